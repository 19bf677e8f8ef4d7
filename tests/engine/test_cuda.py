"""The CUDA decode loop: the Triton LoRA path and the CUDA-graph decode steps against PEFT,
and no host-device sync per step except reading the sampled ids. Skipped without a GPU."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from adapterhub_server.engine.sampling_params import SamplingParams
from tests.engine.test_engine import _engine, _greedy_equals_peft, _requests

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("cuda_graphs", [False, True], ids=["eager", "graphs"])
def test_cuda_triton_path_greedy_equals_peft(
    tiny_base: Path, tiny_adapters, peft_greedy, cuda_graphs: bool
) -> None:
    """Mixed ranks and base rows with fewer slots than adapters (the pool churns; with
    graphs, batches shrink through the buckets as requests finish)."""
    engine = _engine(
        tiny_base,
        tiny_adapters,
        max_loras=3,
        device="cuda",
        dtype="float32",
        lora_kernel="triton",
        cuda_graphs=cuda_graphs,
    )
    assert (engine.decode_graphs is not None) == cuda_graphs
    reqs = _requests(engine.tokenizer, [*tiny_adapters, None], max_tokens=[8, 5])
    _greedy_equals_peft(engine, reqs, peft_greedy)
    if engine.decode_graphs is not None:
        assert engine.decode_graphs.num_captures > 0
        assert engine.decode_graphs.num_runs > engine.decode_graphs.num_captures


def test_graph_replay_equals_the_eager_step(tiny_base: Path, tiny_adapters) -> None:
    """bf16: the replayed step's logits against the eager forward of the same step, for
    several adapter mixes through one captured graph."""
    engine = _engine(tiny_base, tiny_adapters, max_loras=6, device="cuda", dtype="bfloat16")
    graphs = engine.decode_graphs
    assert graphs is not None
    for i, adapter in enumerate(["r8", None, "r32", "patterns", "r4", "r8"]):
        ids = [(5 * i + j) % 50 + 1 for j in range(6 + i)]
        engine.add_request(f"r{i}", ids, SamplingParams(max_tokens=8, ignore_eos=True), adapter)
    while any(s.prefilling for s in engine.scheduler.running) or engine.num_waiting:
        engine.step()
    seqs = list(engine.scheduler.running)
    for order in ([0, 1, 2, 3, 4, 5], [5, 3, 1, 0, 2, 4], [2, 2, 2, 2, 2, 2]):
        chosen = [seqs[i] for i in order]
        ids = [s.token_at(s.num_computed) for s in chosen]
        # Blocks and positions stay in place (nothing is written twice): only mixes vary.
        positions = [s.num_computed for s in seqs]
        tables = [engine.kv.block_ids(s) for s in seqs]
        routes = [s.route for s in chosen]
        replayed = graphs.run(ids, positions, routes, tables).clone()
        eager = engine._forward(ids, positions, tables, [], routes, [], list(range(6)))
        torch.testing.assert_close(replayed, eager, rtol=5e-2, atol=5e-2)
    assert graphs.num_captures == 1 and graphs.num_runs == 3


@pytest.mark.parametrize("cuda_graphs", [False, True], ids=["eager", "graphs"])
def test_a_decode_step_synchronises_once(tiny_base: Path, tiny_adapters, cuda_graphs) -> None:
    engine = _engine(
        tiny_base, tiny_adapters, device="cuda", dtype="bfloat16", cuda_graphs=cuda_graphs
    )
    reqs = _requests(engine.tokenizer, ["r8", "r4", None, "r8"], max_tokens=[64])
    for rid, ids, adapter, n in reqs:
        engine.add_request(
            rid, ids, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True), adapter
        )
    while engine.num_running < len(reqs) or any(s.prefilling for s in engine.scheduler.running):
        engine.step()
    engine.step()  # one decode step to warm every path (and capture the graph)
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            engine.step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
    assert len(syncs) <= 1, [str(w.message) for w in syncs]  # the sampled ids' .tolist()
    if cuda_graphs:
        assert engine.decode_graphs is not None and engine.decode_graphs.num_runs >= 2
