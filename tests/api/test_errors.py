"""Every failure answers with the OpenAI error envelope and a fitting status."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import anyio
import httpx
import pytest

from adapterhub_server.api import create_app
from adapterhub_server.errors import (
    AdapterNotFoundError,
    AdapterValidationError,
    BaseModelError,
    CapacityError,
    ContextLengthError,
    InvalidRequestError,
)
from client.types import ErrorResponse
from tests.api.conftest import sse_json
from tests.api.fake_engine import FakeEngine

pytestmark = pytest.mark.anyio

CHAT = [{"role": "user", "content": "hello"}]


def envelope(r: httpx.Response, status: int) -> dict:
    """Assert `status` and the envelope shape; return the `error` object."""
    assert r.status_code == status, r.text
    body = r.json()
    ErrorResponse.model_validate(body)
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert r.headers["x-request-id"]
    return body["error"]


async def test_unknown_model_is_404(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    for path, body in [
        ("/v1/completions", {"model": "nope", "prompt": "hi"}),
        ("/v1/chat/completions", {"model": "nope", "messages": CHAT}),
        ("/v1/chat/completions", {"model": "nope", "messages": CHAT, "stream": True}),
    ]:
        error = envelope(await client.post(path, json=body), 404)
        assert error["type"] == "invalid_request_error"
        assert error["code"] == "model_not_found"
        assert error["param"] == "model"
        assert "nope" in error["message"]
    assert engine.calls == []


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "hi", "temperature": 2.5}, "temperature"),
        ({"prompt": "hi", "temperature": -0.1}, "temperature"),
        ({"prompt": "hi", "temperature": "hot"}, "temperature"),
        ({"prompt": "hi", "top_p": 1.5}, "top_p"),
        ({"prompt": "hi", "top_p": 0}, "top_p"),  # in OpenAI's range, refused by the sampler
        ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "hi", "logprobs": 21}, "logprobs"),
        ({"prompt": "hi", "top_k": -2}, "top_k"),
        ({"prompt": "hi", "seed": -1}, "seed"),
        ({"prompt": "hi", "n": 0}, "n"),
        ({"prompt": "hi", "n": 129}, "n"),
        ({"prompt": "hi", "stop": ["s"] * 17}, "stop"),
        ({"prompt": "hi", "stop": 5}, "stop"),
        ({"prompt": "hi", "stop": [""]}, "stop"),
        (
            {"prompt": "hi", "stream_options": {"include_usage": "maybe"}},
            "stream_options.include_usage",
        ),
        ({}, "prompt"),
        ({"prompt": 5}, "prompt"),
        ({"prompt": [1, "a"]}, "prompt"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": []}, "prompt"),
        ({"prompt": ["hi", ""]}, "prompt"),
        ({"prompt": [[1, 2], []]}, "prompt"),
        ({"prompt": [1, 10**6]}, "prompt"),
        ({"prompt": "hi", "max_tokens": 1000}, "max_tokens"),
        ({"prompt": "hi " * 200}, "prompt"),
    ],
)
async def test_completion_400s(
    client: httpx.AsyncClient, engine: FakeEngine, body: dict, param: str
) -> None:
    error = envelope(await client.post("/v1/completions", json=body), 400)
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert error["message"]
    assert engine.calls == []  # nothing reached the engine


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({}, "messages"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user"}]}, "messages[0].content"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
            "messages[0].content[0].type",
        ),
        ({"messages": CHAT, "top_logprobs": 2}, "top_logprobs"),
        ({"messages": CHAT, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"messages": CHAT, "max_completion_tokens": 1000}, "max_completion_tokens"),
        ({"messages": CHAT, "max_tokens": 1000}, "max_tokens"),
        ({"messages": [{"role": "user", "content": "hi " * 200}]}, "messages"),
        ({"messages": CHAT, "n": 129}, "n"),
    ],
)
async def test_chat_400s(
    client: httpx.AsyncClient, engine: FakeEngine, body: dict, param: str
) -> None:
    error = envelope(await client.post("/v1/chat/completions", json=body), 400)
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert engine.calls == []


async def test_context_length_code(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 1000})
    error = envelope(r, 400)
    assert error["code"] == "context_length_exceeded"
    assert "128" in error["message"]


async def test_missing_field_code(client: httpx.AsyncClient) -> None:
    error = envelope(await client.post("/v1/completions", json={"model": "x"}), 400)
    assert error["code"] == "missing_required_parameter"


@pytest.mark.parametrize(
    "content", [b'{"prompt": "hi"', b"not json", b'{"prompt": "hi",}'], ids=str
)
async def test_malformed_json(client: httpx.AsyncClient, content: bytes) -> None:
    r = await client.post(
        "/v1/completions", content=content, headers={"content-type": "application/json"}
    )
    error = envelope(r, 400)
    assert error["code"] == "invalid_json"
    assert error["param"] is None


async def test_body_that_is_not_an_object(client: httpx.AsyncClient) -> None:
    error = envelope(await client.post("/v1/completions", json=["hi"]), 400)
    assert error["type"] == "invalid_request_error"


async def test_body_without_json_content_type(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/completions", content=b'{"prompt": "hi"}')
    error = envelope(r, 400)
    assert "application/json" in error["message"]


async def test_unknown_route_is_404(client: httpx.AsyncClient) -> None:
    error = envelope(await client.get("/v1/nope"), 404)
    assert error["type"] == "invalid_request_error"
    assert error["code"] == "not_found"


async def test_wrong_method_is_405(client: httpx.AsyncClient) -> None:
    r = await client.get("/v1/completions")
    error = envelope(r, 405)
    assert error["code"] == "method_not_allowed"
    assert "POST" in r.headers["allow"]


@pytest.mark.parametrize(
    ("exc", "status", "code", "error_type"),
    [
        (AdapterNotFoundError("gone"), 404, "model_not_found", "invalid_request_error"),
        (AdapterValidationError("bad shapes"), 400, "invalid_adapter", "invalid_request_error"),
        (ContextLengthError("too long"), 400, "context_length_exceeded", "invalid_request_error"),
        (InvalidRequestError("no"), 400, "invalid_request", "invalid_request_error"),
        (CapacityError("full"), 503, "server_busy", "server_error"),
        (BaseModelError("no model"), 503, "base_model_unavailable", "server_error"),
    ],
)
@pytest.mark.parametrize("stream", [False, True])
async def test_engine_errors_at_admission(
    client: httpx.AsyncClient,
    engine: FakeEngine,
    exc: Exception,
    status: int,
    code: str,
    error_type: str,
    stream: bool,
) -> None:
    """Errors the engine raises before the first token keep their status, even for streams."""
    engine.start_error = exc
    r = await client.post("/v1/completions", json={"prompt": "hi", "stream": stream})
    error = envelope(r, status)
    assert error["code"] == code
    assert error["type"] == error_type
    assert error["message"] == str(exc)
    if status == 503:
        assert r.headers["retry-after"] == "1"


async def test_unexpected_error_is_500_without_traceback(
    client: httpx.AsyncClient, engine: FakeEngine
) -> None:
    engine.start_error = RuntimeError("secret internals")
    r = await client.post("/v1/completions", json={"prompt": "hi"})
    error = envelope(r, 500)
    assert error["type"] == "server_error"
    assert "secret" not in r.text
    assert "Traceback" not in r.text


async def test_failed_generation_is_500(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    engine.finish_with = "error"
    error = envelope(await client.post("/v1/completions", json={"prompt": "hi"}), 500)
    assert error["code"] == "generation_failed"


async def test_aborted_generation_is_503(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    engine.finish_with = "abort"
    r = await client.post("/v1/chat/completions", json={"messages": CHAT})
    assert envelope(r, 503)["code"] == "request_aborted"


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
async def test_error_mid_stream_is_an_event_then_done(
    client: httpx.AsyncClient, engine: FakeEngine, path: str
) -> None:
    engine.fail_after = 2
    body = {"messages": CHAT} if "chat" in path else {"prompt": "hi"}
    r = await client.post(path, json={**body, "stream": True})
    assert r.status_code == 200
    events = sse_json(r.text)
    error = events[-1]["error"]
    assert error["type"] == "server_error"
    assert "fake engine failure" not in error["message"]  # internals stay in the log
    assert all("error" not in e for e in events[:-1])
    assert len([e for e in events if e.get("choices")]) >= 2


async def test_error_finish_mid_stream(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    engine.finish_with = "error"
    r = await client.post("/v1/completions", json={"prompt": "hi", "stream": True})
    events = sse_json(r.text)
    assert events[-1]["error"]["code"] == "generation_failed"
    assert events[-1]["error"]["message"] == "fake engine error"


async def test_request_id_generated(client: httpx.AsyncClient) -> None:
    first = await client.get("/health")
    second = await client.post("/v1/completions", json={"prompt": "hi"})
    ids = {first.headers["x-request-id"], second.headers["x-request-id"]}
    assert len(ids) == 2 and all(ids)


async def test_request_id_echoed(client: httpx.AsyncClient) -> None:
    headers = {"x-request-id": "abc-123"}
    assert (await client.get("/health", headers=headers)).headers["x-request-id"] == "abc-123"
    r = await client.post("/v1/completions", json={"prompt": "hi", "stream": True}, headers=headers)
    assert r.headers["x-request-id"] == "abc-123"
    r = await client.post(
        "/v1/completions", json={"model": "nope", "prompt": "hi"}, headers=headers
    )
    assert r.headers["x-request-id"] == "abc-123"


async def test_unsafe_request_id_replaced(client: httpx.AsyncClient) -> None:
    r = await client.get("/health", headers={"x-request-id": "a b<script>" + "x" * 200})
    assert r.headers["x-request-id"] != ""
    assert "<" not in r.headers["x-request-id"]


async def test_bad_request_changes_nothing(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    """A rejected request leaves the next good one unaffected."""
    await client.post("/v1/completions", json={"prompt": "hi", "temperature": 9})
    r = await client.post("/v1/completions", json={"prompt": "hi"})
    assert r.status_code == 200
    assert len(engine.calls) == 1


async def test_bad_requests_beside_a_stream(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    """Rejected requests arriving while a stream runs leave that stream intact."""
    engine.step_delay = 0.02
    results: dict[str, httpx.Response] = {}

    async def send(name: str, path: str, body: dict) -> None:
        results[name] = await client.post(path, json=body)

    async with anyio.create_task_group() as group:
        group.start_soon(send, "good", "/v1/chat/completions", {"messages": CHAT, "stream": True})
        group.start_soon(send, "404", "/v1/completions", {"model": "nope", "prompt": "hi"})
        group.start_soon(send, "400", "/v1/completions", {"prompt": "hi", "top_p": 7})
        group.start_soon(send, "json", "/v1/completions", {"prompt": [[]]})
    events = sse_json(results["good"].text)
    assert all("error" not in e for e in events)
    assert events[-1]["choices"][0]["finish_reason"] == "stop"
    assert [results[k].status_code for k in ("404", "400", "json")] == [404, 400, 400]
    assert engine.aborted == []


@pytest.mark.anyio
async def test_json_bodies_over_the_request_limit_are_413_while_read() -> None:
    app = create_app(FakeEngine(), max_request_bytes=1024)
    transport = httpx.ASGITransport(app=app)
    body = json.dumps({"model": "tiny-base", "prompt": "x" * 2000}).encode()

    async def chunks() -> AsyncIterator[bytes]:
        # No Content-Length: the limit must be enforced by counting.
        for i in range(0, len(body), 256):
            yield body[i : i + 256]

    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        declared = await c.post("/v1/completions", content=body)
        streamed = await c.post(
            "/v1/completions", content=chunks(), headers={"content-type": "application/json"}
        )
        small = await c.post(
            "/v1/completions", json={"model": "tiny-base", "prompt": "hi", "max_tokens": 2}
        )
    for response in (declared, streamed):
        assert response.status_code == 413, response.text
        assert response.json()["error"]["code"] == "payload_too_large"
    assert small.status_code == 200
