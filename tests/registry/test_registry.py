"""Versions, aliases, listing, deletion, immutability, integrity and the engine source."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

import pytest

from adapterhub_server.errors import AdapterNotFoundError, AdapterValidationError
from adapterhub_server.lora.adapter import load_adapter
from adapterhub_server.lora.cache import verify_files
from adapterhub_server.registry import (
    AdapterVersionNotFoundError,
    AliasNotFoundError,
    BaseModelSpec,
    Lineage,
    Registry,
    RegistryAdapterSource,
    RegistryCorruptionError,
    VersionConflictError,
    default_registry_dir,
    default_registry_location,
)
from tests.registry.conftest import TINY_BASE_ID

LINEAGE = {
    "dataset_sha256": "ab" * 32,
    "hyperparameters": {"lr": 2e-4, "epochs": 3, "r": 4},
    "train_loss": 1.25,
    "eval_loss": 1.5,
    "package_versions": {"torch": "2.13.0", "peft": "0.21.0"},
    "hardware": {"device": "cpu", "threads": 2},
    "wall_time_s": 12.5,
    "seed": 7,
}


def test_push_records_everything(
    registry: Registry, adapter_dir: Path, base_spec: BaseModelSpec
) -> None:
    record = registry.push(
        adapter_dir,
        "sql",
        alias="prod",
        description="SQL assistant",
        metadata={"team": "data"},
        lineage=LINEAGE,
    )
    assert record.key == "sql@1"
    assert record.status == "ready"
    assert record.aliases == ("prod",)
    assert record.base_model_id == TINY_BASE_ID
    assert record.base_fingerprint == base_spec.fingerprint
    assert record.rank == 4
    assert record.alpha == 8.0
    assert record.target_modules == (
        "down_proj",
        "gate_proj",
        "k_proj",
        "o_proj",
        "q_proj",
        "up_proj",
        "v_proj",
    )
    assert record.description == "SQL assistant"
    assert record.metadata == {"team": "data"}
    assert isinstance(record.lineage, Lineage)
    assert record.lineage.train_loss == 1.25
    assert record.lineage.hyperparameters["epochs"] == 3
    assert record.lineage.extra == {"seed": 7}  # unknown keys are kept, not dropped
    assert set(record.files) == {"adapter_config.json", "adapter_model.safetensors"}
    for filename, info in record.files.items():
        data = (adapter_dir / filename).read_bytes()
        assert info.size == len(data)
        assert info.sha256 == hashlib.sha256(data).hexdigest()
    # The stored copy is byte-identical and loads as the engine would load it.
    stored = registry.root / "adapters" / "sql" / "1"
    assert sorted(p.name for p in stored.iterdir()) == sorted(record.files)
    loaded = load_adapter(stored, name="x", targets=dict(base_spec.targets), max_rank=64)
    assert loaded.rank == 4
    # Round trip through the index (a fresh instance reads the same record).
    reopened = Registry.open(registry.root)
    again = reopened.resolve("sql@1")
    assert again.to_dict() == record.to_dict()
    json.dumps(again.to_dict())  # JSON-ready
    reopened.close()


def test_versions_and_aliases_resolve(registry: Registry, tiny_adapters: dict[str, Path]) -> None:
    v1 = registry.push(tiny_adapters["r4"], "sql")
    v2 = registry.push(tiny_adapters["r8"], "sql", alias="canary")
    v3 = registry.push(tiny_adapters["attn-only"], "sql")
    assert [v1.version, v2.version, v3.version] == [1, 2, 3]

    assert registry.resolve("sql").version == 3  # newest ready
    assert registry.resolve("sql@latest").version == 3
    assert registry.resolve("sql@1").rank == 4
    assert registry.resolve("sql@canary").version == 2

    assert registry.set_alias("sql", "prod", 1) is None
    assert registry.resolve("sql@prod").version == 1
    assert registry.set_alias("sql", "prod", 3) == 1  # aliases move
    assert registry.resolve("sql@prod").version == 3
    assert registry.aliases("sql") == {"canary": 2, "prod": 3}
    assert registry.resolve("sql@3").aliases == ("prod",)

    assert registry.delete_alias("sql", "canary") == 2
    with pytest.raises(AliasNotFoundError):
        registry.resolve("sql@canary")
    with pytest.raises(AliasNotFoundError):
        registry.delete_alias("sql", "canary")
    with pytest.raises(AdapterVersionNotFoundError, match="sql@9 does not exist"):
        registry.resolve("sql@9")
    with pytest.raises(AdapterVersionNotFoundError):
        registry.set_alias("sql", "prod", 9)
    with pytest.raises(AdapterNotFoundError, match="'nope' does not exist"):
        registry.resolve("nope")
    with pytest.raises(AdapterNotFoundError):
        registry.resolve("nope@prod")

    assert [r.version for r in registry.versions("sql")] == [1, 2, 3]
    info = registry.get("sql")
    assert info.latest.version == 3 and info.aliases == {"prod": 3}


def test_list_adapters(registry: Registry, tiny_adapters: dict[str, Path]) -> None:
    registry.push(tiny_adapters["r4"], "b-adapter")
    registry.push(tiny_adapters["r8"], "a-adapter", alias="prod")
    registry.push(tiny_adapters["r16-rslora"], "a-adapter")
    listed = registry.list_adapters()
    assert [i.name for i in listed] == ["a-adapter", "b-adapter"]
    assert [v.version for v in listed[0].versions] == [1, 2]
    assert listed[0].latest.rank == 16
    assert listed[0].aliases == {"prod": 1}
    assert listed[1].latest.key == "b-adapter@1"


def test_version_numbers_never_reused(registry: Registry, adapter_dir: Path) -> None:
    for _ in range(3):
        registry.push(adapter_dir, "sql")
    deleted = registry.delete_version("sql", 3)
    assert deleted.key == "sql@3"
    assert not (registry.root / "adapters" / "sql" / "3").exists()
    with pytest.raises(AdapterVersionNotFoundError, match="was deleted"):
        registry.resolve("sql@3")
    assert registry.resolve("sql").version == 2
    assert registry.push(adapter_dir, "sql").version == 4  # not 3 again

    # Even with every version deleted, the next one continues the sequence.
    registry.delete_adapter("sql")
    with pytest.raises(AdapterNotFoundError, match="all were deleted"):
        registry.resolve("sql")
    assert registry.list_adapters() == []
    assert registry.push(adapter_dir, "sql").version == 5
    history = registry.versions("sql", include_deleted=True)
    assert [(r.version, r.status) for r in history] == [
        (1, "deleted"),
        (2, "deleted"),
        (3, "deleted"),
        (4, "deleted"),
        (5, "ready"),
    ]
    with pytest.raises(AdapterVersionNotFoundError):
        registry.delete_version("sql", 3)


def test_delete_refuses_aliased_version_unless_forced(
    registry: Registry, adapter_dir: Path
) -> None:
    registry.push(adapter_dir, "sql", alias="prod")
    registry.push(adapter_dir, "sql")
    with pytest.raises(VersionConflictError, match="prod"):
        registry.delete_version("sql", 1)
    assert registry.resolve("sql@prod").version == 1
    with pytest.raises(VersionConflictError):
        registry.delete_adapter("sql")
    registry.delete_version("sql", 1, force=True)
    assert registry.aliases("sql") == {}
    with pytest.raises(AliasNotFoundError):
        registry.resolve("sql@prod")


def test_versions_are_immutable_and_read_only(
    registry: Registry, tiny_adapters: dict[str, Path]
) -> None:
    first = registry.push(tiny_adapters["r4"], "sql")
    path = registry.root / "adapters" / "sql" / "1"
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    for entry in path.iterdir():
        assert stat.S_IMODE(entry.stat().st_mode) == 0o444
    assert stat.S_IMODE(path.stat().st_mode) == 0o555

    second = registry.push(tiny_adapters["r8"], "sql")  # a new version, never an overwrite
    assert second.version == 2
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    assert registry.resolve("sql@1").files == first.files

    # The blob store refuses to publish over an existing version outright.
    staging = registry.blobs.begin()
    (staging.path / "adapter_config.json").write_text("{}")
    with pytest.raises(Exception, match="overwrite"):
        registry.blobs.publish(staging, "sql", 1)
    registry.blobs.abort(staging, None, None)
    registry.blobs.release(staging)
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before


def _corrupt(path: Path) -> None:
    os.chmod(path, 0o644)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # same size, different bytes
    path.write_bytes(bytes(data))


def test_corruption_is_detected_and_names_the_file(registry: Registry, adapter_dir: Path) -> None:
    registry.push(adapter_dir, "sql")
    registry.push(adapter_dir, "other")
    assert registry.verify().ok
    weights = registry.root / "adapters" / "sql" / "1" / "adapter_model.safetensors"
    _corrupt(weights)

    report = registry.verify()
    assert report.checked == 2 and not report.ok
    (problem,) = report.problems
    assert problem.ref == "sql@1"
    assert problem.filename == "adapter_model.safetensors"
    assert "sha256 mismatch" in problem.message
    assert registry.verify("other").ok

    with pytest.raises(
        RegistryCorruptionError, match=r"sql@1: adapter_model\.safetensors: sha256 mismatch"
    ):
        registry.open_file("sql", 1, "adapter_model.safetensors")
    with registry.open_file("sql", 1, "adapter_config.json") as f:
        assert json.loads(f.read())["r"] == 4

    # What the engine's cache does before parsing a located adapter.
    location = RegistryAdapterSource(registry).locate("sql")
    assert location is not None
    with pytest.raises(
        AdapterValidationError, match=r"adapter_model\.safetensors: sha256 mismatch"
    ):
        verify_files(location.path, location.sha256)


def test_verify_reports_missing_and_extra_files(registry: Registry, adapter_dir: Path) -> None:
    registry.push(adapter_dir, "sql")
    path = registry.root / "adapters" / "sql" / "1"
    os.chmod(path, 0o755)
    (path / "adapter_config.json").unlink()
    (path / "evil.py").write_text("import os")
    problems = {(p.filename, p.message) for p in registry.verify().problems}
    assert ("adapter_config.json", "missing") in problems
    assert ("evil.py", "unexpected file (not in the index)") in problems
    with pytest.raises(RegistryCorruptionError, match=r"adapter_config\.json"):
        registry.open_file("sql", 1, "adapter_config.json")


def test_adapter_source(
    registry: Registry, tiny_adapters: dict[str, Path], base_spec: BaseModelSpec
) -> None:
    registry.push(tiny_adapters["r4"], "sql", alias="prod")
    registry.push(tiny_adapters["r8"], "sql")
    registry.push(tiny_adapters["r4"], "chat")
    source = RegistryAdapterSource(registry, base_fingerprint=base_spec.fingerprint)

    latest = source.locate("sql")
    assert latest is not None and latest.key == "sql@2"
    assert source.locate("sql@2") == latest
    prod = source.locate("sql@prod")
    assert prod is not None and prod.key == "sql@1"
    assert prod.path == registry.root / "adapters" / "sql" / "1"
    assert prod.sha256 == registry.resolve("sql@1").sha256
    verify_files(prod.path, prod.sha256)
    assert source.locate("nope") is None
    assert source.locate("sql@7") is None
    assert source.locate("HuggingFaceTB/SmolLM2-135M-Instruct") is None  # a base id, not a ref
    assert source.locate("../etc") is None
    assert sorted(loc.key for loc in source.list()) == ["chat@1", "sql@2"]

    other_base = RegistryAdapterSource(registry, base_fingerprint="0" * 64)
    with pytest.raises(AdapterValidationError, match="validated against base weights"):
        other_base.locate("sql")
    assert other_base.list() == []


def test_files_outside_the_index_are_collected(registry: Registry, adapter_dir: Path) -> None:
    registry.push(adapter_dir, "sql")
    # Leftovers of a crash in the middle of a delete, and of hand-made mischief.
    os.makedirs(registry.root / "adapters" / "sql" / "7")
    os.makedirs(registry.root / "adapters" / "ghost" / "1")
    (registry.root / "adapters" / "stray.txt").write_text("x")
    (registry.root / ".trash" / "sql@5-dead").mkdir()
    dry = registry.gc(dry_run=True)
    assert len(dry.removed) == 4
    assert (registry.root / "adapters" / "sql" / "7").exists()
    report = registry.gc()
    assert sorted(report.removed) == sorted(dry.removed)
    assert not (registry.root / "adapters" / "sql" / "7").exists()
    assert not (registry.root / "adapters" / "ghost" / "1").exists()
    assert list((registry.root / ".trash").iterdir()) == []
    assert registry.verify().ok and registry.resolve("sql").version == 1
    assert registry.gc().removed == ()


def test_default_registry_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ADAPTERHUB_REGISTRY", str(tmp_path / "explicit"))
    assert default_registry_dir() == tmp_path / "explicit"
    monkeypatch.delenv("ADAPTERHUB_REGISTRY")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_registry_dir() == tmp_path / "xdg" / "adapterhub" / "registry"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_registry_dir() == tmp_path / "home" / ".cache" / "adapterhub" / "registry"


def test_default_registry_location_keeps_a_url(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A `postgresql://` URL in $ADAPTERHUB_REGISTRY stays a URL (what a cluster worker
    hands its trainers); anything else is a directory."""
    url = "postgresql://hub:secret@db:5432/adapterhub"
    monkeypatch.setenv("ADAPTERHUB_REGISTRY", url)
    assert default_registry_location() == url
    monkeypatch.setenv("ADAPTERHUB_REGISTRY", str(tmp_path / "dir"))
    assert default_registry_location() == tmp_path / "dir"


def test_index_is_sqlite_wal(registry: Registry) -> None:
    import sqlite3

    conn = sqlite3.connect(registry.root / "registry.db")
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"adapters", "versions", "files", "aliases"} <= tables
    conn.close()
