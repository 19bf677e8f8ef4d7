"""Penalties, logit_bias, min_tokens and min_p: the batched code against a per-row loop."""

from __future__ import annotations

import math
import random

import pytest
import torch

from adapterhub_server.engine.logits_processors import SamplingContext, process_logits
from adapterhub_server.engine.sampler import Sampler
from adapterhub_server.engine.sampling_params import SamplingParams, SamplingParamsError

VOCAB = 97
EOS = 3


def _reference(
    logits: torch.Tensor, params: list[SamplingParams], contexts: list[SamplingContext]
) -> torch.Tensor:
    """The docstring's semantics, one row and one token at a time."""
    out = logits.clone()
    for i, (p, c) in enumerate(zip(params, contexts)):
        bias = dict(p.logit_bias)
        for v in range(logits.shape[1]):
            value = out[i, v].item()
            if len(c.output_ids) < p.min_tokens and v in c.stop_ids:
                value = -math.inf
            value += bias.get(v, 0.0)
            if v in c.prompt_ids or v in c.output_ids:
                r = p.repetition_penalty
                value = value / r if value > 0 else value * r
            n = list(c.output_ids).count(v)
            value -= p.frequency_penalty * n + p.presence_penalty * (n > 0)
            out[i, v] = value
    return out


def _case(seed: int) -> tuple[torch.Tensor, list[SamplingParams], list[SamplingContext]]:
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(6, VOCAB, generator=gen) * 3
    params = [
        SamplingParams(),  # untouched
        SamplingParams(presence_penalty=1.5, frequency_penalty=0.7),
        SamplingParams(repetition_penalty=1.3),
        SamplingParams(logit_bias=((5, 100.0), (7, -100.0), (11, 2.5))),
        SamplingParams(min_tokens=8, max_tokens=20, frequency_penalty=-0.5),
        SamplingParams(repetition_penalty=0.8, presence_penalty=-1.0, logit_bias=((EOS, 4.0),)),
    ]
    contexts = [
        SamplingContext(
            prompt_ids=[rng.randrange(VOCAB) for _ in range(12)],
            output_ids=[rng.randrange(20) for _ in range(rng.randrange(0, 10))],
            stop_ids=frozenset({EOS, 9}),
        )
        for _ in params
    ]
    return logits, params, contexts


@pytest.mark.parametrize("seed", range(4))
def test_batched_processing_equals_the_loop(seed: int) -> None:
    logits, params, contexts = _case(seed)
    got = process_logits(logits, params, contexts)
    torch.testing.assert_close(got, _reference(logits, params, contexts))
    assert torch.equal(got[0], logits[0])  # a row that asks for nothing is not touched


def test_nothing_to_process_returns_the_input() -> None:
    logits = torch.randn(2, VOCAB)
    ctx = SamplingContext([1], [2], frozenset({EOS}))
    assert process_logits(logits, [SamplingParams()] * 2, [ctx] * 2) is logits


def test_logit_bias_steers_greedy_and_is_per_row() -> None:
    logits = torch.zeros(3, VOCAB)
    logits[:, 40] = 5.0
    params = [
        SamplingParams(temperature=0, logit_bias=((13, 100.0),)),
        SamplingParams(temperature=0),
        SamplingParams(temperature=0, logit_bias=((40, -100.0),)),
    ]
    ctx = [SamplingContext([], [], frozenset({EOS}))] * 3
    out = Sampler()(logits, params, [None] * 3, ctx)
    assert out.token_ids.tolist()[:2] == [13, 40]
    assert out.token_ids[2].item() != 40
    # Logprobs stay those of the model's own distribution (vLLM's default "raw" mode).
    assert out.logprobs is None


def test_min_tokens_blocks_stop_ids_until_reached() -> None:
    logits = torch.zeros(1, VOCAB)
    logits[0, EOS] = 10.0
    params = [SamplingParams(temperature=0, min_tokens=2, max_tokens=5)]
    sampler = Sampler()
    early = SamplingContext([1, 2], [7], frozenset({EOS}))
    assert sampler(logits, params, [None], [early]).token_ids.item() != EOS
    reached = SamplingContext([1, 2], [7, 8], frozenset({EOS}))
    assert sampler(logits, params, [None], [reached]).token_ids.item() == EOS


