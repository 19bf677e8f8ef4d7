"""Llama-family forward over a flattened, mixed (prefill + decode) batch of many sequences.

The weights are those of a Hugging Face ``LlamaForCausalLM`` (loaded by transformers, so
every checkpoint format it reads works); this module only replaces the forward pass: tokens
of all sequences are flattened into ``[T, hidden]`` so every linear layer is one GEMM for
the whole step, attention reads the static KV cache (``models.attention``), and the seven
projections of each layer run as four packed GEMMs (q/k/v, o, gate/up, down) that also add
the per-token adapter deltas (``PackedLoRALinear``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from adapterhub_server.lora.layers import LoRAContext, PackedLoRALinear
from adapterhub_server.lora.ops import LoRABatch
from adapterhub_server.lora.pool import LoRAWeightPool
from adapterhub_server.models.attention import AttentionMetadata, KVCache, attend
from adapterhub_server.models.linear import FrozenLinear


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
        self.qkv = nn.ModuleList()
        self.o = nn.ModuleList()
        self.gate_up = nn.ModuleList()
        self.down = nn.ModuleList()
        for i, layer in enumerate(hf_model.model.layers):
            sa, mlp = layer.self_attn, layer.mlp
            prefix = f"model.layers.{i}"

            def packed(bases: list[nn.Linear], key: str, prefix: str = prefix) -> PackedLoRALinear:
                return PackedLoRALinear(bases, f"{prefix}.{key}", pool, context)

            self.qkv.append(packed([sa.q_proj, sa.k_proj, sa.v_proj], "self_attn.qkv_proj"))
            self.o.append(packed([sa.o_proj], "self_attn.o_proj"))
            self.gate_up.append(packed([mlp.gate_proj, mlp.up_proj], "mlp.gate_up_proj"))
            self.down.append(packed([mlp.down_proj], "mlp.down_proj"))
        s = self.shape
        self._qkv_split = (
            s.num_heads * s.head_dim,
            s.num_kv_heads * s.head_dim,
            s.num_kv_heads * s.head_dim,
        )
        self._intermediate = hf_model.model.layers[0].mlp.gate_proj.out_features
        head = hf_model.lm_head
        self.lm_head = FrozenLinear(head.weight.detach(), getattr(head, "bias", None))

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
                q, k, v = self.qkv[i](x).split(self._qkv_split, dim=-1)
                q = q.view(num_tokens, s.num_heads, s.head_dim)
                k = k.view(num_tokens, s.num_kv_heads, s.head_dim)
                v = v.view(num_tokens, s.num_kv_heads, s.head_dim)
                q = q * cos + _rotate_half(q) * sin
                k = k * cos + _rotate_half(k) * sin
                h = residual + self.o[i](attend(q, k, v, cache, i, attn))
                residual = h
                x = layer.post_attention_layernorm(h)
                gate, up = self.gate_up[i](x).split(self._intermediate, dim=-1)
                h = residual + self.down[i](layer.mlp.act_fn(gate) * up)
            h = model.norm(h[logits_index])
            return self.lm_head(h).float()
        finally:
            self.lora_context.batch = None
