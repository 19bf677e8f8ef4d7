"""Processes that the crash tests SIGKILL: `python -m tests.reliability.crash_workers CMD ...`.

- `push-stalled ROOT BASE ADAPTER NAME MARKER`: the registry CLI's `push`, whose copy of the
  weights file stops half-way (after writing the first half into staging), touches MARKER
  and hangs until killed.
- `push-loop ROOT BASE ADAPTER NAME`: the registry CLI's `push`, again and again, until
  killed (wherever the kill lands).
- `serve-jobs JOBS REGISTRY BASE PORT`: an HTTP server with the fine-tuning routes over the
  fake trainer, its job runner started, until killed.
- `serve-stalling ROOT BASE PORT POINT MARKER`: the real server (tiny engine, registry) whose
  adapter uploads reach registry write step POINT (`staged`, `allocated`, `published`),
  touch MARKER and hang there until the server is killed.
"""

from __future__ import annotations

import io
import sys
import time
from pathlib import Path
from typing import Any, BinaryIO


def _push_argv(root: str, base: str, adapter: str, name: str) -> list[str]:
    return [
        "registry",
        "push",
        adapter,
        "--name",
        name,
        "--registry",
        root,
        "--base-model",
        base,
        "--base-model-id",
        "tiny-base",
    ]


class _StallHalfWay(io.RawIOBase):
    """A reader that hands out the first half of `inner`, then touches `marker` and hangs."""

    def __init__(self, inner: BinaryIO, size: int, marker: Path) -> None:
        self.inner, self.half, self.marker, self.given = inner, size // 2, marker, 0

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        if self.given >= self.half:
            self.marker.write_text("stalled")
            time.sleep(600)
        chunk = self.inner.read(self.half - self.given)
        self.given += len(chunk)
        return chunk


def push_stalled(root: str, base: str, adapter: str, name: str, marker: str) -> int:
    from adapterhub_server.registry import cli
    from adapterhub_server.registry import registry as registry_module

    original = registry_module._copy_stream

    def copy_stream(src: BinaryIO, dest: Path, budget: Any) -> Any:
        if dest.name == "adapter_model.safetensors":
            size = Path(adapter, dest.name).stat().st_size
            src = _StallHalfWay(src, size, Path(marker))  # type: ignore[assignment]
        return original(src, dest, budget)

    registry_module._copy_stream = copy_stream  # type: ignore[assignment]
    return cli.main(_push_argv(root, base, adapter, name))


def push_loop(root: str, base: str, adapter: str, name: str) -> int:
    from adapterhub_server.registry import cli

    while True:
        status = cli.main(_push_argv(root, base, adapter, name))
        if status != 0:
            return status


def serve_jobs(jobs: str, registry: str, base: str, port: str) -> int:
    import uvicorn

    from adapterhub_server.api import create_app
    from adapterhub_server.finetune import BaseModelInfo, FineTuningService
    from tests.api.fake_engine import FakeEngine
    from tests.finetune.conftest import fake_runner

    service = FineTuningService.open(
        Path(jobs),
        base=BaseModelInfo(model_id=FakeEngine().base_model_id, path=Path(base)),
        registry=Path(registry),
        runner=fake_runner(stop_timeout_s=20.0),
    )
    assert service.start(), "another runner holds the jobs directory"
    app = create_app(FakeEngine(), fine_tuning=service)
    # Stopped inside the server's shutdown: uvicorn re-raises SIGTERM once it has shut down,
    # which ends the process before any code after `run` would execute.
    app.router.on_shutdown.append(service.stop)
    uvicorn.run(app, host="127.0.0.1", port=int(port), log_level="warning")
    return 0


def serve_stalling(root: str, base: str, port: str, point: str, marker: str) -> int:
    import uvicorn

    from adapterhub_server.config import EngineConfig, ServerConfig
    from adapterhub_server.server import build_app, build_server

    config = ServerConfig(
        base_model=base,
        served_model_name="tiny-base",
        registry=Path(root),
        fine_tuning=False,
        engine=EngineConfig(max_num_seqs=2, max_loras=1),
    )
    server = build_server(config)

    def stall(reached: str) -> None:
        if reached == point:
            Path(marker).write_text(reached)
            time.sleep(600)

    assert server.registry is not None
    server.registry._hook = stall
    uvicorn.run(
        build_app(server.engine, server), host="127.0.0.1", port=int(port), log_level="warning"
    )
    return 0


COMMANDS = {
    "push-stalled": push_stalled,
    "push-loop": push_loop,
    "serve-jobs": serve_jobs,
    "serve-stalling": serve_stalling,
}

if __name__ == "__main__":
    sys.exit(COMMANDS[sys.argv[1]](*sys.argv[2:]))
