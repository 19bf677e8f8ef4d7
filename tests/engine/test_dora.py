"""DoRA adapters served by the engine, against HF PEFT (the reference), fp32 on CPU.

Greedy output equals PEFT's for concurrent batches that mix DoRA adapters (several rank
classes, rsLoRA, attention-only), plain LoRA adapters and base rows, with chunked prefill
and a slot cache that churns (DoRA rows freed and reused); on families whose packed q/k/v
carry biases (Qwen2) or whose projections are fused modules (Phi-3); through the static
decode buffers that CUDA graphs replay; and from the registry.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from adapterhub_server.base_model import ResolvedBaseModel
from adapterhub_server.config import EngineConfig
from adapterhub_server.engine.build import build_engine
from adapterhub_server.engine.decode_graphs import DecodeGraphs
from adapterhub_server.engine.sampling_params import SamplingParams
from adapterhub_server.errors import AdapterValidationError
from adapterhub_server.lora.adapter import WEIGHTS_FILE
from adapterhub_server.lora.cpu_kernel import load as load_cpu_kernel
from adapterhub_server.lora.triton_ops import triton_available
from adapterhub_server.registry import (
    BaseModelSpec,
    Registry,
    RegistryAdapterSource,
    RegistryLimits,
)
from tests.engine.test_engine import (
    Result,
    _drain,
    _engine,
    _greedy_equals_peft,
    _requests,
    bfloat16_kernel_and_torch_outputs,
)
from tests.lora.dora_adapters import PeftReference, make_dora_adapter, make_mixed_adapters
from tests.tiny_families import DEFAULT_TARGETS, make_tiny_adapter, make_tiny_family


@pytest.fixture(scope="module")
def mixed(tiny_base: Path, tiny_adapters: dict[str, Path], tmp_path_factory) -> dict[str, Path]:
    return make_mixed_adapters(tiny_base, tiny_adapters, tmp_path_factory.mktemp("dora-engine"))


@pytest.fixture(scope="module")
def reference(tiny_base: Path, mixed: dict[str, Path]) -> PeftReference:
    return PeftReference(tiny_base, mixed)


def _backends() -> list:
    cpu = pytest.mark.skipif(load_cpu_kernel() is None, reason="the CPU kernel does not build")
    return ["torch", pytest.param("cpu", marks=cpu)]


@pytest.mark.parametrize("backend", _backends())
def test_mixed_dora_lora_base_greedy_equals_peft(tiny_base, mixed, reference, backend) -> None:
    """Two device slots for five adapters: DoRA adapters are evicted and re-slotted (their
    rows freed and reused) while others run; prefill is chunked; requests finish at
    different steps."""
    engine = _engine(tiny_base, mixed, max_num_batched_tokens=24, max_loras=2, lora_kernel=backend)
    assert str(engine.lora_backend) == backend
    names = ["dora", None, "r8", "dora-attn", "dora-r32", "attn-only", "dora", None]
    reqs = _requests(engine.tokenizer, names, max_tokens=[9, 5, 12, 7])
    _greedy_equals_peft(engine, reqs, reference)
    pool = engine.adapters.pool
    assert engine.adapters.stats().evictions > 0
    assert len(pool.dora_rows) <= 2  # rows follow the slots
    assert pool.dora_tables("model.layers.0.self_attn.qkv_proj") is not None


def test_bfloat16_serving_on_cpu_kernel_equals_torch_ops(tiny_base, mixed) -> None:
    """Served in bfloat16 on CPU, DoRA's rescale after the kernel's bfloat16 delta: the
    same greedy tokens as through the torch ops, with slots churning."""
    via_kernel, via_torch = bfloat16_kernel_and_torch_outputs(
        tiny_base, mixed, ["dora", None, "r8", "dora-attn", "dora-r32", "dora"], max_loras=2
    )
    assert via_kernel == via_torch


def test_all_requests_on_one_dora_adapter(tiny_base, mixed, reference) -> None:
    engine = _engine(tiny_base, mixed)
    reqs = _requests(engine.tokenizer, ["dora-attn"] * 5, max_tokens=[8])
    _greedy_equals_peft(engine, reqs, reference)


@pytest.mark.parametrize("family", ["qwen2", "phi3"])
def test_families_greedy_equals_peft(family: str, tmp_path_factory) -> None:
    """Qwen2: packed q/k/v with biases (the bias stays outside the scale). Phi-3: fused
    qkv_proj / gate_up_proj modules, each one DoRA module with one magnitude."""
    root = tmp_path_factory.mktemp(f"dora-{family}")
    base = make_tiny_family(family, root / "base", seed=1)
    adapters = {
        "dora": make_dora_adapter(
            base, root / "dora", seed=21, target_modules=DEFAULT_TARGETS[family]
        ),
        "plain": make_tiny_adapter(base, root / "plain", family=family, seed=22, r=4, alpha=8),
    }
    config = EngineConfig(max_num_seqs=8, max_num_batched_tokens=24, max_loras=2)
    engine = build_engine(ResolvedBaseModel(base, family, "local"), config, lora_modules=adapters)
    reqs = _requests(engine.tokenizer, ["dora", None, "plain", "dora", None], max_tokens=[8, 5])
    _greedy_equals_peft(engine, reqs, PeftReference(base, adapters))


needs_triton = pytest.mark.skipif(not triton_available(), reason="Triton is not installed")


@needs_triton
def test_static_decode_step_with_dora_equals_the_dynamic_step(tiny_base, mixed) -> None:
    """The padded static buffers a CUDA graph replays (run eagerly here): every row is
    rescaled by its DoRA row, 0 (unchanged) for plain, base and padding rows."""
    engine = _engine(tiny_base, mixed, max_loras=4, lora_kernel="triton")
    graphs = DecodeGraphs(
        engine.model,
        engine.kv_cache,
        engine.adapters.pool,
        max_num_seqs=engine.scheduler.max_num_seqs,
        max_model_len=engine.max_model_len,
        capture=False,
    )
    names = ["dora", None, "r8", "dora-attn", "dora"]  # padded 5 -> 8
    for i, name in enumerate(names):
        ids = [(7 * i + 3 * j) % 50 + 1 for j in range(4 + i)]
        engine.add_request(
            f"r{i}", ids, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True), name
        )
    while any(s.prefilling for s in engine.scheduler.running) or engine.num_waiting:
        engine.step()
    seqs = list(engine.scheduler.running)
    ids = [s.token_at(s.num_computed) for s in seqs]
    positions = [s.num_computed for s in seqs]
    routes = [s.route for s in seqs]
    tables = [engine.kv.block_ids(s) for s in seqs]
    static = graphs.run(ids, positions, routes, tables)
    assert static is not None
    static = static.clone()
    (step,) = graphs._steps.values()
    assert step.dora_rows is not None and step.batch == 8
    dynamic = engine._forward(ids, positions, tables, [], routes, [], list(range(len(seqs))))
    torch.testing.assert_close(static, dynamic, rtol=1e-4, atol=1e-4)
    # Without the DoRA rows the same step is different: the buffers really carry them.
    step.dora_rows.zero_()
    undora = graphs._forward(step)[: len(seqs)]
    assert (undora - dynamic).abs().max() > 1e-2


def test_unservable_scale_fails_the_request_alone(tiny_base, mixed, reference, tmp_path) -> None:
    """A magnitude far beyond the base's row norms passes upload (the base weights are not
    read there) but is refused when written into a slot: that request fails naming DoRA,
    its slot is given back, and a request beside it is served as usual."""
    bad = tmp_path / "huge"
    bad.mkdir()
    for f in ("adapter_config.json",):
        (bad / f).write_bytes((mixed["dora-attn"] / f).read_bytes())
    tensors = load_file(mixed["dora-attn"] / WEIGHTS_FILE)
    for key in tensors:
        if key.endswith("lora_magnitude_vector"):
            tensors[key] = tensors[key] * 1e9
    save_file(tensors, bad / WEIGHTS_FILE)
    engine = _engine(tiny_base, {"huge": bad, "r8": mixed["r8"]}, max_loras=2)
    greedy = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    ids = engine.tokenizer.encode("hello world")
    engine.add_request("good", ids, greedy, "r8")
    engine.add_request("bad", ids, greedy, "huge")
    results: dict[str, Result] = {}
    _drain(engine, results)
    assert results["bad"].finish_reason == "error"
    assert "DoRA" in (results["bad"].error or "") and "above the bound" in results["bad"].error
    assert results["good"].token_ids == reference("r8", ids, 6)
    assert "huge" not in engine.adapters.slots
    assert engine.adapters.pool.dora_rows == {}


def test_registry_upload_then_served(tiny_base, mixed, reference, tmp_path) -> None:
    """Pushed to the registry (validated there), then served by name; a broken DoRA file is
    refused at push naming the magnitude, and nothing is stored."""
    spec = BaseModelSpec.from_directory(tiny_base, "tiny-llama")
    registry = Registry.open(
        tmp_path / "registry", base=spec, limits=RegistryLimits(max_lora_rank=64)
    )
    try:
        registry.push(mixed["dora"], "dora-sql")
        broken = tmp_path / "broken"
        broken.mkdir()
        (broken / "adapter_config.json").write_bytes(
            (mixed["dora"] / "adapter_config.json").read_bytes()
        )
        tensors = load_file(mixed["dora"] / WEIGHTS_FILE)
        key = next(k for k in tensors if k.endswith("lora_magnitude_vector"))
        tensors[key] = tensors[key][:-1].clone()
        save_file(tensors, broken / WEIGHTS_FILE)
        with pytest.raises(AdapterValidationError, match=r"lora_magnitude_vector.*DoRA magnitude"):
            registry.push(broken, "broken")
        assert [r.name for r in registry.list_adapters()] == ["dora-sql"]

        source = RegistryAdapterSource(registry, base_fingerprint=spec.fingerprint)
        config = EngineConfig(max_num_seqs=4, max_num_batched_tokens=32, max_loras=2)
        engine = build_engine(ResolvedBaseModel(tiny_base, "tiny", "local"), config, source=source)
        reqs = _requests(engine.tokenizer, ["dora-sql", None, "dora-sql@1"], max_tokens=[7])
        for rid, ids, adapter, n in reqs:
            engine.add_request(
                rid, ids, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True), adapter
            )
        results: dict[str, Result] = {}
        _drain(engine, results)
        for rid, ids, adapter, n in reqs:
            want = reference("dora" if adapter else None, ids, n)
            assert results[rid].token_ids == want, rid
    finally:
        registry.close()
