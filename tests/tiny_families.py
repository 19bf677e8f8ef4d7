"""Tiny random-weight checkpoints of every served decoder family, for fast CPU tests.

Each family's config turns on the feature that makes it differ from Llama (RoPE scaling,
sliding-window layers, soft-capping, q/k norms, biases, multipliers, fused projections,
experts) at sizes where a forward pass takes milliseconds. Nothing downloads: the
tokenizer is `tests.tiny_models.build_tokenizer()`, the weights are random from `seed`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from tests.tiny_models import ALL_PROJECTIONS, build_tokenizer, make_peft_adapter

FAMILIES: tuple[str, ...] = (
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma2",
    "gemma3_text",
    "phi3",
    "olmo2",
    "granite",
    "qwen3_moe",
)

SLIDING_WINDOW = 16
"""Window of the sliding-window layers (mistral, gemma2, gemma3_text): prompts longer than
this exercise the window."""

PHI3_ORIGINAL_MAX_POSITIONS = 64
"""Phi-3's longrope switches from `short_factor` to `long_factor` for a forward whose
largest position id is at or past this (transformers decides per forward, not per token)."""

ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")

DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    **{family: ALL_PROJECTIONS for family in FAMILIES},
    "phi3": ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),
}
"""Per family, the leaf names of every nn.Linear in its decoder layers (PEFT's all-linear
without lm_head); `make_tiny_adapter` targets these when given none.

