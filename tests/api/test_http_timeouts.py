"""Timeouts for slow or stalled clients, over raw sockets against a real uvicorn server."""

from __future__ import annotations

import asyncio
import importlib.util
import select
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import parse_qs

import pytest

from adapterhub_server.cli import build_parser, config_from_args
from adapterhub_server.config import ServerConfig
from adapterhub_server.http_timeouts import timed_protocol
from tests import live_server

T = 0.5
"""Keep-alive, header and body timeout of the test servers, in seconds."""

IMPLS = [
    pytest.param(
        "httptools",
        marks=pytest.mark.skipif(
            importlib.util.find_spec("httptools") is None, reason="httptools not installed"
        ),
    ),
    "h11",
]


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Echoes the body's length. `?delay=S` sleeps before reading the body; `?chunks=N&gap=S`
    streams N chunks S seconds apart instead."""
    assert scope["type"] == "http"
    query = {k: float(v[0]) for k, v in parse_qs(scope["query_string"].decode()).items()}
    await asyncio.sleep(query.get("delay", 0))
    size, more = 0, True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        size += len(message["body"])
        more = message["more_body"]
    if "chunks" in query:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for _ in range(int(query["chunks"])):
            await send({"type": "http.response.body", "body": b"x", "more_body": True})
            await asyncio.sleep(query["gap"])
        await send({"type": "http.response.body", "body": b""})
        return
    body = str(size).encode()
    headers = [(b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


@contextmanager
def serve(impl: str) -> Iterator[int]:
    with live_server.serve(
        app,
        timeout_keep_alive=T,
        http=timed_protocol(header_timeout=T, body_timeout=T, impl=impl),
    ) as url:
        yield int(url.rsplit(":", 1)[1])


@pytest.fixture(scope="module")
def ports() -> Iterator[dict[str, int]]:
    with serve("h11") as h11_port:
        if importlib.util.find_spec("httptools") is None:
            yield {"h11": h11_port}
            return
        with serve("httptools") as httptools_port:
            yield {"h11": h11_port, "httptools": httptools_port}


def connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.settimeout(10)
    return sock


def read_until_closed(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def read_response(sock: socket.socket) -> tuple[int, bytes]:
    """One response with a content-length, leaving the connection open."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"closed mid-response: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    length = next(
        int(v)
        for k, _, v in (x.partition(b":") for x in lines[1:])
        if k.lower() == b"content-length"
    )
    while len(body) < length:
        body += sock.recv(65536)
    return int(lines[0].split()[1]), body


def status_of(response: bytes) -> int:
    assert response.startswith(b"HTTP/1.1 "), response
    return int(response.split()[1])


def assert_closed_in_time(start: float) -> None:
    elapsed = time.monotonic() - start
    assert 0.5 * T <= elapsed < 3 * T, elapsed


@pytest.mark.parametrize("impl", IMPLS)
def test_after_a_408_the_server_reads_on_before_closing(ports: dict[str, int], impl: str) -> None:
    """A slow client is, by definition, still sending when its 408 goes out. A socket
    closed at once answers those late bytes with a reset, which can destroy the 408 before
    the client has read it (RFC 9112, section 9.6); so the server half-closes and reads on
    for a while: late bytes are taken, not reset."""
    with connect(ports[impl]) as sock:
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\n")
        response = read_until_closed(sock)  # the 408, then the server's end of stream
        for _ in range(3):  # a reset from a closed socket fails the second send at latest
            sock.sendall(b"X-Late: 1\r\n")
            time.sleep(T / 5)
    assert status_of(response) == 408
    assert b'"code": "request_timeout"' in response


@pytest.mark.parametrize("impl", IMPLS)
def test_a_trickled_header_block_gets_408_at_the_header_timeout(
    ports: dict[str, int], impl: str
) -> None:
    # Bytes keep coming, but the whole block is late: its clock is not reset by each one.
    with connect(ports[impl]) as sock:
        start = time.monotonic()
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\n")
        while time.monotonic() - start < 5 * T:
            if select.select([sock], [], [], T / 6)[0]:
                break
            sock.sendall(b"X-Slow: 1\r\n")
        response = read_until_closed(sock)
        assert_closed_in_time(start)
    assert status_of(response) == 408
    assert b'"code": "request_timeout"' in response


@pytest.mark.parametrize("impl", IMPLS)
def test_a_fresh_connection_that_sends_nothing_is_closed_without_a_response(
    ports: dict[str, int], impl: str
) -> None:
    with connect(ports[impl]) as sock:
        start = time.monotonic()
        assert read_until_closed(sock) == b""
        assert_closed_in_time(start)


