"""FSDP (fully sharded data parallel) for full-parameter SFT under torchrun.

Full SFT holds weights, gradients and two AdamW moments for every parameter: 16 bytes per
parameter in float32, which is what stops a plain DDP replica from fitting. FSDP2
(`fully_shard`) splits all four across ranks; each decoder layer is its own unit, gathered
just before it runs. LoRA runs keep DDP: their trainable state is tiny.

Checkpoints and the saved model need whole tensors: `full_tensor` gathers a sharded one (a
collective: every rank calls it), `shard_like` splits a whole one back on resume.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from trainer.modeling import causal_lm


def is_sharded(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor on CPU (gathered from every rank when sharded)."""
    if is_sharded(t):
        t = t.full_tensor()  # type: ignore[attr-defined]
    return t.detach().cpu()


def shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`full` laid out as `like` is (this rank's shard when `like` is sharded)."""
    if not is_sharded(like):
        return full.to(like.device)
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(
        full.to(like.device_mesh.device_type), like.device_mesh, like.placements
    )  # type: ignore[attr-defined]


def shard_full_sft(loss_module: nn.Module, device: torch.device) -> nn.Module:
    """Shard `loss_module` (a CausalLMLoss over a plain causal LM) in place; returns it.

    On CUDA the forward runs in bf16 with float32 master weights and float32 gradient
    reduction; on CPU everything stays float32.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if device.type == "cuda"
        else MixedPrecisionPolicy()
    )
    lm: Any = causal_lm(loss_module.model)  # type: ignore[attr-defined]
    for layer in lm.get_decoder().layers:
        fully_shard(layer, mp_policy=policy)
    # The root unit holds the rest (embeddings, final norm, tied LM head) and must be the
    # module the loop calls, so that its hooks gather them before the forward.
    fully_shard(loss_module, mp_policy=policy)
    return loss_module


def set_gradient_sync(module: nn.Module, enabled: bool) -> None:
    """FSDP's counterpart of DDP's `no_sync`: skip reduce-scatter on accumulation steps."""
    setter = getattr(module, "set_requires_gradient_sync", None)
    if callable(setter):
        setter(enabled)
