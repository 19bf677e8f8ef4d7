"""Machine-readable progress events of a training run, one JSON object per line.

`trainer train --events FILE` appends them; the server's fine-tuning jobs tail the file into
their event log. Each line is

    {"time": <unix seconds>, "type": <str>, "level": "info"|"warning"|"error",
     "message": <human-readable str>, "data": {...}}

Types and their `data`:

- `started`: total_steps, examples, eval_examples, trainable_parameters, total_parameters,
  method, device, resumed_from_step (0 for a fresh run)
- `metrics`: step, total_steps, train_loss, lr, tokens_per_s, elapsed_s, eta_s
- `eval`: step, eval_loss
- `checkpoint`: step, path
- `interrupted`: step, checkpoint (path, or null when nothing could be saved)
- `extracted`: rank, energy (overall retained Frobenius energy), modules (how many)
- `published`: ref (`name@version`), alias (or null)
- `succeeded`: steps, trained_tokens, train_loss, eval_loss, ref, output_dir, wall_time_s
- `failed`: error (the message)
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


class EventLog:
    """Appends events to a JSONL file; does nothing without a path.

    Each line is written with one `write` and flushed, so a reader tailing the file never sees
    a torn line from a live writer (a killed writer may leave one partial last line, which
    readers skip).
    """

    def __init__(self, path: Path | None) -> None:
        self.path = Path(path) if path is not None else None
        self._handle = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._handle = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - held open

    def emit(self, type_: str, message: str, *, level: str = "info", **data: Any) -> None:
        if self._handle is None:
            return
        line = json.dumps(
            {"time": time.time(), "type": type_, "level": level, "message": message, "data": data},
            allow_nan=False,
            default=str,
        )
        self._handle.write(line + "\n")
        self._handle.flush()
        os.fsync(self._handle.fileno())

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


def read_events(path: Path, offset: int = 0) -> tuple[list[dict[str, Any]], int]:
    """Complete event lines from byte `offset` on; returns (events, next offset).

    A trailing partial line (no newline yet) is left for the next call.
    """
    events: list[dict[str, Any]] = []
    try:
        with open(path, "rb") as handle:
            handle.seek(offset)
            data = handle.read()
    except FileNotFoundError:
        return events, offset
    end = data.rfind(b"\n") + 1
    # `\n` only: what ends a line the writer wrote; `splitlines` also splits at `\r`.
    for raw in data[:end].split(b"\n"):
        if not raw.strip():
            continue
        try:
            event = json.loads(raw)
        except ValueError:
            logger.warning("skipping unreadable event line in %s", path)
            continue
        if isinstance(event, dict):
            events.append(event)
    return events, offset + end
