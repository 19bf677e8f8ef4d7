"""Any transformers decoder-only CausalLM, run over a flattened mixed batch of sequences.

The engine never re-implements a family's forward: the Hugging Face model runs as it is,
with its own modules (rotary variants and scaling, q/k norms, soft-capping, multipliers,
biases, sliding-window layers, MoE routing), on one batch row that holds every sequence's
tokens of the step (``[1, T]``, with each token's own position). What it swaps in:

- attention: the model is loaded with ``attn_implementation=ATTENTION``, so every layer's
  attention reads and writes the engine's KV cache (`models.attention_interface`);
- linear layers: whoever builds the model replaces adaptable linears with modules of the
  same call signature (the batched-LoRA layers), through `replace_module`;
- the output head: a frozen, prepacked copy (`FrozenLinear`), fed only the tokens whose
  logits are needed (transformers' ``logits_to_keep``);
- adapters' full modules and trainable token rows (`lora.full_module_batch`): a forward
  hook on the input embedding rewrites the rows of their tokens, and the head computes the
  logits of their rows from their copies. Both run only in steps that have such adapters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from adapterhub_server.frozen_linear import FrozenLinear
from adapterhub_server.lora.full_module_batch import FullModuleBatch
from adapterhub_server.models.attention import AttentionMetadata, KVCache
from adapterhub_server.models.attention_interface import ATTENTION, STEP_KWARG, StepAttention


@dataclass(frozen=True)
class ModelShape:
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int


def model_shape(config: Any) -> ModelShape:
    """The cache-relevant dimensions of a (text) model config."""
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


class StepContext(Protocol):
    """Per-step state that layers swapped into the model read (the LoRA routing)."""

    batch: Any


class FullModuleContext:
    """Holds the current step's full-module routing, shared by the embedding hook and the
    head."""

    def __init__(self) -> None:
        self.batch: FullModuleBatch | None = None


class FrozenHead(nn.Module):
    """The output projection as a prepacked `FrozenLinear`, for ``[..., hidden]`` input; the
    rows of adapters with their own head (or head token rows) come from those."""

    def __init__(self, head: nn.Linear, context: FullModuleContext | None = None) -> None:
        super().__init__()
        self.linear = FrozenLinear(head.weight.detach(), getattr(head, "bias", None))
        self.out_features = head.out_features
        self.context = context

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: ``[..., hidden]`` -> ``[..., vocab]``."""
        flat = x.reshape(-1, x.shape[-1])
        logits = self.linear(flat)
        batch = self.context.batch if self.context is not None else None
        if batch is not None and batch.touches_head:
            logits = _route_head(batch, flat, logits)
        return logits.view(*x.shape[:-1], self.out_features)


def _route_head(batch: FullModuleBatch, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """x: ``[S, hidden]``, logits: ``[S, vocab]`` of the base head -> the step's logits."""
    for g in batch.head_tables:
        logits[g.rows] = F.linear(x[g.rows], g.weight, g.bias).to(logits.dtype)
    for h in batch.head_rows:
        # PEFT computes these logits with the row in place of the base row: same dot product.
        logits[h.rows[:, None], h.cols[None, :]] = (x[h.rows] @ h.values.T).to(logits.dtype)
    return logits


def _embedding_hook(context: FullModuleContext):
    """A forward hook for the input embedding that puts adapters' rows in place."""

    def hook(module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor:
        batch = context.batch
        if batch is None or not batch.touches_embedding:
            return output
        ids = (args[0] if args else next(iter(kwargs.values()))).reshape(-1)
        out = output.clone()
        flat = out.view(-1, out.shape[-1])
        # Families that scale embeddings in the module (Gemma 3) scale these rows too, as
        # PEFT's full copy (the module itself) and its token rows do.
        scale = getattr(module, "embed_scale", None)
        for g in batch.embed_tables:
            flat[g.rows] = _scaled(F.embedding(ids[g.rows], g.weight), scale)
        if batch.embed_rows is not None:
            assert batch.embed_values is not None
            flat[batch.embed_rows] = _scaled(batch.embed_values, scale)
        return out

    return hook


def _scaled(rows: torch.Tensor, scale: object) -> torch.Tensor:
    if scale is None:
        return rows
    return rows * torch.as_tensor(scale, device=rows.device).to(rows.dtype)


def replace_module(model: nn.Module, path: str, module: nn.Module) -> None:
    """Put `module` at `path` (dotted, relative to `model`) in place of what is there."""
    parent_path, _, leaf = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, leaf, module)


class BatchedCausalLM(nn.Module):
    """Serving forward of a Hugging Face CausalLM loaded with ``attn_implementation=ATTENTION``."""

    def __init__(self, hf_model: nn.Module, context: StepContext) -> None:
        super().__init__()
        implementation = getattr(hf_model.config, "_attn_implementation", None)
        if implementation != ATTENTION:
            raise ValueError(f"load the model with attn_implementation={ATTENTION!r}")
        self.hf = hf_model
        self.shape = model_shape(hf_model.config)
        self.step_context = context
        self.full_context = FullModuleContext()
        head = hf_model.get_output_embeddings()
        if isinstance(head, nn.Linear):
            hf_model.set_output_embeddings(FrozenHead(head, self.full_context))
        embed = hf_model.get_input_embeddings()
        if isinstance(embed, nn.Embedding):
            embed.register_forward_hook(_embedding_hook(self.full_context), with_kwargs=True)

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        attn: AttentionMetadata,
        cache: KVCache,
        lora: Any,
        logits_index: torch.Tensor,
        full: FullModuleBatch | None = None,
    ) -> torch.Tensor:
        """Run one step.

        Args:
            input_ids: ``[T]`` int64, flattened tokens of all sequences.
            positions: ``[T]`` int64, each token's position in its sequence.
            attn: layout of the flat batch (decode tokens first, then prefill chunks).
            cache: the KV cache the sequences' rows live in.
            lora: the step's adapter routing (handed to the swapped-in layers through the
                step context), or None.
            logits_index: ``[S]`` int64, the tokens whose next-token logits are needed.
            full: which tokens and logits rows use adapters' full modules or token rows
                (rows of `full` index the flat tokens and `logits_index`), or None.
        Returns:
            ``[S, vocab]`` float32 logits, after the family's own final processing
            (soft-capping, logit scaling).
        """
        self.step_context.batch = lora
        self.full_context.batch = full
        try:
            out = self.hf(
                input_ids=input_ids[None],
                position_ids=positions[None],
                use_cache=False,
                logits_to_keep=logits_index,
                **{STEP_KWARG: StepAttention(attn, cache)},
            )
            return out.logits[0].float()
        finally:
            self.step_context.batch = None
            self.full_context.batch = None

    def layers_attending(self, attn: AttentionMetadata, cache: KVCache) -> dict[int, int | None]:
        """Run a one-token step and return, for each layer whose attention went through the
        engine (every layer must, or the model is not servable), its sliding window."""
        step = StepAttention(attn, cache)
        self.step_context.batch = None
        with torch.inference_mode():
            self.hf(
                input_ids=torch.zeros(1, 1, dtype=torch.long, device=cache.k.device),
                position_ids=torch.zeros(1, 1, dtype=torch.long, device=cache.k.device),
                use_cache=False,
                logits_to_keep=1,
                **{STEP_KWARG: step},
            )
        return step.windows
