"""The paged KV cache in the engine: prefix reuse keyed by adapter content, preemption,
blocks returned, requests that can never fit. Outputs are checked against HF / PEFT."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from adapterhub_server.base_model import ResolvedBaseModel
from adapterhub_server.config import EngineConfig
from adapterhub_server.engine.build import build_engine
from adapterhub_server.engine.engine import LLMEngine
from adapterhub_server.engine.sampling_params import SamplingParams
from adapterhub_server.errors import ContextLengthError
from adapterhub_server.lora.cache import AdapterSource
from adapterhub_server.models import cpu_attention
from adapterhub_server.models.attention import KVCache
from adapterhub_server.registry import BaseModelSpec, Registry, RegistryAdapterSource
from tests.engine.test_engine import Result, _drain

BLOCK = 4
SHARED = [(7 * j) % 50 + 3 for j in range(6 * BLOCK)]
"""A prefix of six full blocks."""


def _engine(
    base: Path,
    adapters: dict[str, Path] | None = None,
    *,
    source: AdapterSource | None = None,
    **overrides,
) -> LLMEngine:
    config = EngineConfig(
        **{
            "max_num_seqs": 8,
            "max_num_batched_tokens": 64,
            "max_loras": 3,
            "block_size": BLOCK,
            **overrides,
        }
    )
    return build_engine(
        ResolvedBaseModel(base, "tiny", "local"), config, lora_modules=adapters, source=source
    )


def _blocks_bytes(tiny_base: Path, blocks: int) -> int:
    """`--kv-cache-memory` for exactly `blocks` blocks (one of them the null block)."""
    import json

    cfg = json.loads((tiny_base / "config.json").read_text())
    heads = cfg["num_attention_heads"]
    per_block = KVCache.bytes_per_block(
        num_layers=cfg["num_hidden_layers"],
        block_size=BLOCK,
        num_kv_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
        dtype=__import__("torch").float32,
    )
    return per_block * blocks


def _greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


def _one(engine: LLMEngine, rid: str, ids: list[int], adapter: str | None, n: int = 5):
    """Run one request alone; returns (its tokens, prompt tokens served from the cache)."""
    before = engine.kv.stats.hit_tokens
    engine.add_request(rid, ids, _greedy(n), adapter)
    results: dict[str, Result] = {}
    _drain(engine, results)
    assert results[rid].finish_reason == "length", results[rid].error
    return results[rid].token_ids, engine.kv.stats.hit_tokens - before


def test_prefix_reuse_follows_adapter_content(
    tiny_base: Path, tiny_adapters: dict[str, Path], peft_greedy, tmp_path: Path
) -> None:
    """Hits within one adapter and within base rows; misses across adapters and between
    base and adapter; the same bytes under another name share. Output equals PEFT's with
    and without hits."""
    same_bytes = shutil.copytree(tiny_adapters["r8"], tmp_path / "r8-copy")
    adapters = {"r8": tiny_adapters["r8"], "r16": tiny_adapters["r32"], "r8-copy": same_bytes}
    engine = _engine(tiny_base, adapters)
    cases = [
        ("r8", [11], 0, "r8"),
        ("r8", [12, 13], len(SHARED), "r8"),
        ("r16", [11], 0, "r32"),
        (None, [11], 0, None),
        ("r8-copy", [14], len(SHARED), "r8"),
        (None, [15, 16, 17], len(SHARED), None),
    ]
    for i, (adapter, tail, hit, reference) in enumerate(cases):
        ids = SHARED + tail
        tokens, got = _one(engine, f"q{i}", ids, adapter)
        assert got == hit, (i, adapter)
        assert tokens == peft_greedy(reference, ids, 5), (i, adapter)
    stats = engine.kv.stats
    assert stats.hit_tokens == 3 * len(SHARED)
    assert stats.queried_tokens == sum(len(SHARED) + len(c[1]) for c in cases)
    # Nothing is left referenced, while the published blocks stay cached.
    assert engine.kv.pool.num_used == 0


def test_a_new_version_never_reuses_the_old_versions_blocks(
    tiny_base: Path, tiny_adapters: dict[str, Path], peft_greedy, tmp_path: Path
) -> None:
    registry = Registry.open(tmp_path / "registry", base=BaseModelSpec.from_directory(tiny_base))
    try:
        registry.push(tiny_adapters["r4"], "ad")
        engine = _engine(tiny_base, source=RegistryAdapterSource(registry))
        ids = [*SHARED, 9]
        assert _one(engine, "v1", ids, "ad") == (peft_greedy("r4", ids, 5), 0)
        registry.push(tiny_adapters["r8"], "ad")  # "ad" now names version 2
        assert _one(engine, "v2", ids, "ad") == (peft_greedy("r8", ids, 5), 0)
        # Version 1 by number still finds its own blocks.
        assert _one(engine, "v1-again", [*ids, 3], "ad@1") == (
            peft_greedy("r4", [*ids, 3], 5),
            len(SHARED),
        )
    finally:
        registry.close()


def test_no_prefix_caching_computes_every_prompt(tiny_base: Path, peft_greedy) -> None:
    engine = _engine(tiny_base, prefix_caching=False)
    for i in range(2):
        tokens, hit = _one(engine, f"q{i}", [*SHARED, i + 1], None)
        assert hit == 0 and tokens == peft_greedy(None, [*SHARED, i + 1], 5)


def _workload(engine: LLMEngine, params) -> dict[str, Result]:
    """Six requests of 9-16 prompt tokens and 20 output tokens each, submitted at once."""
    for i in range(6):
        ids = [(5 * i + 3 * j) % 60 + 2 for j in range(9 + i)]
        engine.add_request(f"r{i}", ids, params(i), ["r8", None, "r4"][i % 3])
    results: dict[str, Result] = {}
    _drain(engine, results)
    return results


def test_preemption_keeps_greedy_output(
    tiny_base: Path, tiny_adapters: dict[str, Path], peft_greedy
) -> None:
    """A cache of 16 blocks for six sequences that need up to 9 each: the newest are
    preempted and recomputed, and every output is still exactly PEFT's."""
    adapters = {k: tiny_adapters[k] for k in ("r8", "r4")}
    engine = _engine(
        tiny_base, adapters, kv_cache_memory=_blocks_bytes(tiny_base, 17), max_num_batched_tokens=32
    )
    assert engine.kv.pool.usable_blocks == 16
    results = _workload(engine, lambda i: _greedy(20))
    assert engine.scheduler.num_preemptions > 0
    for i in range(6):
        r = results[f"r{i}"]
        ids = [(5 * i + 3 * j) % 60 + 2 for j in range(9 + i)]
        assert r.finish_reason == "length", r.error
        assert r.token_ids == peft_greedy(["r8", None, "r4"][i % 3], ids, 20), i
        # What streamed out is exactly the tokens, once: nothing repeated after a preemption.
        assert r.text == engine.tokenizer.decode(r.token_ids)
    assert engine.kv.pool.num_used == 0


