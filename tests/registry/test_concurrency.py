"""Several writer processes at once, and writers killed (SIGKILL) in the middle of a push."""

from __future__ import annotations

import multiprocessing
import os
import signal
import sqlite3
import time
from pathlib import Path

import pytest

from adapterhub_server.registry import BaseModelSpec, Registry
from tests.registry import workers

# spawn, not fork: the test process has run torch (OpenMP threads), which fork can deadlock.
CTX = multiprocessing.get_context("spawn")


@pytest.mark.parametrize("journal_mode", ["wal", "delete"])
def test_concurrent_pushes_get_distinct_versions(
    registry_root: Path,
    base_spec: BaseModelSpec,
    tiny_base: Path,
    adapter_dir: Path,
    journal_mode: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # `delete` is the mode for an index shared over network storage; the child processes
    # inherit the environment, as every process of a deployment must.
    monkeypatch.setenv("ADAPTERHUB_REGISTRY_JOURNAL_MODE", journal_mode)
    procs, per_proc = 4, 3
    Registry.open(registry_root).close()  # created up front; workers race on writes only
    barrier = CTX.Barrier(procs)
    queue = CTX.Queue()
    children = [
        CTX.Process(
            target=workers.push_many,
            args=(
                str(registry_root),
                str(tiny_base),
                str(adapter_dir),
                "shared",
                per_proc,
                barrier,
                queue,
            ),
        )
        for _ in range(procs)
    ]
    for child in children:
        child.start()
    results = [queue.get(timeout=300) for _ in children]
    for child in children:
        child.join(timeout=60)
        assert child.exitcode == 0

    got = sorted(v for versions in results for v in versions)
    assert got == list(range(1, procs * per_proc + 1))
    for versions in results:
        assert versions == sorted(versions)  # each writer sees its own numbers increase
    registry = Registry.open(registry_root, base=base_spec)
    assert [r.version for r in registry.versions("shared")] == got
    assert registry.index.pending() == []
    report = registry.verify()
    assert report.ok and report.checked == procs * per_proc
    assert list((registry_root / ".staging").iterdir()) == []
    with sqlite3.connect(registry_root / "registry.db") as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == journal_mode


def _start_hung_writer(root: Path, tiny_base: Path, adapter_dir: Path, point: str, tmp: Path):
    marker = tmp / f"reached-{point}"
    child = CTX.Process(
        target=workers.push_and_hang,
        args=(str(root), str(tiny_base), str(adapter_dir), "sql", point, str(marker)),
    )
    child.start()
    deadline = time.monotonic() + 180
    while not marker.exists():
        assert child.is_alive(), "writer exited before reaching the hook"
        assert time.monotonic() < deadline, "writer never reached the hook"
        time.sleep(0.05)
    return child


@pytest.mark.parametrize(
    ("point", "number_used"),
    [
        ("staged", False),  # files staged and validated; no version number yet
        ("allocated", True),  # pending row committed; files not yet renamed into place
        ("published", True),  # files renamed into adapters/sql/1; index row still pending
    ],
)
def test_killed_writer_leaves_registry_consistent(
    registry_root: Path,
    base_spec: BaseModelSpec,
    tiny_base: Path,
    adapter_dir: Path,
    tmp_path: Path,
    point: str,
    number_used: bool,
) -> None:
    registry = Registry.open(registry_root, base=base_spec)
    registry.push(adapter_dir, "other")  # an unrelated, committed version must survive

    child = _start_hung_writer(registry_root, tiny_base, adapter_dir, point, tmp_path)
    try:
        # While the writer is alive, opening (recovery) and gc must leave its work alone.
        observer = Registry.open(registry_root)
        assert observer.gc().discarded_pending == ()
        assert [i.name for i in observer.list_adapters()] == ["other"]
        if number_used:
            assert [p.version for p in observer.index.pending()] == [1]
        if point == "published":
            assert (registry_root / "adapters" / "sql" / "1").is_dir()
        assert any((registry_root / ".staging").iterdir())
        observer.close()
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.join(timeout=30)
    assert child.exitcode == -signal.SIGKILL

    # The kill leaves no visible partial version, whatever the next process does first.
    assert [i.name for i in registry.list_adapters()] == ["other"]
    reopened = Registry.open(registry_root, base=base_spec)  # opening cleans up
    assert reopened.index.pending() == []
    assert not (registry_root / "adapters" / "sql" / "1").exists()
    assert list((registry_root / ".staging").iterdir()) == []
    assert [i.name for i in reopened.list_adapters()] == ["other"]
    assert reopened.verify().ok

    record = reopened.push(adapter_dir, "sql")
    assert record.version == (2 if number_used else 1)  # a used number is never handed out again
    assert reopened.resolve("sql").key == record.key
    assert reopened.verify().ok
    assert reopened.gc().removed == ()
    reopened.close()
    registry.close()


def test_concurrent_pushes_from_threads(registry: Registry, adapter_dir: Path) -> None:
    """The server pushes from a thread pool: one Registry shared by threads."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=4) as pool:
        versions = list(
            pool.map(lambda _: registry.push(adapter_dir, "threaded").version, range(8))
        )
    assert sorted(versions) == list(range(1, 9))
    assert registry.verify().ok
    assert registry.index.pending() == []


def test_journal_mode_must_be_known_and_shared(
    registry_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from adapterhub_server.registry.errors import RegistryError

    monkeypatch.setenv("ADAPTERHUB_REGISTRY_JOURNAL_MODE", "memory")
    with pytest.raises(RegistryError, match="expected one of"):
        Registry.open(registry_root)
    monkeypatch.setenv("ADAPTERHUB_REGISTRY_JOURNAL_MODE", "wal")
    holder = Registry.open(registry_root)
    holder.list_adapters()  # keeps a WAL connection open, as a running server does
    monkeypatch.setenv("ADAPTERHUB_REGISTRY_JOURNAL_MODE", "delete")
    # A process configured differently cannot flip the mode under a live one.
    with pytest.raises(Exception, match=r"lock|journal mode"):
        Registry.open(registry_root, busy_timeout_s=0.5)
    holder.close()
