"""Adapters with modules_to_save (lm_head, embed_tokens) and trainable token rows, served in
batches mixed with plain LoRA adapters and base rows: greedy output equals PEFT's, on an
untied and a tied-embedding tiny model."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from adapterhub_server.config import EngineConfig
from adapterhub_server.engine.engine import LLMEngine
from adapterhub_server.engine.sampling_params import SamplingParams
from tests.engine.conftest import greedy_continuation
from tests.engine.test_engine import _engine as engine_for
from tests.full_module_adapters import make_full_module_adapter, peft_model
from tests.tiny_models import build_tokenizer, make_peft_adapter, make_tiny_llama

PROMPTS = [
    "hello world",
    "the quick brown fox jumps over the lazy dog and",
    "what is the capital of france?",
    "numbers 0 1 2 3",
    "abc",
    "paris is the capital. the quick brown fox",
    "tiny tokenizer",
    "ABCDEFG xyz",
]


def _token_ids(*words: str) -> list[int]:
    """Ids of tokens the prompts contain, so that trainable rows are actually looked up."""
    tokenizer = build_tokenizer()
    return list(dict.fromkeys(i for word in words for i in tokenizer.encode(word)))


def _adapters(base: Path, root: Path, *, tied: bool) -> dict[str, Path]:
    embed_ids = _token_ids("hello", " the", " quick", "abc")
    specs: dict[str, dict] = {
        "head": {"modules_to_save": ["lm_head"]},
        "embed": {"modules_to_save": ["embed_tokens"]},
        "tokens": {"trainable_token_indices": embed_ids},
        # Head rows of their own: large, so that these ids win where they should.
        "tokens-head": {
            "trainable_token_indices": {"embed_tokens": embed_ids[:2], "lm_head": [7, 40, 41]}
        },
        "plain": {},
    }
    if tied:
        specs["tied-both"] = {"modules_to_save": ["embed_tokens"], "ensure_weight_tying": True}
    out = {}
    for i, (name, spec) in enumerate(specs.items()):
        if name == "plain":
            out[name] = make_peft_adapter(base, root / name, seed=50 + i, r=8, alpha=16)
        else:
            out[name] = make_full_module_adapter(base, root / name, seed=50 + i, **spec)
    return out


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def setup(request, tmp_path_factory: pytest.TempPathFactory):
    tied = request.param
    root = tmp_path_factory.mktemp(f"full-{'tied' if tied else 'untied'}")
    base = make_tiny_llama(root / "base", tie_word_embeddings=tied)
    adapters = _adapters(base, root / "adapters", tied=tied)
    return base, adapters


@pytest.fixture(scope="module")
def reference(setup):
    base, adapters = setup
    from transformers import AutoModelForCausalLM

    models = {None: AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()}
    cache: dict[tuple, list[int]] = {}

    def run(adapter: str | None, prompt: list[int], n: int) -> list[int]:
        key = (adapter, tuple(prompt), n)
        if key not in cache:
            if adapter not in models:
                models[adapter] = peft_model(base, adapters[adapter])
            cache[key] = greedy_continuation(models[adapter], prompt, n)
        return cache[key]

    return run


def _engine(base: Path, adapters: dict[str, Path], **overrides) -> LLMEngine:
    settings = {"max_num_seqs": 12, "max_num_batched_tokens": 48, "max_loras": 4}
    return engine_for(base, adapters, **{**settings, **overrides})


def _run(engine: LLMEngine, reqs, timeout: float = 120.0) -> dict[str, list[int]]:
    for rid, ids, adapter, n in reqs:
        engine.add_request(
            rid, ids, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True), adapter
        )
    out: dict[str, list[int]] = {rid: [] for rid, *_ in reqs}
    deadline = time.monotonic() + timeout
    while engine.has_work():
        assert time.monotonic() < deadline, "engine did not finish"
        if engine.idle:
            time.sleep(0.001)
        for o in engine.step():
            out[o.request_id] += o.token_ids
            assert o.error is None, o.error
    return out


def _requests(engine: LLMEngine, names, lengths=(7, 11, 5, 9)):
    return [
        (f"r{i}", engine.tokenizer.encode(PROMPTS[i % len(PROMPTS)]), name, lengths[i % 4])
        for i, name in enumerate(names)
    ]


def test_mixed_batch_greedy_equals_peft(setup, reference) -> None:
    """Every kind, plain LoRA and base rows in one batch, twice over (so several sequences
    share one adapter's copies), with chunked prefill and sequences finishing at different
    steps."""
    base, adapters = setup
    engine = _engine(base, adapters, max_loras=len(adapters))
    names = [*adapters, None]
    reqs = _requests(engine, names * 2)
    results = _run(engine, reqs)
    for rid, ids, adapter, n in reqs:
        assert results[rid] == reference(adapter, ids, n), (rid, adapter)
    # Each kind changes the output: an engine that dropped one would have matched the base.
    for rid, ids, adapter, n in reqs[: len(names) - 1]:
        assert results[rid] != reference(None, ids, n) or adapter == "plain", adapter


def test_full_module_room_of_one_serves_two_such_adapters(setup, reference) -> None:
    """With room for one full copy, two adapters with full copies in flight take turns
    (the second waits, then evicts the idle first) and both still equal PEFT."""
    base, adapters = setup
    engine = _engine(base, adapters, max_full_module_adapters=1)
    reqs = _requests(engine, ["head", "embed", "head", "embed", None, "tokens"])
    results = _run(engine, reqs)
    for rid, ids, adapter, n in reqs:
        assert results[rid] == reference(adapter, ids, n), (rid, adapter)
    store = engine.adapters.full_modules
    assert store is not None and store.evictions >= 1
    assert not any(store.pinned(k) for k in ("head", "embed", "tokens"))


def test_prefix_cache_never_shares_blocks_across_embedding_tables(setup, reference) -> None:
    """A prompt computed for the base, then for an adapter with its own embedding table
    (and one with token rows): the adapters' keys and values differ from the first token,
    so they must not reuse the base's cached blocks."""
    base, adapters = setup
    engine = _engine(base, adapters, block_size=4)
    prompt = engine.tokenizer.encode(PROMPTS[1] + " " + PROMPTS[5])
    for i, adapter in enumerate([None, "embed", "tokens", None]):
        got = _run(engine, [(f"p{i}", prompt, adapter, 6)])[f"p{i}"]
        assert got == reference(adapter, prompt, 6), adapter


def test_max_full_module_adapters_zero_refuses_such_adapters(setup) -> None:
    base, adapters = setup
    engine = _engine(
        base, {"head": adapters["head"], "tokens": adapters["tokens"]}, max_full_module_adapters=0
    )
    engine.add_request("a", [5, 6, 7], SamplingParams(max_tokens=3), "head")
    engine.add_request("b", [5, 6, 7], SamplingParams(max_tokens=3), "tokens")
    outs = {}
    while engine.has_work():
        for o in engine.step():
            outs[o.request_id] = o
    assert outs["a"].finish_reason == "error"
    assert "--max-full-module-adapters 0" in (outs["a"].error or "")
    assert outs["b"].finish_reason == "length"  # token rows need no full-module room
    assert not engine.adapters.slots.pinned("head")  # the refused request left no pin


@pytest.mark.gpu
def test_cuda_graph_engine_runs_full_module_steps_eagerly(setup, reference) -> None:
    """On CUDA with decode graphs: steps with full modules or token rows run eagerly, the
    others (plain LoRA and base rows, once the full-module requests finish) replay graphs,
    and every request still equals PEFT."""
    base, adapters = setup
    engine = _engine(
        base,
        adapters,
        max_loras=len(adapters),
        device="cuda",
        dtype="float32",
        lora_kernel="triton",
        cuda_graphs=True,
    )
    graphs = engine.decode_graphs
    assert graphs is not None
    names = [n for n in adapters if n != "plain"]
    reqs = _requests(engine, names, lengths=(4, 5, 4, 5))
    reqs += [
        (f"long{i}", engine.tokenizer.encode(p), a, 12)
        for i, (p, a) in enumerate([("hello world", "plain"), ("abc", None)])
    ]
    results = _run(engine, reqs)
    for rid, ids, adapter, n in reqs:
        assert results[rid] == reference(adapter, ids, n), (rid, adapter)
    assert graphs.num_runs > 0


def test_flag_reaches_the_engine_config() -> None:
    from adapterhub_server.cli import build_parser, config_from_args

    args = build_parser().parse_args(["serve", "--max-full-module-adapters", "2"])
    assert config_from_args(args).engine.max_full_module_adapters == 2
    assert EngineConfig().max_full_module_adapters == 4
    with pytest.raises(ValueError, match="max_full_module_adapters"):
        EngineConfig(max_full_module_adapters=-1)
