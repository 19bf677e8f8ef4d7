"""Shared helpers for the benchmarks: timing, peak memory, and the machine description."""

from __future__ import annotations

import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def median_us(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of `fn` in microseconds, after one warm-up call."""
    fn()
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples) * 1e6


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far, in MiB (`getrusage` high-water mark)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024


def cpu_model() -> str:
    """The CPU's marketing name where /proc/cpuinfo has it, else `platform.processor()`."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    """What a benchmark figure depends on: CPU, cores, load, torch build and threads, GPU."""
    import torch

    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    if hasattr(os, "getloadavg"):
        info["loadavg_1_5_15"] = [round(x, 2) for x in os.getloadavg()]
    return info


def source_state(tree: Path | None = None) -> dict[str, Any]:
    """Which code a figure was measured with: the tree's commit and its uncommitted files
    under ``adapterhub_server/`` (None where git cannot tell)."""
    import subprocess

    tree = tree or Path(__file__).resolve().parent.parent

    def git(*args: str) -> str | None:
        try:
            proc = subprocess.run(
                ["git", *args], cwd=tree, capture_output=True, text=True, timeout=30
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
        return proc.stdout if proc.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--", "adapterhub_server")
    return {
        "commit": commit.strip() if commit else None,
        "uncommitted": [line[3:] for line in status.splitlines()] if status is not None else None,
    }


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The median of every numeric field over repeated runs of one configuration (booleans
    and other fields are left out), plus `runs`: how many there were."""
    keys = [k for k, v in runs[0].items() if isinstance(v, int | float) and not isinstance(v, bool)]
    out: dict[str, Any] = {k: statistics.median(r[k] for r in runs) for k in keys}
    out["runs"] = len(runs)
    return out


def cpu_run_title(meta: dict[str, Any], workload: str) -> str:
    """A CPU benchmark plot's title: the model, the threads and `workload`."""
    return f"{meta['model'].split('/')[-1]}, CPU ({meta['torch_threads']} threads): {workload}"


def save_figure(fig: Any, path: Path, *, dpi: int = 120) -> None:
    """Lay out and write a matplotlib figure, and say where."""
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    print(f"wrote {path}")
