"""PEFT DoRA adapters with random weights, for the DoRA tests (nothing downloads)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from tests.tiny_models import ALL_PROJECTIONS


def randomise_dora(model: torch.nn.Module, seed: int, *, b_std: float = 0.3) -> None:
    """Random A and B (PEFT starts B at zero) and magnitudes 0.5x-1.5x of PEFT's initial
    ones (the base rows' norms), so that g = m / ||W + s B A|| is far from 1 and varies."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            if "lora_A" in name:
                param.copy_(noise * 0.3)
            elif "lora_B" in name:
                param.copy_(noise * b_std)
            elif "lora_magnitude_vector" in name:
                param.mul_(1 + 0.5 * torch.rand(param.shape, generator=gen) * noise.sign())


def make_dora_adapter(
    base_dir: Path,
    out_dir: Path,
    *,
    seed: int,
    r: int = 8,
    alpha: float = 16,
    target_modules: Sequence[str] = ALL_PROJECTIONS,
    use_rslora: bool = False,
) -> Path:
    """Save a PEFT DoRA adapter (`use_dora: true`) for the causal LM at `base_dir`."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        target_modules=list(target_modules),
        lora_dropout=0.0,
        bias="none",
        use_rslora=use_rslora,
        use_dora=True,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(base, config)
    randomise_dora(model, seed)
    model.save_pretrained(out_dir)
    return out_dir


def make_mixed_adapters(base_dir: Path, plain: dict[str, Path], root: Path) -> dict[str, Path]:
    """Three DoRA adapters (rank classes 8 and 32, rsLoRA, attention-only) beside two plain
    ones (`plain["r8"]`, `plain["attn-only"]`: the session's `tiny_adapters`)."""
    return {
        "dora": make_dora_adapter(base_dir, root / "dora", seed=11),
        "dora-attn": make_dora_adapter(
            base_dir,
            root / "dora-attn",
            seed=12,
            r=4,
            alpha=8,
            target_modules=("q_proj", "v_proj"),
            use_rslora=True,
        ),
        "dora-r32": make_dora_adapter(base_dir, root / "dora-r32", seed=13, r=32, alpha=32),
        "r8": plain["r8"],
        "attn-only": plain["attn-only"],
    }


class PeftReference:
    """Greedy continuations by HF / PEFT, one adapter (or the base) at a time, on CPU."""

    def __init__(self, base: Path, adapters: dict[str, Path]) -> None:
        self.base, self.adapters = base, adapters
        self._models: dict[str | None, torch.nn.Module] = {}
        self._cache: dict[tuple, list[int]] = {}

    def __call__(self, adapter: str | None, prompt: list[int], n: int) -> list[int]:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        from tests.engine.conftest import greedy_continuation

        key = (adapter, tuple(prompt), n)
        if key not in self._cache:
            if adapter not in self._models:
                model = AutoModelForCausalLM.from_pretrained(self.base, dtype=torch.float32)
                if adapter is not None:
                    model = PeftModel.from_pretrained(model, self.adapters[adapter])
                self._models[adapter] = model.eval()
            self._cache[key] = greedy_continuation(self._models[adapter], prompt, n)
        return self._cache[key]
