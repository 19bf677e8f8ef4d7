"""The engine against HF PEFT (the reference) on tiny random models, fp32 on CPU."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from adapterhub_server.base_model import ResolvedBaseModel
from adapterhub_server.config import EngineConfig
from adapterhub_server.engine.build import build_engine
from adapterhub_server.engine.engine import LLMEngine
from adapterhub_server.engine.sampling_params import SamplingParams
from adapterhub_server.errors import AdapterNotFoundError, ContextLengthError
from adapterhub_server.lora.cache import AdapterLocation, StaticAdapterSource
from adapterhub_server.lora.triton_ops import triton_available

PROMPTS = [
    "hello world",
    "the quick brown fox jumps over the lazy dog and",
    "what is the capital of france?",
    "numbers 0 1 2 3",
    "abc",
    "paris is the capital. the quick brown fox jumps over the lazy dog. hello",
    "tiny tokenizer",
    "ABCDEFG xyz",
]


@dataclass
class Result:
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    error: str | None = None
    logprobs: list = field(default_factory=list)


def _engine(base: Path, adapters: dict[str, Path], **overrides: int | str) -> LLMEngine:
    # A fixed KV budget: on CUDA the default is a fraction of the device, which an engine
    # of an earlier test not yet collected would already hold.
    config = EngineConfig(
        **{
            "max_num_seqs": 8,
            "max_num_batched_tokens": 64,
            "max_loras": 3,
            "kv_cache_memory": 64 * 2**20,
            **overrides,
        }
    )
    return build_engine(ResolvedBaseModel(base, "tiny", "local"), config, lora_modules=adapters)


def _drain(engine: LLMEngine, results: dict[str, Result], timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not engine.has_work():
            return
        if engine.idle:  # waiting for adapter files to load in the background
            time.sleep(0.001)
        for out in engine.step():
            r = results.setdefault(out.request_id, Result())
            r.token_ids += out.token_ids
            r.text += out.text
            r.logprobs += out.logprobs
            if out.finished:
                r.finish_reason, r.error = out.finish_reason, out.error
    raise AssertionError("engine did not finish")


def _requests(tokenizer, adapters: Iterable[str | None], max_tokens: list[int]):
    reqs = []
    for i, adapter in enumerate(adapters):
        ids = tokenizer.encode(PROMPTS[i % len(PROMPTS)])
        reqs.append((f"req{i}", ids, adapter, max_tokens[i % len(max_tokens)]))
    return reqs


def _greedy_equals_peft(engine: LLMEngine, reqs, peft_greedy, timeout: float = 120.0) -> None:
    """Submit `reqs` (from `_requests`) greedily, run them to the end, and compare every
    request's tokens with HF / PEFT generating it alone."""
    for rid, ids, adapter, n in reqs:
        engine.add_request(
            rid, ids, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True), adapter
        )
    results: dict[str, Result] = {}
    _drain(engine, results, timeout=timeout)
    for rid, ids, adapter, n in reqs:
        assert results[rid].token_ids == peft_greedy(adapter, ids, n), (rid, adapter)


def test_mixed_batch_greedy_equals_peft(tiny_base, tiny_adapters, peft_greedy) -> None:
    """Every adapter kind (ranks 4-32, rsLoRA, rank/alpha patterns, attention-only) and base
    requests in one batch, with fewer device slots than adapters, chunked prefill,
    requests joining mid-flight and finishing at different steps."""
    engine = _engine(tiny_base, tiny_adapters, max_num_batched_tokens=24, max_loras=3)
    names = [*tiny_adapters, None]
    reqs = _requests(engine.tokenizer, names * 2, max_tokens=[9, 14, 5, 11])
    results: dict[str, Result] = {}
    greedy = lambda n: SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)  # noqa: E731
    first, later = reqs[:7], reqs[7:]
    for rid, ids, adapter, n in first:
        engine.add_request(rid, ids, greedy(n), adapter)
    for _ in range(4):  # let the first wave start decoding before the rest arrive
        for out in engine.step():
            r = results.setdefault(out.request_id, Result())
            r.token_ids += out.token_ids
    for rid, ids, adapter, n in later:
        engine.add_request(rid, ids, greedy(n), adapter)
    _drain(engine, results)
    for rid, ids, adapter, n in reqs:
        assert results[rid].token_ids == peft_greedy(adapter, ids, n), (rid, adapter)
        assert results[rid].finish_reason == "length"
    assert engine.adapters.stats().evictions > 0  # the slot cache really churned
    assert engine.num_running == 0 and engine.num_waiting == 0


