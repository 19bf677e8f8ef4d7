"""Structured logs: JSON lines carrying the request id the response header shows."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import httpx
import pytest

from adapterhub_server.logs import configure_logging, parse_level, request_id_context
from tests.api.fake_engine import BASE_ID

pytestmark = pytest.mark.anyio


@pytest.fixture
def log_stream() -> Iterator[io.StringIO]:
    """Root logging into a buffer as JSON at DEBUG; the previous setup is restored after."""
    root = logging.getLogger()
    level = root.level
    stream = io.StringIO()
    handler = configure_logging("debug", "json", stream=stream)
    try:
        yield stream
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def lines(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


async def test_json_lines_carry_the_request_id_of_the_response(
    client: httpx.AsyncClient, log_stream: io.StringIO
) -> None:
    response = await client.post(
        "/v1/chat/completions",
        # The caller's labels are logged with the request id.
        json={
            "model": BASE_ID,
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 2,
            "user": "frobnicate",
            "metadata": {"team": "blue"},
        },
    )
    assert response.status_code == 200
    request_id = response.headers["x-request-id"]
    records = lines(log_stream)
    for record in records:
        assert {"ts", "level", "logger", "message"} <= record.keys()
    mine = [r for r in records if r.get("request_id") == request_id]
    service = [r for r in mine if r["logger"] == "adapterhub_server.api.service"]
    assert service and "frobnicate" in service[0]["message"]
    assert "blue" in service[0]["message"]
    (access,) = [r for r in mine if r["logger"] == "adapterhub_server.access"]
    assert access["level"] == "INFO"
    assert access["method"] == "POST"
    assert access["route"] == "/v1/chat/completions"
    assert access["status"] == 200
    assert access["duration_ms"] >= 0
    assert access["message"].startswith("POST /v1/chat/completions 200 ")


async def test_a_client_request_id_is_used_and_probes_log_at_debug(
    client: httpx.AsyncClient, log_stream: io.StringIO
) -> None:
    response = await client.get("/v1/models", headers={"x-request-id": "client-id-7"})
    assert response.headers["x-request-id"] == "client-id-7"
    await client.get("/health")
    records = lines(log_stream)
    access = [r for r in records if r["logger"] == "adapterhub_server.access"]
    assert [(r["route"], r["level"], r["request_id"] == "client-id-7") for r in access] == [
        ("/v1/models", "INFO", True),
        ("/health", "DEBUG", False),
    ]


def test_exceptions_and_records_outside_requests(log_stream: io.StringIO) -> None:
    logger = logging.getLogger("tests.logging")
    try:
        raise ValueError("boom")
    except ValueError:
        logger.exception("it failed")
    with request_id_context("abc"):
        logger.warning("inside", extra={"adapter": "alpha"})
    outside, inside = lines(log_stream)
    assert outside["level"] == "ERROR"
    assert "request_id" not in outside
    assert "ValueError: boom" in outside["exc_info"]
    assert inside == {
        "ts": inside["ts"],
        "level": "WARNING",
        "logger": "tests.logging",
        "message": "inside",
        "request_id": "abc",
        "adapter": "alpha",
    }


def test_text_format_shows_the_request_id_and_setup_is_idempotent() -> None:
    root = logging.getLogger()
    level = root.level
    stream = io.StringIO()
    configure_logging("info", "json", stream=io.StringIO())
    handler = configure_logging("info", "text", stream=stream)  # replaces the first
    try:
        assert sum(h.get_name() == handler.get_name() for h in root.handlers) == 1
        logger = logging.getLogger("tests.logging")
        with request_id_context("req-1"):
            logger.info("hello")
        logger.info("bye")
        logger.debug("not shown")
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    first, second = stream.getvalue().splitlines()
    assert first.endswith("INFO tests.logging [req-1] hello")
    assert second.endswith("INFO tests.logging [-] bye")


def test_levels() -> None:
    assert parse_level("info") == logging.INFO
    assert parse_level("WARNING") == logging.WARNING
    assert parse_level("trace") < logging.DEBUG
    with pytest.raises(ValueError):
        parse_level("loud")
    with pytest.raises(ValueError):
        configure_logging("info", "xml")  # type: ignore[arg-type]
