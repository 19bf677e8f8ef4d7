"""Every served model family, on tiny random-weight checkpoints, through the engine's general
model layer (the family's own transformers modules with the engine's attention and LoRA
layers swapped in):

- one step's logits (two prefills in one flattened batch, then a decode step) equal
  transformers' own forward of the same tokens;
- greedy output equals HF PEFT's for a mixed concurrent batch: two adapters of different
  ranks and targets plus base rows, chunked prefill, requests joining mid-flight;
- prompts longer than the sliding window give the same tokens as transformers.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from adapterhub_server.base_model import ResolvedBaseModel
from adapterhub_server.config import EngineConfig
from adapterhub_server.engine.build import build_engine
from adapterhub_server.engine.engine import LLMEngine
from adapterhub_server.engine.sampling_params import SamplingParams
from adapterhub_server.models.attention import build_attention_metadata
from tests.engine.conftest import greedy_continuation
from tests.engine.test_engine import PROMPTS, Result, _drain
from tests.tiny_families import (
    ATTENTION_PROJECTIONS,
    DEFAULT_TARGETS,
    FAMILIES,
    SLIDING_WINDOW,
    make_tiny_adapter,
    make_tiny_family,
)

SLIDING_FAMILIES = ("mistral", "gemma2", "gemma3_text")


@dataclass
class Family:
    name: str
    base: Path
    adapters: dict[str, Path]
    _models: dict[str | None, torch.nn.Module] = field(default_factory=dict)

    def reference(self, adapter: str | None) -> torch.nn.Module:
        """transformers' own model (sdpa attention), with PEFT for an adapter."""
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        if adapter not in self._models:
            model = AutoModelForCausalLM.from_pretrained(self.base, dtype=torch.float32)
            if adapter is not None:
                model = PeftModel.from_pretrained(model, self.adapters[adapter])
            self._models[adapter] = model.eval()
        return self._models[adapter]

    def greedy(self, adapter: str | None, prompt: list[int], n: int) -> list[int]:
        return greedy_continuation(self.reference(adapter), prompt, n)

    def engine(self, **overrides: int) -> LLMEngine:
        config = EngineConfig(
            **{"max_num_seqs": 8, "max_num_batched_tokens": 24, "max_loras": 2, **overrides}
        )
        return build_engine(
            ResolvedBaseModel(self.base, self.name, "local"), config, lora_modules=self.adapters
        )


@pytest.fixture(scope="module", params=FAMILIES)
def family(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Family]:
    name = request.param
    root = tmp_path_factory.mktemp(name)
    base = make_tiny_family(name, root / "base", seed=1)
    # Two adapters of different ranks and targets; MoE experts are not served, so the MoE
    # model's adapters stay on attention (its default targets adapt the experts).
    wide = ATTENTION_PROJECTIONS if name == "qwen3_moe" else DEFAULT_TARGETS[name]
    narrow = ("qkv_proj", "o_proj") if name == "phi3" else ("q_proj", "v_proj")
    adapters = {
        "narrow": make_tiny_adapter(
            base, root / "narrow", family=name, seed=2, r=4, alpha=8, target_modules=narrow
        ),
        "wide": make_tiny_adapter(
            base, root / "wide", family=name, seed=3, r=8, alpha=32, target_modules=wide
        ),
    }
    yield Family(name, base, adapters)


