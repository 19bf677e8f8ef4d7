"""Chat replies read back over HTTP from recorded model outputs: reasoning split off into
`reasoning_content`, tool calls parsed from the model's own format, whole and streamed,
for several choices at once."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from adapterhub_server.api import create_app
from tests.api.conftest import sse_json
from tests.api.fake_engine import FakeEngine

pytestmark = pytest.mark.anyio

TEMPLATES = Path(__file__).parent / "chat_templates"
USER = [{"role": "user", "content": "weather in Paris?"}]
TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
THOUGHT_AND_CALL = (
    "<think>\nI should look it up.\n</think>\n\nLet me check."
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
)


def _client(engine: FakeEngine) -> httpx.AsyncClient:
    app: FastAPI = create_app(engine)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


@pytest.fixture
def qwen3() -> FakeEngine:
    """Qwen3's template leaves the think block to the model (the recorded output opens and
    closes it)."""
    return FakeEngine(
        max_model_len=4096,
        chat_template=(TEMPLATES / "qwen3.jinja").read_text(),
        reply=THOUGHT_AND_CALL,
    )


async def test_reasoning_content_and_calls_whole(qwen3: FakeEngine) -> None:
    async with _client(qwen3) as client:
        r = await client.post(
            "/v1/chat/completions", json={"messages": USER, "tools": [TOOL], "n": 2}
        )
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    assert len(choices) == 2
    for choice in choices:
        message = choice["message"]
        # The block's text as the model wrote it (newlines kept, as vLLM's parser does).
        assert message["reasoning_content"].strip() == "I should look it up."
        assert message["content"].strip() == "Let me check."
        (call,) = message["tool_calls"]
        assert call["function"]["name"] == "get_weather"
        assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}
        assert choice["finish_reason"] == "tool_calls"
    # Both choices after the first follow it in the engine (shared prompt blocks).
    assert [c.follows for c in qwen3.calls] == [None, qwen3.calls[0].request_id]


async def test_reasoning_content_and_calls_streamed(qwen3: FakeEngine) -> None:
    async with _client(qwen3) as client:
        r = await client.post(
            "/v1/chat/completions", json={"messages": USER, "tools": [TOOL], "stream": True}
        )
    chunks = [c for c in sse_json(r.text) if c["choices"]]
    deltas = [c["choices"][0]["delta"] for c in chunks]
    reasoning = "".join(d.get("reasoning_content", "") for d in deltas)
    assert reasoning.strip() == "I should look it up."
    assert "".join(d.get("content", "") for d in deltas).strip() == "Let me check."
    calls = [tc for d in deltas for tc in d.get("tool_calls", [])]
    assert calls[0]["function"]["name"] == "get_weather" and calls[0]["id"].startswith("call_")
    arguments = "".join(tc["function"].get("arguments", "") for tc in calls)
    assert json.loads(arguments) == {"city": "Paris"}
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


async def test_without_tools_the_call_text_is_content(qwen3: FakeEngine) -> None:
    async with _client(qwen3) as client:
        r = await client.post("/v1/chat/completions", json={"messages": USER})
    message = r.json()["choices"][0]["message"]
    assert message["content"].strip().startswith("Let me check.<tool_call>")
    assert "tool_calls" not in message
    assert r.json()["choices"][0]["finish_reason"] == "stop"


async def test_enable_thinking_false_reaches_the_template(qwen3: FakeEngine) -> None:
    async with _client(qwen3) as client:
        r = await client.post(
            "/v1/chat/completions",
            json={"messages": USER, "chat_template_kwargs": {"enable_thinking": False}},
        )
    assert r.status_code == 200, r.text
    prompt = qwen3.tokenizer.decode(qwen3.calls[0].prompt_token_ids)
    assert prompt.endswith("<think>\n\n</think>\n\n")


async def test_forced_calls_are_decoded_under_the_call_schema() -> None:
    engine = FakeEngine(max_model_len=4096, reply='{"city": "Oslo"}')
    async with _client(engine) as client:
        body = {
            "messages": USER,
            "tools": [TOOL],
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        }
        r = await client.post("/v1/chat/completions", json=body)
    (spec,) = engine.grammar_specs
    assert spec.kind == "json_schema"
    assert json.loads(spec.value) == TOOL["function"]["parameters"]
    assert engine.calls[0].params.grammar is not None
    (call,) = r.json()["choices"][0]["message"]["tool_calls"]
    assert json.loads(call["function"]["arguments"]) == {"city": "Oslo"}
