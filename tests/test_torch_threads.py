"""`single_threaded`: torch work off the engine's thread starts no OpenMP team of its own
(which would throttle the engine's), and torch's thread count comes back after it."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable

import pytest
import torch

from adapterhub_server.torch_threads import single_threaded


def _os_threads() -> set[str]:
    return set(os.listdir("/proc/self/task"))


def _parallel_torch_work() -> None:
    x = torch.ones(1024, 1024)
    (x @ x).sum()  # an MKL GEMM and a reduction: both run OpenMP parallel regions


def _threads_started_by(fn: Callable[[], None]) -> int:
    """OS threads started while `fn` ran on a new thread (still alive then); threads of
    earlier tests that end meanwhile do not count."""
    go, done, leave = threading.Event(), threading.Event(), threading.Event()

    def run() -> None:
        go.wait()
        fn()
        done.set()
        leave.wait()

    thread = threading.Thread(target=run)
    thread.start()
    before = _os_threads()
    go.set()
    done.wait()
    after = _os_threads()
    leave.set()
    thread.join()
    return len(after - before)


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
