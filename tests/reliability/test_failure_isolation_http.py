"""Over HTTP, on the real engine: a request that breaks the forward (an out-of-memory, a
bug) fails alone with its own status, while a stream decoding in the same batch finishes,
and the server keeps serving."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from adapterhub_server.config import EngineConfig, ServerConfig
from adapterhub_server.server import Server, build_app, build_server
from tests.live_server import serve

POISON = 7
"""A prompt containing this token id makes every forward it takes part in fail."""


@pytest.fixture(scope="module")
def server(tiny_base: Path) -> Server:
    config = ServerConfig(
        base_model=str(tiny_base),
        served_model_name="tiny",
        engine=EngineConfig(max_num_seqs=4, max_model_len=256),
    )
    return build_server(config)


@pytest.fixture(scope="module")
def url(server: Server) -> Iterator[str]:
    with serve(build_app(server.engine, server), lifespan="on") as base_url:
        yield base_url


@dataclass
class Failure:
    raise_: BaseException | None = None
    """What the forward raises while a poisoned prompt is in the batch."""
    shared_batches: int = 0
    """Failed forwards that held other sequences too (which then had to be retried)."""


@pytest.fixture
def failure(server: Server, monkeypatch: pytest.MonkeyPatch) -> Failure:
    model = server.engine.engine.model
    real = model.forward
    state = Failure()

    def forward(input_ids: torch.Tensor, positions: torch.Tensor, attn: Any, *rest: Any) -> Any:
        if state.raise_ is not None and bool((input_ids == POISON).any()):
            state.shared_batches += attn.num_decode + len(attn.prefills) > 1
            raise state.raise_
        return real(input_ids, positions, attn, *rest)

    monkeypatch.setattr(model, "forward", forward)
    return state


def _completion(prompt: list[int], max_tokens: int, *, stream: bool = False) -> dict:
    return {
        "model": "tiny",
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": stream,
    }


def _stream_beside(url: str, poisoned: dict, started: threading.Event) -> list[dict]:
    """Stream a long healthy request; once it decodes, send `poisoned` and return the
    stream's events (the poisoned response is stored in `poisoned["response"]`)."""
    events: list[dict] = []
    with (
        httpx.Client(base_url=url, timeout=120) as http,
        http.stream("POST", "/v1/completions", json=_completion([1, 2, 3], 120, stream=True)) as r,
    ):
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            payload = line.removeprefix("data: ")
            if payload == "[DONE]":
                break
            events.append(json.loads(payload))
            if not started.is_set():
                started.set()
                # Sent while the stream is mid-decode: both share the next steps' batches.
                poisoned["response"] = httpx.post(
                    f"{url}/v1/completions", json=poisoned["body"], timeout=120
                )
    return events


@pytest.mark.parametrize(
    ("exc", "status", "code"),
    [
        (
            torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
            503,
            "out_of_memory",
        ),
        (RuntimeError("an engine bug"), 500, "internal_error"),
    ],
    ids=["oom", "bug"],
)
def test_a_failing_request_fails_alone(
    url: str, failure: Failure, exc: BaseException, status: int, code: str
) -> None:
    with httpx.Client(base_url=url, timeout=120) as http:
        clean = http.post("/v1/completions", json=_completion([1, 2, 3], 120)).json()
    failure.raise_ = exc
    poisoned: dict = {"body": _completion([POISON, 5, 6], 30)}
    events = _stream_beside(url, poisoned, threading.Event())

    response: httpx.Response = poisoned["response"]
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code
    if status == 503:
        assert response.headers["retry-after"] == "1"
    assert failure.shared_batches > 0, "the poisoned request never shared a batch"
    # The healthy stream finished, with exactly the text it has when it runs alone.
    assert events[-1]["choices"][0]["finish_reason"] == "length"
    assert "".join(e["choices"][0]["text"] for e in events) == clean["choices"][0]["text"]
    with httpx.Client(base_url=url, timeout=120) as http:
        after = http.post("/v1/completions", json=_completion([1, 2, 3], 120))
    assert after.status_code == 200
    assert after.json()["choices"][0]["text"] == clean["choices"][0]["text"]
