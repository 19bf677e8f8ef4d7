"""Loading and validating PEFT DoRA adapter files (`load_adapter`)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from adapterhub_server.errors import AdapterValidationError
from adapterhub_server.lora.adapter import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    TargetShape,
    adaptable_modules,
    load_adapter,
)
from tests.lora.dora_adapters import make_dora_adapter

PREFIX = "base_model.model."
Q0 = "model.layers.0.self_attn.q_proj"
MAG = f"{PREFIX}{Q0}.lora_magnitude_vector"


@pytest.fixture(scope="module")
def targets(tiny_base: Path) -> dict[str, TargetShape]:
    from transformers import AutoModelForCausalLM

    return adaptable_modules(AutoModelForCausalLM.from_pretrained(tiny_base))


@pytest.fixture(scope="module")
def dora_dir(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dora_adapter(
        tiny_base, tmp_path_factory.mktemp("dora") / "dora", seed=5, r=4, alpha=8
    )


@pytest.fixture
def copy(dora_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(dora_dir, tmp_path / "copy"))


def _load(path: Path, targets: dict[str, TargetShape]):
    return load_adapter(path, name="d", targets=targets, max_rank=64)


def _edit(path: Path, change: Callable[[dict[str, torch.Tensor]], None]) -> None:
    tensors = load_file(path / WEIGHTS_FILE)
    change(tensors)
    save_file(tensors, path / WEIGHTS_FILE)


def _edit_config(path: Path, **changes: object) -> None:
    config = json.loads((path / CONFIG_FILE).read_text())
    config.update(changes)
    (path / CONFIG_FILE).write_text(json.dumps(config))


def _rejects(path: Path, targets: dict[str, TargetShape], *fragments: str) -> str:
    with pytest.raises(AdapterValidationError) as info:
        _load(path, targets)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


def test_loads_what_peft_saves(dora_dir: Path, targets: dict[str, TargetShape]) -> None:
    saved = load_file(dora_dir / WEIGHTS_FILE)
    assert MAG in saved  # PEFT's file format: no ".weight" after the magnitude
    adapter = _load(dora_dir, targets)
    assert adapter.use_dora
    assert len(adapter.modules) == 2 * 7
    for module, lora in adapter.modules.items():
        assert lora.magnitude is not None
        assert torch.equal(lora.magnitude, saved[f"{PREFIX}{module}.lora_magnitude_vector"])
    assert adapter.num_bytes == sum(t.nbytes for t in saved.values())


@pytest.mark.parametrize("form", ["weight", "adapter-segment"])
def test_other_key_forms(copy: Path, targets: dict[str, TargetShape], form: str) -> None:
    def rename(tensors: dict[str, torch.Tensor]) -> None:
        for key in list(tensors):
            if form == "weight":
                if key.endswith("lora_magnitude_vector"):
                    tensors[key + ".weight"] = tensors.pop(key)
            elif key.endswith("lora_magnitude_vector"):
                tensors[key + ".default.weight"] = tensors.pop(key)
            else:
                tensors[key.replace(".weight", ".default.weight")] = tensors.pop(key)

    _edit(copy, rename)
    adapter = _load(copy, targets)
    assert all(m.magnitude is not None for m in adapter.modules.values())


def test_rejects_mixed_segments(copy: Path, targets: dict[str, TargetShape]) -> None:
    _edit(copy, lambda t: t.update({MAG + ".other.weight": t.pop(MAG)}))
    _rejects(copy, targets, "mix adapter-name segments")


@pytest.mark.parametrize(
    ("change", "fragments"),
    [
        (lambda t: t.update({MAG: t[MAG][:32]}), [MAG, "shape [32]", "expected [64]", "DoRA"]),
        (lambda t: t.update({MAG: t[MAG].view(8, 8)}), [MAG, "shape [8, 8]", "expected [64]"]),
        (lambda t: t[MAG].__setitem__(5, float("nan")), [MAG, "non-finite", "1 NaN"]),
        (lambda t: t[MAG].__setitem__(0, float("inf")), [MAG, "non-finite", "1 Inf"]),
        (lambda t: t.update({MAG: t[MAG].to(torch.int32)}), [MAG, "float dtype"]),
        (lambda t: t.pop(MAG), [CONFIG_FILE, "use_dora: true", Q0, "lora_magnitude_vector"]),
        (
            lambda t: [t.pop(f"{PREFIX}{Q0}.lora_{k}.weight") for k in "AB"],
            [Q0, "DoRA magnitude", "but no lora_A / lora_B"],
        ),
        (
            lambda t: t.update(
                {f"{PREFIX}model.embed_tokens.lora_magnitude_vector": t[MAG].clone()}
            ),
            ["model.embed_tokens", "not embeddings"],
        ),
        (
            lambda t: t.update({MAG + ".extra": t.pop(MAG)}),
            ["unexpected tensor", "DoRA magnitudes are read from keys"],
        ),
    ],
    ids=[
        "short",
        "2d",
        "nan",
        "inf",
        "int",
        "missing",
        "magnitude-alone",
        "embedding",
        "odd-key",
    ],
)
def test_rejects_bad_magnitudes(
    copy: Path, targets: dict[str, TargetShape], change: Callable, fragments: list[str]
) -> None:
    _edit(copy, change)
    _rejects(copy, targets, *fragments)


def test_rejects_magnitude_without_use_dora(copy: Path, targets: dict[str, TargetShape]) -> None:
    _edit_config(copy, use_dora=False)
    _rejects(
        copy,
        targets,
        "unexpected tensor",
        "lora_magnitude_vector'",
        "DoRA magnitude",
        "use_dora: true",
    )


@pytest.mark.parametrize(
    ("changes", "fragments"),
    [
        ({"use_dora": "yes"}, ["use_dora must be true or false"]),
        ({"lora_bias": True}, ["lora_bias"]),
        ({"fan_in_fan_out": True}, ["fan_in_fan_out"]),
    ],
)
def test_rejects_config(
    copy: Path, targets: dict[str, TargetShape], changes: dict, fragments: list[str]
) -> None:
    _edit_config(copy, **changes)
    _rejects(copy, targets, CONFIG_FILE, *fragments)
