"""The adaptable modules of a base model, found from its config.json alone.

Validating an upload needs the shape of every linear an adapter may target. Loading the
weights to find out would cost seconds and hundreds of MB in a CLI that only copies files.
Instead the family's own transformers class is built from the config on the meta device
(no weights read or allocated, no code from the checkpoint imported) and its modules are
listed with the engine's own rule (`adaptable_modules`), so every decoder family that
transformers implements is covered without a per-family table and the registry accepts
exactly the modules the engine wraps. Building a meta model takes tens of milliseconds;
the listing is cached per config.

Mixture-of-experts blocks are listed too: their experts (in transformers 5, 3D parameters
of one `experts` module, not linears) and routers are not served, and an adapter with
weights for them is refused naming the block (`BaseModelSpec.refuse_unserved`).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from adapterhub_server.errors import AdapterValidationError, BaseModelError
from adapterhub_server.lora.adapter import WEIGHTS_FILE, TargetShape, adaptable_modules
from adapterhub_server.lora.full_modules import EmbeddingTargets, embedding_targets

_KEY_PREFIX = "base_model.model."
"""What PEFT puts before a module path in an adapter's tensor names."""

# Checked when present, so that a broken config fails with the field's name rather than
# with whatever the family's constructor trips over.
_POSITIVE_INT_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
)

_CACHE_SIZE = 16


@dataclass(frozen=True)
class ModuleListing:
    """What a base model offers adapters."""

    targets: dict[str, TargetShape]
    """Module path -> shape of every adaptable linear (`adaptable_modules`), in model order."""
    unserved: dict[str, str]
    """Module path -> why no adapter may have weights for it or anything below it: the
    experts and routers of mixture-of-experts blocks."""
    embeddings: EmbeddingTargets | None = None
    """The input embedding and output head that full-module adapters (`modules_to_save`,
    trainable tokens) are checked against."""


