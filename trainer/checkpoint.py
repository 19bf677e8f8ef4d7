"""Save and restore a run mid-way: trainable weights, AdamW state, schedule, RNG, progress.

Everything is safetensors or JSON, never pickle, so a checkpoint from anywhere can be
resumed without running code from it. Layout of `<checkpoint_dir>/step-<N>/`:

- `trainable.safetensors`: the trainable parameters by name;
- `optimizer.safetensors` + the `optimizer` entry of the state file: AdamW's per-parameter
  tensors (`<i>.exp_avg`, `<i>.exp_avg_sq`, `<i>.step`) and its param groups;
- `rng.safetensors`: the CPU (and CUDA) generator states, for dropout;
- `trainer_state.json`: step, progress counters, histories, schedule state and the
  fingerprint of the settings a resume must share; written last, it marks the checkpoint
  complete.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from trainer.checkpoint_paths import STATE_FILE, checkpoint_dir_for_step
from trainer.config import TrainConfigError
from trainer.sharding import full_tensor, shard_like

logger = logging.getLogger(__name__)


@dataclass
class Progress:
    """Counters and histories a run accumulates; saved in every checkpoint."""

    step: int = 0
    trained_tokens: int = 0
    seen_tokens: int = 0
    wall_time_s: float = 0.0
    losses: list[tuple[int, float]] = field(default_factory=list)
    """(step, mean train loss since the previous entry)."""
    eval_losses: list[tuple[int, float]] = field(default_factory=list)
    """(step, eval loss)."""

    def to_json(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "trained_tokens": self.trained_tokens,
            "seen_tokens": self.seen_tokens,
            "wall_time_s": self.wall_time_s,
            "losses": [list(p) for p in self.losses],
            "eval_losses": [list(p) for p in self.eval_losses],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Progress:
        return cls(
            step=int(data["step"]),
            trained_tokens=int(data["trained_tokens"]),
            seen_tokens=int(data["seen_tokens"]),
            wall_time_s=float(data["wall_time_s"]),
            losses=[(int(s), float(v)) for s, v in data["losses"]],
            eval_losses=[(int(s), float(v)) for s, v in data["eval_losses"]],
        )


def save_checkpoint(
    checkpoint_dir: Path,
    *,
    params: Sequence[tuple[str, nn.Parameter]],
    optimizer: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler,
    progress: Progress,
    fingerprint: dict[str, Any],
    write: bool = True,
) -> Path | None:
    """Write `step-<progress.step>/` (replacing a partial one) and return its path.

    Under FSDP every rank must call this (sharded tensors are gathered); only the one with
    `write` writes, and the others get None.
    """
    weights = {name: full_tensor(p).contiguous() for name, p in params}
    index = {id(p): i for i, (_, p) in enumerate(params)}
    tensors: dict[str, torch.Tensor] = {}
    for p, state in optimizer.state.items():
        i = index[id(p)]
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{i}.{key}"] = full_tensor(value).contiguous()
    if not write:
        return None
    target = checkpoint_dir_for_step(checkpoint_dir, progress.step)
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    save_file(weights, target / "trainable.safetensors")
    save_file(tensors, target / "optimizer.safetensors")
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for d, state in enumerate(torch.cuda.get_rng_state_all()):
            rng[f"cuda.{d}"] = state
    save_file(rng, target / "rng.safetensors")
    groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    state = {
        "progress": progress.to_json(),
        "optimizer": {"param_groups": groups},
        "schedule": schedule.state_dict(),
        "fingerprint": fingerprint,
    }
    _write_json_durably(target / STATE_FILE, state)
    return target


def load_checkpoint(
    path: Path,
    *,
    params: Sequence[tuple[str, nn.Parameter]],
    optimizer: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler,
    fingerprint: dict[str, Any],
) -> Progress:
    """Restore everything `save_checkpoint` wrote into live objects; returns the progress.

    Raises:
        TrainConfigError: the checkpoint was made with settings that change the result.
    """
    state = json.loads((path / STATE_FILE).read_text())
    saved = state["fingerprint"]
    changed = sorted(k for k in set(saved) | set(fingerprint) if saved.get(k) != fingerprint.get(k))
    if changed:
        raise TrainConfigError(
            f"resume: the checkpoint {path} was made with different settings "
            f"({', '.join(changed)}); start a fresh run or restore them",
            param="resume",
        )
    weights = load_file(path / "trainable.safetensors")
    names = {name for name, _ in params}
    if set(weights) != names:
        raise TrainConfigError(
            f"resume: {path} holds other trainable parameters than this model", param="resume"
        )
    with torch.no_grad():
        for name, p in params:
            p.copy_(shard_like(weights[name], p))
    tensors = load_file(path / "optimizer.safetensors")
    per_param: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        i, name = key.split(".", 1)
        param = params[int(i)][1]
        # AdamW's moments have the parameter's shape (and, under FSDP, its sharding).
        if value.shape == param.shape:
            value = shard_like(value, param)
        per_param.setdefault(int(i), {})[name] = value
    groups = state["optimizer"]["param_groups"]
    # Param indices follow `params` order: one group holds them all (see the loop).
    groups[0]["params"] = list(range(len(params)))
    optimizer.load_state_dict({"state": per_param, "param_groups": groups})
    schedule.load_state_dict(state["schedule"])
    rng = load_file(path / "rng.safetensors")
    torch.set_rng_state(rng["cpu"])
    cuda_states = [rng[f"cuda.{d}"] for d in range(torch.cuda.device_count()) if f"cuda.{d}" in rng]
    if cuda_states:
        torch.cuda.set_rng_state_all(cuda_states)
    progress = Progress.from_json(state["progress"])
    logger.info("resumed from %s (step %d)", path, progress.step)
    return progress


def remove_checkpoints(checkpoint_dir: Path) -> None:
    """Delete every `step-*` directory this trainer made (and nothing else)."""
    if not checkpoint_dir.is_dir():
        return
    for child in checkpoint_dir.iterdir():
        if child.is_dir() and child.name.startswith("step-"):
            shutil.rmtree(child, ignore_errors=True)
    with contextlib.suppress(OSError):  # other files live there: leave the directory
        checkpoint_dir.rmdir()


def prune_checkpoints(checkpoint_dir: Path, keep: Path) -> None:
    """Delete the `step-*` directories other than `keep`: only the latest is needed to resume."""
    for child in checkpoint_dir.iterdir():
        if child.is_dir() and child.name.startswith("step-") and child != keep:
            shutil.rmtree(child, ignore_errors=True)


def _write_json_durably(path: Path, data: dict[str, Any]) -> None:
    """Write, fsync the data files and the JSON, then rename: the state file appears last and
    whole, so its presence means the checkpoint is complete."""
    for sibling in path.parent.iterdir():
        with open(sibling, "rb") as handle:
            os.fsync(handle.fileno())
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as handle:
        json.dump(data, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
