"""A stand-in for `trainer train` that speaks the same contract in milliseconds, for runner tests.

`fake_trainer.py train --config FILE --events FILE --checkpoint-dir DIR [--resume]`

It reads `name` and `max_steps` from the config and behaves according to the name's prefix:

- `ok...`: emits started, one metrics event per step, published (`<name>@<attempt>`) and
  succeeded; exit 0.
- `slow...`: like `ok` but sleeps 0.1 s per step; on SIGTERM it saves a checkpoint
  (`step-N/trainer_state.json`), emits checkpoint + interrupted and exits 130.
- `bad...`: a `failed` event and a message on stderr; exit 2 (bad input).
- `crash...`: a traceback on stderr; exit 1.
- `nopub...`: succeeds without publishing anything.
- `leakevent...`: like `bad`, its message naming the job's files by absolute path.
- `leaklog...`: like `crash`, the traceback naming absolute paths.

Every start appends its argv to `calls.jsonl` in the working directory (the job directory).
Standard library only, so it starts instantly.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path


def emit(events: Path, type_: str, message: str, level: str = "info", **data: object) -> None:
    line = json.dumps(
        {"time": time.time(), "type": type_, "level": level, "message": message, "data": data}
    )
    with open(events, "a", encoding="utf-8") as handle:
        handle.write(line + "\n")


def latest_step(checkpoints: Path) -> int:
    steps = [
        int(d.name.split("-")[1])
        for d in checkpoints.glob("step-*")
        if (d / "trainer_state.json").is_file()
    ]
    return max(steps, default=0)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("command", choices=["train"])
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--events", type=Path, required=True)
    parser.add_argument("--checkpoint-dir", type=Path, required=True)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()
    with open("calls.jsonl", "a", encoding="utf-8") as calls:
        calls.write(json.dumps(sys.argv[1:]) + "\n")
    config = json.loads(args.config.read_text())
    name = config["name"]
    total = config.get("max_steps") or 2
    events = args.events
    start = latest_step(args.checkpoint_dir) if args.resume else 0
    attempt = len(Path("calls.jsonl").read_text(encoding="utf-8").splitlines())

    if name.startswith("bad"):
        emit(events, "failed", "data.jsonl:3: invalid JSON", "error", error="data.jsonl:3: bad")
        print("trainer: error: data.jsonl:3: bad", file=sys.stderr)
        return 2
    if name.startswith("leakevent"):
        where = f"{args.config.resolve()} and {args.checkpoint_dir.resolve()}"
        emit(events, "failed", f"cannot read {where}", "error", error=f"cannot read {where}")
        return 2
    if name.startswith("leaklog"):
        print(
            f'Traceback (most recent call last):\n  File "{Path(__file__).resolve()}", line 1\n'
            f"OSError: cannot write {args.checkpoint_dir.resolve()}/step-1",
            file=sys.stderr,
        )
        return 1
    if name.startswith("crash"):
        print("Traceback (most recent call last):\nRuntimeError: boom", file=sys.stderr)
        return 1

    step = start
    stopping = False

    def on_term(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_term)
    emit(events, "started", f"training {total} steps", total_steps=total, resumed_from_step=start)
    while step < total:
        if stopping:
            path = args.checkpoint_dir / f"step-{step:08d}"
            path.mkdir(parents=True, exist_ok=True)
            (path / "trainer_state.json").write_text(json.dumps({"step": step}))
            emit(
                events, "checkpoint", f"checkpoint saved at step {step}", step=step, path=str(path)
            )
            emit(
                events,
                "interrupted",
                f"interrupted at step {step}",
                step=step,
                checkpoint=str(path),
            )
            return 130
        step += 1
        if name.startswith("slow"):
            time.sleep(0.1)
        emit(
            events,
            "metrics",
            f"step {step}/{total}",
            step=step,
            total_steps=total,
            train_loss=1.0 / step,
            eta_s=(total - step) * 0.1,
        )
    ref = None
    if not name.startswith("nopub"):
        ref = f"{name}@{attempt}"
        emit(events, "published", f"published {ref}", ref=ref, alias=None)
    emit(events, "succeeded", "training finished", steps=step, trained_tokens=10 * step, ref=ref)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
