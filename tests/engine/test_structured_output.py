"""Structured outputs in the engine: grammars compiled by llguidance, masks applied per row
in mixed batches (constrained and free rows, base and adapter rows), failure isolation,
preemption, the compile cache and its time bound. Tiny random models, fp32 on CPU, plus
one short schema on the real default model."""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import torch

from adapterhub_server.engine.async_engine import AsyncLLMEngine
from adapterhub_server.engine.engine import GRAMMAR_FAILED, LLMEngine
from adapterhub_server.engine.sampling_params import SamplingParams
from adapterhub_server.engine.structured import (
    GrammarCompiler,
    GrammarError,
    GrammarSpec,
    TokenMasks,
    mask_logits,
)
from adapterhub_server.engine.structured.bitmask import _bias_from_bits, _bias_on_device
from adapterhub_server.errors import InvalidRequestError
from tests.api.fake_engine import shared_tokenizer
from tests.engine.test_decode_graphs import _static_engine, needs_triton
from tests.engine.test_engine import PROMPTS, _engine
from tests.engine.test_failure_isolation import Outcome, _drain, _failing_forward
from tests.engine.test_paged_kv import _blocks_bytes

SCHEMA = {
    "type": "object",
    "properties": {
        "kind": {"enum": ["cat", "dog", "bird"]},
        "name": {"type": "string", "maxLength": 6},
        "owner": {
            "type": "object",
            "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 99}},
            "required": ["id"],
            "additionalProperties": False,
        },
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2},
    },
    "required": ["kind", "owner", "tags"],
    "additionalProperties": False,
}
REGEX = r"[0-9]{2}-[a-z]{2,4}"
CHOICES = ["yes", "no", "maybe"]

SPECS = {
    "json_schema": GrammarSpec("json_schema", json.dumps(SCHEMA)),
    "json_object": GrammarSpec("json_object"),
    "regex": GrammarSpec("regex", REGEX),
    "choice": GrammarSpec("choice", json.dumps(CHOICES)),
}


def _valid(kind: str, text: str) -> bool:
    """Whether `text` is an output that satisfies the grammar of `kind` in SPECS."""
    if kind == "regex":
        return re.fullmatch(REGEX, text) is not None
    if kind == "choice":
        return text in CHOICES
    try:
        value = json.loads(text)
    except ValueError:
        return False
    if kind == "json_object":
        return isinstance(value, dict)
    try:
        jsonschema.validate(value, SCHEMA)
    except jsonschema.ValidationError:
        return False
    return True


def _whitespace_bias(engine: LLMEngine) -> tuple[tuple[int, float], ...]:
    """logit_bias -100 on every whitespace-only token: random weights otherwise like to fill
    JSON gaps with whitespace. It also checks that logit_bias composes with the mask."""
    tok = engine.tokenizer
    ws = [t for t in range(len(tok)) if (s := tok.decode([t])) and not s.strip()]
    assert ws
    return tuple((t, -100.0) for t in ws)


@dataclass(frozen=True)
class Req:
    rid: str
    prompt: list[int]
    adapter: str | None
    params: SamplingParams
    kind: str | None = None
    """The grammar kind in SPECS; None for a free row."""


