"""The model under training: the base causal LM, wrapped with PEFT LoRA or trained in full,
and the loss module the loop (and DDP) runs.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trainer.config import ALL_LINEAR, TrainConfig, TrainConfigError
from trainer.data import IGNORE_INDEX

logger = logging.getLogger("trainer")


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


def _moved_to_experts(model: nn.Module, names: Sequence[str]) -> set[str]:
    """The names among `names` that PEFT would not adapt as modules but move to the fused
    expert parameters of a mixture-of-experts model (`target_parameters`).

    Under transformers 5, PEFT maps the transformers 4 expert names (`gate_proj`, `up_proj`,
    `down_proj` on Qwen-MoE, `w1`/`w2`/`w3` on Mixtral) onto the experts' 3D parameters,
    whatever module they were meant for. Expert weights are not served, so such names are
    left out of `all-linear` and refused when asked for.
    """
    try:
        from peft import LoraConfig
        from peft.utils.transformers_weight_conversion import (
            convert_peft_config_for_transformers,
            get_model_conversion_mapping,
        )
    except ImportError:  # a PEFT without transformers 5 support maps nothing
        return set()
    conversions = get_model_conversion_mapping(model)

    def moved(group: Sequence[str]) -> set[str]:
        probe = LoraConfig(target_modules=list(group), task_type="CAUSAL_LM")
        convert_peft_config_for_transformers(probe, model=model, conversions=conversions)
        if not probe.target_parameters:
            return set()
        return set(group) - set(probe.target_modules or ())

    try:
        return moved(names)
    except ValueError:
        # PEFT refuses half of a fused pair (gate_proj without up_proj): name by name, such
        # a refusal also means an expert name.
        out: set[str] = set()
        for name in names:
            try:
                out |= moved([name])
            except ValueError:
                out.add(name)
        return out


def resolve_target_modules(requested: Sequence[str], model: nn.Module) -> tuple[str, ...]:
    """The leaf names LoRA adapts on `model` (a CausalLM, loaded or on the meta device) for
    `TrainConfig.target_modules`.

    `all-linear`: the leaf names of every linear the server can adapt (the engine's
    `adaptable_modules`: every nn.Linear of the decoder layers, so not the output head), in
    model order, less those PEFT would move onto MoE experts. Explicit names must each be
    the leaf name of such a module. Resolving resolved names gives them back.

    Raises:
        TrainConfigError: a name the base has no adaptable module for, or one PEFT would
            apply to MoE expert weights (param `target_modules`).
    """
    from adapterhub_server.lora.adapter import adaptable_modules

    leaves = list(dict.fromkeys(p.rpartition(".")[2] for p in adaptable_modules(model)))
    model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    if tuple(requested) == (ALL_LINEAR,):
        moved = _moved_to_experts(model, leaves)
        return tuple(name for name in leaves if name not in moved)
    unknown = [name for name in requested if name not in leaves]
    if unknown:
        raise TrainConfigError(
            f"target_modules: {', '.join(map(repr, unknown))} not among the adaptable linear "
            f"modules of this {model_type} base ({', '.join(leaves)}, or {ALL_LINEAR})",
            param="target_modules",
        )
    moved = _moved_to_experts(model, requested)
    if moved:
        raise TrainConfigError(
            f"target_modules: on this {model_type} base PEFT applies "
            f"{', '.join(map(repr, sorted(moved)))} to the mixture-of-experts expert weights, "
            "which are not served; adapt the attention modules (or use all-linear)",
            param="target_modules",
        )
    return tuple(requested)


def build_model(base_path: Path, config: TrainConfig, device: torch.device) -> Any:
    """Load the base and make it trainable: fresh LoRA (PEFT; DoRA, modules_to_save and
    trainable tokens as `config` asks, see `trainer.kinds`) or every parameter (full).

    Raises:
        TrainConfigError: a kind option this base cannot take (`check_against_base`).
    """
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

        from trainer.kinds import EmbeddingFacts, check_against_base, lora_kind_arguments

        facts = EmbeddingFacts.of(model)
        check_against_base(config, facts)
        lora = LoraConfig(
            task_type="CAUSAL_LM",
            r=config.r,
            lora_alpha=config.alpha,
            lora_dropout=config.dropout,
            target_modules=list(resolve_target_modules(config.target_modules, model)),
            use_rslora=config.rslora,
            bias="none",
            **lora_kind_arguments(config),
        )
        torch.manual_seed(config.seed)  # LoRA A init draws from the global generator
        with warnings.catch_warnings():
            # peft 0.21 still calls a transformers 5 attribute that warns on every run.
            warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated")
            # A tied head in modules_to_save becomes an untied trained copy, which is
            # PEFT's documented default and what servers reproduce; said once in the log.
            warnings.filterwarnings("ignore", "Model has `tie_word_embeddings=True`")
            model = get_peft_model(model, lora)
        if facts.tied and config.modules_to_save:
            logger.info(
                "tied embeddings: %s trained as an untied copy (PEFT's modules_to_save)",
                ", ".join(config.modules_to_save),
            )
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
