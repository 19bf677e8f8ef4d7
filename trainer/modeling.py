"""The model under training: the base causal LM, wrapped with PEFT LoRA or trained in full,
and the loss module the loop (and DDP) runs.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trainer.config import TrainConfig
from trainer.data import IGNORE_INDEX


def pick_device(spec: str | None, local_rank: int = 0) -> torch.device:
    """`spec` as given, else this process's CUDA device when available, else CPU."""
    if spec:
        return torch.device(spec)
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def param_dtype(config: TrainConfig, device: torch.device) -> torch.dtype:
    """bfloat16 weights for LoRA on CUDA (the frozen base), float32 otherwise.

    Full SFT keeps float32 master weights everywhere and runs the CUDA forward under bf16
    autocast: AdamW updates on bf16 weights lose most small steps to rounding.
    """
    if device.type == "cuda" and config.is_lora:
        return torch.bfloat16
    return torch.float32


def build_model(base_path: Path, config: TrainConfig, device: torch.device) -> Any:
    """Load the base and make it trainable: fresh LoRA (PEFT) or every parameter (full)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=param_dtype(config, device))
    model.config.use_cache = False
    if config.gradient_checkpointing:
        # Non-reentrant: works with frozen inputs (LoRA) and with DDP, no input grads needed.
        # transformers 5 renamed the method (the old name warns; 4.x has only the old one).
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if config.is_lora:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            task_type="CAUSAL_LM",
            r=config.r,
            lora_alpha=config.alpha,
            lora_dropout=config.dropout,
            target_modules=list(config.target_modules),
            use_rslora=config.rslora,
            bias="none",
        )
        torch.manual_seed(config.seed)  # LoRA A init draws from the global generator
        with warnings.catch_warnings():
            # peft 0.21 still calls a transformers 5 attribute that warns on every run.
            warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated")
            model = get_peft_model(model, lora)
    else:
        model.requires_grad_(True)
    return model.to(device)


def causal_lm(model: Any) -> Any:
    """The transformers `*ForCausalLM` inside a PeftModel (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


class CausalLMLoss(nn.Module):
    """Summed next-token cross-entropy over the trained positions of a batch.

    The LM head runs only on positions whose next token carries loss: on chat data most
    tokens are prompt, and the vocabulary projection (49k x 576 for SmolLM2) plus its
    [tokens, vocab] float32 logits are a large share of a small model's step.

    Wrapping the whole computation in one module lets DDP hook a single forward.
    """

    def __init__(self, model: Any, autocast_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.model = model
        self.autocast_dtype = autocast_dtype
        lm = causal_lm(model)
        # A tuple, not attributes: registering the submodules a second time would give their
        # parameters two names (state dicts, FSDP) for one tensor.
        self._parts = (lm.get_decoder(), lm.get_output_embeddings())

    def forward(self, inputs: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        """inputs: input_ids [B, L] (+ attention_mask or position_ids [B, L]);
        labels [B, L] -> scalar: the loss summed over trained tokens (float32)."""
        device_type = labels.device.type
        with torch.autocast(
            device_type,
            dtype=self.autocast_dtype or torch.float32,
            enabled=self.autocast_dtype is not None,
        ):
            decoder, head = self._parts
            hidden = decoder(**inputs, use_cache=False).last_hidden_state
            targets = labels[:, 1:]
            keep = targets != IGNORE_INDEX
            selected = hidden[:, :-1][keep]  # [N, H]
            logits = head(selected)  # [N, V]
        return F.cross_entropy(logits.float(), targets[keep], reduction="sum")


def trainable_parameters(model: Any) -> list[tuple[str, nn.Parameter]]:
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]
