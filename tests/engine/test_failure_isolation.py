"""One failing sequence fails alone: in the forward, in sampling, in post-processing, and on
an accelerator out-of-memory; the rest of its batch comes out as if nothing had happened."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from adapterhub_server.engine.engine import LLMEngine
from adapterhub_server.engine.sampling_params import SamplingParams
from adapterhub_server.lora.triton_ops import triton_available
from tests.engine.test_decode_graphs import _static_engine
from tests.engine.test_engine import PROMPTS, Result, _engine

ADAPTERS = [None, "r4", "r8", None, "r4", "r16-rslora"]

Request = tuple[str, list[int], str | None]


@dataclass
class Outcome(Result):
    error_code: str | None = None


def _drain(engine: LLMEngine, results: dict[str, Outcome], timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while engine.has_work():
        assert time.monotonic() < deadline, "engine did not finish"
        if engine.idle:  # waiting for adapter files to load in the background
            time.sleep(0.001)
        for out in engine.step():
            r = results.setdefault(out.request_id, Outcome())
            r.token_ids += out.token_ids
            r.text += out.text
            if out.finished:
                r.finish_reason, r.error = out.finish_reason, out.error
                r.error_code = out.error_code


def _greedy(n: int = 10) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


def _requests(engine: LLMEngine, count: int = len(ADAPTERS)) -> list[Request]:
    tok = engine.tokenizer
    return [(f"req{i}", tok.encode(PROMPTS[i]), ADAPTERS[i]) for i in range(count)]


def _run(engine: LLMEngine, reqs: list[Request], max_tokens: int = 10) -> dict[str, Outcome]:
    for rid, ids, adapter in reqs:
        engine.add_request(rid, ids, _greedy(max_tokens), adapter)
    results: dict[str, Outcome] = {}
    _drain(engine, results)
    return results


def _error_codes(results: dict[str, Outcome]) -> dict[str, str | None]:
    return {rid: r.error_code for rid, r in results.items() if r.finish_reason == "error"}


def _failing_forward(
    monkeypatch: pytest.MonkeyPatch,
    engine: LLMEngine,
    fails: Callable[[torch.Tensor, int], BaseException | None],
) -> list[int]:
    """Make the model raise `fails(input_ids, num_seqs)` when it returns an exception.

    Returns the list of batch sizes (sequences) of every forward call, filled as they run.
    """
    real = engine.model.forward
    sizes: list[int] = []

    def forward(input_ids, positions, attn, cache, lora, logits_index, *rest):
        n = attn.num_decode + len(attn.prefills)
        sizes.append(n)
        exc = fails(input_ids, n)
        if exc is not None:
            # A failure deep in the model leaves this attempt's keys/values in the cache;
            # garbage there instead proves every survivor's retry rewrites its positions.
            real(input_ids, positions, attn, cache, lora, logits_index, *rest)
            slots = attn.slot_mapping
            cache.k.view(cache.k.shape[0], -1, *cache.k.shape[3:])[:, slots] = 1e4
            cache.v.view(cache.v.shape[0], -1, *cache.v.shape[3:])[:, slots] = -1e4
            raise exc
        return real(input_ids, positions, attn, cache, lora, logits_index, *rest)

    monkeypatch.setattr(engine.model, "forward", forward)
    return sizes


def _unused_token(engine: LLMEngine, results: dict[str, Result], reqs: list[Request]) -> int:
    used = {t for _, ids, _ in reqs for t in ids}
    used |= {t for r in results.values() for t in r.token_ids}
    return next(t for t in range(engine.model.shape.vocab_size - 1, 0, -1) if t not in used)


def _decode_poison(
    clean: dict[str, Result], reqs: list[Request], order: list[int] | None = None
) -> tuple[str, int, int]:
    """A request and the index j of one of its generated tokens that appears nowhere else in
    any request (prompt or output), nor earlier in its own: a forward that fails on that
    token id hits that request alone, mid-decode, when the token is fed back. Requests are
    tried in `order` (default: from the middle of the batch outwards)."""
    if order is None:
        order = sorted(range(len(reqs)), key=lambda i: abs(i - len(reqs) // 2))
    for i in order:
        rid, ids, _ = reqs[i]
        others = {t for r, p, _ in reqs if r != rid for t in p}
        others |= {t for r, res in clean.items() if r != rid for t in res.token_ids}
        out = clean[rid].token_ids
        for j in range(1, len(out) - 1):
            if out[j] not in others and out[j] not in ids and out[j] not in out[:j]:
                return rid, j, out[j]
    raise AssertionError("no generated token is unique to one request; change the prompts")


def test_a_sequence_failing_mid_decode_fails_alone(
    tiny_base: Path, tiny_adapters: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = _engine(tiny_base, tiny_adapters)
    reqs = _requests(engine)
    clean = _run(engine, reqs)
    victim, j, poison = _decode_poison(clean, reqs)

    sizes = _failing_forward(
        monkeypatch,
        engine,
        lambda ids, n: RuntimeError("boom") if poison in ids.tolist() else None,
    )
    got = _run(engine, reqs)

    assert _error_codes(got) == {victim: "internal_error"}
    assert "boom" in (got[victim].error or "")
    # It emitted everything up to and including the token whose forward then failed.
    assert got[victim].token_ids == clean[victim].token_ids[: j + 1]
    for rid, _, _ in reqs:
        if rid != victim:
            assert got[rid].finish_reason == "length", rid
            assert got[rid].token_ids == clean[rid].token_ids, rid
    # The failing step really was retried in pieces, down to the victim alone.
    assert len(reqs) in sizes and 1 in sizes
    assert engine.num_running == 0 and engine.num_waiting == 0
    for adapter in {a for _, _, a in reqs if a}:  # every adapter pin was released
        assert engine.adapters.evict(adapter)


def test_poisoned_prompts_joining_mid_flight_fail_alone(
    tiny_base: Path, tiny_adapters: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = _engine(tiny_base, tiny_adapters)
    reqs = _requests(engine)
    clean = _run(engine, reqs)
    poison = _unused_token(engine, clean, reqs)
    _failing_forward(
        monkeypatch,
        engine,
        lambda ids, n: ValueError("bad row") if poison in ids.tolist() else None,
    )
    bad = [
        ("bad0", [poison, *reqs[0][1]], "r8"),
        ("bad1", [*reqs[1][1], poison], None),
    ]
    early, late = reqs[:4], reqs[4:]
    for rid, ids, adapter in early:
        engine.add_request(rid, ids, _greedy(), adapter)
    got: dict[str, Outcome] = {}
    for _ in range(3):  # the first wave is decoding when the rest arrive
        for out in engine.step():
            got.setdefault(out.request_id, Outcome()).token_ids += out.token_ids
    for rid, ids, adapter in [bad[0], *late, bad[1]]:
        engine.add_request(rid, ids, _greedy(), adapter)
    _drain(engine, got)

    for rid, _, _ in bad:
        assert got[rid].finish_reason == "error" and got[rid].token_ids == []
        assert "bad row" in (got[rid].error or "")
    for rid, _, _ in reqs:
        assert got[rid].finish_reason == "length", rid
        assert got[rid].token_ids == clean[rid].token_ids, rid


def test_a_failing_detokenizer_fails_only_its_sequence(
    tiny_base: Path, tiny_adapters: dict[str, Path]
) -> None:
    engine = _engine(tiny_base, tiny_adapters)
    reqs = _requests(engine, 4)
    clean = _run(engine, reqs)

    for rid, ids, adapter in reqs:
        engine.add_request(rid, ids, _greedy(), adapter)
    victim = engine._requests["req1"].detokenizer
    real_append, calls = victim.append, []

    def append(token_id: int) -> str:
        calls.append(token_id)
        if len(calls) == 3:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "broken tokenizer")
        return real_append(token_id)

    victim.append = append  # type: ignore[method-assign]
    got: dict[str, Outcome] = {}
    _drain(engine, got)

    assert got["req1"].finish_reason == "error"
    assert "broken tokenizer" in (got["req1"].error or "")
    # Two tokens went through whole; the third was sampled but its text never came out.
    assert got["req1"].token_ids == clean["req1"].token_ids[:3]
    assert got["req1"].text == clean["req1"].text[: len(got["req1"].text)]
    for rid in ("req0", "req2", "req3"):
        assert got[rid].finish_reason == "length"
        assert got[rid].token_ids == clean[rid].token_ids
        assert got[rid].text == clean[rid].text
    assert engine.adapters.evict("r4")  # req1's adapter pin was released


def test_a_failing_final_flush_turns_the_finish_into_an_error(
    tiny_base: Path, tiny_adapters: dict[str, Path]
) -> None:
    engine = _engine(tiny_base, tiny_adapters)
    reqs = _requests(engine, 2)
    for rid, ids, adapter in reqs:
        engine.add_request(rid, ids, _greedy(4), adapter)

    def flush() -> str:
        raise RuntimeError("flush failed")

    engine._requests["req1"].detokenizer.flush = flush  # type: ignore[method-assign]
    got: dict[str, Outcome] = {}
    _drain(engine, got)
    assert got["req1"].finish_reason == "error" and len(got["req1"].token_ids) == 4
    assert "flush failed" in (got["req1"].error or "")
    assert got["req0"].finish_reason == "length"
    assert engine.adapters.evict("r4")


def test_a_sampling_failure_replays_the_survivors_random_draws(
    tiny_base: Path, tiny_adapters: dict[str, Path]
) -> None:
    """The failed attempt already drew from the seeded generators; the retry must draw the
    same numbers again, or the survivors' seeded samples would change."""
    engine = _engine(tiny_base, tiny_adapters)
    tok = engine.tokenizer
    seeded = [
        SamplingParams(max_tokens=8, temperature=1.0, seed=100 + i, ignore_eos=True)
        for i in range(3)
    ]

    def run(poisoned: SamplingParams | None) -> dict[str, Outcome]:
        for i, params in enumerate(seeded):
            engine.add_request(f"s{i}", tok.encode(PROMPTS[i]), params, ADAPTERS[i])
        if poisoned is not None:
            engine.add_request("bad", tok.encode(PROMPTS[3]), poisoned, None)
        results: dict[str, Outcome] = {}
        _drain(engine, results)
        return results

    clean = run(None)
    poisoned = SamplingParams(max_tokens=8, temperature=1.0, seed=7, ignore_eos=True)
    real = engine.sampler

    def sampler(logits, params, generators, contexts=None):
        out = real(logits, params, generators, contexts)  # consumes every row's random draw
        if any(p is poisoned for p in params):
            raise FloatingPointError("sampling blew up")
        return out

    engine.sampler = sampler  # type: ignore[assignment]
    got = run(poisoned)
    assert got["bad"].finish_reason == "error" and got["bad"].token_ids == []
    for i in range(3):
        assert got[f"s{i}"].token_ids == clean[f"s{i}"].token_ids


