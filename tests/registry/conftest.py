"""Fixtures for registry tests: a base-model spec of the tiny Llama and a fresh registry."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from adapterhub_server.registry import BaseModelSpec, Registry, RegistryLimits

TINY_BASE_ID = "tiny-llama"


@pytest.fixture(scope="session")
def base_spec(tiny_base: Path) -> BaseModelSpec:
    return BaseModelSpec.from_directory(tiny_base, TINY_BASE_ID)


@pytest.fixture
def registry_root(tmp_path: Path) -> Path:
    return tmp_path / "registry"


@pytest.fixture
def registry(registry_root: Path, base_spec: BaseModelSpec) -> Iterator[Registry]:
    reg = Registry.open(registry_root, base=base_spec, limits=RegistryLimits(max_lora_rank=64))
    yield reg
    reg.close()


@pytest.fixture
def adapter_dir(tiny_adapters: dict[str, Path]) -> Path:
    return tiny_adapters["r4"]


def copy_adapter(
    src: Path,
    dest: Path,
    *,
    config: dict | None = None,
    tensors: dict[str, torch.Tensor] | None = None,
    weights_bytes: bytes | None = None,
) -> Path:
    """A copy of the adapter at `src` with its config, tensors or raw weight bytes replaced."""
    dest.mkdir(parents=True, exist_ok=True)
    cfg = json.loads((src / "adapter_config.json").read_text())
    (dest / "adapter_config.json").write_text(json.dumps(config if config is not None else cfg))
    if weights_bytes is not None:
        (dest / "adapter_model.safetensors").write_bytes(weights_bytes)
    else:
        data = tensors if tensors is not None else load_file(src / "adapter_model.safetensors")
        save_file(data, dest / "adapter_model.safetensors")
    return dest


def assert_nothing_stored(registry: Registry, name: str) -> None:
    """No version, no row, no number used, no files or staging leftovers."""
    assert registry.list_adapters() == []
    assert not registry.index.known_name(name)
    assert registry.index.pending() == []
    root = registry.root
    assert root is not None
    assert list((root / "adapters").iterdir()) == []
    assert list((root / ".staging").iterdir()) == []
