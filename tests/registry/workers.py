"""Entry points for child processes in registry tests (importable, for the spawn start method)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from adapterhub_server.registry import BaseModelSpec, Registry


def _open(root: str, base_dir: str) -> Registry:
    return Registry.open(root, base=BaseModelSpec.from_directory(Path(base_dir), "tiny-llama"))


def push_many(
    root: str, base_dir: str, adapter_dir: str, name: str, count: int, barrier: Any, queue: Any
) -> None:
    """Push `count` versions of `name`, starting together with the other workers."""
    registry = _open(root, base_dir)
    barrier.wait(timeout=120)
    versions = [registry.push(adapter_dir, name).version for _ in range(count)]
    registry.close()
    queue.put(versions)


def push_and_hang(
    root: str, base_dir: str, adapter_dir: str, name: str, point: str, marker: str
) -> None:
    """Push, but stop at hook `point`: write `marker`, then sleep until killed."""
    registry = _open(root, base_dir)

    def hook(reached: str) -> None:
        if reached == point:
            Path(marker).write_text(reached)
            time.sleep(600)

    registry._hook = hook
    registry.push(adapter_dir, name)
