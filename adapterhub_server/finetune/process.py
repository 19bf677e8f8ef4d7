"""One trainer subprocess: how it is started, signalled, recognised and described."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

from adapterhub_server.finetune.job_tables import JobPaths

INTERRUPTED_EXIT = 130
"""The trainer's exit status after SIGINT/SIGTERM (it saves a checkpoint first)."""
BAD_INPUT_EXIT = 2
"""The trainer's exit status for input it refuses (with a `failed` event)."""

_SEGMENT = r"[^\s/'\"`:,;()\[\]{}<>|=]+"
_ABSOLUTE_PATH = re.compile(rf"(?<![\w.:/~-])(?:/{_SEGMENT})*/({_SEGMENT})")
"""A POSIX path of two segments or more, not part of a URL or of a relative path."""


def trainer_argv(command: Sequence[str], paths: JobPaths, *, resume: bool) -> list[str]:
    """The command line of `trainer train` for one job."""
    argv = [
        *command,
        "train",
        "--config",
        str(paths.config),
        "--events",
        str(paths.events),
        "--checkpoint-dir",
        str(paths.checkpoints),
    ]
    if resume:
        argv.append("--resume")
    return argv


def spawn(
    argv: Sequence[str], paths: JobPaths, env: Mapping[str, str], *, die_with_parent: bool = False
) -> subprocess.Popen:
    """Start the trainer with its output appended to the job's log.

    It gets a session (and process group) of its own: the server signals the whole group
    (data-loader workers included), and a Ctrl-C meant for the server's terminal does not
    reach the trainer, which the server stops in order (SIGTERM, checkpoint, requeue).

    `die_with_parent` (Linux): the kernel SIGKILLs the trainer when the thread that started
    it dies, SIGKILL included. A cluster worker needs it: its job resumes on another worker,
    and an orphaned trainer would go on training (and publishing) the same job.
    """
    paths.dir.mkdir(parents=True, exist_ok=True)
    with open(paths.log, "ab") as log:
        return subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=paths.dir,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
            start_new_session=True,
            preexec_fn=_die_with_parent if die_with_parent else None,
        )


_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child before exec: ask for SIGKILL when the parent thread dies."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def signal_group(pid: int, sig: int) -> None:
    """Send `sig` to the trainer's process group; a group that is gone is fine."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def process_identity(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), or None if unknown.

    With the pid it identifies a process for good: after a restart, a recorded pid that the
    kernel has since given to another process is not mistaken for the trainer.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 2 (the command) is parenthesised and may contain spaces: split after it.
    fields = stat[stat.rfind(")") + 2 :].split()
    return fields[19] if len(fields) > 19 else None


def is_alive(pid: int, identity: str | None) -> bool:
    """Whether the process recorded as (pid, identity) still runs (zombies count as gone)."""
    if identity is None:
        return False  # without an identity a reused pid cannot be ruled out: never signal it
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    state = stat[stat.rfind(")") + 2 :].split()[0]
    return state != "Z" and process_identity(pid) == identity


def describe_exit(returncode: int) -> str:
    """`exit status 1` / `killed by SIGKILL`."""
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit status {returncode}"


def log_tail(path: Path, *, lines: int = 5, max_chars: int = 1000) -> str:
    """The last non-empty lines of the trainer's log, for error messages."""
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - 16384))
            text = handle.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    kept = [line.rstrip() for line in text.splitlines() if line.strip()][-lines:]
    return "\n".join(kept)[-max_chars:]


def redact_paths(text: str) -> str:
    """`text` with each absolute path cut to its last segment: what error messages, job
    errors and events show clients (the trainer names files by their server paths, and a
    traceback names the installation's)."""
    return _ABSOLUTE_PATH.sub(_last_segment, text)


def _last_segment(match: re.Match[str]) -> str:
    whole = match.group(0)
    # One segment ("/tmp", "a / b") is no path worth hiding and may be plain text.
    return match.group(1) if whole.count("/") > 1 else whole
