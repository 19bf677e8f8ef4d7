"""Uploads of adapters with full modules or trainable token rows are checked against the
base's embedding and head (read from the meta-device model), and stored with their kind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from adapterhub_server.errors import AdapterValidationError
from adapterhub_server.registry import Registry
from tests.full_module_adapters import make_full_module_adapter


def test_the_base_spec_knows_the_embedding_and_head(registry: Registry) -> None:
    embeddings = registry.base.embeddings
    assert embeddings is not None
    assert embeddings.embed_path and embeddings.head_path
    assert embeddings.embed_shape[0] == embeddings.head_shape[0] > 0  # vocab


@pytest.mark.parametrize(
    ("kwargs", "kind"),
    [
        ({"modules_to_save": ["lm_head"]}, "lora+modules_to_save"),
        ({"trainable_token_indices": [3, 17]}, "lora+trainable_tokens"),
    ],
)
def test_full_module_adapters_are_stored_with_their_kind(
    registry: Registry, tiny_base: Path, tmp_path: Path, kwargs: dict, kind: str
) -> None:
    adapter = make_full_module_adapter(tiny_base, tmp_path / "a", seed=1, **kwargs)
    record = registry.push(adapter, "full")
    assert record.kind == kind


def test_a_head_copy_of_the_wrong_vocabulary_is_refused_and_nothing_stored(
    registry: Registry, tiny_base: Path, tmp_path: Path
) -> None:
    adapter = make_full_module_adapter(
        tiny_base, tmp_path / "a", seed=2, modules_to_save=["lm_head"]
    )
    weights = adapter / "adapter_model.safetensors"
    tensors = load_file(weights)
    (head_key,) = [k for k in tensors if k.endswith("lm_head.weight")]
    tensors[head_key] = tensors[head_key][:-5].contiguous()
    save_file(tensors, weights)
    with pytest.raises(AdapterValidationError, match="lm_head"):
        registry.push(adapter, "bad-head")
    assert not registry.index.known_name("bad-head")


def test_token_indices_outside_the_vocabulary_are_refused(
    registry: Registry, tiny_base: Path, tmp_path: Path
) -> None:
    adapter = make_full_module_adapter(
        tiny_base, tmp_path / "a", seed=3, trainable_token_indices=[3, 17]
    )
    config_path = adapter / "adapter_config.json"
    config = json.loads(config_path.read_text())
    vocab = registry.base.embeddings.embed_shape[0]
    config["trainable_token_indices"] = [3, vocab + 4]
    config_path.write_text(json.dumps(config))
    with pytest.raises(AdapterValidationError, match=str(vocab + 4)):
        registry.push(adapter, "bad-tokens")
    assert not registry.index.known_name("bad-tokens")