def _mixed(engine: LLMEngine, *, free: bool = True, constrained: bool = True) -> list[Req]:
    """Constrained rows of every kind across base and adapter rows (one of them sampled
    with a seed), and free greedy rows, in one batch."""
    compile_ = engine.grammar_compiler
    assert compile_ is not None
    grammars = {k: compile_.compile(spec, timeout=10) for k, spec in SPECS.items()}
    bias = _whitespace_bias(engine)
    tok = engine.tokenizer
    reqs: list[Req] = []
    layout = [
        ("json_schema", None),
        ("json_schema", "r4"),
        ("json_schema", "attn-only"),
        ("json_object", "r8"),
        ("json_object", None),
        ("regex", None),
        ("regex", "patterns"),
        ("choice", "r16-rslora"),
        ("choice", None),
    ]
    if constrained:
        for i, (kind, adapter) in enumerate(layout):
            params = SamplingParams(
                max_tokens=80,
                temperature=0.0,
                grammar=grammars[kind],
                logit_bias=bias if kind.startswith("json") else (),
            )
            reqs.append(Req(f"c{i}", tok.encode(PROMPTS[i % 8]), adapter, params, kind))
        seeded = SamplingParams(
            max_tokens=80, temperature=0.8, seed=7, grammar=grammars["json_schema"], logit_bias=bias
        )
        reqs.append(Req("c-seeded", tok.encode(PROMPTS[3]), "r4", seeded, "json_schema"))
    if free:
        for i, adapter in enumerate([None, "r4", "r8", "patterns"]):
            params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
            reqs.append(Req(f"f{i}", tok.encode(PROMPTS[(i + 2) % 8]), adapter, params))
    return reqs


def _run(engine: LLMEngine, reqs: list[Req]) -> dict[str, Outcome]:
    for r in reqs:
        engine.add_request(r.rid, r.prompt, r.params, r.adapter)
    results: dict[str, Outcome] = {}
    _drain(engine, results)
    return results


def _check_constrained(reqs: list[Req], results: dict[str, Outcome]) -> None:
    """Every constrained row that stopped is valid; every kind but json_object (whose
    strings a random model may never close) must stop."""
    stopped_objects = 0
    for r in reqs:
        if r.kind is None:
            continue
        out = results[r.rid]
        assert out.error is None, (r.rid, out.error)
        if out.finish_reason == "stop":
            assert _valid(r.kind, out.text), (r.rid, out.text)
            stopped_objects += r.kind == "json_object"
        else:
            assert r.kind == "json_object" and out.finish_reason == "length", (r.rid, out)
    assert stopped_objects >= 1 or not any(r.kind == "json_object" for r in reqs)


def test_mixed_batch_constrained_rows_are_valid_and_free_rows_unchanged(
    tiny_base: Path, tiny_adapters: dict[str, Path]
) -> None:
    engine = _engine(tiny_base, tiny_adapters, max_num_seqs=16, max_loras=6)
    reqs = _mixed(engine)
    results = _run(engine, reqs)
    _check_constrained(reqs, results)
    # A finished grammar ends its sequence at once: no EOS is generated after a choice.
    eos = engine.eos_token_ids
    for r in reqs:
        if r.kind == "choice":
            assert not eos & set(results[r.rid].token_ids)
    assert engine._num_constrained == 0  # later steps skip all grammar work

    alone = _engine(tiny_base, tiny_adapters, max_num_seqs=16, max_loras=6)
    free = _run(alone, _mixed(alone, constrained=False))
    for rid, out in free.items():
        assert results[rid].token_ids == out.token_ids, rid
        assert results[rid].finish_reason == "length"


@needs_triton
def test_masks_apply_after_the_static_decode_path(tiny_base: Path, tiny_adapters) -> None:
    """The decode-graph layout (run eagerly on CPU; replayed on CUDA) hands back logits in
    static buffers; the masks are applied to them after the run. Base rows only: the
    graphs' LoRA kernels would run in Triton's slow CPU interpreter."""
    engine = _static_engine(tiny_base, tiny_adapters)
    reqs = [r for r in _mixed(engine) if r.adapter is None]
    results = _run(engine, reqs)
    assert engine.decode_graphs is not None and engine.decode_graphs.num_runs > 0
    _check_constrained(reqs, results)
    eager = _engine(tiny_base, tiny_adapters)
    expected = _run(eager, [r for r in _mixed(eager) if r.adapter is None])
    for rid, out in expected.items():
        assert results[rid].token_ids == out.token_ids, rid


