"""Llama-family forward over a flattened, mixed (prefill + decode) batch of many sequences.

The weights are those of a Hugging Face ``LlamaForCausalLM`` (loaded by transformers, so
every checkpoint format it reads works); this module only replaces the forward pass: tokens
of all sequences are flattened into ``[T, hidden]`` so every linear layer is one GEMM for
the whole step, attention reads the static KV cache (``models.attention``), and the seven
projections of each layer are wrapped in ``LoRALinear`` to add per-token adapter deltas.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from adapterhub_server.lora.adapter import TargetShape
from adapterhub_server.lora.layers import LoRAContext, LoRALinear
from adapterhub_server.lora.ops import LoRABatch
from adapterhub_server.lora.pool import LoRAWeightPool
from adapterhub_server.models.attention import AttentionMetadata, KVCache, attend

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ModelShape:
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int


def model_shape(config: object) -> ModelShape:
    heads = config.num_attention_heads
    return ModelShape(
        num_layers=config.num_hidden_layers,
        hidden_size=config.hidden_size,
        num_heads=heads,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
        vocab_size=config.vocab_size,
        max_position_embeddings=config.max_position_embeddings,
    )


def adaptable_targets(hf_model: nn.Module) -> dict[str, TargetShape]:
    """Module path -> shape for every projection a LoRA adapter may target."""
    targets: dict[str, TargetShape] = {}
    for i, layer in enumerate(hf_model.model.layers):
        for part, names in (("self_attn", PROJECTIONS[:4]), ("mlp", PROJECTIONS[4:])):
            for name in names:
                lin = getattr(getattr(layer, part), name)
                targets[f"model.layers.{i}.{part}.{name}"] = TargetShape(
                    lin.in_features, lin.out_features
                )
    return targets


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class BatchedLlama(nn.Module):
    """Serving forward for a ``LlamaForCausalLM`` (also Mistral/Qwen2-style without biases)."""

    def __init__(self, hf_model: nn.Module, pool: LoRAWeightPool, context: LoRAContext) -> None:
        super().__init__()
        self.hf = hf_model
        self.shape = model_shape(hf_model.config)
        self.lora_context = context
        for i, layer in enumerate(hf_model.model.layers):
            for part, names in (("self_attn", PROJECTIONS[:4]), ("mlp", PROJECTIONS[4:])):
                module = getattr(layer, part)
                for name in names:
                    key = f"model.layers.{i}.{part}.{name}"
                    setattr(module, name, LoRALinear(getattr(module, name), key, pool, context))

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        attn: AttentionMetadata,
        cache: KVCache,
        lora: LoRABatch | None,
        logits_index: torch.Tensor,
    ) -> torch.Tensor:
        """Run one step.

        Args:
            input_ids: ``[T]`` int64, flattened tokens of all sequences.
            positions: ``[T]`` int64, each token's position in its sequence.
            attn: layout of the flat batch (decode tokens first, then prefill chunks).
            cache: the KV cache the sequences' rows live in.
            lora: per-token adapter routing, or None when no token uses an adapter.
            logits_index: ``[S]`` int64, the tokens whose next-token logits are needed.
        Returns:
            ``[S, vocab]`` float32 logits.
        """
        s = self.shape
        model = self.hf.model
        self.lora_context.batch = lora
        try:
            h = model.embed_tokens(input_ids)  # [T, hidden]
            cos, sin = model.rotary_emb(h, positions[None, :])
            cos, sin = cos[0, :, None, :], sin[0, :, None, :]  # [T, 1, head_dim]
            num_tokens = input_ids.shape[0]
            for i, layer in enumerate(model.layers):
                residual = h
                x = layer.input_layernorm(h)
                sa = layer.self_attn
                q = sa.q_proj(x).view(num_tokens, s.num_heads, s.head_dim)
                k = sa.k_proj(x).view(num_tokens, s.num_kv_heads, s.head_dim)
                v = sa.v_proj(x).view(num_tokens, s.num_kv_heads, s.head_dim)
                q = q * cos + _rotate_half(q) * sin
                k = k * cos + _rotate_half(k) * sin
                h = residual + sa.o_proj(attend(q, k, v, cache, i, attn))
                residual = h
                x = layer.post_attention_layernorm(h)
                mlp = layer.mlp
                h = residual + mlp.down_proj(mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x))
            h = model.norm(h[logits_index])
            return self.hf.lm_head(h).float()
        finally:
            self.lora_context.batch = None
