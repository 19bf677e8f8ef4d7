"""Torch work off the engine's thread runs on one intra-op thread.

GNU OpenMP, torch's intra-op runtime on Linux, gives every thread that runs a parallel
region a team of worker threads of its own, kept for that thread's life. Once the process
holds more OpenMP threads than it has CPUs, libgomp throttles every team's spin-wait
(from about 3 ms of spinning to 100 spins): the engine's workers then fall asleep between
the hundreds of parallel regions of a decode step, and the engine thread wakes them
through the kernel each time. Measured on the default model on 2 cores: after one adapter
merge on the loader thread (which built that thread a team), a decode step of 16 sequences
went from 65 to 86 ms without adapters, and from 77 to 109 ms with 8, for the rest of the
process's life.

Work off the engine's thread (reading and merging adapters, whichever thread asks; the
registry's checks of a push) is small beside a decode step, so it runs inside
`single_threaded`, and its threads never start a team.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch

_lock = threading.Lock()
_inside = 0
"""Threads inside `single_threaded` now."""
_restore = 0
"""torch's thread count when the first of them entered."""
_depth = threading.local()
"""This thread's nesting of `single_threaded` blocks."""


@contextmanager
def single_threaded() -> Iterator[None]:
    """Run the block's torch ops on this thread alone (no OpenMP team of its own); any
    thread, nested blocks allowed.

    ``torch.set_num_threads`` sets the calling thread's count and also the count a thread
    that starts using torch later begins with. Each thread leaving its outermost block puts
    the count from before the first thread entered back, for itself and for threads to
    come; a thread still inside keeps its one. Only a thread that starts using torch while
    a block runs begins with one (the engine's thread has long started then: it builds the
    engine).
    """
    global _inside, _restore
    depth = getattr(_depth, "n", 0)
    _depth.n = depth + 1
    if depth:
        try:
            yield
        finally:
            _depth.n = depth
        return
    with _lock:
        # Asked first, also on a thread already inside: torch gives a thread its count at
        # its first use, from the process's, which would undo a 1 set before that.
        count = torch.get_num_threads()
        if _inside == 0:
            _restore = count
        _inside += 1
        torch.set_num_threads(1)
    try:
        yield
    finally:
        _depth.n = 0
        with _lock:
            _inside -= 1
            torch.set_num_threads(_restore)