def test_preempted_constrained_sequences_carry_on(tiny_base: Path, tiny_adapters) -> None:
    """A KV cache too small for the batch: sequences are preempted and recomputed with
    their output tokens; their matchers stay where they were, outputs equal a roomy run."""
    adapters = {k: tiny_adapters[k] for k in ("r4", "r8")}

    def workload(engine: LLMEngine) -> list[Req]:
        return [r for r in _mixed(engine, free=False) if r.adapter in (None, "r4", "r8")]

    roomy = _engine(tiny_base, adapters, block_size=4, max_num_batched_tokens=32)
    expected = _run(roomy, workload(roomy))
    tight = _engine(
        tiny_base,
        adapters,
        block_size=4,
        max_num_batched_tokens=32,
        kv_cache_memory=_blocks_bytes(tiny_base, 40),
    )
    reqs = workload(tight)
    results = _run(tight, reqs)
    assert tight.scheduler.num_preemptions > 0
    _check_constrained(reqs, results)
    for rid, out in expected.items():
        assert results[rid].token_ids == out.token_ids, rid
        assert results[rid].text == out.text


def test_a_failed_sampling_attempt_leaves_matchers_untouched(
    tiny_base: Path, tiny_adapters, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sampling raises once mid-generation for the whole batch: the step is retried in
    halves and everything comes out as from an undisturbed run. Had the failed attempt
    advanced a matcher, its retry would be refused or its output invalid."""
    clean_engine = _engine(tiny_base, tiny_adapters, max_num_seqs=16, max_loras=6)
    clean = _run(clean_engine, _mixed(clean_engine))
    engine = _engine(tiny_base, tiny_adapters, max_num_seqs=16, max_loras=6)
    real = engine.sampler
    calls = {"n": 0}

    def flaky(logits, params, generators, contexts=None, masks=None):
        calls["n"] += 1
        if calls["n"] == 6 and masks is not None and len(params) > 1:
            raise RuntimeError("injected sampling failure")
        return real(logits, params, generators, contexts, masks)

    monkeypatch.setattr(engine, "sampler", flaky)
    results = _run(engine, _mixed(engine))
    assert calls["n"] > 6
    for rid, out in clean.items():
        assert results[rid].finish_reason == out.finish_reason, rid
        assert results[rid].token_ids == out.token_ids, rid


def test_a_failing_sequence_fails_alone_beside_constrained_ones(
    tiny_base: Path, tiny_adapters, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The forward fails whenever one free row's mid-decode token is in the batch: that row
    fails alone, every constrained row finishes exactly as without it."""
    clean_engine = _engine(tiny_base, tiny_adapters, max_num_seqs=16, max_loras=6)
    reqs = _mixed(clean_engine)
    clean = _run(clean_engine, reqs)
    victim, poison = _unique_decode_token(reqs, clean)
    engine = _engine(tiny_base, tiny_adapters, max_num_seqs=16, max_loras=6)
    _failing_forward(
        monkeypatch,
        engine,
        lambda ids, n: RuntimeError("injected") if poison in ids.tolist() else None,
    )
    results = _run(engine, _mixed(engine))
    assert results[victim].finish_reason == "error"
    for rid, out in clean.items():
        if rid != victim:
            assert results[rid].token_ids == out.token_ids, rid
            assert results[rid].finish_reason == out.finish_reason, rid


def _unique_decode_token(reqs: list[Req], clean: dict[str, Outcome]) -> tuple[str, int]:
    """A free row and one of its generated tokens (not the first) that appears nowhere
    else: no other prompt or output, nor earlier in its own."""
    for r in reqs:
        if r.kind is not None:
            continue
        others = {t for o in reqs if o.rid != r.rid for t in o.prompt}
        others |= {t for rid, o in clean.items() if rid != r.rid for t in o.token_ids}
        out = clean[r.rid].token_ids
        for j in range(1, len(out) - 1):
            if out[j] not in others and out[j] not in r.prompt and out[j] not in out[:j]:
                return r.rid, out[j]
    raise AssertionError("no free row has a token of its own; change the prompts")


def test_a_token_the_grammar_refuses_fails_that_sequence_alone(
    tiny_base: Path, tiny_adapters, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Should the sampler ever pick a token the grammar refuses, that sequence fails with
    a clear error and the token is never emitted; the rest of the batch is unaffected."""
    clean_engine = _engine(tiny_base, tiny_adapters, max_num_seqs=16, max_loras=6)
    clean = _run(clean_engine, _mixed(clean_engine))
    engine = _engine(tiny_base, tiny_adapters, max_num_seqs=16, max_loras=6)
    reqs = _mixed(engine)
    target = next(r for r in reqs if r.kind == "choice")
    bad = engine.tokenizer.encode("z")[0]
    real = engine.sampler

    def corrupt(logits, params, generators, contexts=None, masks=None):
        out = real(logits, params, generators, contexts, masks)
        for i, p in enumerate(params):
            if p is target.params:
                out.token_ids[i] = bad
        return out

    monkeypatch.setattr(engine, "sampler", corrupt)
    results = _run(engine, reqs)
    failed = results[target.rid]
    assert failed.finish_reason == "error" and failed.error_code == GRAMMAR_FAILED
    assert "refused" in (failed.error or "") and bad not in failed.token_ids
    for rid, out in clean.items():
        if rid != target.rid:
            assert results[rid].token_ids == out.token_ids, rid


def test_grammar_composes_with_min_tokens_and_stop_ids(tiny_base: Path) -> None:
    """The grammar ends the sequence even before min_tokens (its mask wins), and a stop id
    that min_tokens forbids is still taken when it is the grammar's only choice."""
    engine = _engine(tiny_base, {})
    compiler = engine.grammar_compiler
    assert compiler is not None
    tok = engine.tokenizer
    (a,) = tok.encode("a")
    digits = compiler.compile(GrammarSpec("regex", "[0-9]{2}"), timeout=10)
    only_a = compiler.compile(GrammarSpec("choice", '["a"]'), timeout=10)
    engine.add_request(
        "digits",
        tok.encode(PROMPTS[0]),
        SamplingParams(max_tokens=10, min_tokens=6, grammar=digits),
    )
    engine.add_request(
        "a",
        tok.encode(PROMPTS[1]),
        SamplingParams(max_tokens=10, min_tokens=3, stop_token_ids=(a,), grammar=only_a),
    )
    results: dict[str, Outcome] = {}
    _drain(engine, results)
    assert results["digits"].finish_reason == "stop"
    assert re.fullmatch("[0-9]{2}", results["digits"].text)
    assert results["a"].finish_reason == "stop" and results["a"].token_ids == [a]


# -- the compiler ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compiler() -> GrammarCompiler:
    tok = shared_tokenizer()
    return GrammarCompiler(tok, vocab_size=len(tok) + 13, eos_token_ids=[tok.eos_token_id])


@pytest.mark.parametrize(
    ("spec", "named"),
    [
        (GrammarSpec("json_schema", json.dumps({"not": {"type": "string"}})), '"not"'),
        (
            GrammarSpec("json_schema", json.dumps({"type": "array", "uniqueItems": True})),
            "uniqueItems",
        ),
        (GrammarSpec("json_schema", json.dumps({"type": "tensor"})), "tensor"),
        (GrammarSpec("json_schema", '{"type": '), "not valid JSON"),
        (GrammarSpec("json_schema", "[1]"), "JSON object"),
        (GrammarSpec("regex", "(abc"), "unclosed group"),
        (GrammarSpec("regex", ""), "empty"),
        (GrammarSpec("choice", "[]"), "non-empty"),
        (GrammarSpec("choice", '["a", 3]'), "string"),
        (GrammarSpec("grammar", "start: missing_rule"), "missing_rule"),
        (GrammarSpec("grammar", 'root ::= "a" | b'), "'b'"),
    ],
)
def test_compile_errors_name_the_construct(
    compiler: GrammarCompiler, spec: GrammarSpec, named: str
) -> None:
    with pytest.raises(GrammarError) as caught:
        compiler.compile(spec, timeout=10)
    assert isinstance(caught.value, InvalidRequestError)
    assert caught.value.code == "invalid_grammar"
    assert named in caught.value.message


def test_unknown_kind_is_a_grammar_error() -> None:
    with pytest.raises(GrammarError, match="unknown structured output kind"):
        GrammarSpec("yaml", "a: 1")  # type: ignore[arg-type]


def test_grammar_dialects_compile(compiler: GrammarCompiler) -> None:
    """The `grammar` kind takes llguidance's Lark and llama.cpp's GBNF."""
    for text in ('start: "x" | "y" start', 'root ::= "x" | "y" root'):
        grammar = compiler.compile(GrammarSpec("grammar", text), timeout=10)
        matcher = grammar.matcher()
        tok = shared_tokenizer()
        assert all(matcher.accept(t) for t in tok.encode("yyx"))
        assert matcher.terminated


def test_the_cache_is_a_bounded_lru() -> None:
    tok = shared_tokenizer()
    small = GrammarCompiler(
        tok, vocab_size=len(tok), eos_token_ids=[tok.eos_token_id], cache_size=2
    )
    a, b, c = (GrammarSpec("regex", p) for p in ("a+", "b+", "c+"))
    first_a = small.compile(a, timeout=10)
    small.compile(b, timeout=10)
    assert small.compile(a, timeout=10) is first_a  # a hit, and now the most recent
    small.compile(c, timeout=10)  # evicts b, the least recently used
    assert len(small) == 2 and small.compiles == 3
    assert small.compile(a, timeout=10) is first_a
    small.compile(b, timeout=10)
    assert small.compiles == 4 and len(small) == 2

    uncached = GrammarCompiler(
        tok, vocab_size=len(tok), eos_token_ids=[tok.eos_token_id], cache_size=0
    )
    assert uncached.compile(a, timeout=10) is not uncached.compile(a, timeout=10)
    assert len(uncached) == 0


def test_a_slow_compile_times_out_at_the_bound(
    compiler: GrammarCompiler, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The caller gets a 400 at the bound; the compile finishes in the background and a
    retry is served from the cache."""
    real = compiler._build
    release = threading.Event()

    def slow(spec: GrammarSpec):
        release.wait(5)
        return real(spec)

    monkeypatch.setattr(compiler, "_build", slow)
    spec = GrammarSpec("regex", "slow[0-9]+")
    t0 = time.monotonic()
    with pytest.raises(GrammarError, match=r"longer than 0\.2 s") as caught:
        compiler.compile(spec, timeout=0.2)
    assert time.monotonic() - t0 < 2.0
    assert caught.value.code == "invalid_grammar"
    release.set()
    assert compiler.compile(spec, timeout=5).spec == spec


def test_async_compile_runs_off_the_event_loop(
    tiny_base: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While a compile runs (slowly) the event loop keeps turning, and the engine's
    configured timeout bounds it."""
    engine = _engine(tiny_base, {}, grammar_compile_timeout=0.3)
    compiler = engine.grammar_compiler
    assert compiler is not None and engine.grammar_compile_timeout == 0.3
    real = compiler._build

    def slow(spec: GrammarSpec):
        time.sleep(0.6 if spec.value == "slow" else 0.1)
        return real(spec)

    monkeypatch.setattr(compiler, "_build", slow)
    client = AsyncLLMEngine(engine, base_model_id="tiny")

    async def main() -> tuple[int, object]:
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        ticker = asyncio.create_task(tick())
        grammar = await client.compile_grammar(GrammarSpec("regex", "quick"))
        with pytest.raises(GrammarError, match=r"longer than 0\.3 s"):
            await client.compile_grammar(GrammarSpec("regex", "slow"))
        ticker.cancel()
        return ticks, grammar

    ticks, grammar = asyncio.run(main())
    assert ticks >= 10  # ~0.4 s of compiling, the loop ticking all along
    assert grammar.spec == GrammarSpec("regex", "quick")


# -- bitmasks -------------------------------------------------------------------------------


def test_bitmask_unpacking_equals_a_loop() -> None:
    """Both unpackers (numpy on the worker for CPU, torch on the device for CUDA) read bit
    v % 32 of word v // 32 as token v, for a vocabulary that is not a multiple of 32."""
    rng = np.random.default_rng(0)
    vocab, words = 70, 3
    packed = rng.integers(-(2**31), 2**31, size=(4, words), dtype=np.int64).astype(np.int32)
    expected = torch.full((4, vocab), float("-inf"))
    for r in range(4):
        for v in range(vocab):
            if (int(packed[r, v // 32]) >> (v % 32)) & 1:
                expected[r, v] = 0.0
    assert torch.equal(torch.from_numpy(_bias_from_bits(packed, vocab)), expected)
    assert torch.equal(_bias_on_device(torch.from_numpy(packed), vocab), expected)

    logits = torch.randn(6, vocab)
    out = logits.clone()
    rows = torch.tensor([1, 4, 5, 0])
    mask_logits(out, TokenMasks(rows, expected))
    for r, i in enumerate(rows.tolist()):
        want = torch.where(expected[r] == 0, logits[i], float("-inf"))
        assert torch.equal(out[i], want)
    assert torch.equal(out[2], logits[2]) and torch.equal(out[3], logits[3])


# -- the real default model -----------------------------------------------------------------


def test_default_model_answers_a_short_schema(default_model) -> None:
    from adapterhub_server.config import EngineConfig
    from adapterhub_server.engine.build import build_engine

    engine = build_engine(
        default_model,
        EngineConfig(max_num_seqs=2, max_num_batched_tokens=256, kv_cache_memory=64 * 2**20),
    )
    compiler = engine.grammar_compiler
    assert compiler is not None and compiler.vocab_size == 49152
    schema = {
        "type": "object",
        "properties": {
            "capital": {"type": "string", "maxLength": 20},
            "confident": {"type": "boolean"},
        },
        "required": ["capital", "confident"],
        "additionalProperties": False,
    }
    grammar = compiler.compile(GrammarSpec("json_schema", json.dumps(schema)), timeout=10)
    messages = [{"role": "user", "content": "What is the capital of France? Answer in JSON."}]
    tok = engine.tokenizer
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    engine.add_request("r", ids, SamplingParams(max_tokens=40, temperature=0, grammar=grammar))
    results: dict[str, Outcome] = {}
    _drain(engine, results)
    out = results["r"]
    assert out.finish_reason == "stop", out
    value = json.loads(out.text)
    jsonschema.validate(value, schema)


def test_serve_flags_reach_the_engine_config() -> None:
    from adapterhub_server.cli import build_parser, config_from_args
    from adapterhub_server.config import EngineConfig

    args = build_parser().parse_args(
        ["serve", "--grammar-compile-timeout", "2.5", "--grammar-cache-size", "7"]
    )
    engine = config_from_args(args).engine
    assert (engine.grammar_compile_timeout, engine.grammar_cache_size) == (2.5, 7)
    defaults = config_from_args(build_parser().parse_args(["serve"])).engine
    assert defaults.grammar_compile_timeout == EngineConfig.grammar_compile_timeout == 10.0
    assert defaults.grammar_cache_size == EngineConfig.grammar_cache_size == 256
    for bad in ({"grammar_compile_timeout": 0}, {"grammar_compile_timeout": float("inf")}):
        with pytest.raises(ValueError, match="grammar_compile_timeout"):
            EngineConfig(**bad)
    with pytest.raises(ValueError, match="grammar_cache_size"):
        EngineConfig(grammar_cache_size=-1)
