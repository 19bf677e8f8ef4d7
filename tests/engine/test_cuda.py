"""The CUDA decode loop: the Triton LoRA path against PEFT, and no host-device sync per
step except reading the sampled ids. Skipped without a GPU."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from adapterhub_server.engine.sampling_params import SamplingParams
from tests.engine.test_engine import Result, _drain, _engine, _requests

pytestmark = pytest.mark.gpu


def test_cuda_triton_path_greedy_equals_peft(tiny_base: Path, tiny_adapters, peft_greedy) -> None:
    engine = _engine(
        tiny_base,
        tiny_adapters,
        max_loras=3,
        device="cuda",
        dtype="float32",
        lora_kernel="triton",
    )
    reqs = _requests(engine.tokenizer, [*tiny_adapters, None], max_tokens=[8, 5])
    for rid, ids, adapter, n in reqs:
        engine.add_request(
            rid, ids, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True), adapter
        )
    results: dict[str, Result] = {}
    _drain(engine, results)
    for rid, ids, adapter, n in reqs:
        assert results[rid].token_ids == peft_greedy(adapter, ids, n), (rid, adapter)


def test_a_decode_step_synchronises_once(tiny_base: Path, tiny_adapters) -> None:
    engine = _engine(tiny_base, tiny_adapters, device="cuda", dtype="bfloat16")
    reqs = _requests(engine.tokenizer, ["r8", "r4", None, "r8"], max_tokens=[64])
    for rid, ids, adapter, n in reqs:
        engine.add_request(
            rid, ids, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True), adapter
        )
    while engine.num_running < len(reqs) or any(s.prefilling for s in engine.scheduler.running):
        engine.step()
    engine.step()  # one decode step to warm every path
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            engine.step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
    assert len(syncs) <= 1, [str(w.message) for w in syncs]  # the sampled ids' .tolist()
