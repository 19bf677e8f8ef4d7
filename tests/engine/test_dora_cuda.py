"""DoRA on CUDA: the Triton kernels plus the DoRA rescale, eager and from captured CUDA
graphs, against PEFT and against the eager step. Skipped without a GPU (kept apart from
tests/engine/test_dora.py, which imports the registry: GPU machines may lack its stack)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from adapterhub_server.engine.sampling_params import SamplingParams
from tests.engine.test_engine import _engine, _greedy_equals_peft, _requests
from tests.lora.dora_adapters import PeftReference, make_mixed_adapters

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def mixed(tiny_base: Path, tiny_adapters: dict[str, Path], tmp_path_factory) -> dict[str, Path]:
    return make_mixed_adapters(tiny_base, tiny_adapters, tmp_path_factory.mktemp("dora-cuda"))


@pytest.fixture(scope="module")
def reference(tiny_base: Path, mixed: dict[str, Path]) -> PeftReference:
    return PeftReference(tiny_base, mixed)


@pytest.mark.parametrize("cuda_graphs", [False, True], ids=["eager", "graphs"])
def test_cuda_greedy_equals_peft(tiny_base, mixed, reference, cuda_graphs: bool) -> None:
    """The Triton kernels plus the DoRA rescale, eager and replayed from captured graphs
    (DoRA and plain-only graphs both), with a pool that churns."""
    engine = _engine(
        tiny_base,
        mixed,
        max_loras=3,
        device="cuda",
        dtype="float32",
        lora_kernel="triton",
        cuda_graphs=cuda_graphs,
    )
    names = ["dora", None, "r8", "dora-attn", "dora-r32", "attn-only", "dora"]
    reqs = _requests(engine.tokenizer, names, max_tokens=[8, 5, 11])
    _greedy_equals_peft(engine, reqs, reference)
    graphs = engine.decode_graphs
    if cuda_graphs:
        assert graphs is not None and graphs.num_runs > graphs.num_captures > 0
        assert any(key[3] for key in graphs._steps)  # a graph with the DoRA rescale ran


def test_cuda_graph_replay_with_dora_equals_the_eager_step(tiny_base, mixed) -> None:
    """bf16: one captured DoRA graph replayed for several mixes (DoRA rows move between
    batch rows, some rows plain or base) equals the eager step each time."""
    engine = _engine(tiny_base, mixed, max_loras=6, device="cuda", dtype="bfloat16")
    graphs = engine.decode_graphs
    assert graphs is not None
    for i, adapter in enumerate(["dora", None, "dora-r32", "r8", "dora-attn", "dora"]):
        ids = [(5 * i + j) % 50 + 1 for j in range(6 + i)]
        engine.add_request(f"r{i}", ids, SamplingParams(max_tokens=8, ignore_eos=True), adapter)
    while any(s.prefilling for s in engine.scheduler.running) or engine.num_waiting:
        engine.step()
    seqs = list(engine.scheduler.running)
    positions = [s.num_computed for s in seqs]
    tables = [engine.kv.block_ids(s) for s in seqs]
    for order in ([0, 1, 2, 3, 4, 5], [3, 0, 4, 2, 1, 5], [0, 0, 4, 4, 2, 2]):
        chosen = [seqs[i] for i in order]
        ids = [s.token_at(s.num_computed) for s in chosen]
        routes = [s.route for s in chosen]
        replayed = graphs.run(ids, positions, routes, tables).clone()
        eager = engine._forward(ids, positions, tables, [], routes, [], list(range(6)))
        torch.testing.assert_close(replayed, eager, rtol=5e-2, atol=5e-2)
    assert graphs.num_captures == 1 and graphs.num_runs == 3


def _decode_step_syncs(engine, names: list[str | None]) -> int:
    """Host-device synchronisations of one warm decode step of requests on `names`."""
    reqs = _requests(engine.tokenizer, names, max_tokens=[64])
    for rid, ids, adapter, n in reqs:
        engine.add_request(
            rid, ids, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True), adapter
        )
    while engine.num_running < len(reqs) or any(s.prefilling for s in engine.scheduler.running):
        engine.step()
    engine.step()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            engine.step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    return sum("synchroniz" in str(w.message).lower() for w in caught)


def test_cuda_dora_adds_no_synchronisation(tiny_base, mixed) -> None:
    """The DoRA routing reaches the device without a host-device sync: a decode step with
    DoRA adapters synchronises no more often than the same step with plain ones."""
    plain = _engine(tiny_base, mixed, device="cuda", dtype="bfloat16", cuda_graphs=False)
    baseline = _decode_step_syncs(plain, ["r8", "attn-only", None, "r8"])
    dora = _engine(tiny_base, mixed, device="cuda", dtype="bfloat16", cuda_graphs=False)
    assert _decode_step_syncs(dora, ["dora", "r8", None, "dora-attn"]) <= baseline
