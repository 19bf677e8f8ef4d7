"""The adaptable modules of a base model, computed from its config.json alone.

Validating an upload needs the shape of every linear an adapter may target. Loading the
weights to find out would cost seconds and hundreds of MB in a CLI that only copies files,
so the shapes are derived from the config, the way the Llama-family modeling code builds
its layers (tests check the result against `adaptable_modules(model)`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapterhub_server.errors import BaseModelError
from adapterhub_server.lora.adapter import TargetShape

LLAMA_FAMILY: frozenset[str] = frozenset({"llama", "mistral", "qwen2", "qwen3"})
"""`model_type`s whose decoder layers hold self_attn.{q,k,v,o}_proj and mlp.{gate,up,down}_proj
with the shapes computed below."""


def _positive_int(config: Mapping[str, Any], key: str) -> int:
    value = config.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise BaseModelError(
            f"base model config.json: {key} must be a positive integer, got {value!r}"
        )
    return value


def targets_from_config(config: Mapping[str, Any]) -> dict[str, TargetShape]:
    """Module path -> shape of every adaptable projection of a Llama-family CausalLM.

    Paths are relative to the CausalLM ("model.layers.0.self_attn.q_proj"), the ones PEFT
    writes after "base_model.model.", in the order the model defines them.

    Raises BaseModelError if the config is not Llama-family or lacks a needed field.
    """
    model_type = config.get("model_type")
    if model_type not in LLAMA_FAMILY:
        raise BaseModelError(
            f"base model config.json: model_type {model_type!r} is not supported for "
            f"config-only validation (supported: {', '.join(sorted(LLAMA_FAMILY))})"
        )
    hidden = _positive_int(config, "hidden_size")
    intermediate = _positive_int(config, "intermediate_size")
    heads = _positive_int(config, "num_attention_heads")
    layers = _positive_int(config, "num_hidden_layers")
    # Both default the way transformers' configs do: no GQA, and head_dim = hidden / heads.
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads
    for key, value in (("num_key_value_heads", kv_heads), ("head_dim", head_dim)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise BaseModelError(
                f"base model config.json: {key} must be a positive integer, got {value!r}"
            )

    q_out, kv_out = heads * head_dim, kv_heads * head_dim
    per_layer = {
        "self_attn.q_proj": TargetShape(in_features=hidden, out_features=q_out),
        "self_attn.k_proj": TargetShape(in_features=hidden, out_features=kv_out),
        "self_attn.v_proj": TargetShape(in_features=hidden, out_features=kv_out),
        "self_attn.o_proj": TargetShape(in_features=q_out, out_features=hidden),
        "mlp.gate_proj": TargetShape(in_features=hidden, out_features=intermediate),
        "mlp.up_proj": TargetShape(in_features=hidden, out_features=intermediate),
        "mlp.down_proj": TargetShape(in_features=intermediate, out_features=hidden),
    }
    return {
        f"model.layers.{i}.{suffix}": shape
        for i in range(layers)
        for suffix, shape in per_layer.items()
    }


def targets_from_model_dir(path: Path) -> dict[str, TargetShape]:
    """`targets_from_config` of `<path>/config.json`."""
    config_path = Path(path) / "config.json"
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise BaseModelError(f"cannot read base model config {config_path}: {exc}") from exc
    if not isinstance(config, dict):
        raise BaseModelError(f"{config_path} is not a JSON object")
    return targets_from_config(config)


@dataclass(frozen=True)
class BaseModelSpec:
    """What uploads are validated against, and recorded with each version."""

    model_id: str
    """Id of the base model (e.g. "HuggingFaceTB/SmolLM2-135M-Instruct")."""
    targets: Mapping[str, TargetShape] = field(repr=False)
    """Every adaptable module and its shape (see `targets_from_config`)."""
    fingerprint: str | None = None
    """sha256 over the base weights (`weights_fingerprint`); None when not computed."""

    @classmethod
    def from_directory(
        cls, path: Path, model_id: str | None = None, *, fingerprint: bool = True
    ) -> BaseModelSpec:
        """Spec of a local HF-format model directory (config only; weights are hashed, not loaded)."""
        from adapterhub_server.base_model import weights_fingerprint

        path = Path(path)
        return cls(
            model_id=model_id or path.name,
            targets=targets_from_model_dir(path),
            fingerprint=weights_fingerprint(path) if fingerprint else None,
        )
