"""The registry on a shared backend: PostgreSQL index plus S3 (moto) or file:// blobs.

The behaviour tests run against the embedded directory registry too, so every backend is
held to one contract. Services are real processes started once per session.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from adapterhub_server.registry import (
    AdapterVersionNotFoundError,
    BaseModelSpec,
    Registry,
    RegistryError,
    VersionConflictError,
)
from adapterhub_server.registry.errors import AliasNotFoundError
from adapterhub_server.registry.factory import open_registry
from adapterhub_server.registry.postgres_index import PostgresIndex, redact_url
from tests.registry import cluster_services as services
from tests.registry import workers

CTX = multiprocessing.get_context("spawn")

pytestmark = pytest.mark.skipif(
    services.pg_bin() is None,
    reason="PostgreSQL binaries (initdb, pg_ctl) are not installed; scripts/test.sh installs "
    "them when run as root",
)


@pytest.fixture
def shared(
    request: pytest.FixtureRequest,
    pg_url: str,
    s3_env: dict[str, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> tuple[str, str]:
    """(index URL, blobs URL) of a fresh shared registry; the blobs URL is also exported as
    $ADAPTERHUB_REGISTRY_BLOBS so child processes opening the URL find it."""
    kind = getattr(request, "param", "s3")
    db = services.create_database(pg_url)
    if kind == "s3":
        blobs = f"s3://{services.create_bucket(s3_env)}/reg"
    else:
        blobs = f"file://{tmp_path / 'blobs'}"
    monkeypatch.setenv("ADAPTERHUB_REGISTRY_BLOBS", blobs)
    monkeypatch.setenv("ADAPTERHUB_REGISTRY_CACHE", str(tmp_path / "cache"))
    return db, blobs


@pytest.fixture(params=["dir", "pg+s3", "pg+file"])
def any_registry(
    request: pytest.FixtureRequest, tmp_path: Path, base_spec: BaseModelSpec
) -> Iterator[Registry]:
    if request.param == "dir":
        reg = Registry.open(tmp_path / "registry", base=base_spec)
    else:
        kind = "s3" if request.param == "pg+s3" else "file"
        db = services.create_database(request.getfixturevalue("pg_url"))
        env = request.getfixturevalue("s3_env")
        blobs = (
            f"s3://{services.create_bucket(env)}/p"
            if kind == "s3"
            else f"file://{tmp_path / 'blobs'}"
        )
        os.environ["ADAPTERHUB_REGISTRY_CACHE"] = str(tmp_path / "cache")
        reg = open_registry(db, blobs, base=base_spec)
    yield reg
    reg.close()
    os.environ.pop("ADAPTERHUB_REGISTRY_CACHE", None)


# -- one contract for every backend ---------------------------------------------------------


def test_versions_aliases_deletes(any_registry: Registry, tiny_adapters: dict[str, Path]) -> None:
    reg = any_registry
    lineage = {"base_model_id": "tiny-llama", "hyperparameters": {"lr": 0.001}}
    v1 = reg.push(tiny_adapters["r4"], "sql", alias="prod", description="d", lineage=lineage)
    v2 = reg.push(tiny_adapters["r8"], "sql", metadata={"k": [1, 2]})
    assert (v1.version, v2.version) == (1, 2)
    assert reg.resolve("sql").version == 2
    assert reg.resolve("sql@prod").version == 1
    got = reg.resolve("sql@1")
    assert got.files == v1.files and got.description == "d" and got.aliases == ("prod",)
    assert got.lineage is not None and got.lineage.hyperparameters == {"lr": 0.001}
    assert reg.resolve("sql@2").metadata == {"k": [1, 2]}
    # What the engine loads: a local directory with the recorded bytes.
    path = reg.version_path("sql", 1)
    assert sorted(p.name for p in path.iterdir()) == sorted(v1.files)
    with reg.open_file("sql", 1, "adapter_model.safetensors") as f:
        assert len(f.read()) == v1.files["adapter_model.safetensors"].size

    with pytest.raises(VersionConflictError):
        reg.delete_version("sql", 1)
    assert reg.set_alias("sql", "prod", 2) == 1
    reg.delete_version("sql", 1)
    with pytest.raises(AdapterVersionNotFoundError):
        reg.resolve("sql@1")
    with pytest.raises(AdapterVersionNotFoundError):
        reg.set_alias("sql", "old", 1)
    assert [r.version for r in reg.versions("sql", include_deleted=True)] == [1, 2]
    reg.delete_version("sql", 2, force=True)
    assert reg.push(tiny_adapters["r4"], "sql").version == 3  # numbers are never reused
    assert reg.aliases("sql") == {}
    with pytest.raises(AliasNotFoundError):
        reg.delete_alias("sql", "prod")
    assert reg.verify().ok
    assert [i.name for i in reg.list_adapters()] == ["sql"]


def test_verify_and_gc_find_corruption_and_orphans(
    any_registry: Registry, tiny_adapters: dict[str, Path]
) -> None:
    reg = any_registry
    reg.push(tiny_adapters["r4"], "a")
    # An orphan: files published for a number the index never made ready.
    staging = reg.blobs.begin()
    for src in tiny_adapters["r8"].iterdir():
        if src.name != "README.md":
            (staging.path / src.name).write_bytes(src.read_bytes())
    reg.blobs.publish(staging, "ghost", 7)
    reg.blobs.release(staging)
    if hasattr(reg.blobs, "gc_grace_s"):
        reg.blobs.gc_grace_s = 0.0
    report = reg.gc()
    assert any("ghost" in entry for entry in report.removed)
    assert ("ghost", 7) not in list(reg.blobs.stored_versions())
    reg.gc()  # the orphan's blobs, unreferenced now
    assert reg.verify().ok

    # Corrupt a stored file behind the registry's back.
    record = reg.resolve("a@1")
    if hasattr(reg.blobs, "client"):
        sha = record.files["adapter_model.safetensors"].sha256
        reg.blobs.client.put_object(
            Bucket=reg.blobs.bucket, Key=reg.blobs._blob_key(sha), Body=b"garbage"
        )
    else:
        target = reg.blobs.version_path("a", 1) / "adapter_model.safetensors"
        os.chmod(target.parent, 0o755)
        os.chmod(target, 0o644)
        target.write_bytes(b"garbage")
    problems = reg.verify().problems
    assert [(p.ref, p.filename) for p in problems] == [("a@1", "adapter_model.safetensors")]


# -- PostgreSQL specifics -------------------------------------------------------------------


def test_password_never_shown(pg_url: str) -> None:
    password = pg_url.split(":")[2].split("@")[0]
    assert password not in redact_url(pg_url)
    assert "***" in redact_url(pg_url)
    bad = pg_url.replace(password, password + "x")
    with pytest.raises(RegistryError) as caught:
        PostgresIndex(bad)
    assert password not in str(caught.value)
    with pytest.raises(RegistryError) as caught:
        open_registry(pg_url, None)  # no blob store
    assert password not in str(caught.value) and "registry-blobs" in str(caught.value)


def test_schema_is_versioned_and_migrated_once(shared: tuple[str, str]) -> None:
    db, _ = shared
    threads = [threading.Thread(target=lambda: PostgresIndex(db).close()) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    import psycopg

    with psycopg.connect(db) as conn:
        assert conn.execute("SELECT version FROM schema_version").fetchall() == [(1,)]


def test_concurrent_pushes_from_processes_get_distinct_numbers(
    shared: tuple[str, str], base_spec: BaseModelSpec, tiny_base: Path, adapter_dir: Path
) -> None:
    db, _ = shared
    open_registry(db).close()
    procs, per_proc = 3, 3
    barrier = CTX.Barrier(procs)
    queue = CTX.Queue()
    children = [
        CTX.Process(
            target=workers.push_many,
            args=(db, str(tiny_base), str(adapter_dir), "shared", per_proc, barrier, queue),
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
    with open_registry(db, base=base_spec) as reg:
        assert reg.index.pending() == []
        assert reg.verify().ok and reg.verify().checked == procs * per_proc


@pytest.mark.parametrize("point", ["allocated", "published"])
def test_sigkill_during_upload_leaves_nothing_half_visible(
    shared: tuple[str, str],
    base_spec: BaseModelSpec,
    tiny_base: Path,
    adapter_dir: Path,
    tmp_path: Path,
    point: str,
) -> None:
    db, _ = shared
    reg = open_registry(db, base=base_spec)
    reg.push(adapter_dir, "other")
    marker = tmp_path / "reached"
    child = CTX.Process(
        target=workers.push_and_hang,
        args=(db, str(tiny_base), str(adapter_dir), "sql", point, str(marker)),
    )
    child.start()
    deadline = time.monotonic() + 180
    try:
        while not marker.exists():
            assert child.is_alive() and time.monotonic() < deadline
            time.sleep(0.05)
        # A live writer's work is left alone by other processes' recovery and gc.
        observer = open_registry(db)
        assert observer.gc().discarded_pending == ()
        assert [p.version for p in observer.index.pending()] == [1]
        observer.close()
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.join(timeout=30)
    assert [i.name for i in reg.list_adapters()] == ["other"]
    deadline = time.monotonic() + 10
    while reg.blobs.writer_alive(reg.index.pending()[0].writer):
        assert time.monotonic() < deadline, "the dead writer's lease was never released"
        time.sleep(0.1)
    reopened = open_registry(db, base=base_spec)  # opening recovers
    assert reopened.index.pending() == []
    assert ("sql", 1) not in list(reopened.blobs.stored_versions())
    assert reopened.push(adapter_dir, "sql").version == 2
    assert reopened.verify().ok
    reopened.close()
    reg.close()


def test_changes_are_notified(shared: tuple[str, str], base_spec, adapter_dir: Path) -> None:
    db, _ = shared
    reg = open_registry(db, base=base_spec)
    events: list[dict] = []
    stop, ready = threading.Event(), threading.Event()
    listener = threading.Thread(
        target=reg.index.listen, args=(events.append, stop), kwargs={"ready": ready}
    )
    listener.start()
    try:
        assert ready.wait(10)
        reg.push(adapter_dir, "n", alias="prod")
        reg.push(adapter_dir, "n")
        reg.set_alias("n", "prod", 2)
        reg.delete_version("n", 1)
        deadline = time.monotonic() + 5
        while len(events) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        stop.set()
        listener.join(timeout=5)
        reg.close()
    assert [(e["event"], e.get("alias"), e["version"]) for e in events] == [
        ("alias", "prod", 1),
        ("alias", "prod", 2),
        ("deleted", None, 1),
    ]


class _FakeEngine:
    """Records retirements; refuses the first `pinned` attempts as a pinned adapter would."""

    def __init__(self, pinned: int) -> None:
        self.pinned = pinned
        self.retired: list[str] = []

    async def retire_adapter(self, key, then):
        from adapterhub_server.errors import ConflictError

        if self.pinned > 0:
            self.pinned -= 1
            raise ConflictError(f"{key} is in use", param="version")
        self.retired.append(key)
        return then()


def test_listener_evicts_deleted_versions_after_pinning_requests_end(
    shared: tuple[str, str], base_spec: BaseModelSpec, adapter_dir: Path
) -> None:
    from adapterhub_server.registry.events import RegistryEventListener

    db, _ = shared
    writer = open_registry(db, base=base_spec)
    replica = open_registry(db, base=base_spec)
    writer.push(adapter_dir, "e")
    writer.push(adapter_dir, "e")
    cached = replica.blobs.version_path("e", 1)  # the replica's downloaded copy
    assert cached.is_dir()
    engine = _FakeEngine(pinned=2)
    listener = RegistryEventListener(replica, engine)
    listener.start()
    try:
        assert listener.ready.wait(10)
        writer.delete_version("e", 1)
        deadline = time.monotonic() + 3
        while not engine.retired:
            assert time.monotonic() < deadline, "the deleted version was never evicted"
            time.sleep(0.05)
    finally:
        listener.stop()
        writer.close()
        replica.close()
    assert engine.retired == ["e@1"] and engine.pinned == 0
    assert not cached.exists()