@pytest.mark.parametrize("impl", IMPLS)
def test_b_a_stalled_body_gets_408_at_the_body_timeout(ports: dict[str, int], impl: str) -> None:
    with connect(ports[impl]) as sock:
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n" + b"a" * 500)
        start = time.monotonic()
        response = read_until_closed(sock)
        assert_closed_in_time(start)
    assert status_of(response) == 408


@pytest.mark.parametrize("impl", IMPLS)
def test_c_a_slow_body_that_keeps_moving_completes(ports: dict[str, int], impl: str) -> None:
    chunks, gap = 12, T / 4  # 3 x the body timeout in all, each gap a quarter of it
    with connect(ports[impl]) as sock:
        sock.sendall(
            b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (chunks * 10)
        )
        for _ in range(chunks):
            time.sleep(gap)
            sock.sendall(b"b" * 10)
        assert read_response(sock) == (200, str(chunks * 10).encode())


@pytest.mark.parametrize("impl", IMPLS)
def test_d_keep_alive_serves_requests_then_closes_when_idle(
    ports: dict[str, int], impl: str
) -> None:
    # Three requests over longer than the header timeout: that clock stops at each request.
    with connect(ports[impl]) as sock:
        for _ in range(3):
            sock.sendall(b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n")
            assert read_response(sock) == (200, b"0")
            time.sleep(T / 2)
        sock.sendall(b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_response(sock) == (200, b"0")
        start = time.monotonic()
        assert read_until_closed(sock) == b""
        assert_closed_in_time(start)


@pytest.mark.parametrize("impl", IMPLS)
def test_e_a_slow_app_reading_a_large_body_late_still_answers(
    ports: dict[str, int], impl: str
) -> None:
    # The app sleeps past both timeouts before reading; uvicorn pauses reading meanwhile,
    # so the body's silence is the server's doing.
    size = 1024 * 1024
    with connect(ports[impl]) as sock:
        sock.sendall(
            b"POST /echo?delay=%g HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (2 * T, size)
        )
        sock.sendall(b"c" * size)
        assert read_response(sock) == (200, str(size).encode())


@pytest.mark.parametrize("impl", IMPLS)
def test_e_a_client_awaiting_100_continue_from_a_slow_app_is_not_timed_out(
    ports: dict[str, int], impl: str
) -> None:
    # The body clock starts at `100 Continue`, not at the headers: the client may then take
    # a while to send, within the body timeout.
    with connect(ports[impl]) as sock:
        sock.sendall(
            b"POST /echo?delay=%g HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
            b"Expect: 100-continue\r\n\r\n" % (1.6 * T)
        )
        interim = b""
        while not interim.endswith(b"\r\n\r\n"):
            interim += sock.recv(1)
        assert status_of(interim) == 100
        time.sleep(T / 2)
        sock.sendall(b"hello")
        assert read_response(sock) == (200, b"5")


def test_e_a_slow_streamed_response_is_not_cut(ports: dict[str, int]) -> None:
    # Computed for longer than the header timeout, then streamed for longer again.
    port = ports.get("httptools", ports["h11"])
    with connect(port) as sock:
        sock.sendall(
            b"GET /echo?delay=%g&chunks=3&gap=%g HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            % (2 * T, T / 2)
        )
        response = read_until_closed(sock)
    assert status_of(response) == 200
    assert response.endswith(b"1\r\nx\r\n0\r\n\r\n") and response.count(b"\r\nx\r\n") == 3


def test_cli_flags_and_validation() -> None:
    config = config_from_args(build_parser().parse_args(["serve", "--no-registry"]))
    assert (config.timeout_keep_alive, config.timeout_request_header) == (5.0, 30.0)
    assert config.timeout_request_body == 60.0
    args = build_parser().parse_args(
        [
            "serve",
            "--no-registry",
            "--timeout-keep-alive",
            "2.5",
            "--timeout-request-header",
            "7",
            "--timeout-request-body",
            "120",
        ]
    )
    config = config_from_args(args)
    assert config.timeout_keep_alive == 2.5
    assert config.timeout_request_header == 7.0
    assert config.timeout_request_body == 120.0
    for name in ("timeout_keep_alive", "timeout_request_header", "timeout_request_body"):
        for bad in (0, -1, float("nan"), float("inf")):
            with pytest.raises(ValueError, match=name):
                ServerConfig(**{name: bad})
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--timeout-request-body", "soon"])


def test_timed_protocol_refuses_unknown_implementations_and_bad_timeouts() -> None:
    with pytest.raises(ValueError, match="unknown HTTP implementation"):
        timed_protocol(header_timeout=1, body_timeout=1, impl="h2")
    with pytest.raises(ValueError, match="body_timeout"):
        timed_protocol(header_timeout=1, body_timeout=0)
