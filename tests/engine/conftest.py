"""Fixtures shared by the engine tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="module")
def peft_greedy(tiny_base: Path, tiny_adapters: dict[str, Path]):
    """Greedy continuation by HF (base) or PEFT (adapter), one request at a time."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    models: dict[str | None, torch.nn.Module] = {
        None: AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32).eval()
    }
    cache: dict[tuple, list[int]] = {}

    def run(adapter: str | None, prompt_ids: list[int], max_new: int) -> list[int]:
        key = (adapter, tuple(prompt_ids), max_new)
        if key not in cache:
            if adapter not in models:
                base = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
                models[adapter] = PeftModel.from_pretrained(base, tiny_adapters[adapter]).eval()
            cache[key] = greedy_continuation(models[adapter], prompt_ids, max_new)
        return cache[key]

    return run


def greedy_continuation(model: torch.nn.Module, prompt_ids: list[int], max_new: int) -> list[int]:
    """`max_new` greedy tokens after `prompt_ids` from a transformers (or PEFT) model alone,
    ignoring EOS: the reference the engine's greedy output must equal."""
    out = model.generate(
        torch.tensor([prompt_ids]),
        attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
        max_new_tokens=max_new,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
    )
    return out[0, len(prompt_ids) :].tolist()
