"""The wire schemas in `client.types`: ranges, prompt forms, serialization details."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from client.types import (
    ChatCompletionChunk,
    ChatCompletionChunkChoice,
    ChatCompletionRequest,
    ChoiceDelta,
    Completion,
    CompletionLogprobs,
    CompletionRequest,
    TopLogprob,
)


@pytest.mark.parametrize("prompt", ["hi", ["a", "b"], [1, 2], [[1], [2, 3]]])
def test_prompt_forms(prompt) -> None:
    assert CompletionRequest(prompt=prompt).prompt == prompt


@pytest.mark.parametrize("prompt", [5, [1, "a"], [[1], "a"], [True, 1], None, {"a": 1}])
def test_bad_prompt_forms(prompt) -> None:
    with pytest.raises(ValidationError):
        CompletionRequest(prompt=prompt)


@pytest.mark.parametrize(
    "field",
    [
        {"temperature": 2.01},
        {"top_p": 1.01},
        {"max_tokens": 0},
        {"n": 0},
        {"logprobs": 21},
        {"logprobs": -1},
        {"stop": ["x"] * 17},
        {"top_k": -2},
    ],
)
def test_completion_ranges(field: dict) -> None:
    with pytest.raises(ValidationError):
        CompletionRequest(prompt="x", **field)


def test_chat_ranges() -> None:
    ok = [{"role": "user", "content": "x"}]
    with pytest.raises(ValidationError):
        ChatCompletionRequest(messages=ok, top_logprobs=21)
    with pytest.raises(ValidationError):
        ChatCompletionRequest(messages=ok, max_completion_tokens=0)
    with pytest.raises(ValidationError):
        ChatCompletionRequest(messages=[])


def test_unknown_request_fields_are_kept_not_rejected() -> None:
    request = CompletionRequest(prompt="x", best_of=2)
    assert request.model_extra == {"best_of": 2}


def test_usage_omitted_until_set() -> None:
    chunk = Completion(id="cmpl-1", created=1, model="m", choices=[])
    assert "usage" not in json.loads(chunk.model_dump_json())


def test_empty_delta_serializes_as_empty_object() -> None:
    chunk = ChatCompletionChunk(
        id="c",
        created=1,
        model="m",
        choices=[ChatCompletionChunkChoice(index=0, delta=ChoiceDelta(), finish_reason="stop")],
    )
    choice = json.loads(chunk.model_dump_json())["choices"][0]
    assert choice == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}


def test_infinite_logprobs_become_openai_floor() -> None:
    """JSON has no -inf; OpenAI reports -9999.0 for impossible tokens."""
    top = TopLogprob(token="a", logprob=float("-inf"))
    assert json.loads(top.model_dump_json())["logprob"] == -9999.0
    legacy = CompletionLogprobs(
        tokens=["a"],
        token_logprobs=[float("-inf")],
        top_logprobs=[{"a": float("nan")}],
        text_offset=[0],
    )
    dumped = json.loads(legacy.model_dump_json())
    assert dumped["token_logprobs"] == [-9999.0]
    assert dumped["top_logprobs"] == [{"a": -9999.0}]


def test_client_package_has_no_server_dependencies() -> None:
    import subprocess
    import sys

    code = (
        "import sys, client, client.types; "
        "bad = [m for m in ('torch', 'fastapi', 'starlette', 'adapterhub_server') if m in sys.modules]; "
        "assert not bad, bad"
    )
    repo = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-c", code], check=True, cwd=repo)