On qwen3_moe these include the dense MLP of `mlp_only_layers`, but PEFT (0.21, on
transformers 5) rewrites gate_proj/up_proj/down_proj targets of a qwen2/qwen3-MoE model
into `target_parameters` on the 3D expert stacks, so the default adapter there adapts the
experts (not the dense MLP): pass `ATTENTION_PROJECTIONS` for a plain-module adapter."""

_HIDDEN = 64
_HEADS = 4
_KV_HEADS = 2
_INTERMEDIATE = 128
_MAX_POSITIONS = 256
_INIT_STD = 0.2
"""Larger than a real model's so logits are peaked and greedy decoding is not decided by
rounding noise (as in `tests.tiny_models`)."""
_VECTOR_STD = 0.1
"""Noise added to 1-D parameters (norm weights, biases) so that a swapped or ignored norm
or bias changes the output."""


def _family_config(family: str) -> dict[str, Any]:
    """The family-specific config fields; the shared sizes are added by `_config`."""
    if family == "llama":
        return {
            "num_hidden_layers": 2,
            "tie_word_embeddings": True,
            "rope_parameters": {
                "rope_type": "llama3",
                "rope_theta": 500_000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        }
    if family == "mistral":
        return {"num_hidden_layers": 2, "sliding_window": SLIDING_WINDOW}
    if family == "qwen2":
        # Qwen2's q/k/v always carry a bias.
        return {"num_hidden_layers": 2, "tie_word_embeddings": False}
    if family == "qwen3":
        return {"num_hidden_layers": 2, "head_dim": 32, "tie_word_embeddings": False}
    if family == "gemma2":
        # layer_types default to alternating sliding/full for gemma2.
        return {
            "num_hidden_layers": 4,
            "head_dim": 16,
            "hidden_activation": "gelu_pytorch_tanh",
            "query_pre_attn_scalar": 24,
            "sliding_window": SLIDING_WINDOW,
            "attn_logit_softcapping": 4.0,
            "final_logit_softcapping": 8.0,
        }
    if family == "gemma3_text":
        return {
            "num_hidden_layers": 4,
            "head_dim": 32,
            "hidden_activation": "gelu_pytorch_tanh",
            "query_pre_attn_scalar": 24,
            "sliding_window": SLIDING_WINDOW,
            "layer_types": [
                "sliding_attention",
                "full_attention",
                "sliding_attention",
                "full_attention",
            ],
            "rope_parameters": {
                "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
            },
            # transformers 5 does not pass this one to the attention function for gemma3
            # (real Gemma 3 checkpoints leave it null); set so a future pass-through is seen.
            "attn_logit_softcapping": 4.0,
            "final_logit_softcapping": 8.0,
        }
    if family == "phi3":
        rotary_dim = int(_HIDDEN // _HEADS * 0.75)
        return {
            "num_hidden_layers": 2,
            # Phi-3 configs keep this at top level; it overrides the one in rope_parameters.
            "original_max_position_embeddings": PHI3_ORIGINAL_MAX_POSITIONS,
            "rope_parameters": {
                "rope_type": "longrope",
                "rope_theta": 10_000.0,
                "partial_rotary_factor": 0.75,
                "short_factor": [1.0 + 0.1 * i for i in range(rotary_dim // 2)],
                "long_factor": [1.0 + 0.5 * i for i in range(rotary_dim // 2)],
                "original_max_position_embeddings": PHI3_ORIGINAL_MAX_POSITIONS,
                "factor": _MAX_POSITIONS / PHI3_ORIGINAL_MAX_POSITIONS,
            },
        }
    if family == "olmo2":
        return {"num_hidden_layers": 2}
    if family == "granite":
        return {
            "num_hidden_layers": 2,
            "embedding_multiplier": 4.0,
            "residual_multiplier": 0.5,
            "attention_multiplier": 0.2,
            "logits_scaling": 2.0,
        }
    if family == "qwen3_moe":
        return {
            "num_hidden_layers": 3,
            "head_dim": 16,
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 32,
            "norm_topk_prob": True,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [0],
        }
    raise ValueError(f"unknown family {family!r}; known: {', '.join(FAMILIES)}")


def _config(family: str, tokenizer) -> Any:
    from transformers import AutoConfig

    fields = {
        "vocab_size": len(tokenizer),
        "hidden_size": _HIDDEN,
        "intermediate_size": _INTERMEDIATE,
        "num_attention_heads": _HEADS,
        "num_key_value_heads": _KV_HEADS,
        "max_position_embeddings": _MAX_POSITIONS,
        "initializer_range": _INIT_STD,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        **_family_config(family),
    }
    config = AutoConfig.for_model(family, **fields)
    config.dtype = torch.float32
    return config


def _randomise(model: torch.nn.Module, seed: int) -> None:
    """Draw every parameter from `seed`, independently of the family's own init scheme.

    Matrices (including 3D expert stacks) get N(0, _INIT_STD); vectors keep the family's
    init (1 for Llama-style norms, 0 for Gemma's `1 + w` norms and for biases) plus noise.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in sorted(model.named_parameters()):
            noise = torch.randn(param.shape, generator=gen, dtype=torch.float32)
            if param.ndim >= 2:
                param.copy_(noise * _INIT_STD)
            else:
                param.add_(noise * _VECTOR_STD)


def _retune_gemma(model: torch.nn.Module) -> None:
    """Keep a random Gemma from copying its input token forever.

    Gemma multiplies the (tied) embeddings by sqrt(hidden), so at the shared init the
    residual stream is dominated by the current token's own embedding and greedy decoding
    repeats the last prompt token. Shrink the embeddings by sqrt(hidden) and move that gain
    into the final norm (Gemma norms scale by `1 + w`), give the sublayer outputs more
    weight through the post-norms, and sharpen attention through the q/k norms.
    """
    hidden = model.config.hidden_size
    with torch.no_grad():
        model.get_input_embeddings().weight.div_(hidden**0.5)
        model.model.norm.weight.add_(hidden**0.5 - 1)
        for name, param in model.named_parameters():
            if name.endswith(
                ("post_attention_layernorm.weight", "post_feedforward_layernorm.weight")
            ):
                param.add_(2.0)
            elif name.endswith(("q_norm.weight", "k_norm.weight")):
                param.add_(1.0)


def make_tiny_family(family: str, path: Path, *, seed: int = 0) -> Path:
    """Write a random `family` causal LM plus the tiny tokenizer as an HF directory at `path`."""
    from transformers import AutoModelForCausalLM

    tokenizer = build_tokenizer()
    config = _config(family, tokenizer)
    # The family's own init draws from the global RNG; `_randomise` overwrites it all, so
    # leave the caller's RNG stream untouched.
    with torch.random.fork_rng(devices=[]):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    _randomise(model, seed)
    if family.startswith("gemma"):
        _retune_gemma(model)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def make_tiny_adapter(
    base_dir: Path,
    out_dir: Path,
    *,
    family: str,
    seed: int,
    r: int = 8,
    alpha: int = 16,
    target_modules: Sequence[str] | None = None,
) -> Path:
    """Save a PEFT LoRA adapter with random non-zero A and B for the `family` model at `base_dir`.

    `target_modules` defaults to `DEFAULT_TARGETS[family]`.
    """
    targets = DEFAULT_TARGETS[family] if target_modules is None else tuple(target_modules)
    return make_peft_adapter(base_dir, out_dir, seed=seed, r=r, alpha=alpha, target_modules=targets)
