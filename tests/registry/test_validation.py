"""Every bad input is refused with a clear error and stores nothing (no files, no number)."""

from __future__ import annotations

import hashlib
import io
import json
import struct
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from adapterhub_server.errors import (
    AdapterHubError,
    AdapterValidationError,
    InvalidRequestError,
)
from adapterhub_server.registry import (
    ChecksumMismatchError,
    PayloadTooLargeError,
    Registry,
    RegistryLimits,
)
from tests.registry.conftest import assert_nothing_stored, copy_adapter

NAME = "victim"


def _config(adapter_dir: Path) -> dict:
    return json.loads((adapter_dir / "adapter_config.json").read_text())


def _tensors(adapter_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(adapter_dir / "adapter_model.safetensors")


def _first_key(tensors: dict[str, torch.Tensor], kind: str) -> str:
    return next(k for k in sorted(tensors) if f"{kind}.weight" in k)


def _make_bad_dirs(src: Path, root: Path) -> dict[str, tuple[Path, str]]:
    """name -> (adapter directory, regex the error must match)."""
    cases: dict[str, tuple[Path, str]] = {}
    raw = (src / "adapter_model.safetensors").read_bytes()

    pickle_dir = root / "pickle"
    pickle_dir.mkdir()
    (pickle_dir / "adapter_config.json").write_text(json.dumps(_config(src)))
    torch.save(_tensors(src), pickle_dir / "adapter_model.bin")
    cases["pickle"] = (pickle_dir, "pickle")

    cases["truncated"] = (
        copy_adapter(src, root / "truncated", weights_bytes=raw[: len(raw) // 2]),
        "adapter_model.safetensors",
    )
    lying = struct.pack("<Q", 10**12) + raw[8:]
    cases["lying-header"] = (
        copy_adapter(src, root / "lying", weights_bytes=lying),
        "adapter_model.safetensors",
    )
    cases["not-safetensors"] = (
        copy_adapter(src, root / "garbage", weights_bytes=b"\x00" * 64),
        "adapter_model.safetensors",
    )

    tensors = _tensors(src)
    key = _first_key(tensors, "lora_A")
    tensors[key] = tensors[key].clone()
    tensors[key][0, 0] = float("nan")
    cases["nan"] = (copy_adapter(src, root / "nan", tensors=tensors), "non-finite")

    tensors = _tensors(src)
    key = _first_key(tensors, "lora_B")
    tensors[key] = tensors[key].clone()
    tensors[key][0, 0] = float("inf")
    cases["inf"] = (copy_adapter(src, root / "inf", tensors=tensors), "non-finite")

    tensors = _tensors(src)
    key = _first_key(tensors, "lora_A")
    tensors[key] = torch.zeros(tensors[key].shape[0], tensors[key].shape[1] + 1)
    cases["shape"] = (copy_adapter(src, root / "shape", tensors=tensors), "shape")

    tensors = _tensors(src)
    key = _first_key(tensors, "lora_A")
    tensors[key] = torch.ones(tensors[key].shape, dtype=torch.int32)
    cases["int-dtype"] = (copy_adapter(src, root / "int", tensors=tensors), "dtype")

    tensors = _tensors(src)
    tensors["base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight"] = torch.zeros(4, 64)
    tensors["base_model.model.model.layers.9.self_attn.q_proj.lora_B.weight"] = torch.zeros(64, 4)
    cases["unknown-module"] = (copy_adapter(src, root / "module", tensors=tensors), "layers.9")

    tensors = _tensors(src)
    tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"] = torch.ones(
        64
    )
    cases["dora-tensor"] = (copy_adapter(src, root / "dora-tensor", tensors=tensors), "DoRA")

    cases["dora-config"] = (
        copy_adapter(src, root / "dora", config={**_config(src), "use_dora": True}),
        "DoRA",
    )
    cases["bias"] = (
        copy_adapter(src, root / "bias", config={**_config(src), "bias": "all"}),
        "bias",
    )
    cases["modules-to-save"] = (
        copy_adapter(src, root / "mts", config={**_config(src), "modules_to_save": ["lm_head"]}),
        "modules_to_save",
    )
    cases["rank-mismatch"] = (
        copy_adapter(src, root / "rank", config={**_config(src), "r": 8}),
        "rank",
    )
    bad_json = copy_adapter(src, root / "badjson")
    (bad_json / "adapter_config.json").write_text("{not json")
    cases["bad-json"] = (bad_json, "JSON")
    no_config = copy_adapter(src, root / "noconfig")
    (no_config / "adapter_config.json").unlink()
    cases["missing-config"] = (no_config, "missing adapter_config.json")
    no_weights = copy_adapter(src, root / "noweights")
    (no_weights / "adapter_model.safetensors").unlink()
    cases["missing-weights"] = (no_weights, "missing adapter_model.safetensors")
    return cases


@pytest.fixture(scope="module")
def bad_dirs(
    tiny_adapters: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, tuple[Path, str]]:
    return _make_bad_dirs(tiny_adapters["r4"], tmp_path_factory.mktemp("bad"))


BAD_CASES = [
    "pickle",
    "truncated",
    "lying-header",
    "not-safetensors",
    "nan",
    "inf",
    "shape",
    "int-dtype",
    "unknown-module",
    "dora-tensor",
    "dora-config",
    "bias",
    "modules-to-save",
    "rank-mismatch",
    "bad-json",
    "missing-config",
    "missing-weights",
]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_adapter_directories(
    registry: Registry, bad_dirs: dict[str, tuple[Path, str]], case: str
) -> None:
    path, pattern = bad_dirs[case]
    with pytest.raises(AdapterValidationError, match=pattern):
        registry.push(path, NAME)
    assert_nothing_stored(registry, NAME)


def test_rank_above_limit(registry_root: Path, base_spec, tiny_adapters: dict[str, Path]) -> None:
    registry = Registry.open(registry_root, base=base_spec, limits=RegistryLimits(max_lora_rank=16))
    with pytest.raises(AdapterValidationError, match="above this server's limit"):
        registry.push(tiny_adapters["r32"], NAME)
    assert_nothing_stored(registry, NAME)


def test_upload_size_limit(registry_root: Path, base_spec, adapter_dir: Path) -> None:
    registry = Registry.open(
        registry_root, base=base_spec, limits=RegistryLimits(max_upload_bytes=4096)
    )
    with pytest.raises(PayloadTooLargeError, match="4096-byte limit"):
        registry.push(adapter_dir, NAME)
    assert_nothing_stored(registry, NAME)


@pytest.mark.parametrize(
    "name", ["..", "a/b", "%2e%2e", "../x", "/abs", "A", "", "a" * 65, "a\n", "a..b", "-a", "a b"]
)
def test_bad_names(registry: Registry, adapter_dir: Path, name: str) -> None:
    with pytest.raises(AdapterValidationError, match="invalid adapter name"):
        registry.push(adapter_dir, name)
    assert registry.list_adapters() == []
    assert list((registry.root / "adapters").iterdir()) == []


@pytest.mark.parametrize("alias", ["3", "latest", "a/b", "..", "Prod"])
def test_bad_alias_stores_nothing(registry: Registry, adapter_dir: Path, alias: str) -> None:
    with pytest.raises(InvalidRequestError):
        registry.push(adapter_dir, NAME, alias=alias)
    assert_nothing_stored(registry, NAME)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"metadata": {"x": float("nan")}},
        {"metadata": {"x": object()}},
        {"metadata": ["not", "an", "object"]},
        {"metadata": {"big": "x" * 70_000}},
        {"lineage": {"train_loss": "low"}},
        {"lineage": {"train_loss": float("inf")}},
        {"description": "x" * 5000},
    ],
)
def test_bad_metadata_stores_nothing(registry: Registry, adapter_dir: Path, kwargs: dict) -> None:
    with pytest.raises(InvalidRequestError):
        registry.push(adapter_dir, NAME, **kwargs)
    assert_nothing_stored(registry, NAME)


