"""The real engine behind the real HTTP server, driven by the official `openai` client."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import torch

from adapterhub_server.base_model import ResolvedBaseModel
from adapterhub_server.config import EngineConfig
from adapterhub_server.engine.async_engine import AsyncLLMEngine
from adapterhub_server.engine.build import build_engine
from adapterhub_server.server import build_app
from tests.engine.conftest import greedy_continuation
from tests.live_server import serve


def _start(base: ResolvedBaseModel, adapters: dict[str, Path], **engine: int):
    config = EngineConfig(**{"max_num_seqs": 8, "max_loras": 4, **engine})
    async_engine = AsyncLLMEngine(
        build_engine(base, config, lora_modules=adapters), base_model_id=base.model_id
    )
    return serve(build_app(async_engine), lifespan="on")


def _peft_greedy(base_dir: Path, adapter_dir: Path | None, ids: list[int], n: int) -> list[int]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir)
    return greedy_continuation(model.eval(), ids, n)


@pytest.fixture(scope="module")
def tiny_server(tiny_base: Path, tiny_adapters: dict[str, Path]) -> Iterator[openai.OpenAI]:
    with _start(ResolvedBaseModel(tiny_base, "tiny-base", "local"), tiny_adapters) as url:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


def test_models_lists_base_and_adapters(tiny_server: openai.OpenAI, tiny_adapters) -> None:
    models = tiny_server.models.list().data
    assert models[0].id == "tiny-base"
    listed = {m.id: m for m in models[1:]}
    assert set(listed) == set(tiny_adapters)
    assert all(m.parent == "tiny-base" for m in listed.values())  # type: ignore[attr-defined]


def test_concurrent_requests_over_many_adapters_match_peft(
    tiny_server: openai.OpenAI, tiny_base: Path, tiny_adapters: dict[str, Path]
) -> None:
    """Requests for every adapter and the base, sent at once so they share batches."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_base)
    prompts = ["hello world", "the quick brown fox", "what is the capital of france?"]
    jobs = [(model, prompt) for model in [*tiny_adapters, "tiny-base"] for prompt in prompts]

    def call(job: tuple[str, str]):
        model, prompt = job
        return tiny_server.completions.create(
            model=model,
            prompt=tok.encode(prompt),
            max_tokens=8,
            temperature=0,
            extra_body={"ignore_eos": True, "skip_special_tokens": False},
        )

    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        responses = list(pool.map(call, jobs))
    for (model, prompt), response in zip(jobs, responses):
        ids = tok.encode(prompt)
        adapter_dir = tiny_adapters.get(model)
        expected = tok.decode(_peft_greedy(tiny_base, adapter_dir, ids, 8))
        assert response.choices[0].text == expected, model
        assert response.usage.completion_tokens == 8
        assert response.usage.prompt_tokens == len(ids)


def test_streamed_chat_equals_the_unstreamed_answer(tiny_server: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "hello"}]
    whole = tiny_server.chat.completions.create(
        model="r8", messages=messages, max_tokens=10, temperature=0
    )
    chunks = list(
        tiny_server.chat.completions.create(
            model="r8", messages=messages, max_tokens=10, temperature=0, stream=True
        )
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_seeded_sampling_over_http_is_reproducible(tiny_server: openai.OpenAI) -> None:
    kwargs = {"model": "r4", "prompt": "abc", "max_tokens": 10, "temperature": 1.0, "seed": 7}
    first = tiny_server.completions.create(**kwargs).choices[0].text
    second = tiny_server.completions.create(**kwargs).choices[0].text
    assert first == second


def test_unknown_adapter_is_404(tiny_server: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        tiny_server.completions.create(model="no-such-adapter", prompt="x", max_tokens=2)
    assert info.value.body["code"] == "model_not_found"  # type: ignore[index]


def test_context_overflow_is_400(tiny_server: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        tiny_server.completions.create(model="tiny-base", prompt="hello", max_tokens=100_000)
    assert info.value.body["code"] == "context_length_exceeded"  # type: ignore[index]


@pytest.mark.slow
def test_default_model_serves_base_and_adapter(default_model, tmp_path: Path) -> None:
    """The embedded SmolLM2-135M-Instruct answers sensibly, and a rank-16 adapter on all 7
    projections served next to it gives PEFT's own greedy output."""
    from transformers import AutoTokenizer

    from bench.serve_throughput import make_adapters

    adapters = make_adapters(default_model.path, tmp_path, 1, 16)
    tok = AutoTokenizer.from_pretrained(default_model.path)
    with _start(default_model, adapters, max_num_seqs=4, max_model_len=512) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        answer = client.chat.completions.create(
            model=default_model.model_id,
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=24,
            temperature=0,
        )
        assert "Paris" in (answer.choices[0].message.content or "")
        prompt = "The three primary colours are"
        got = client.completions.create(
            model="adapter0",
            prompt=tok.encode(prompt),
            max_tokens=12,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
    ids = tok.encode(prompt)
    expected = _peft_greedy(default_model.path, adapters["adapter0"], ids, 12)
    assert got.choices[0].text == tok.decode(expected, skip_special_tokens=True)
