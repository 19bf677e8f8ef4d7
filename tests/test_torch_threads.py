"""`single_threaded`: torch work off the engine's thread starts no OpenMP team of its own
(which would throttle the engine's), and torch's thread count comes back after it."""

from __future__ import annotations

import ctypes
import itertools
import os
import threading
from collections.abc import Callable

import pytest
import torch

from adapterhub_server.torch_threads import single_threaded


def _parallel_torch_work() -> None:
    x = torch.ones(1024, 1024)
    (x @ x).sum()  # an MKL GEMM and a reduction: both run OpenMP parallel regions


_PR_SET_NAME = 15
_probes = itertools.count()


def _threads_named(name: str) -> int:
    count = 0
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                count += f.read().strip() == name
        except FileNotFoundError:  # the thread ended while we looked
            pass
    return count


def _threads_started_by(fn: Callable[[], None]) -> int:
    """OS threads that `fn`, run on a new thread, started (and still alive then).

    The new thread gets a name of its own, and Linux gives a thread its creator's name,
    so threads that other tests' servers and pools start meanwhile do not count.
    """
    name = f"ah-probe-{next(_probes)}"
    seen: list[int] = []

    def run() -> None:
        ctypes.CDLL(None).prctl(_PR_SET_NAME, name.encode(), 0, 0, 0)
        fn()
        seen.append(_threads_named(name) - 1)  # all but this thread

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    return seen[0]


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs Linux /proc")
@pytest.mark.skipif(torch.get_num_threads() < 2, reason="torch runs one thread here")
def test_work_inside_starts_no_openmp_team() -> None:
    # Without it, the thread's own torch work gives it a team of worker threads.
    assert _threads_started_by(_parallel_torch_work) >= 1

    def inside() -> None:
        with single_threaded():
            _parallel_torch_work()

    assert _threads_started_by(inside) == 0


def _count_on_a_new_thread() -> int:
    seen: list[int] = []
    thread = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    thread.start()
    thread.join()
    return seen[0]


def test_each_thread_leaving_puts_the_count_back() -> None:
    """Two threads inside at once: a thread that starts meanwhile begins with one; when
    the first leaves, its count and new threads' are back, the other keeps its one."""
    n = torch.get_num_threads()
    first_in, second_in, first_out = threading.Event(), threading.Event(), threading.Event()
    seen: dict[str, int] = {}

    def second() -> None:
        first_in.wait()
        with single_threaded():
            seen["a new thread while both are inside"] = _count_on_a_new_thread()
            second_in.set()
            first_out.wait()
            seen["the second, after the first left"] = torch.get_num_threads()
            seen["a new thread after the first left"] = _count_on_a_new_thread()

    thread = threading.Thread(target=second)
    thread.start()
    with single_threaded():
        assert torch.get_num_threads() == 1
        first_in.set()
        second_in.wait()
    assert torch.get_num_threads() == n
    first_out.set()
    thread.join()
    assert seen == {
        "a new thread while both are inside": 1,
        "the second, after the first left": 1,
        "a new thread after the first left": n,
    }
    assert torch.get_num_threads() == n
    assert _count_on_a_new_thread() == n


def test_nested_blocks_keep_one_thread_until_the_outermost_leaves() -> None:
    n = torch.get_num_threads()
    with single_threaded():
        with single_threaded():
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == n