def test_expected_sha256(registry: Registry, adapter_dir: Path) -> None:
    with pytest.raises(ChecksumMismatchError, match=r"adapter_model\.safetensors: sha256 mismatch"):
        registry.push(adapter_dir, NAME, expected_sha256={"adapter_model.safetensors": "0" * 64})
    with pytest.raises(ChecksumMismatchError, match="not a sha256"):
        registry.push(adapter_dir, NAME, expected_sha256={"adapter_model.safetensors": "nope"})
    with pytest.raises(ChecksumMismatchError, match="not one of the adapter's files"):
        registry.push(adapter_dir, NAME, expected_sha256={"../etc/passwd": "0" * 64})
    assert_nothing_stored(registry, NAME)

    digest = hashlib.sha256((adapter_dir / "adapter_model.safetensors").read_bytes()).hexdigest()
    record = registry.push(
        adapter_dir, NAME, expected_sha256={"adapter_model.safetensors": digest.upper()}
    )
    assert record.files["adapter_model.safetensors"].sha256 == digest


def _adapter_bytes(adapter_dir: Path) -> dict[str, bytes]:
    return {
        f: (adapter_dir / f).read_bytes()
        for f in ("adapter_config.json", "adapter_model.safetensors")
    }


def test_upload_as_bytes(registry: Registry, adapter_dir: Path) -> None:
    files = _adapter_bytes(adapter_dir)
    record = registry.push({**files, "README.md": b"# hi"}, NAME)
    assert set(record.files) == set(files)  # the README is not stored
    record = registry.push({k: io.BytesIO(v) for k, v in files.items()}, NAME)
    assert record.version == 2