def test_bfloat16_adapter_weights_greedy_equal_peft(tiny_base, tmp_path) -> None:
    """``lora_dtype=bfloat16`` on CPU keeps A and B in bfloat16 (the kernel's other build
    for decode, widened slices for prefill). Adapters saved in bfloat16 whose scale is a
    power of two lose nothing to that, so greedy output equals PEFT's exactly, with
    mixed adapters, base rows and chunked prefill in one batch."""
    from peft import PeftModel
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    from tests.engine.conftest import greedy_continuation
    from tests.tiny_models import make_peft_adapter

    specs = {"b4": (4, 8), "b8": (8, 16), "b32": (32, 64)}  # scale alpha / r = 2
    adapters = {}
    for i, (name, (r, alpha)) in enumerate(specs.items()):
        path = make_peft_adapter(tiny_base, tmp_path / name, seed=40 + i, r=r, alpha=alpha)
        weights = path / "adapter_model.safetensors"
        save_file({k: v.bfloat16() for k, v in load_file(weights).items()}, weights)
        adapters[name] = path
    engine = _engine(tiny_base, adapters, lora_dtype="bfloat16", max_num_batched_tokens=24)
    from adapterhub_server.lora import cpu_kernel

    assert engine.adapters.pool.weight_dtype == torch.bfloat16
    kernel_builds = cpu_kernel.load(torch.bfloat16) is not None
    assert str(engine.lora_backend) == ("cpu" if kernel_builds else "torch")
    reqs = _requests(engine.tokenizer, [*adapters, None] * 2, max_tokens=[9, 6, 12])
    for rid, ids, adapter, n in reqs:
        engine.add_request(
            rid, ids, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True), adapter
        )
    results: dict[str, Result] = {}
    _drain(engine, results)
    models = {}
    for rid, ids, adapter, n in reqs:
        if adapter not in models:
            hf = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
            models[adapter] = (
                PeftModel.from_pretrained(hf, adapters[adapter]) if adapter else hf
            ).eval()
        assert results[rid].token_ids == greedy_continuation(models[adapter], ids, n), rid


def bfloat16_kernel_and_torch_outputs(
    base: Path, adapters: dict[str, Path], names: list[str | None], **overrides: int | str
) -> list[dict[str, list[int]]]:
    """Greedy tokens of `names`' requests served in bfloat16 on CPU, through the CPU
    kernel (``auto``) and through the torch ops, by request id; skips where the kernel's
    bfloat16 build cannot be built."""
    from adapterhub_server.lora import cpu_kernel

    if cpu_kernel.load(torch.bfloat16, torch.bfloat16) is None:
        pytest.skip("the CPU LoRA kernel cannot be built here")
    outputs = []
    for backend in ("auto", "torch"):
        engine = _engine(
            base,
            adapters,
            dtype="bfloat16",
            max_num_batched_tokens=24,
            lora_kernel=backend,
            **overrides,
        )
        assert str(engine.lora_backend) == ("cpu" if backend == "auto" else "torch")
        reqs = _requests(engine.tokenizer, names, max_tokens=[8, 5])
        for rid, ids, adapter, n in reqs:
            engine.add_request(
                rid, ids, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True), adapter
            )
        results: dict[str, Result] = {}
        _drain(engine, results)
        outputs.append({rid: results[rid].token_ids for rid, *_ in reqs})
    return outputs


