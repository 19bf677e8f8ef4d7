"""SIGTERM on a real server process: in-flight requests finish (or are aborted at the
timeout), nothing new is admitted, and the process exits 0."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from tests.tiny_models import make_tiny_llama

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def long_context_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Long enough that a generation outlasts the signal by seconds.
    return make_tiny_llama(tmp_path_factory.mktemp("long") / "base", max_position_embeddings=8192)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def _server(base: Path, shutdown_timeout: float) -> Iterator[tuple[subprocess.Popen, str]]:
    port = _free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "adapterhub_server",
            "serve",
            "--base-model",
            str(base),
            "--served-model-name",
            "tiny",
            "--port",
            str(port),
            "--no-registry",
            "--max-model-len",
            "8192",
            "--shutdown-timeout",
            str(shutdown_timeout),
            "--log-level",
            "warning",
        ],
        cwd=REPO,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"server exited early:\n{proc.stdout.read()}")  # type: ignore[union-attr]
            try:
                if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError("server did not become ready")
            time.sleep(0.2)
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)


def _stream_events(response: httpx.Response) -> Iterator[str]:
    for line in response.iter_lines():
        if line.startswith("data: "):
            yield line.removeprefix("data: ")


def _long_request(max_tokens: int) -> dict[str, object]:
    return {
        "model": "tiny",
        "prompt": "hello",
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }


def test_sigterm_lets_in_flight_requests_finish(long_context_base: Path) -> None:
    with (
        _server(long_context_base, shutdown_timeout=60) as (proc, url),
        httpx.Client(base_url=url, timeout=120) as http,
        http.stream("POST", "/v1/completions", json=_long_request(1500)) as r,
    ):
        events = _stream_events(r)
        first = json.loads(next(events))
        assert first["choices"][0]["finish_reason"] is None
        proc.send_signal(signal.SIGTERM)
        rest = list(events)
        # The listener is closed: nothing new gets in while the old request finishes.
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{url}/health", timeout=5)
        assert rest[-1] == "[DONE]"
        final = json.loads(rest[-2])
        assert final["choices"][0]["finish_reason"] == "length"
        assert proc.wait(timeout=60) == 0


def test_sigterm_aborts_what_outlasts_the_timeout(long_context_base: Path) -> None:
    with (
        _server(long_context_base, shutdown_timeout=0.5) as (proc, url),
        httpx.Client(base_url=url, timeout=120) as http,
        http.stream("POST", "/v1/completions", json=_long_request(8000)) as r,
    ):
        events = _stream_events(r)
        next(events)
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        rest = list(events)
        assert rest[-1] == "[DONE]"
        error = json.loads(rest[-2])["error"]
        assert error["code"] == "shutting_down"
        assert proc.wait(timeout=60) == 0
        # Well before the 8000 tokens could have been generated.
        assert time.monotonic() - started < 30