@pytest.mark.parametrize(
    ("filename", "pattern"),
    [
        ("adapter_model.bin", "pickle"),
        ("model.pt", "pickle"),
        ("../adapter_config.json", "unexpected file"),
        ("/etc/passwd", "unexpected file"),
        ("%2e%2e/adapter_config.json", "unexpected file"),
        ("evil.py", "unexpected file"),
    ],
)
def test_bad_upload_file_names(
    registry: Registry, adapter_dir: Path, filename: str, pattern: str
) -> None:
    files = {**_adapter_bytes(adapter_dir), filename: b"payload"}
    with pytest.raises(AdapterValidationError, match=pattern):
        registry.push(files, NAME)
    assert_nothing_stored(registry, NAME)
    assert not (registry.root.parent / "etc").exists()


def test_auto_map_never_loads_code(registry: Registry, adapter_dir: Path, tmp_path: Path) -> None:
    marker = tmp_path / "imported"
    src = copy_adapter(
        adapter_dir,
        tmp_path / "automap",
        config={**_config(adapter_dir), "auto_map": {"AutoModelForCausalLM": "evil.Model"}},
    )
    (src / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('pwned')\n")
    record = registry.push(src, NAME)
    assert not marker.exists()
    assert set(record.files) == {"adapter_config.json", "adapter_model.safetensors"}
    assert not (registry.root / "adapters" / NAME / "1" / "evil.py").exists()


# -- archives -----------------------------------------------------------------------------


def _tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                tar.addfile(info)
    return path


def _file(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.mode = 0o644
    return info


def test_archives_are_accepted(registry: Registry, adapter_dir: Path, tmp_path: Path) -> None:
    files = _adapter_bytes(adapter_dir)
    tgz = _tar(tmp_path / "a.tar.gz", [(_file(f"my-adapter/{k}"), v) for k, v in files.items()])
    assert registry.push(tgz, NAME).version == 1
    with zipfile.ZipFile(tmp_path / "a.zip", "w") as zf:
        for k, v in files.items():
            zf.writestr(k, v)
        zf.writestr("README.md", "# card")
    assert registry.push(tmp_path / "a.zip", NAME).version == 2
    assert registry.verify().ok


def _link(name: str, target: str, kind: bytes) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info


@pytest.mark.parametrize(
    ("members", "pattern"),
    [
        ([("../adapter_config.json", "cfg")], r"'\.\.' is not allowed"),
        ([("x/../../adapter_config.json", "cfg")], r"'\.\.' is not allowed"),
        ([("%2e%2e/adapter_config.json", "cfg")], r"'\.\.' is not allowed"),
        ([("/etc/adapter_config.json", "cfg")], "absolute"),
        ([("adapter_config.json", "symlink:/etc/passwd")], "symbolic link"),
        ([("adapter_config.json", "hardlink:/etc/passwd")], "hard link"),
        ([("adapter_model.bin", "pickle")], "pickle"),
    ],
)
def test_hostile_tar_archives(
    registry: Registry,
    adapter_dir: Path,
    tmp_path: Path,
    members: list[tuple[str, str]],
    pattern: str,
) -> None:
    files = _adapter_bytes(adapter_dir)
    entries: list[tuple[tarfile.TarInfo, bytes | None]] = []
    if pattern != "pickle":
        entries.append((_file("adapter_model.safetensors"), files["adapter_model.safetensors"]))
    else:
        entries.append((_file("adapter_config.json"), files["adapter_config.json"]))
    for name, content in members:
        if content.startswith("symlink:"):
            entries.append((_link(name, content[8:], tarfile.SYMTYPE), None))
        elif content.startswith("hardlink:"):
            entries.append((_link(name, content[9:], tarfile.LNKTYPE), None))
        else:
            entries.append((_file(name), files["adapter_config.json"]))
    archive = _tar(tmp_path / "evil.tar.gz", entries)
    with pytest.raises(AdapterValidationError, match=pattern):
        registry.push(archive, NAME)
    assert_nothing_stored(registry, NAME)
    assert not (tmp_path / "adapter_config.json").exists()


def test_hostile_zip_archives(registry: Registry, adapter_dir: Path, tmp_path: Path) -> None:
    files = _adapter_bytes(adapter_dir)
    path = tmp_path / "evil.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("adapter_model.safetensors", files["adapter_model.safetensors"])
        zf.writestr("../../adapter_config.json", files["adapter_config.json"])
    with pytest.raises(AdapterValidationError, match=r"'\.\.' is not allowed"):
        registry.push(path, NAME)

    link = tmp_path / "link.zip"
    with zipfile.ZipFile(link, "w") as zf:
        zf.writestr("adapter_model.safetensors", files["adapter_model.safetensors"])
        info = zipfile.ZipInfo("adapter_config.json")
        info.external_attr = 0o120777 << 16  # a symlink
        zf.writestr(info, "/etc/passwd")
    with pytest.raises(AdapterValidationError, match="symbolic link"):
        registry.push(link, NAME)

    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("adapter_model.safetensors", files["adapter_model.safetensors"])
        zf.writestr("adapter_config.json", files["adapter_config.json"])
        zf.writestr("padding.bin.txt", b"\0" * (3 * 1024 * 1024))
    small = Registry.open(
        registry.root, base=registry.base, limits=RegistryLimits(max_upload_bytes=1024 * 1024)
    )
    with pytest.raises(PayloadTooLargeError):
        small.push(bomb, NAME)
    assert_nothing_stored(registry, NAME)


def test_not_an_adapter(registry: Registry, tmp_path: Path) -> None:
    with pytest.raises(AdapterValidationError, match="does not exist"):
        registry.push(tmp_path / "missing", NAME)
    (tmp_path / "weights.pt").write_bytes(b"\x80\x04junk")
    with pytest.raises(AdapterValidationError, match="pickle"):
        registry.push(tmp_path / "weights.pt", NAME)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(AdapterHubError, match="expected a PEFT adapter directory"):
        registry.push(tmp_path / "notes.txt", NAME)
    assert_nothing_stored(registry, NAME)
