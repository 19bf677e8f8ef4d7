"""Decode steps from static, padded, bucketed buffers (what a CUDA graph replays), on CPU.

On CPU nothing is captured (`capture=False`): the same buffers and padded layout run
eagerly, so these tests check that the static step computes what the dynamic one does and
that it reads everything that varies from device buffers (a graph would replay stale host
values otherwise). The captured graphs themselves are checked by the `gpu` tests in
tests/engine/test_cuda.py.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from adapterhub_server.engine.decode_graphs import (
    DecodeGraphs,
    batch_buckets,
    chunk_capacity,
    table_width_buckets,
)
from adapterhub_server.engine.engine import LLMEngine
from adapterhub_server.engine.sampling_params import SamplingParams
from adapterhub_server.lora.ops import Route
from adapterhub_server.lora.routing import plan_chunks
from adapterhub_server.lora.triton_ops import triton_available
from tests.engine.test_engine import _engine, _greedy_equals_peft, _requests

needs_triton = pytest.mark.skipif(not triton_available(), reason="Triton is not installed")


def test_buckets() -> None:
    assert batch_buckets(32) == [1, 2, 4, 8, 16, 24, 32]
    assert batch_buckets(20) == [1, 2, 4, 8, 16, 20]
    assert batch_buckets(3) == [1, 2, 3]
    assert batch_buckets(1) == [1]
    assert table_width_buckets(2048, 16) == [4, 8, 16, 32, 64, 128]
    assert table_width_buckets(200, 16) == [4, 8, 13]
    assert table_width_buckets(40, 16) == [3]
    assert table_width_buckets(100, 128) == [1]


@pytest.mark.parametrize("seed", range(20))
def test_chunk_capacity_bounds_every_mix(seed: int) -> None:
    rng = random.Random(seed)
    slots = rng.choice([1, 4, 16, 64])
    batch = rng.choice([1, 7, 16, 33, 128, 256])
    skew = rng.random() * 3
    weights = [1 / (i + 1) ** skew for i in range(slots)]
    routes: list[Route | None] = [
        None if rng.random() < 0.2 else (16, rng.choices(range(slots), weights)[0])
        for _ in range(batch)
    ]
    plan = plan_chunks(routes).get(16)
    chunks = len(plan.slots) if plan else 0
    assert chunks <= chunk_capacity(batch, slots)
    # The bound is reached: every slot used once, the rest on one slot.
    worst: list[Route | None] = [(16, s % slots) for s in range(batch)]
    assert len(plan_chunks(worst)[16].slots) <= chunk_capacity(batch, slots)


def _static_engine(tiny_base: Path, tiny_adapters: dict[str, Path], **overrides) -> LLMEngine:
    engine = _engine(tiny_base, tiny_adapters, lora_kernel="triton", **overrides)
    engine.decode_graphs = DecodeGraphs(
        engine.model,
        engine.kv_cache,
        engine.adapters.pool,
        max_num_seqs=engine.scheduler.max_num_seqs,
        max_model_len=engine.max_model_len,
        capture=False,
    )
    return engine


@needs_triton
def test_static_decode_greedy_equals_peft(tiny_base, tiny_adapters, peft_greedy) -> None:
    """Mixed ranks (several rank classes), base rows, batches padded to buckets as requests
    finish, the adapter pool growing mid-run (the buffers are rebuilt)."""
    engine = _static_engine(tiny_base, tiny_adapters, max_num_batched_tokens=24, max_loras=6)
    graphs = engine.decode_graphs
    assert graphs is not None
    reqs = _requests(engine.tokenizer, [*tiny_adapters, None], max_tokens=[7, 3, 5])
    _greedy_equals_peft(engine, reqs, peft_greedy, timeout=600)
    assert graphs.num_runs >= 3  # the decode-only steps went through the static path
    assert len(engine.adapters.pool.rank_classes()) >= 3


def _prefill(engine: LLMEngine, adapters: list[str | None], prompt_len: int) -> None:
    """Admit and prefill one request per entry, leaving them all about to decode."""
    for i, adapter in enumerate(adapters):
        ids = [(7 * i + 3 * j) % 50 + 1 for j in range(prompt_len + i)]
        engine.add_request(
            f"r{i}", ids, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True), adapter
        )
    while any(s.prefilling for s in engine.scheduler.running) or engine.num_waiting:
        engine.step()


@needs_triton
@pytest.mark.parametrize(
    ("adapters", "prompt_len"),
    [
        (["r8", None, "r32", "r8", "patterns"], 5),  # padded 5 -> 8, three rank classes
        (["r4"], 70),  # one sequence past the first key-length bucket
        ([None, None, None], 3),  # no adapter in the step, adapters in the pool
    ],
)
def test_static_step_logits_equal_the_dynamic_step(
    tiny_base, tiny_adapters, adapters, prompt_len
) -> None:
    engine = _static_engine(tiny_base, tiny_adapters, max_loras=6, max_model_len=160)
    graphs = engine.decode_graphs
    assert graphs is not None
    engine.adapters.pool.ensure_capacity(16, 1)  # resident adapters, used or not
    _prefill(engine, adapters, prompt_len)
    seqs = list(engine.scheduler.running)
    ids = [s.token_at(s.num_computed) for s in seqs]
    positions = [s.num_computed for s in seqs]
    routes = [s.route for s in seqs]
    tables = [engine.kv.block_ids(s) for s in seqs]
    static = graphs.run(ids, positions, routes, tables)
    assert static is not None and static.shape[0] == len(seqs)
    static = static.clone()
    (step,) = graphs._steps.values()
    # A step with no adapter in it runs without the LoRA kernels, though the pool has some.
    assert (step.lora is None) == all(a is None for a in adapters)
    dynamic = engine._forward(ids, positions, tables, [], routes, [], list(range(len(seqs))))
    torch.testing.assert_close(static, dynamic, rtol=1e-4, atol=1e-4)


@needs_triton
def test_the_static_step_reads_only_its_buffers(tiny_base, tiny_adapters) -> None:
    """Traced once with no graph break (so no host sync) and then run for a different mix,
    positions and ids without retracing: nothing the step varies is a host value baked into
    the trace, which is what a captured CUDA graph needs."""
    engine = _static_engine(tiny_base, tiny_adapters, max_loras=6)
    graphs = engine.decode_graphs
    assert graphs is not None
    _prefill(engine, ["r8", "r32", None, "r16-rslora", "r8"], 4)
    seqs = list(engine.scheduler.running)
    step = graphs._new_step(8, 4, lora=True)
    forward = torch.compile(graphs._forward, backend="eager", fullgraph=True)

    def run(order: list[int], shift: int) -> torch.Tensor:
        chosen = [seqs[i] for i in order]
        graphs._fill(
            step,
            [s.token_at(s.num_computed) for s in chosen],
            [s.num_computed - shift for s in chosen],
            [s.route for s in chosen],
            [engine.kv.block_ids(s) for s in chosen],
        )
        return forward(step)[: len(order)].clone()

    first = run([0, 1, 2, 3, 4], 0)
    with torch.compiler.set_stance("fail_on_recompile"):
        second = run([3, 0, 4], 1)
    reference = run([3, 0, 4], 1)  # may retrace here: it only checks the values
    torch.testing.assert_close(second, reference)
    assert not torch.equal(first[:3], second)
