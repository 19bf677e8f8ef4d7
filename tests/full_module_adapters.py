"""PEFT LoRA adapters with modules_to_save / trainable_token_indices for the tiny models.

Every trainable tensor PEFT creates (LoRA factors, full module copies, token rows) is
perturbed with seeded noise before `save_pretrained`, so that each part changes the output
and a server that ignored one of them would decode differently from PEFT.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from tests.tiny_models import ALL_PROJECTIONS


def make_full_module_adapter(
    base_dir: Path,
    out_dir: Path,
    *,
    seed: int,
    modules_to_save: Sequence[str] | None = None,
    trainable_token_indices: list[int] | dict[str, list[int]] | None = None,
    ensure_weight_tying: bool = False,
    target_modules: Sequence[str] = ALL_PROJECTIONS,
    r: int = 4,
    noise: float = 0.3,
) -> Path:
    """Save a PEFT LoRA adapter for the model at `base_dir` using the given options."""
    import warnings

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    kwargs: dict[str, Any] = {}
    if modules_to_save is not None:
        kwargs["modules_to_save"] = list(modules_to_save)
    if trainable_token_indices is not None:
        kwargs["trainable_token_indices"] = trainable_token_indices
    config = LoraConfig(
        r=r,
        lora_alpha=2 * r,
        target_modules=list(target_modules),
        lora_dropout=0.0,
        ensure_weight_tying=ensure_weight_tying,
        task_type="CAUSAL_LM",
        **kwargs,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns about tied layers in the adapter
        model = get_peft_model(base, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=gen) * noise)
    model.save_pretrained(out_dir)
    return out_dir


def peft_model(base_dir: Path, adapter_dir: Path) -> torch.nn.Module:
    """The reference: PEFT's own model for the adapter, float32, eval mode."""
    import warnings

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PeftModel.from_pretrained(base, adapter_dir).eval()
