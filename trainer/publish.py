"""Save the trained adapter in PEFT format and push it into the registry with its lineage."""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from adapterhub_server.base_model import ResolvedBaseModel
from adapterhub_server.registry import (
    BaseModelSpec,
    Lineage,
    Registry,
    VersionRecord,
    default_registry_location,
)
from trainer.config import TrainConfig
from trainer.extract import Extraction
from trainer.kinds import describe_kind
from trainer.loop import TrainResult


def package_versions() -> dict[str, str]:
    """Versions of the packages that shape the result."""
    import adapterhub_server

    out = {"adapterhub": adapterhub_server.__version__, "torch": torch.__version__}
    for name in ("transformers", "peft"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[name] = importlib.metadata.version(name)
    return out


def hardware(device: torch.device) -> dict[str, Any]:
    """What the run ran on: device type and name, CPU count."""
    info: dict[str, Any] = {"device": device.type, "cpu_count": os.cpu_count()}
    if device.type == "cuda":
        info["name"] = torch.cuda.get_device_name(device)
        info["count"] = torch.cuda.device_count()
    else:
        info["name"] = platform.processor() or platform.machine()
    return info


MAX_HISTORY_POINTS = 500
"""Loss points kept in lineage: the registry caps lineage at 64 KiB of JSON."""


def thin(
    points: list[tuple[int, float]], limit: int = MAX_HISTORY_POINTS
) -> list[tuple[int, float]]:
    """At most `limit` evenly spaced points, always the first and the last."""
    if len(points) <= limit:
        return list(points)
    last = len(points) - 1
    picks = sorted({round(i * last / (limit - 1)) for i in range(limit)})
    return [points[i] for i in picks]


def build_lineage(
    config: TrainConfig,
    result: TrainResult,
    dataset_sha256: str,
    device: torch.device,
    *,
    world_size: int = 1,
    eval_sha256: str | None = None,
    extraction: Extraction | None = None,
) -> Lineage:
    extra: dict[str, Any] = {
        "method": config.method,
        "train_loss_history": [[step, loss] for step, loss in thin(result.losses)],
        "steps": result.steps,
        "trained_tokens": result.trained_tokens,
        "world_size": world_size,
    }
    if result.eval_losses:
        extra["eval_loss"] = result.eval_loss
        extra["eval_loss_history"] = [[s, v] for s, v in thin(result.eval_losses)]
        extra["eval_dataset_sha256"] = eval_sha256
    if result.resumed_from_step:
        extra["resumed_from_step"] = result.resumed_from_step
    if extraction is not None:
        extra["extraction"] = {
            "rank": extraction.rank,
            "energy": round(extraction.energy, 6),
            "energy_by_module": extraction.energy_by_module(),
            "untracked_relative_change": {
                k: round(v, 6) for k, v in sorted(extraction.untracked.items())[:64]
            },
        }
    return Lineage(
        dataset_sha256=dataset_sha256,
        hyperparameters=config.to_dict(lineage=True),
        train_loss=result.final_loss,
        package_versions=package_versions(),
        hardware=hardware(device) | {"world_size": world_size},
        wall_time_s=round(result.wall_time_s, 3),
        extra=extra,
    )


def save_adapter(model: Any, directory: Path) -> Path:
    """Write the PEFT directory (adapter_config.json + adapter_model.safetensors)."""
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    return directory


def save_full_model(model: Any, tokenizer: Any, directory: Path) -> Path:
    """Write the fine-tuned model as a loadable HF directory (safetensors + config + tokenizer)."""
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


def publish_adapter(
    write: Callable[[Path], Path],
    config: TrainConfig,
    base: ResolvedBaseModel,
    lineage: Lineage,
    description: str,
) -> VersionRecord:
    """Push the adapter `write(dir)` produces as a new version of `config.name`."""
    spec = BaseModelSpec.from_directory(base.path, base.model_id)
    with (
        Registry.open(
            config.registry or default_registry_location(), base=spec, blobs=config.registry_blobs
        ) as registry,
        tempfile.TemporaryDirectory(prefix="adapterhub-trainer-") as tmp,
    ):
        # Pushed from a fresh directory: --output-dir may hold files from earlier runs.
        source = write(Path(tmp) / "adapter")
        return registry.push(
            source,
            str(config.name),
            alias=config.alias,
            description=description,
            lineage=lineage,
        )


def describe(config: TrainConfig, base: ResolvedBaseModel, steps: int, rank: int) -> str:
    if config.description:
        return config.description
    what = (
        f"LoRA r={config.r} alpha={config.alpha:g}"
        if config.is_lora
        else f"LoRA r={rank} extracted by SVD from a full fine-tune"
    )
    kind = describe_kind(config)
    if kind:
        what += f" ({kind})"
    return f"{what} on {base.model_id}, trained on {config.data.name} ({steps} steps)"