@pytest.mark.parametrize(
    "oom",
    [
        lambda: torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        lambda: RuntimeError("CUDA error: out of memory"),
    ],
    ids=["OutOfMemoryError", "RuntimeError"],
)
def test_out_of_memory_in_a_big_batch_is_retried_smaller(
    tiny_base: Path,
    tiny_adapters: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
    oom: Callable[[], BaseException],
) -> None:
    engine = _engine(tiny_base, tiny_adapters)
    reqs = _requests(engine)
    clean = _run(engine, reqs)
    sizes = _failing_forward(monkeypatch, engine, lambda ids, n: oom() if n > 2 else None)
    got = _run(engine, reqs)
    assert _error_codes(got) == {}
    for rid, _, _ in reqs:
        assert got[rid].token_ids == clean[rid].token_ids, rid
    assert max(sizes) == len(reqs)  # the whole batch was tried, and did not fit


def test_a_sequence_that_cannot_fit_alone_fails_with_out_of_memory(
    tiny_base: Path, tiny_adapters: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = _engine(tiny_base, tiny_adapters)
    reqs = _requests(engine, 4)
    clean = _run(engine, reqs)
    victim, _, poison = _decode_poison(clean, reqs)

    def fails(ids: torch.Tensor, n: int) -> BaseException | None:
        return torch.OutOfMemoryError("out of memory") if poison in ids.tolist() else None

    _failing_forward(monkeypatch, engine, fails)
    got = _run(engine, reqs)
    assert _error_codes(got) == {victim: "out_of_memory"}
    for rid, _, _ in reqs:
        if rid != victim:
            assert got[rid].token_ids == clean[rid].token_ids, rid

    # The engine keeps serving.
    monkeypatch.undo()
    again = _run(engine, reqs[:1])
    assert again["req0"].finish_reason == "length"
    assert again["req0"].token_ids == clean["req0"].token_ids


def test_an_internal_failure_carries_the_internal_error_code(
    tiny_base: Path, tiny_adapters: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = _engine(tiny_base, tiny_adapters)
    reqs = _requests(engine, 3)
    poison = _unused_token(engine, {}, reqs)
    _failing_forward(
        monkeypatch, engine, lambda ids, n: KeyError("x") if poison in ids.tolist() else None
    )
    bad: Request = ("bad", [poison, 5, 6], None)
    assert _error_codes(_run(engine, [*reqs, bad], max_tokens=3)) == {"bad": "internal_error"}


@pytest.mark.skipif(not triton_available(), reason="Triton is not installed")
def test_isolation_through_the_decode_graph_path(
    tiny_base: Path, tiny_adapters: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With decode steps on the static (CUDA-graph) buffers, a failing step is retried in
    parts of the batch; a part padded to its bucket must not write its padding into the
    cache rows of the sequences that are not in it."""
    engine = _static_engine(tiny_base, tiny_adapters, max_loras=4)
    assert engine.decode_graphs is not None
    reqs = _requests(engine)
    clean = _run(engine, reqs)
    # A victim in the first half: that half (rows 0-2, padded to 4) runs first and fails.
    victim, _, poison = _decode_poison(clean, reqs, order=[0, 1, 2])
    _failing_forward(
        monkeypatch,
        engine,
        lambda ids, n: RuntimeError("boom") if poison in ids.tolist() else None,
    )
    got = _run(engine, reqs)
    assert _error_codes(got) == {victim: "internal_error"}
    for rid, _, _ in reqs:
        if rid != victim:
            assert got[rid].token_ids == clean[rid].token_ids, rid
    assert engine.decode_graphs.num_runs > 0