def test_bfloat16_serving_on_cpu_takes_the_kernel(tiny_base, tiny_adapters) -> None:
    """``dtype=bfloat16`` on CPU: the base in bfloat16 and LoRA through the kernel's
    bfloat16 build (x and y bfloat16, each output summed in float32 and rounded once)
    rather than the torch ops. Greedy output is the torch ops' own, with mixed ranks and
    patterns, base rows and chunked prefill. (Neither equals PEFT's float32 output token
    for token: the bfloat16 base flips a near-tie of this model's 'patterns' request.)"""
    via_kernel, via_torch = bfloat16_kernel_and_torch_outputs(
        tiny_base, tiny_adapters, [*tiny_adapters, None]
    )
    assert via_kernel == via_torch
    assert all(len(ids) in (5, 8) for ids in via_kernel.values())


@pytest.mark.skipif(not triton_available(), reason="Triton is not installed")
def test_triton_kernel_path_greedy_equals_peft(tiny_base, tiny_adapters, peft_greedy) -> None:
    """The engine with LoRA through the Triton kernels (Triton's interpreter on CPU): mixed
    ranks and patterns, base rows, chunked prefill, a slot cache that churns."""
    engine = _engine(
        tiny_base, tiny_adapters, max_num_batched_tokens=24, max_loras=3, lora_kernel="triton"
    )
    assert str(engine.lora_backend) == "triton"
    reqs = _requests(engine.tokenizer, [*tiny_adapters, None], max_tokens=[6, 9, 4])
    _greedy_equals_peft(engine, reqs, peft_greedy, timeout=600)
    assert engine.adapters.stats().evictions > 0


def test_all_requests_on_one_adapter(tiny_base, tiny_adapters, peft_greedy) -> None:
    engine = _engine(tiny_base, tiny_adapters)
    reqs = _requests(engine.tokenizer, ["r8"] * 6, max_tokens=[8])
    _greedy_equals_peft(engine, reqs, peft_greedy)


def test_seeded_sampling_is_independent_of_the_batch(tiny_base, tiny_adapters) -> None:
    engine = _engine(tiny_base, tiny_adapters)
    tok = engine.tokenizer
    params = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, top_k=50, seed=1234)
    target = tok.encode("hello world")

    engine.add_request("alone", target, params, "r8")
    alone: dict[str, Result] = {}
    _drain(engine, alone)

    crowd: dict[str, Result] = {}
    for i, prompt in enumerate(PROMPTS[:5]):
        engine.add_request(
            f"other{i}",
            tok.encode(prompt),
            SamplingParams(max_tokens=7, temperature=0.8),
            "r4" if i % 2 else None,
        )
    engine.add_request("crowded", target, params, "r8")
    _drain(engine, crowd)
    assert crowd["crowded"].token_ids == alone["alone"].token_ids
    assert len(alone["alone"].token_ids) == 12


def test_stop_string_cuts_the_text(tiny_base, tiny_adapters) -> None:
    engine = _engine(tiny_base, tiny_adapters)
    ids = engine.tokenizer.encode(PROMPTS[1])
    full: dict[str, Result] = {}
    engine.add_request(
        "full", ids, SamplingParams(max_tokens=16, temperature=0, ignore_eos=True), "r4"
    )
    _drain(engine, full)
    text = full["full"].text
    assert len(text) > 6
    stop = text[3:6]
    expected = text[: text.index(stop)]

    got: dict[str, Result] = {}
    engine.add_request(
        "cut",
        ids,
        SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, stop=(stop,)),
        "r4",
    )
    _drain(engine, got)
    assert got["cut"].finish_reason == "stop"
    assert got["cut"].text == expected


def test_stop_token_ids(tiny_base, tiny_adapters) -> None:
    engine = _engine(tiny_base, tiny_adapters)
    ids = engine.tokenizer.encode(PROMPTS[2])
    full: dict[str, Result] = {}
    engine.add_request(
        "full", ids, SamplingParams(max_tokens=10, temperature=0, ignore_eos=True), None
    )
    _drain(engine, full)
    stop_tok = full["full"].token_ids[4]
    first = full["full"].token_ids.index(stop_tok)
    got: dict[str, Result] = {}
    engine.add_request(
        "cut",
        ids,
        SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, stop_token_ids=(stop_tok,)),
        None,
    )
    _drain(engine, got)
    assert got["cut"].token_ids == full["full"].token_ids[: first + 1]
    assert got["cut"].finish_reason == "stop"


