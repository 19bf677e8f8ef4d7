"""Where checkpoints live and which one is the latest complete one.

A checkpoint is a directory `<checkpoint_dir>/step-<8-digit step>/`; `trainer_state.json` is
written into it last, so a directory without that file is incomplete (the run died while
saving) and is ignored.
"""

from __future__ import annotations

import re
from pathlib import Path

STATE_FILE = "trainer_state.json"
_STEP_DIR = re.compile(r"step-(\d{8})")


def checkpoint_dir_for_step(checkpoint_dir: Path, step: int) -> Path:
    return Path(checkpoint_dir) / f"step-{step:08d}"


def latest_checkpoint(checkpoint_dir: Path | None) -> Path | None:
    """The complete checkpoint with the highest step under `checkpoint_dir`, or None."""
    if checkpoint_dir is None or not Path(checkpoint_dir).is_dir():
        return None
    best: tuple[int, Path] | None = None
    for child in Path(checkpoint_dir).iterdir():
        match = _STEP_DIR.fullmatch(child.name)
        if match and (child / STATE_FILE).is_file():
            step = int(match.group(1))
            if best is None or step > best[0]:
                best = (step, child)
    return best[1] if best else None