def test_frequency_penalty_counts_occurrences() -> None:
    logits = torch.zeros(1, VOCAB)
    logits[0, 20] = 1.0
    logits[0, 21] = 0.9
    params = [SamplingParams(temperature=0, frequency_penalty=0.06)]
    once = SamplingContext([], [20], frozenset())
    twice = SamplingContext([], [20, 20], frozenset())
    sampler = Sampler()
    assert sampler(logits, params, [None], [once]).token_ids.item() == 20  # 0.94 > 0.9
    assert sampler(logits, params, [None], [twice]).token_ids.item() == 21  # 0.88 < 0.9


@pytest.mark.parametrize("seed", range(3))
def test_min_p_never_samples_below_the_floor(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(4, VOCAB, generator=gen) * 2
    params = [SamplingParams(temperature=0.7, min_p=0.2, seed=seed + i) for i in range(4)]
    probs = torch.softmax(logits / 0.7, dim=-1)
    allowed = probs >= 0.2 * probs.amax(dim=-1, keepdim=True)
    sampler = Sampler()
    for _ in range(50):
        out = sampler(logits, params, [None] * 4)
        assert allowed[torch.arange(4), out.token_ids].all()


def test_contexts_are_required_when_a_row_processes() -> None:
    with pytest.raises(ValueError, match="contexts"):
        Sampler()(torch.zeros(1, VOCAB), [SamplingParams(presence_penalty=1.0)], [None])


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -3.0}, "frequency_penalty"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"logit_bias": ((5, 101.0),)}, "logit_bias"),
        ({"logit_bias": ((-1, 1.0),)}, "logit_bias"),
        ({"logit_bias": tuple((i, 1.0) for i in range(301))}, "logit_bias"),
        ({"min_p": 1.5}, "min_p"),
        ({"min_tokens": 17}, "min_tokens"),
    ],
)
def test_out_of_range_values_name_their_field(kwargs: dict, param: str) -> None:
    with pytest.raises(SamplingParamsError) as err:
        SamplingParams(**kwargs)
    assert err.value.param == param


def _processed_greedy(model, prompt: list[int], params: SamplingParams, eos: set[int]) -> list[int]:
    """HF forward one token at a time, each step's logits through `_reference`: what the
    engine must produce for `params`."""
    out: list[int] = []
    stop = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else eos)
    with torch.no_grad():
        for _ in range(params.max_tokens):
            logits = model(torch.tensor([prompt + out])).logits[:, -1].float()
            ctx = SamplingContext(prompt, list(out), frozenset(stop))
            out.append(int(_reference(logits, [params], [ctx]).argmax()))
    return out


def test_engine_applies_each_rows_processors_in_a_mixed_batch(
    tiny_base, tiny_adapters, peft_greedy
) -> None:
    """Penalised, biased and plain rows (with adapters and base rows) in one batch: each
    processed row equals the reference loop over HF logits, the others equal PEFT."""
    from transformers import AutoModelForCausalLM

    from adapterhub_server.base_model import ResolvedBaseModel
    from adapterhub_server.config import EngineConfig
    from adapterhub_server.engine.build import build_engine

    engine = build_engine(
        ResolvedBaseModel(tiny_base, "tiny", "local"),
        EngineConfig(max_num_seqs=8, max_num_batched_tokens=64, kv_cache_memory=64 * 2**20),
        lora_modules=tiny_adapters,
    )
    hf = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32).eval()
    prompt = engine.tokenizer.encode("the quick brown fox")
    adapter = next(iter(tiny_adapters))
    processed = {
        "freq": SamplingParams(max_tokens=10, temperature=0, ignore_eos=True,
                               frequency_penalty=-2.0, presence_penalty=-1.0),
        "rep": SamplingParams(max_tokens=10, temperature=0, ignore_eos=True,
                              repetition_penalty=1.8),
        "bias": SamplingParams(max_tokens=10, temperature=0, ignore_eos=True,
                               logit_bias=((7, 30.0), (11, 25.0))),
    }  # fmt: skip
    plain = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    for rid, params in processed.items():
        engine.add_request(rid, prompt, params, None)
    engine.add_request("plain-base", prompt, plain, None)
    engine.add_request("plain-adapter", prompt, plain, adapter)
    tokens: dict[str, list[int]] = {}
    while engine.has_work():
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.token_ids)
    for rid, params in processed.items():
        assert tokens[rid] == _processed_greedy(hf, prompt, params, set()), rid
    assert tokens["plain-base"] == peft_greedy(None, prompt, 10)
    assert tokens["plain-adapter"] == peft_greedy(adapter, prompt, 10)
    # Each processor changed the output here, so the equalities above test something.
    for rid in processed:
        assert tokens[rid] != tokens["plain-base"], rid
    assert len(set(tokens["freq"])) < len(set(tokens["plain-base"]))  # rewarded repeats
