"""A client that goes away aborts its engine requests (and so frees their batch slots)."""

from __future__ import annotations

import json
import time
from typing import Any

import anyio
import httpx
import pytest
from fastapi import FastAPI

from tests.api.conftest import LiveServer
from tests.api.fake_engine import FakeEngine

CHAT = [{"role": "user", "content": "hello"}]


class AsgiCall:
    """Drive the ASGI app by hand, to disconnect at a chosen moment.

    httpx's in-process transport cannot disconnect mid-response, so these tests speak ASGI.
    """

    def __init__(self, path: str, body: dict[str, Any], *, spec_version: str = "2.3") -> None:
        self.body = json.dumps(body).encode()
        self.scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": spec_version},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "query_string": b"",
            "root_path": "",
            "headers": [(b"host", b"test"), (b"content-type", b"application/json")],
            "client": ("127.0.0.1", 50000),
            "server": ("test", 80),
        }
        self.disconnected = anyio.Event()
        self.sent: list[dict[str, Any]] = []
        self._body_sent = False
        self.disconnect_after_chunks: int | None = None
        self.raise_on_send = False

    async def receive(self) -> dict[str, Any]:
        if not self._body_sent:
            self._body_sent = True
            return {"type": "http.request", "body": self.body, "more_body": False}
        await self.disconnected.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: dict[str, Any]) -> None:
        if self.disconnected.is_set() and self.raise_on_send:
            raise OSError("connection closed")  # what ASGI 2.4 servers do
        self.sent.append(message)
        chunks = [m for m in self.sent if m["type"] == "http.response.body" and m.get("body")]
        if self.disconnect_after_chunks is not None and len(chunks) >= self.disconnect_after_chunks:
            self.disconnected.set()

    def body_text(self) -> str:
        return b"".join(m.get("body", b"") for m in self.sent[1:]).decode()

    async def run(self, app: FastAPI) -> None:
        with anyio.fail_after(10):
            await app(self.scope, self.receive, self.send)


async def disconnect_later(call: AsgiCall, delay: float) -> None:
    await anyio.sleep(delay)
    call.disconnected.set()


@pytest.mark.anyio
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
async def test_stream_disconnect_aborts(app: FastAPI, engine: FakeEngine, path: str) -> None:
    engine.step_delay = 0.05
    body = {"messages": CHAT} if "chat" in path else {"prompt": "hi"}
    call = AsgiCall(path, {**body, "stream": True, "max_tokens": 8})
    call.disconnect_after_chunks = 2
    await call.run(app)
    (request,) = engine.calls
    assert engine.aborted == [request.request_id]
    assert engine.finished == []
    assert "[DONE]" not in call.body_text()


@pytest.mark.anyio
async def test_stream_disconnect_aborts_every_prompt(app: FastAPI, engine: FakeEngine) -> None:
    engine.step_delay = 0.05
    call = AsgiCall("/v1/completions", {"prompt": ["hi", "there"], "stream": True})
    call.disconnect_after_chunks = 1
    await call.run(app)
    assert sorted(engine.aborted) == sorted(c.request_id for c in engine.calls)
    assert len(engine.aborted) == 2


@pytest.mark.anyio
async def test_stream_disconnect_on_send_aborts(app: FastAPI, engine: FakeEngine) -> None:
    """Servers on ASGI 2.4 report the disconnect by failing `send` instead."""
    engine.step_delay = 0.02
    call = AsgiCall("/v1/completions", {"prompt": "hi", "stream": True}, spec_version="2.4")
    call.disconnect_after_chunks = 1
    call.raise_on_send = True
    await call.run(app)  # the disconnect is normal: nothing propagates to the server
    assert engine.aborted == [engine.calls[0].request_id]


@pytest.mark.anyio
@pytest.mark.parametrize("stream", [False, True])
async def test_disconnect_before_first_token_aborts(
    app: FastAPI, engine: FakeEngine, stream: bool
) -> None:
    engine.step_delay = 5.0  # the first token never comes in time
    call = AsgiCall("/v1/completions", {"prompt": "hi", "stream": stream})
    async with anyio.create_task_group() as group:
        group.start_soon(disconnect_later, call, 0.1)
        await call.run(app)
    assert engine.aborted == [engine.calls[0].request_id]


@pytest.mark.anyio
async def test_non_stream_disconnect_mid_generation_aborts(
    app: FastAPI, engine: FakeEngine
) -> None:
    engine.step_delay = 0.05
    call = AsgiCall("/v1/chat/completions", {"messages": CHAT, "max_tokens": 8})
    async with anyio.create_task_group() as group:
        group.start_soon(disconnect_later, call, 0.12)
        await call.run(app)
    assert engine.aborted == [engine.calls[0].request_id]
    assert engine.finished == []


def test_real_socket_disconnect_aborts(slow_live_server: LiveServer) -> None:
    """End to end over TCP with uvicorn: closing the connection aborts the stream."""
    engine = slow_live_server.engine
    body = {
        "prompt": "the quick brown fox jumps over the lazy dog",
        "stream": True,
        "max_tokens": 60,
    }
    with (
        httpx.Client(base_url=slow_live_server.base_url, timeout=10) as client,
        client.stream("POST", "/v1/completions", json=body) as response,
    ):
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: "):
                break
    deadline = time.monotonic() + 10
    while not engine.aborted and time.monotonic() < deadline:
        time.sleep(0.02)
    assert engine.aborted == [engine.calls[0].request_id]
    assert engine.finished == []
