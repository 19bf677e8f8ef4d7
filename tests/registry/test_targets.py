from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from adapterhub_server.errors import BaseModelError
from adapterhub_server.lora.adapter import adaptable_modules
from adapterhub_server.registry.targets import (
    BaseModelSpec,
    targets_from_config,
    targets_from_model_dir,
)


def test_matches_the_loaded_tiny_model(tiny_base: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    expected = adaptable_modules(model)
    got = targets_from_model_dir(tiny_base)
    assert got == expected
    assert list(got) == list(expected)  # same (model) order
    assert len(got) == 7 * model.config.num_hidden_layers


@pytest.mark.parametrize(
    "overrides",
    [
        {"num_key_value_heads": 4},  # no GQA
        {"num_key_value_heads": 1},  # MQA
        {"head_dim": 8},  # head_dim not hidden / heads
        {"num_key_value_heads": None},  # absent: defaults to the head count
    ],
)
def test_matches_model_for_attention_variants(overrides: dict) -> None:
    kwargs = {
        "vocab_size": 64,
        "hidden_size": 32,
        "intermediate_size": 48,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    }
    for key, value in overrides.items():
        if value is None:
            kwargs.pop(key)
        else:
            kwargs[key] = value
    config = LlamaConfig(**kwargs)
    model = LlamaForCausalLM(config)
    as_json = json.loads(config.to_json_string())
    for key, value in overrides.items():
        if value is None:
            as_json.pop(key, None)
    assert targets_from_config(as_json) == adaptable_modules(model)


def test_rejects_other_architectures() -> None:
    with pytest.raises(BaseModelError, match="model_type 'gpt2'"):
        targets_from_config({"model_type": "gpt2", "n_embd": 64})
    with pytest.raises(BaseModelError, match="hidden_size"):
        targets_from_config({"model_type": "llama", "hidden_size": 0})


def test_base_model_spec(tiny_base: Path) -> None:
    spec = BaseModelSpec.from_directory(tiny_base, "tiny")
    assert spec.model_id == "tiny"
    assert spec.fingerprint is not None and len(spec.fingerprint) == 64
    assert spec.targets == targets_from_model_dir(tiny_base)
