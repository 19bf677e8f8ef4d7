"""Config-only upload validation for every served decoder family (meta-device listing).

For each family of `tests.tiny_families`: the modules listed from config.json alone equal
the engine's `adaptable_modules` of the loaded model, a PEFT adapter made for it is
accepted, and adapters with a wrong shape or a module the family lacks are refused naming
the module. Qwen3-MoE: attention and dense-MLP LoRA is accepted, expert weights are refused.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from adapterhub_server.errors import AdapterValidationError, BaseModelError
from adapterhub_server.lora.adapter import adaptable_modules
from adapterhub_server.registry import BaseModelSpec, Registry, RegistryLimits
from adapterhub_server.registry.targets import (
    modules_from_config,
    modules_from_model_dir,
    targets_from_config,
)
from tests.registry.conftest import assert_nothing_stored, copy_adapter
from tests.tiny_families import (
    ATTENTION_PROJECTIONS,
    DEFAULT_TARGETS,
    FAMILIES,
    make_tiny_adapter,
    make_tiny_family,
)

PREFIX = "base_model.model."
EXPERTS_REFUSED = "expert weights are not served"
SERVABLE_TARGETS = {**DEFAULT_TARGETS, "qwen3_moe": ATTENTION_PROJECTIONS}
"""`make_tiny_adapter`'s targets, but attention only on qwen3_moe: there PEFT (0.21, with
transformers 5) maps gate_proj/up_proj/down_proj onto the fused experts, whatever the
layer, so the default adapter holds expert weights."""


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], tuple[Path, Path]]:
    """family -> (base directory, a servable PEFT adapter for it), each made once per module."""
    root = tmp_path_factory.mktemp("families")
    made: dict[str, tuple[Path, Path]] = {}

    def get(family: str) -> tuple[Path, Path]:
        if family not in made:
            base = make_tiny_family(family, root / family / "base")
            adapter = make_tiny_adapter(
                base,
                root / family / "adapter",
                family=family,
                seed=1,
                target_modules=SERVABLE_TARGETS[family],
            )
            made[family] = (base, adapter)
        return made[family]

    return get


def _open(tmp_path: Path, base: Path, family: str) -> Registry:
    spec = BaseModelSpec.from_directory(base, f"tiny-{family}", fingerprint=False)
    return Registry.open(tmp_path / "registry", base=spec, limits=RegistryLimits(max_lora_rank=64))


@pytest.fixture
def open_registry(tmp_path: Path) -> Iterator[Callable[[Path, str], Registry]]:
    opened: list[Registry] = []

    def open_(base: Path, family: str) -> Registry:
        opened.append(_open(tmp_path, base, family))
        return opened[-1]

    yield open_
    for registry in opened:
        registry.close()


def _module_of(key: str) -> str:
    return key.removeprefix(PREFIX).rsplit(".lora_", 1)[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_listing_from_config_matches_the_loaded_model(
    family: str, family_dirs: Callable[[str], tuple[Path, Path]]
) -> None:
    from transformers import AutoModelForCausalLM

    base, _ = family_dirs(family)
    listing = modules_from_model_dir(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    expected = adaptable_modules(model)
    assert listing.targets == expected
    assert list(listing.targets) == list(expected)  # model order
    leaves = {name.rpartition(".")[2] for name in listing.targets}
    assert leaves == set(DEFAULT_TARGETS[family])
    assert "lm_head" not in listing.targets


@pytest.mark.parametrize("family", FAMILIES)
def test_accepts_the_family_peft_adapter(
    family: str,
    family_dirs: Callable[[str], tuple[Path, Path]],
    open_registry: Callable[[Path, str], Registry],
) -> None:
    base, adapter = family_dirs(family)
    record = open_registry(base, family).push(adapter, "ok")
    assert record.key == "ok@1" and record.rank == 8
    assert set(record.target_modules) == set(SERVABLE_TARGETS[family])


@pytest.mark.parametrize("family", FAMILIES)
def test_refuses_a_wrong_shape_naming_the_module(
    family: str,
    family_dirs: Callable[[str], tuple[Path, Path]],
    open_registry: Callable[[Path, str], Registry],
    tmp_path: Path,
) -> None:
    base, adapter = family_dirs(family)
    tensors = load_file(adapter / "adapter_model.safetensors")
    key = sorted(k for k in tensors if ".lora_A." in k)[-1]
    r, in_features = tensors[key].shape
    tensors[key] = torch.zeros(r, in_features + 8)
    bad = copy_adapter(adapter, tmp_path / "bad", tensors=tensors)
    registry = open_registry(base, family)
    with pytest.raises(AdapterValidationError) as info:
        registry.push(bad, "bad-shape")
    message = info.value.message
    assert _module_of(key) in message
    assert f"[r, {in_features}]" in message
    assert_nothing_stored(registry, "bad-shape")


@pytest.mark.parametrize("family", FAMILIES)
def test_refuses_a_module_the_family_does_not_have(
    family: str,
    family_dirs: Callable[[str], tuple[Path, Path]],
    open_registry: Callable[[Path, str], Registry],
    tmp_path: Path,
) -> None:
    base, adapter = family_dirs(family)
    # A module of another family: Phi-3's fused projection, or Llama's separate one.
    foreign = "qkv_proj" if family != "phi3" else "q_proj"
    module = f"model.layers.0.self_attn.{foreign}"
    tensors = load_file(adapter / "adapter_model.safetensors")
    tensors[f"{PREFIX}{module}.lora_A.weight"] = torch.zeros(8, 64)
    tensors[f"{PREFIX}{module}.lora_B.weight"] = torch.zeros(64, 8)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["target_modules"] = [*config["target_modules"], foreign]
    bad = copy_adapter(adapter, tmp_path / "bad", config=config, tensors=tensors)
    registry = open_registry(base, family)
    with pytest.raises(AdapterValidationError, match=re.escape(module)):
        registry.push(bad, "foreign")
    assert_nothing_stored(registry, "foreign")


def test_qwen3_moe_serves_attention_and_dense_mlp(
    family_dirs: Callable[[str], tuple[Path, Path]],
    open_registry: Callable[[Path, str], Registry],
    tmp_path: Path,
) -> None:
    base, attention = family_dirs("qwen3_moe")
    listing = modules_from_model_dir(base)
    # Layer 0 is dense (mlp_only_layers); layers 1 and 2 are sparse MoE blocks.
    assert "model.layers.0.mlp.down_proj" in listing.targets
    assert not any(".mlp." in name for name in listing.targets if ".layers.0." not in name)
    assert set(listing.unserved) == {
        f"model.layers.{i}.mlp.{part}" for i in (1, 2) for part in ("experts", "gate")
    }
    base, attention = family_dirs("qwen3_moe")
    registry = open_registry(base, "qwen3_moe")
    assert registry.push(attention, "attn").target_modules == tuple(sorted(ATTENTION_PROJECTIONS))
    # The dense MLP of layer 0 (PEFT itself cannot target it by name: see SERVABLE_TARGETS).
    tensors = load_file(attention / "adapter_model.safetensors")
    module = "model.layers.0.mlp.down_proj"
    tensors[f"{PREFIX}{module}.lora_A.weight"] = torch.randn(8, 128) * 0.1
    tensors[f"{PREFIX}{module}.lora_B.weight"] = torch.randn(64, 8) * 0.1
    config = json.loads((attention / "adapter_config.json").read_text())
    config["target_modules"] = [*config["target_modules"], "down_proj"]
    dense = copy_adapter(attention, tmp_path / "dense", config=config, tensors=tensors)
    assert "down_proj" in registry.push(dense, "attn-and-dense").target_modules


def test_qwen3_moe_refuses_peft_adapter_on_every_projection(
    family_dirs: Callable[[str], tuple[Path, Path]],
    open_registry: Callable[[Path, str], Registry],
    tmp_path: Path,
) -> None:
    """PEFT given the seven projection names on qwen3_moe adapts the fused experts
    (`target_parameters` gate_up_proj / down_proj): refused, saying why."""
    base, _ = family_dirs("qwen3_moe")
    adapter = make_tiny_adapter(base, tmp_path / "all", family="qwen3_moe", seed=3)
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["target_parameters"]
    registry = open_registry(base, "qwen3_moe")
    with pytest.raises(AdapterValidationError, match=EXPERTS_REFUSED) as info:
        registry.push(adapter, "all-projections")
    assert ".mlp.experts" in info.value.message
    assert_nothing_stored(registry, "all-projections")


def test_qwen3_moe_refuses_peft_expert_parameters(
    family_dirs: Callable[[str], tuple[Path, Path]],
    open_registry: Callable[[Path, str], Registry],
    tmp_path: Path,
) -> None:
    """PEFT's own way to adapt transformers 5's fused 3D experts: `target_parameters`."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base, _ = family_dirs("qwen3_moe")
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj"],
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
        task_type="CAUSAL_LM",
    )
    get_peft_model(model, config).save_pretrained(tmp_path / "experts")
    registry = open_registry(base, "qwen3_moe")
    with pytest.raises(AdapterValidationError, match=EXPERTS_REFUSED) as info:
        registry.push(tmp_path / "experts", "experts")
    assert "model.layers.1.mlp.experts" in info.value.message
    assert "mixture-of-experts block 'model.layers.1.mlp'" in info.value.message
    assert_nothing_stored(registry, "experts")


