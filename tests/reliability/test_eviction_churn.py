"""Eviction churn never serves a request with another request's adapter.

A real (tiny, random) engine holds 3 device slots and 4 host-cache entries for 12 adapters,
and many concurrent requests over all 12 arrive in random order, so adapters are loaded,
evicted and reloaded while other requests decode. Adapter k is built so that its greedy
output is one known token (`TOKEN_OFFSET + k`) at every step: a response that was decoded,
even for one step, with another adapter's weights (a stale slot, a wrong slot index) shows
a foreign token, which the test reports.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from adapterhub_server.base_model import ResolvedBaseModel
from adapterhub_server.config import EngineConfig
from adapterhub_server.engine.async_engine import AsyncLLMEngine
from adapterhub_server.engine.build import build_engine
from adapterhub_server.engine.sampling_params import SamplingParams

NUM_ADAPTERS = 12
MAX_LORAS = 3
MAX_CPU_LORAS = 4
TOKEN_OFFSET = 40
"""Adapter k always emits token TOKEN_OFFSET + k (plain BPE tokens, no special ones)."""
ADAPTER_TOKENS = frozenset(range(TOKEN_OFFSET, TOKEN_OFFSET + NUM_ADAPTERS))
REQUESTS_PER_ADAPTER = 4
MAX_TOKENS = 4
PROMPTS = ["hello world", "the quick brown fox", "what is the capital of france?", "abc"]
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
GAIN = 8.0
"""Size of the adapter's push; large against the base model's own hidden state."""


def write_token_adapter(base_dir: Path, out: Path, token: int) -> Path:
    """A PEFT adapter on the last layer's MLP that makes every position predict `token`.

    A LoRA delta is linear in its input, so on its own it cannot push the hidden state one
    way for every input. The MLP's product of gate and up supplies the non-linearity: with
    delta_gate = delta_up = GAIN * [I; -I] x on the (2 x hidden) intermediate channels,
    channel pair i yields z^2 sigmoid(z) + z^2 sigmoid(-z) = z^2 (z = GAIN * x_i) whatever
    the sign of x_i, so the sum over all channels is GAIN^2 |x|^2 > 0. The down projection's
    LoRA reads that sum (an all-ones row) and writes it along the LM-head row of `token`;
    after the final norm the hidden state points at that row and `token` wins the argmax.
    """
    config = json.loads((base_dir / "config.json").read_text())
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    assert inter == 2 * hidden, "the construction uses one channel pair per hidden unit"
    layer = config["num_hidden_layers"] - 1
    lm_head = load_file(base_dir / "model.safetensors")["lm_head.weight"]
    direction = lm_head[token] / lm_head[token].norm()

    rank = hidden
    eye = torch.eye(hidden)
    both_signs = torch.cat([eye, -eye]) * GAIN  # [inter, rank]
    down_a = torch.zeros(rank, inter)
    down_a[0] = 1.0
    down_b = torch.zeros(hidden, rank)
    down_b[:, 0] = direction
    prefix = f"base_model.model.model.layers.{layer}.mlp"
    tensors = {
        f"{prefix}.gate_proj.lora_A.weight": eye.clone(),
        f"{prefix}.gate_proj.lora_B.weight": both_signs.clone(),
        f"{prefix}.up_proj.lora_A.weight": eye.clone(),
        f"{prefix}.up_proj.lora_B.weight": both_signs.clone(),
        f"{prefix}.down_proj.lora_A.weight": down_a,
        f"{prefix}.down_proj.lora_B.weight": down_b,
    }
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, out / "adapter_model.safetensors")
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(base_dir),
        "r": rank,
        "lora_alpha": rank,  # scale 1
        # Full module paths: only the last layer is adapted (PEFT matches them as suffixes).
        "target_modules": [f"model.layers.{layer}.mlp.{m}" for m in MLP_MODULES],
        "lora_dropout": 0.0,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
    }
    (out / "adapter_config.json").write_text(json.dumps(adapter_config))
    return out


def adapter_name(k: int) -> str:
    return f"churn-{k:02d}"


@pytest.fixture(scope="module")
def token_adapters(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("churn")
    return {
        adapter_name(k): write_token_adapter(tiny_base, root / adapter_name(k), TOKEN_OFFSET + k)
        for k in range(NUM_ADAPTERS)
    }


@pytest.fixture(scope="module")
def engine(tiny_base: Path, token_adapters: dict[str, Path]) -> Iterator[AsyncLLMEngine]:
    config = EngineConfig(
        max_num_seqs=8,
        max_num_batched_tokens=64,
        max_loras=MAX_LORAS,
        max_cpu_loras=MAX_CPU_LORAS,
        max_lora_rank=64,
    )
    base = ResolvedBaseModel(tiny_base, "tiny-base", "local")
    async_engine = AsyncLLMEngine.build(
        lambda: build_engine(base, config, lora_modules=token_adapters),
        base_model_id="tiny-base",
    )
    async_engine.start()
    yield async_engine
    async_engine.shutdown()


async def _greedy(engine: AsyncLLMEngine, request_id: str, prompt: str, adapter: str | None):
    ids = engine.tokenizer.encode(prompt)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    tokens: list[int] = []
    async for out in engine.generate(
        request_id=request_id, prompt_token_ids=ids, params=params, adapter=adapter
    ):
        assert out.error is None, out.error
        tokens += out.token_ids
    return tokens


@pytest.fixture(scope="module")
def base_outputs(engine: AsyncLLMEngine) -> dict[str, list[int]]:
    """The base model's greedy tokens per prompt, one request at a time."""

    async def go() -> dict[str, list[int]]:
        return {p: await _greedy(engine, f"base-{i}", p, None) for i, p in enumerate(PROMPTS)}

    return asyncio.run(go())