def test_step_logits_equal_transformers(family: Family) -> None:
    engine = family.engine()
    model, cache = engine.model, engine.kv_cache
    tok = engine.tokenizer
    a, b = tok.encode(PROMPTS[0])[:20], tok.encode(PROMPTS[1])[:7]
    reference = family.reference(None)

    def expected(ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return reference(torch.tensor([ids])).logits[0, -1]

    # Two prompts prefilled in one flattened step.
    ids = torch.tensor(a + b)
    positions = torch.tensor(list(range(len(a))) + list(range(len(b))))
    # Each sequence's blocks, taken from the pool so nothing else may use them.
    bs = engine.kv.block_size
    ta = engine.kv.pool.allocate(engine.kv.pool.blocks_for(len(a) + 1))
    tb = engine.kv.pool.allocate(engine.kv.pool.blocks_for(len(b) + 1))
    meta = build_attention_metadata([], [], [(ta, 0, len(a)), (tb, 0, len(b))], bs)
    logits = model(
        ids, positions, meta, cache, None, torch.tensor([len(a) - 1, len(a) + len(b) - 1])
    )
    torch.testing.assert_close(logits[0], expected(a), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logits[1], expected(b), atol=1e-4, rtol=1e-4)

    # Then one decode step for both, reading what the prefill cached.
    na, nb = int(logits[0].argmax()), int(logits[1].argmax())
    meta = build_attention_metadata([ta, tb], [len(a), len(b)], [], bs)
    logits = model(
        torch.tensor([na, nb]), torch.tensor([len(a), len(b)]), meta, cache, None, torch.arange(2)
    )
    torch.testing.assert_close(logits[0], expected([*a, na]), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logits[1], expected([*b, nb]), atol=1e-4, rtol=1e-4)


def test_mixed_batch_greedy_equals_peft(family: Family) -> None:
    engine = family.engine()
    tok = engine.tokenizer
    greedy = lambda n: SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)  # noqa: E731
    adapters = ["narrow", "wide", None, "wide", None, "narrow"]
    reqs = [
        (f"req{i}", tok.encode(PROMPTS[i % len(PROMPTS)])[:24], adapter, 6 + i % 4)
        for i, adapter in enumerate(adapters)
    ]
    results: dict[str, Result] = {}
    for rid, ids, adapter, n in reqs[:3]:
        engine.add_request(rid, ids, greedy(n), adapter)
    for _ in range(3):  # the first wave is decoding when the rest arrive
        for out in engine.step():
            results.setdefault(out.request_id, Result()).token_ids += out.token_ids
    for rid, ids, adapter, n in reqs[3:]:
        engine.add_request(rid, ids, greedy(n), adapter)
    _drain(engine, results)
    for rid, ids, adapter, n in reqs:
        assert results[rid].token_ids == family.greedy(adapter, ids, n), (family.name, rid, adapter)


@pytest.mark.parametrize("family", SLIDING_FAMILIES, indirect=True)
@pytest.mark.parametrize("adapter", [None, "wide"])
def test_prompts_longer_than_the_window(family: Family, adapter: str | None) -> None:
    """Chunked prefill across the window boundary, then decoding past it, in blocks of 4.

    Where every layer slides (Mistral), blocks that fell out of the window are given back
    while the sequence runs; with global layers among them (Gemma), every block stays."""
    engine = family.engine(max_num_batched_tokens=8, max_num_seqs=2, block_size=4)
    tok = engine.tokenizer
    prompt = (tok.encode(" ".join(PROMPTS)) * 3)[: 3 * SLIDING_WINDOW]
    engine.add_request(
        "long", prompt, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True), adapter
    )
    results: dict[str, Result] = {}
    peak = 0
    while engine.has_work():
        peak = max(peak, engine.kv.pool.num_used)
        for out in engine.step():
            results.setdefault(out.request_id, Result()).token_ids += out.token_ids
    assert results["long"].token_ids == family.greedy(adapter, prompt, 12)
    full_length = engine.kv.pool.blocks_for(len(prompt) + 12)
    if family.name == "mistral":
        assert engine.kv.sliding_window == SLIDING_WINDOW
        assert peak <= engine.kv.blocks_needed(len(prompt) + 12, 8) < full_length
    else:
        assert engine.kv.sliding_window is None
        assert peak >= full_length - 1


def test_serves_over_http(family: Family, tmp_path: Path) -> None:
    """`serve --base-model DIR` for the family: a `--lora-modules` adapter and one uploaded
    into the registry (validated against the family's modules) are listed and answer as
    PEFT does."""
    from starlette.testclient import TestClient

    from adapterhub_server.config import ServerConfig
    from adapterhub_server.server import build_app, build_server

    config = ServerConfig(
        base_model=str(family.base),
        served_model_name=family.name,
        registry=tmp_path / "registry",
        fine_tuning=False,
        lora_modules={"narrow": family.adapters["narrow"]},
        engine=EngineConfig(max_num_seqs=4, max_num_batched_tokens=32, max_loras=2),
    )
    server = build_server(config)
    files = [
        ("files", (name, (family.adapters["wide"] / name).read_bytes()))
        for name in ("adapter_config.json", "adapter_model.safetensors")
    ]
    prompt = "hello world"
    with TestClient(build_app(server.engine, server)) as client:
        assert client.post("/v1/adapters", data={"name": "wide"}, files=files).status_code == 201
        models = [m["id"] for m in client.get("/v1/models").json()["data"]]
        assert models[0] == family.name and {"narrow", "wide"} <= set(models)
        for model in ("narrow", "wide@1", family.name):
            response = client.post(
                "/v1/completions",
                json={
                    "model": model,
                    "prompt": prompt,
                    "max_tokens": 5,
                    "temperature": 0,
                    "ignore_eos": True,
                },
            )
            assert response.status_code == 200, response.text
            text = response.json()["choices"][0]["text"]
            adapter = None if model == family.name else model.split("@")[0]
            ids = server.engine.tokenizer.encode(prompt)
            expected = family.greedy(adapter, ids, 5)
            assert text == server.engine.tokenizer.decode(expected, skip_special_tokens=True)