def test_logprobs_match_log_softmax_of_the_reference(tiny_base, tiny_adapters) -> None:
    from transformers import AutoModelForCausalLM

    engine = _engine(tiny_base, tiny_adapters)
    ids = engine.tokenizer.encode(PROMPTS[0])
    engine.add_request(
        "lp", ids, SamplingParams(max_tokens=3, temperature=0, ignore_eos=True, logprobs=3), None
    )
    got: dict[str, Result] = {}
    _drain(engine, got)
    hf = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    seq = ids + got["lp"].token_ids
    with torch.no_grad():
        logp = torch.log_softmax(hf(torch.tensor([seq])).logits[0].float(), -1)
    for i, entry in enumerate(got["lp"].logprobs):
        row = logp[len(ids) - 1 + i]
        assert entry.token_id == got["lp"].token_ids[i]
        assert entry.logprob == pytest.approx(row[entry.token_id].item(), abs=1e-4)
        top = torch.topk(row, 3)
        assert [t for t, _ in entry.top] == top.indices.tolist()


def test_abort_frees_row_and_adapter_pin(tiny_base, tiny_adapters) -> None:
    engine = _engine(tiny_base, tiny_adapters, max_num_seqs=2, max_loras=1)
    ids = engine.tokenizer.encode(PROMPTS[0])
    params = SamplingParams(max_tokens=50, temperature=0, ignore_eos=True)
    engine.add_request("a", ids, params, "r4")
    engine.add_request("b", ids, params, "r8")  # needs the only slot, held by "a"
    for _ in range(500):  # adapter files load in the background; admission waits for them
        engine.step()
        if engine.num_running == 1 and engine.scheduler.running[0].num_computed > len(ids):
            break
        time.sleep(0.002)
    assert engine.num_running == 1 and engine.num_waiting == 1
    final = engine.abort("a")
    assert final is not None and final.finished and final.finish_reason == "abort"
    results: dict[str, Result] = {}
    _drain(engine, results)
    assert results["b"].finish_reason == "length" and len(results["b"].token_ids) == 50
    assert engine.abort("a") is None


def test_client_errors_are_raised_before_queueing(tiny_base, tiny_adapters) -> None:
    engine = _engine(tiny_base, tiny_adapters, max_model_len=64)
    ids = engine.tokenizer.encode(PROMPTS[0])
    with pytest.raises(ContextLengthError):
        engine.add_request("long", ids, SamplingParams(max_tokens=64), None)
    with pytest.raises(AdapterNotFoundError):
        engine.add_request("nope", ids, SamplingParams(max_tokens=4), "does-not-exist")
    assert not engine.has_work()


def test_a_bad_adapter_fails_only_its_own_request(tiny_base, tiny_adapters, tmp_path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4, "lora_alpha": 8}')
    (broken / "adapter_model.safetensors").write_bytes(b"\x00" * 7)
    adapters = {**tiny_adapters, "broken": broken}
    engine = _engine(tiny_base, {})
    engine.adapters.source = StaticAdapterSource(adapters)
    tok = engine.tokenizer
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    engine.add_request("good", tok.encode(PROMPTS[0]), params, "r4")
    engine.add_request("bad", tok.encode(PROMPTS[1]), params, "broken")
    results: dict[str, Result] = {}
    _drain(engine, results)
    assert results["bad"].finish_reason == "error"
    assert "safetensors" in (results["bad"].error or "")
    assert results["good"].finish_reason == "length" and len(results["good"].token_ids) == 6


def test_adapter_location_key_is_the_cache_identity(tiny_base, tiny_adapters) -> None:
    engine = _engine(tiny_base, tiny_adapters)
    loc = engine.adapters.locate("r4")
    assert isinstance(loc, AdapterLocation) and loc.key == "r4"
