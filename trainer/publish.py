"""Save the trained adapter in PEFT format and push it into the registry with its lineage."""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
import tempfile
from pathlib import Path
from typing import Any

import torch

from adapterhub_server.base_model import ResolvedBaseModel
from adapterhub_server.registry import BaseModelSpec, Lineage, Registry, VersionRecord
from adapterhub_server.registry.registry import default_registry_dir
from trainer.config import TrainConfig
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
    config: TrainConfig, result: TrainResult, dataset_sha256: str, device: torch.device
) -> Lineage:
    return Lineage(
        dataset_sha256=dataset_sha256,
        hyperparameters=config.to_dict(),
        train_loss=result.final_loss,
        package_versions=package_versions(),
        hardware=hardware(device),
        wall_time_s=round(result.wall_time_s, 3),
        extra={
            "train_loss_history": [[step, loss] for step, loss in thin(result.losses)],
            "steps": result.steps,
            "trained_tokens": result.trained_tokens,
        },
    )


def save_adapter(model: Any, directory: Path) -> Path:
    """Write the PEFT directory (adapter_config.json + adapter_model.safetensors)."""
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    return directory


def publish(
    model: Any,
    config: TrainConfig,
    base: ResolvedBaseModel,
    lineage: Lineage,
) -> VersionRecord | None:
    """Save to `config.output_dir` (if set) and push to the registry (if `config.name` is set).

    Returns the pushed version's record, or None when nothing was pushed.
    """
    if config.output_dir is not None:
        save_adapter(model, config.output_dir)
    if config.name is None:
        return None
    description = config.description or (
        f"LoRA r={config.r} alpha={config.alpha:g} on {base.model_id}, "
        f"trained on {config.data.name} ({lineage.extra.get('steps')} steps)"
    )
    spec = BaseModelSpec.from_directory(base.path, base.model_id)
    with (
        Registry.open(config.registry or default_registry_dir(), base=spec) as registry,
        tempfile.TemporaryDirectory(prefix="adapterhub-trainer-") as tmp,
    ):
        # Pushed from a fresh directory: --output-dir may hold files from earlier runs.
        source = save_adapter(model, Path(tmp) / "adapter")
        return registry.push(
            source,
            config.name,
            alias=config.alias,
            description=description,
            lineage=lineage,
        )
