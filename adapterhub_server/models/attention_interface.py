"""The engine's attention, registered with transformers' attention interface.

A family's own attention module computes q/k/v, its norms and its rotary embedding, then
calls the function registered under its config's `_attn_implementation`. Under the name
`ATTENTION` that function is `engine_attention`: it writes the step's keys and values into
the engine's KV cache and attends over the flattened batch (`models.attention.attend`),
honouring the layer's scaling, sliding window and soft-capping. transformers builds no mask
for an implementation it has no mask function for, so none is materialised per step.

The step's layout travels to it as the keyword argument `adapterhub_step`, which
transformers passes from the model's forward down to every attention call.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from adapterhub_server.models.attention import AttentionMetadata, KVCache, attend

ATTENTION = "adapterhub"
"""The `attn_implementation` name the engine loads models with."""
STEP_KWARG = "adapterhub_step"

# Keyword arguments that change what attention computes and that `attend` cannot honour:
# a model passing one of them (not None) is refused rather than served wrongly.
_UNSUPPORTED = ("s_aux", "sinks", "alibi", "position_bias", "attention_chunk_size")


@dataclass
class StepAttention:
    """What every attention call of one forward pass needs: the layout and the cache."""

    meta: AttentionMetadata
    cache: KVCache
    windows: dict[int, int | None] = field(default_factory=dict)
    """Layer index -> the sliding window it attended with (None: every key), for every
    layer that attended through the engine (checked at start-up)."""


class UnsupportedAttentionError(RuntimeError):
    """A model's attention asked for something the engine's attention cannot compute."""


def engine_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-interface signature over the engine's KV cache.

    Args:
        query: ``[1, heads, T, head_dim]``; key, value: ``[1, kv_heads, T, head_dim]``
            (the step's tokens, flattened into one batch row, rotary applied).
        attention_mask: ignored (None: no mask function is registered); visibility comes
            from the step's layout.
    Returns:
        ``([1, T, heads, head_dim], None)``.
    """
    step: StepAttention | None = kwargs.get(STEP_KWARG)
    if step is None:
        raise UnsupportedAttentionError(
            f"the {ATTENTION!r} attention runs only inside an engine step"
        )
    for name in _UNSUPPORTED:
        if kwargs.get(name) is not None:
            raise UnsupportedAttentionError(f"attention with {name!r} is not supported")
    layer = module.layer_idx
    step.windows[layer] = sliding_window
    _, heads, tokens, head_dim = query.shape
    out = attend(
        query[0].transpose(0, 1),
        key[0].transpose(0, 1),
        value[0].transpose(0, 1),
        step.cache,
        layer,
        step.meta,
        scale=scaling,
        sliding_window=sliding_window,
        softcap=softcap,
    )
    return out.view(1, tokens, heads, head_dim), None


def register() -> None:
    """Make `ATTENTION` a valid `attn_implementation` (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION, engine_attention)
