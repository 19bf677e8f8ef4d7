"""Prompt logprobs in the engine: equal to the model's own, across prefill chunks and with
an adapter, and computed from the prompt even when its blocks are in the prefix cache."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from adapterhub_server.engine.sampling_params import SamplingParams
from tests.engine.test_engine import Result, _drain
from tests.engine.test_paged_kv import SHARED, _engine


def _reference(base: Path, adapter: Path | None, ids: list[int]) -> torch.Tensor:
    """``[P-1]`` log p(prompt[q+1] | prompt[:q+1]) from transformers / PEFT."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    with torch.no_grad():
        logits = model.eval()(torch.tensor([ids])).logits[0].float()
    logp = torch.log_softmax(logits, dim=-1)
    return logp[:-1].gather(1, torch.tensor(ids[1:]).unsqueeze(1)).squeeze(1)


def _prompt_logprobs(engine, rid: str, ids: list[int], adapter: str | None, k: int = 2):
    params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True, prompt_logprobs=k)
    firsts: list = []
    engine.add_request(rid, ids, params, adapter)
    results: dict[str, Result] = {}
    while engine.has_work():
        for out in engine.step():
            if out.prompt_logprobs is not None:
                firsts.append(out.prompt_logprobs)
            results.setdefault(out.request_id, Result())
    (entries,) = firsts  # sent once
    return entries


@pytest.mark.parametrize("chunk", [64, 7])
def test_prompt_logprobs_match_the_model(
    tiny_base: Path, tiny_adapters: dict[str, Path], chunk: int
) -> None:
    engine = _engine(tiny_base, {"r8": tiny_adapters["r8"]}, max_num_batched_tokens=max(chunk, 8))
    ids = [*SHARED, 5, 9]
    entries = _prompt_logprobs(engine, "p", ids, "r8")
    assert len(entries) == len(ids) and entries[0] is None
    got = torch.tensor([e.logprob for e in entries[1:]])
    torch.testing.assert_close(
        got, _reference(tiny_base, tiny_adapters["r8"], ids), atol=1e-3, rtol=1e-4
    )
    for token, entry in zip(ids[1:], entries[1:], strict=True):
        assert entry.token_id == token
        assert len(entry.top) == 2 and entry.top[0][1] >= entry.top[1][1]
        # Rank 1 exactly when the prompt token is the most likely one.
        assert (entry.rank == 1) == (entry.top[0][0] == token)


def test_a_cached_prefix_is_computed_again_for_prompt_logprobs(tiny_base: Path) -> None:
    engine = _engine(tiny_base)
    ids = [*SHARED, 5]
    engine.add_request("warm", ids, SamplingParams(max_tokens=1, temperature=0.0))
    _drain(engine, {})
    hits = engine.kv.stats.hit_tokens
    entries = _prompt_logprobs(engine, "p", ids, None)
    assert engine.kv.stats.hit_tokens == hits  # nothing read from the cache
    got = torch.tensor([e.logprob for e in entries[1:]])
    torch.testing.assert_close(got, _reference(tiny_base, None, ids), atol=1e-3, rtol=1e-4)
    # A request without prompt logprobs still reads the cache afterwards.
    engine.add_request("again", ids, SamplingParams(max_tokens=1, temperature=0.0))
    _drain(engine, {})
    assert engine.kv.stats.hit_tokens > hits