def test_qwen3_moe_refuses_per_expert_linear_adapters(
    family_dirs: Callable[[str], tuple[Path, Path]],
    open_registry: Callable[[Path, str], Registry],
    tmp_path: Path,
) -> None:
    """Adapters trained under transformers 4, where each expert was an MLP of nn.Linear:
    keys `...mlp.experts.<i>.gate_proj.lora_A.weight`."""
    base, attention = family_dirs("qwen3_moe")
    tensors = load_file(attention / "adapter_model.safetensors")
    module = "model.layers.2.mlp.experts.3.gate_proj"
    tensors[f"{PREFIX}{module}.lora_A.weight"] = torch.zeros(8, 64)
    tensors[f"{PREFIX}{module}.lora_B.weight"] = torch.zeros(32, 8)
    bad = copy_adapter(attention, tmp_path / "bad", tensors=tensors)
    registry = open_registry(base, "qwen3_moe")
    with pytest.raises(AdapterValidationError, match=EXPERTS_REFUSED) as info:
        registry.push(bad, "experts")
    assert module in info.value.message
    assert_nothing_stored(registry, "experts")


def test_expert_check_only_explains_refusals(
    family_dirs: Callable[[str], tuple[Path, Path]], tmp_path: Path
) -> None:
    base, attention = family_dirs("qwen3_moe")
    spec = BaseModelSpec.from_directory(base, "moe", fingerprint=False)
    spec.refuse_unserved(attention, max_file_bytes=2**30)  # no expert keys: nothing to say
    spec.refuse_unserved(tmp_path, max_file_bytes=2**30)  # no weights file: the loader's job
    (tmp_path / "adapter_model.safetensors").write_bytes(b"garbage")
    spec.refuse_unserved(tmp_path, max_file_bytes=2**30)
    save_file(
        {f"{PREFIX}model.layers.1.mlp.gate.lora_A.weight": torch.zeros(2, 64)},
        tmp_path / "adapter_model.safetensors",
    )
    with pytest.raises(AdapterValidationError, match=re.escape("model.layers.1.mlp.gate")):
        spec.refuse_unserved(tmp_path, max_file_bytes=2**30)


def test_multimodal_wrappers_and_unknown_types_are_named() -> None:
    with pytest.raises(BaseModelError, match=r"model_type 'gemma3' is a multimodal wrapper"):
        targets_from_config({"model_type": "gemma3"})
    with pytest.raises(BaseModelError, match="model_type 'my_custom_lm'"):
        targets_from_config(
            {"model_type": "my_custom_lm", "auto_map": {"AutoModelForCausalLM": "x.Y"}}
        )
    with pytest.raises(BaseModelError, match="model_type must be"):
        targets_from_config({"hidden_size": 64})
    # Known to transformers but not a causal LM.
    with pytest.raises(BaseModelError, match="model_type 't5'"):
        targets_from_config({"model_type": "t5"})


def test_listing_is_cached_and_callers_get_copies(
    family_dirs: Callable[[str], tuple[Path, Path]],
) -> None:
    base, _ = family_dirs("phi3")
    config = json.loads((base / "config.json").read_text())
    first = modules_from_config(config)
    first.targets.clear()
    second = modules_from_config(config)
    assert second.targets == modules_from_model_dir(base).targets
    assert "model.layers.1.self_attn.qkv_proj" in second.targets
