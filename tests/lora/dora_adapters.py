"""PEFT DoRA adapters with random weights, for the DoRA tests (nothing downloads)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tests.tiny_models import make_peft_adapter


def make_dora_adapter(base_dir: Path, out_dir: Path, *, seed: int, **kwargs: Any) -> Path:
    """Save a PEFT DoRA adapter (`use_dora: true`) for the causal LM at `base_dir`
    (`make_peft_adapter`'s options)."""
    return make_peft_adapter(base_dir, out_dir, seed=seed, use_dora=True, **kwargs)


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
