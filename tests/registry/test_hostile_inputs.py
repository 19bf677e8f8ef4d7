"""Hostile pushes and races: patterns, magnitudes, invalid Unicode, deletes under readers.

Each is refused with a clear 4xx-class error and stores nothing, or (for stored rows and
racing deletes) never turns into a server fault or a message naming a server path.
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import BinaryIO

import pytest
import torch
from safetensors.torch import load_file

from adapterhub_server.errors import (
    AdapterNotFoundError,
    AdapterValidationError,
    InvalidRequestError,
)
from adapterhub_server.lora.cache import AdapterCache
from adapterhub_server.lora.pool import LoRAWeightPool, packed_groups
from adapterhub_server.registry import (
    AdapterVersionNotFoundError,
    BaseModelSpec,
    Registry,
    RegistryAdapterSource,
    RegistryLimits,
)
from adapterhub_server.registry.local import INDEX_FILE, LocalBlobStore, SQLiteIndex
from tests.registry.conftest import assert_nothing_stored, copy_adapter

NAME = "victim"
SURROGATE = "\ud800"


def _config(adapter_dir: Path, **changes: object) -> dict:
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    config.update(changes)
    return config


# --- patterns ---------------------------------------------------------------------------------


def test_backtracking_exclude_modules_is_matched_in_linear_time(
    registry: Registry, adapter_dir: Path, tmp_path: Path
) -> None:
    # Python's re needs minutes per module path for this; it matches nothing, so PEFT (and
    # the registry) accept the adapter, and every later load must be as quick.
    src = copy_adapter(
        adapter_dir, tmp_path / "a", config=_config(adapter_dir, exclude_modules="model(.|.)*Z")
    )
    start = time.monotonic()
    record = registry.push(src, NAME)
    source = RegistryAdapterSource(registry)
    cache = _cache(registry, source)
    cache.load_now(source.locate(NAME))
    assert time.monotonic() - start < 10  # liveness only: seconds-to-minutes without RE2
    assert record.version == 1


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("target_modules", r".*(?=q_proj)q_proj"),
        ("exclude_modules", r"(\w+)\.\1"),
        ("rank_pattern", {r"(?<=self_attn\.)q_proj": 4}),
        ("alpha_pattern", {"x" * 2000: 4}),
    ],
)
def test_unmatchable_patterns_are_refused_naming_the_field(
    registry: Registry, adapter_dir: Path, tmp_path: Path, field: str, value: object
) -> None:
    src = copy_adapter(adapter_dir, tmp_path / "a", config=_config(adapter_dir, **{field: value}))
    with pytest.raises(AdapterValidationError) as info:
        registry.push(src, NAME)
    assert field in info.value.message
    assert_nothing_stored(registry, NAME)


# --- magnitudes -------------------------------------------------------------------------------


def _inflated(adapter_dir: Path, dest: Path, value: float) -> tuple[Path, str]:
    tensors = load_file(adapter_dir / "adapter_model.safetensors")
    key = next(k for k in sorted(tensors) if "lora_B" in k)
    tensors[key].fill_(value)
    module = key.removeprefix("base_model.model.").removesuffix(".lora_B.weight")
    return copy_adapter(adapter_dir, dest, tensors=tensors), module


def test_absurd_weights_are_refused_naming_the_module(
    registry: Registry, adapter_dir: Path, tmp_path: Path
) -> None:
    src, module = _inflated(adapter_dir, tmp_path / "a", 1e15)
    with pytest.raises(AdapterValidationError) as info:
        registry.push(src, NAME)
    assert module in info.value.message and "too large to serve in float32" in info.value.message
    assert_nothing_stored(registry, NAME)


def test_magnitude_bound_follows_the_serving_dtype(
    registry_root: Path, base_spec: BaseModelSpec, adapter_dir: Path, tmp_path: Path
) -> None:
    src, _ = _inflated(adapter_dir, tmp_path / "a", 100.0)
    with Registry.open(
        registry_root, base=base_spec, limits=RegistryLimits(serving_dtype=torch.float16)
    ) as half:
        with pytest.raises(AdapterValidationError, match="too large to serve in float16"):
            half.push(src, NAME)
        assert_nothing_stored(half, NAME)
    with Registry.open(
        registry_root, base=base_spec, limits=RegistryLimits(serving_dtype=torch.bfloat16)
    ) as wide:
        assert wide.push(src, NAME).version == 1


@pytest.mark.parametrize("dtype", [torch.int32, "float32", None])
def test_serving_dtype_must_be_a_float_dtype(dtype: object) -> None:
    with pytest.raises(ValueError, match="serving_dtype"):
        RegistryLimits(serving_dtype=dtype)  # type: ignore[arg-type]


# --- text that is not valid Unicode -----------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"description": f"fine {SURROGATE} text"}, "description"),
        ({"metadata": {"k": SURROGATE}}, "metadata"),
        ({"metadata": {SURROGATE: 1}}, "metadata"),
        ({"metadata": {"deep": [[{"x": ["\udfff"]}]]}}, "metadata"),
        ({"metadata": {"nested": json.loads("[" * 70 + "]" * 70)}}, "metadata"),
        ({"lineage": {"extra_note": SURROGATE}}, "lineage"),
        ({"metadata": {"in_a_tuple": ("ok", SURROGATE)}}, "metadata"),
    ],
)
def test_invalid_text_is_refused_and_nothing_stored(
    registry: Registry, adapter_dir: Path, kwargs: dict, param: str
) -> None:
    with pytest.raises(InvalidRequestError) as info:
        registry.push(adapter_dir, NAME, **kwargs)
    assert info.value.code == "invalid_value" and info.value.param == param
    info.value.message.encode("utf-8")  # the message itself is valid Unicode
    assert_nothing_stored(registry, NAME)


def test_adapter_config_with_a_lone_surrogate_is_refused(
    registry: Registry, adapter_dir: Path, tmp_path: Path
) -> None:
    src = copy_adapter(adapter_dir, tmp_path / "a")
    text = (src / "adapter_config.json").read_text()
    # As PEFT's json.dumps would escape it: valid JSON, invalid Unicode.
    (src / "adapter_config.json").write_text(text[:-1] + ', "note": "\\ud800"}')
    with pytest.raises(AdapterValidationError, match="not valid Unicode"):
        registry.push(src, NAME)
    assert_nothing_stored(registry, NAME)


def test_rows_with_invalid_text_still_read(
    registry: Registry, registry_root: Path, adapter_dir: Path
) -> None:
    """Rows stored before these checks (or by other tools): escaped lone surrogates in the
    JSON columns, bytes that are not UTF-8, columns that are not JSON at all. Every read
    returns a record whose text encodes, instead of failing every listing."""
    registry.push(adapter_dir, NAME, description="ok", metadata={"k": "v"})
    registry.push(adapter_dir, "bystander")
    with sqlite3.connect(registry_root / INDEX_FILE) as db:
        db.execute(
            "UPDATE versions SET metadata = ?, description = CAST(X'66FF6F' AS TEXT), "
            "lineage = ?, target_modules = ? WHERE name = ?",
            (
                r'{"k": "\ud800", "\udc00": ["\ud83d\ude00"], "n": 1}',
                r'{"extra": {"x": "\udfff"}, "train_loss": 0.5}',
                "not json",
                NAME,
            ),
        )
    infos = registry.list_adapters()
    assert [i.name for i in infos] == ["bystander", NAME]
    record = registry.resolve(NAME)
    assert record.metadata == {"k": "\ufffd", "\ufffd": ["\U0001f600"], "n": 1}
    assert record.description == "f\ufffdo"
    assert record.lineage is not None and record.lineage.extra == {"x": "\ufffd"}
    assert record.lineage.train_loss == 0.5
    assert record.target_modules == ()
    for info in infos:
        json.dumps(info.to_dict(), ensure_ascii=False).encode("utf-8")
    json.dumps(registry.get(NAME).to_dict(), ensure_ascii=False).encode("utf-8")


# --- deletes racing readers -------------------------------------------------------------------


def _cache(registry: Registry, source: RegistryAdapterSource) -> AdapterCache:
    assert registry.base is not None
    targets = dict(registry.base.targets)
    return AdapterCache(
        source,
        LoRAWeightPool(packed_groups(targets), max_slots=2),
        targets,
        max_loras=2,
        max_cpu_loras=2,
        max_lora_rank=64,
    )


def _acquire_blocking(cache: AdapterCache, loc) -> object:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        route = cache.acquire(loc)  # loads in the background, then raises or routes
        if route is not None:
            return route
        time.sleep(0.01)
    raise AssertionError("the adapter never loaded")


def test_version_deleted_between_resolve_and_load_is_not_found(
    registry: Registry, registry_root: Path, adapter_dir: Path
) -> None:
    registry.push(adapter_dir, NAME)
    source = RegistryAdapterSource(registry)
    cache = _cache(registry, source)
    try:
        loc = cache.locate(NAME)  # what the engine does when the request arrives
        registry.delete_version(NAME, 1)  # ... and then the delete wins the race
        with pytest.raises(AdapterNotFoundError) as info:
            _acquire_blocking(cache, loc)
        assert "was deleted" in info.value.message
        assert str(registry_root) not in info.value.message
        with pytest.raises(AdapterNotFoundError):
            cache.load_now(loc)
        assert cache.source.locate(NAME) is None  # and later requests are plain 404s
    finally:
        cache.close()


def test_files_missing_under_a_live_row_name_no_path(
    registry: Registry, registry_root: Path, adapter_dir: Path
) -> None:
    """A file removed by hand (not a delete): a load failure, but still no server path."""
    registry.push(adapter_dir, NAME)
    source = RegistryAdapterSource(registry)
    cache = _cache(registry, source)
    loc = cache.locate(NAME)
    loc.path.chmod(0o755)
    (loc.path / "adapter_model.safetensors").unlink()
    try:
        with pytest.raises(AdapterValidationError) as info:
            cache.load_now(loc)
        assert "adapter_model.safetensors" in info.value.message
        assert str(registry_root) not in info.value.message
    finally:
        cache.close()


class _DeletingBlobs(LocalBlobStore):
    """The real blob store, whose `open` lets a second registry delete the version first:
    the window between `Registry.open_file` resolving a version and opening its file."""

    other: Registry

    def open(self, name: str, version: int, filename: str) -> BinaryIO:
        self.other.delete_version(name, version)
        return super().open(name, version, filename)


def test_download_racing_a_delete_is_not_found(
    registry: Registry, registry_root: Path, base_spec: BaseModelSpec, adapter_dir: Path
) -> None:
    registry.push(adapter_dir, NAME)
    blobs = _DeletingBlobs(registry_root)
    blobs.other = registry
    reader = Registry(blobs, SQLiteIndex(registry_root / INDEX_FILE), base=base_spec)
    try:
        with pytest.raises(AdapterVersionNotFoundError) as info:
            reader.open_file(NAME, 1, "adapter_model.safetensors")
        assert "was deleted" in info.value.message
        assert str(registry_root) not in info.value.message
    finally:
        reader.close()