def test_cpu_attention_takes_the_kernel_and_keeps_peft_output(
    tiny_base: Path, tiny_adapters: dict[str, Path], peft_greedy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On CPU the decode steps' attention and the prefill chunks' go through the C kernel
    (block tables of several blocks, mixed adapters and base rows, chunks split by the
    token budget), and the output is still exactly PEFT's."""
    if cpu_attention.load() is None:
        pytest.skip("the CPU attention kernel cannot be built here")
    calls: list[int] = []
    real = cpu_attention.paged_attention

    def counted(q, *args, **kwargs) -> None:
        calls.append(q.shape[0])
        real(q, *args, **kwargs)

    monkeypatch.setattr(cpu_attention, "paged_attention", counted)
    adapters = {k: tiny_adapters[k] for k in ("r8", "r4")}
    results = _workload(_engine(tiny_base, adapters), lambda i: _greedy(20))
    assert 6 in calls  # all six sequences decoded together
    assert any(n >= 9 for n in calls)  # prefill chunks of 9-14 tokens
    for i in range(6):
        ids = [(5 * i + 3 * j) % 60 + 2 for j in range(9 + i)]
        assert results[f"r{i}"].token_ids == peft_greedy(["r8", None, "r4"][i % 3], ids, 20), i


def test_preemption_keeps_seeded_sampling(tiny_base: Path, tiny_adapters: dict[str, Path]) -> None:
    adapters = {k: tiny_adapters[k] for k in ("r8", "r4")}

    def sampled(i: int) -> SamplingParams:
        return SamplingParams(max_tokens=20, temperature=0.9, top_p=0.95, seed=100 + i)

    roomy = _workload(_engine(tiny_base, adapters), sampled)
    tight_engine = _engine(
        tiny_base, adapters, kv_cache_memory=_blocks_bytes(tiny_base, 17), max_num_batched_tokens=32
    )
    tight = _workload(tight_engine, sampled)
    assert tight_engine.scheduler.num_preemptions > 0
    for rid, r in roomy.items():
        assert tight[rid].token_ids == r.token_ids, rid
        assert tight[rid].text == r.text


def test_aborted_and_finished_requests_return_their_blocks(tiny_base: Path) -> None:
    engine = _engine(tiny_base)
    for i in range(3):
        engine.add_request(f"r{i}", [*SHARED, i], _greedy(30))
    for _ in range(3):
        engine.step()
    assert engine.kv.pool.num_used > 0 and engine.kv.usage() > 0
    for i in range(3):
        engine.abort(f"r{i}")
    assert engine.kv.pool.num_used == 0 and engine.kv.usage() == 0
    assert not engine.has_work()


def test_a_request_larger_than_the_whole_cache_is_refused_at_once(tiny_base: Path) -> None:
    engine = _engine(tiny_base, kv_cache_memory=_blocks_bytes(tiny_base, 9))
    capacity = engine.kv.pool.usable_blocks * BLOCK
    with pytest.raises(ContextLengthError, match="more than the whole cache holds"):
        engine.add_request("big", [5] * (capacity - 4), _greedy(5))
    # One that fills the whole cache runs, alone.
    engine.add_request("fits", [5] * (capacity - 1), _greedy(1))
    engine.add_request("then", [5] * (capacity - 4), _greedy(4))
    results: dict[str, Result] = {}
    _drain(engine, results)
    assert results["fits"].finish_reason == "length"
    assert results["then"].finish_reason == "length"


def test_a_preempted_stream_carries_on_without_repeating(
    tiny_base: Path, tiny_adapters: dict[str, Path]
) -> None:
    """Streams through the async front (what the HTTP routes read): every delta of a
    request preempted mid-stream is new text, and the whole equals an undisturbed run."""
    import asyncio

    from adapterhub_server.engine.async_engine import AsyncLLMEngine

    adapters = {k: tiny_adapters[k] for k in ("r8", "r4")}
    roomy = _workload(_engine(tiny_base, adapters), lambda i: _greedy(20))
    engine = _engine(
        tiny_base, adapters, kv_cache_memory=_blocks_bytes(tiny_base, 17), max_num_batched_tokens=32
    )
    client = AsyncLLMEngine(engine, base_model_id="tiny")

    async def stream(i: int) -> tuple[list[str], list[int]]:
        ids = [(5 * i + 3 * j) % 60 + 2 for j in range(9 + i)]
        texts: list[str] = []
        tokens: list[int] = []
        async for out in client.generate(
            request_id=f"s{i}",
            prompt_token_ids=ids,
            params=_greedy(20),
            adapter=["r8", None, "r4"][i % 3],
        ):
            texts.append(out.text)
            tokens += out.token_ids
        return texts, tokens

    async def main() -> list[tuple[list[str], list[int]]]:
        return await asyncio.gather(*(stream(i) for i in range(6)))

    client.start()
    try:
        streamed = asyncio.run(main())
    finally:
        client.shutdown()
    assert engine.scheduler.num_preemptions > 0
    for i, (texts, tokens) in enumerate(streamed):
        assert tokens == roomy[f"r{i}"].token_ids, i
        assert "".join(texts) == roomy[f"r{i}"].text, i


def test_requests_with_a_cached_prefix_start_first(
    tiny_base: Path, tiny_adapters: dict[str, Path], peft_greedy
) -> None:
    """Queued behind a request that must compute its whole prompt, one whose prefix is
    cached is admitted first: it gets its first token in the very next step."""
    adapters = {k: tiny_adapters[k] for k in ("r8", "r4")}
    # Budget for the hit's one token plus all but the last of the miss's: in arrival order
    # the miss alone would take all of it.
    engine = _engine(tiny_base, adapters, max_num_batched_tokens=len(SHARED) + 1, max_num_seqs=4)
    _one(engine, "warm", [*SHARED, 1], "r8")
    engine.add_request("miss", [*SHARED, 2], _greedy(3), "r4")
    engine.add_request("hit", [*SHARED, 3], _greedy(3), "r8")
    first = {o.request_id for o in engine.step() if o.token_ids}
    assert first == {"hit"}
    results: dict[str, Result] = {}
    _drain(engine, results)
    assert engine.kv.stats.hit_tokens == len(SHARED)
    assert results["miss"].token_ids == peft_greedy("r4", [*SHARED, 2], 3)