def test_each_adapter_alone_emits_its_own_token(
    engine: AsyncLLMEngine, base_outputs: dict[str, list[int]]
) -> None:
    """The construction works: one request at a time, adapter k gives TOKEN_OFFSET + k on
    every prompt, which the base model never does (so a request that lost its adapter is
    caught too)."""

    async def go() -> None:
        for k in (0, 5, NUM_ADAPTERS - 1):
            for i, prompt in enumerate(PROMPTS):
                got = await _greedy(engine, f"solo-{k}-{i}", prompt, adapter_name(k))
                assert got == [TOKEN_OFFSET + k] * MAX_TOKENS, (k, prompt, got)

    asyncio.run(go())
    for prompt, tokens in base_outputs.items():
        assert len(set(tokens)) > 1 or tokens[0] not in ADAPTER_TOKENS, (prompt, tokens)


def test_concurrent_requests_under_churn_get_their_own_adapter(
    engine: AsyncLLMEngine, base_outputs: dict[str, list[int]]
) -> None:
    jobs: list[tuple[str | None, str, list[int]]] = [
        (adapter_name(k), PROMPTS[(k + i) % len(PROMPTS)], [TOKEN_OFFSET + k] * MAX_TOKENS)
        for k in range(NUM_ADAPTERS)
        for i in range(REQUESTS_PER_ADAPTER)
    ]
    # Base-model requests mixed in: slot -1 rows decode beside the adapters and must match
    # their solo output exactly.
    jobs += [(None, prompt, base_outputs[prompt]) for prompt in PROMPTS]
    random.Random(1234).shuffle(jobs)
    before = engine.stats()

    async def go() -> list[list[int]]:
        return await asyncio.gather(
            *(
                _greedy(engine, f"churn-{i}", prompt, adapter)
                for i, (adapter, prompt, _) in enumerate(jobs)
            )
        )

    results = asyncio.run(go())
    wrong = [
        (adapter or "<base>", prompt, expected, got)
        for (adapter, prompt, expected), got in zip(jobs, results, strict=True)
        if got != expected
    ]
    assert not wrong, f"{len(wrong)} responses decoded with a foreign adapter: {wrong[:5]}"

    after = engine.stats()
    # The churn really happened: with 3 slots for 12 adapters, every adapter past the first
    # three needs a slot someone else had.
    assert after.adapter_evictions - before.adapter_evictions >= NUM_ADAPTERS - MAX_LORAS
    assert after.adapter_slots_used <= MAX_LORAS
    assert after.adapters_in_host_memory <= MAX_CPU_LORAS
    assert after.running == 0 and after.waiting == 0