def _moe_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(path, module) of every mixture-of-experts block: a module with an `experts` child
    (transformers' name for the expert stack, whether fused 3D parameters or a list of MLPs)."""
    return [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(getattr(module, "experts", None), nn.Module)
    ]


def list_modules(model: nn.Module) -> ModuleListing:
    """The adaptable linears of `model` (a CausalLM, real or on the meta device) and the
    parts of its MoE blocks that are not served.

    Within an MoE block, every child holding no adaptable linear (the experts, a router that
    is not an nn.Linear) is unserved; dense children (a shared expert MLP) stay adaptable.
    """
    targets = adaptable_modules(model)
    unserved: dict[str, str] = {}
    for block, module in _moe_blocks(model):
        for child, _ in module.named_children():
            path = f"{block}.{child}" if block else child
            if not any(t.startswith(path + ".") or t == path for t in targets):
                unserved[path] = (
                    f"it is part of the mixture-of-experts block {block!r} (experts and "
                    "router): expert weights are not served; LoRA on the attention and dense "
                    "MLP modules of MoE models is"
                )
    return ModuleListing(targets=targets, unserved=unserved, embeddings=embedding_targets(model))


def _check_config(config: Mapping[str, Any]) -> str:
    """The config's model_type, after the checks that need no transformers class."""
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise BaseModelError(
            f"base model config.json: model_type must be a non-empty string, got {model_type!r}"
        )
    for key in _POSITIVE_INT_KEYS:
        value = config.get(key)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise BaseModelError(
                f"base model config.json: {key} must be a positive integer, got {value!r}"
            )
    return model_type


def _build_meta_model(config: Mapping[str, Any], model_type: str) -> nn.Module:
    """The family's CausalLM built from `config` on the meta device."""
    import torch
    from transformers import CONFIG_MAPPING, AutoModelForCausalLM

    if model_type not in CONFIG_MAPPING:
        raise BaseModelError(
            f"base model config.json: model_type {model_type!r} is not a model type this "
            "version of transformers implements (code shipped with a checkpoint is never run)"
        )
    # auto_map names code shipped with a checkpoint, which is never imported; quantization
    # changes how weights are stored, not the modules' shapes.
    fields = {k: v for k, v in config.items() if k not in ("auto_map", "quantization_config")}
    try:
        hf_config = CONFIG_MAPPING[model_type].from_dict(fields)
    except Exception as exc:  # each family's config class raises its own errors
        raise BaseModelError(
            f"base model config.json: not a valid {model_type!r} config: {exc}"
        ) from exc
    if getattr(hf_config, "sub_configs", None):
        raise BaseModelError(
            f"base model config.json: model_type {model_type!r} is a multimodal wrapper "
            f"(with {', '.join(sorted(hf_config.sub_configs))}), not a decoder-only language "
            "model; serve its text model (its text_config as a checkpoint of its own)"
        )
    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(
                hf_config, attn_implementation="eager", trust_remote_code=False
            )
    except Exception as exc:  # unknown to AutoModelForCausalLM, or a config it cannot build
        raise BaseModelError(
            f"base model config.json: model_type {model_type!r} cannot be built as a "
            f"transformers causal LM: {exc}"
        ) from exc


def meta_model_from_config(config: Mapping[str, Any]) -> nn.Module:
    """The CausalLM that `config` (a parsed config.json) describes, built on the meta device:
    every module with its real shapes, no storage. Not cached (callers may change it).

    Raises BaseModelError naming the model type when the config is not that of a
    decoder-only causal LM transformers implements (unknown type, multimodal wrapper) or a
    field is invalid.
    """
    return _build_meta_model(config, _check_config(config))


def meta_model_from_dir(path: Path) -> nn.Module:
    """`meta_model_from_config` of `<path>/config.json`."""
    return meta_model_from_config(_read_config(path))


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _listing_of(canonical: str) -> ModuleListing:
    model = meta_model_from_config(json.loads(canonical))
    listing = list_modules(model)
    if not listing.targets:
        raise BaseModelError(
            f"base model config.json: model_type {model.config.model_type!r} "
            f"({type(model).__name__}) has no nn.Linear modules inside its decoder layers "
            "for LoRA to adapt"
        )
    return listing


def modules_from_config(config: Mapping[str, Any]) -> ModuleListing:
    """`list_modules` of the CausalLM that `config` (a parsed config.json) describes.

    Cached per config, so that every upload, job and start-up after the first costs a dict
    copy. Raises BaseModelError naming the model type when the config is not that of a
    decoder-only causal LM transformers implements (unknown type, multimodal wrapper, no
    linear layers) or a field is invalid.
    """
    try:
        canonical = json.dumps(dict(config), sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise BaseModelError(f"base model config.json: not plain JSON data: {exc}") from exc
    listing = _listing_of(canonical)
    return ModuleListing(
        targets=dict(listing.targets),
        unserved=dict(listing.unserved),
        embeddings=listing.embeddings,
    )


def targets_from_config(config: Mapping[str, Any]) -> dict[str, TargetShape]:
    """Module path -> shape of every adaptable linear of the CausalLM `config` describes.

    Paths are relative to the CausalLM ("model.layers.0.self_attn.q_proj"), the ones PEFT
    writes after "base_model.model.", in the order the model defines them.

    Raises BaseModelError (see `modules_from_config`).
    """
    return modules_from_config(config).targets


def _read_config(path: Path) -> dict[str, Any]:
    config_path = Path(path) / "config.json"
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise BaseModelError(f"cannot read base model config {config_path}: {exc}") from exc
    if not isinstance(config, dict):
        raise BaseModelError(f"{config_path} is not a JSON object")
    return config


def modules_from_model_dir(path: Path) -> ModuleListing:
    """`modules_from_config` of `<path>/config.json`."""
    return modules_from_config(_read_config(path))


def targets_from_model_dir(path: Path) -> dict[str, TargetShape]:
    """`targets_from_config` of `<path>/config.json`."""
    return modules_from_model_dir(path).targets


@dataclass(frozen=True)
class BaseModelSpec:
    """What uploads are validated against, and recorded with each version."""

    model_id: str
    """Id of the base model (e.g. "HuggingFaceTB/SmolLM2-135M-Instruct")."""
    targets: Mapping[str, TargetShape] = field(repr=False)
    """Every adaptable module and its shape (see `targets_from_config`)."""
    fingerprint: str | None = None
    """sha256 over the base weights (`weights_fingerprint`); None when not computed."""
    unserved: Mapping[str, str] = field(default_factory=dict, repr=False)
    """Module path -> why adapters may not have weights for it or below it (see
    `ModuleListing.unserved`)."""
    embeddings: EmbeddingTargets | None = field(default=None, repr=False)
    """The base's input embedding and head (`ModuleListing.embeddings`); None: adapters
    with full modules or trainable tokens cannot be validated, so they are refused."""

    @classmethod
    def from_directory(
        cls, path: Path, model_id: str | None = None, *, fingerprint: bool = True
    ) -> BaseModelSpec:
        """Spec of a local HF-format model directory (config only; weights are hashed, not loaded)."""
        from adapterhub_server.base_model import weights_fingerprint

        path = Path(path)
        listing = modules_from_model_dir(path)
        return cls(
            model_id=model_id or path.name,
            targets=listing.targets,
            fingerprint=weights_fingerprint(path) if fingerprint else None,
            unserved=listing.unserved,
            embeddings=listing.embeddings,
        )

    def refuse_unserved(self, adapter_dir: Path, *, max_file_bytes: int) -> None:
        """Raise AdapterValidationError if the adapter in `adapter_dir` has weights for a
        module this base does not serve (MoE experts), naming the tensor and the block.

        Reads only the safetensors header; returns when there is nothing to say, including
        when the header cannot be read (the loader reports that in its own words).
        """
        if not self.unserved:
            return
        from adapterhub_server.lora.safetensors_check import read_safetensors_header

        weights = Path(adapter_dir) / WEIGHTS_FILE
        if not weights.is_file():
            return
        try:
            names = read_safetensors_header(weights, max_file_bytes=max_file_bytes)
        except AdapterValidationError:
            return
        for key in names:
            if not key.startswith(_KEY_PREFIX):
                continue
            parts = key[len(_KEY_PREFIX) :].split(".")
            for end in range(1, len(parts) + 1):
                module = ".".join(parts[:end])
                why = self.unserved.get(module)
                if why is not None:
                    raise AdapterValidationError(
                        f"{WEIGHTS_FILE}: tensor {key!r} is for {module!r}, which this base "
                        f"model does not serve: {why}",
                        param="file",
                    )
