"""Retries, timeouts, connection failures, settings: against a server that really answers
429 / 503 / errors from a script, counting the attempts."""

from __future__ import annotations

import logging
import socket
from email.utils import formatdate

import httpx
import pytest

from client import AdapterHubClient as Client
from client import (
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    AsyncAdapterHubClient,
    AuthenticationError,
    BadRequestError,
    ConflictError,
    InternalServerError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    UnprocessableEntityError,
)
from client._base import MAX_RETRY_AFTER, parse_retry_after, retry_delay
from tests.client.conftest import Scripted


@pytest.mark.parametrize("status", [429, 503])
def test_retries_until_success_honouring_retry_after(scripted: Scripted, status: int) -> None:
    scripted.script.reset(status, status)
    with Client(base_url=scripted.url, max_retries=2) as hub:
        assert hub.models.list().data[0].id == "m"
    assert scripted.script.attempts == 3


def test_a_post_is_retried_on_503_too(scripted: Scripted) -> None:
    """The server answers 503 before doing any work, so even a POST is safe to repeat."""
    scripted.script.reset(503)
    with Client(base_url=scripted.url) as hub:
        assert hub.completions.create(model="m", prompt="p").choices[0].text == "ok"
    assert scripted.script.attempts == 2


def test_gives_up_after_max_retries(scripted: Scripted) -> None:
    scripted.script.reset(429, 429, 429, 429)
    with Client(base_url=scripted.url, max_retries=2) as hub, pytest.raises(RateLimitError) as info:
        hub.models.list()
    assert scripted.script.attempts == 3
    assert info.value.status_code == 429
    assert info.value.request_id == "attempt-3"  # the last answer's x-request-id
    assert info.value.code == "code_429"


def test_max_retries_zero_means_one_attempt(scripted: Scripted) -> None:
    scripted.script.reset(503)
    with Client(base_url=scripted.url, max_retries=0) as hub, pytest.raises(InternalServerError):
        hub.models.list()
    assert scripted.script.attempts == 1


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (400, BadRequestError),
        (401, AuthenticationError),
        (403, PermissionDeniedError),
        (404, NotFoundError),
        (409, ConflictError),
        (413, APIStatusError),
        (422, UnprocessableEntityError),
        (500, InternalServerError),
        (502, InternalServerError),
    ],
)
def test_other_errors_are_mapped_and_not_retried(
    scripted: Scripted, status: int, error: type[APIStatusError]
) -> None:
    scripted.script.reset(status)
    with Client(base_url=scripted.url, max_retries=3) as hub, pytest.raises(error) as info:
        hub.models.list()
    assert scripted.script.attempts == 1
    assert isinstance(info.value, APIStatusError)
    assert info.value.status_code == status
    assert info.value.param == "model" and info.value.message == f"scripted {status}"
    assert info.value.body["error"]["code"] == f"code_{status}"


def test_backoff_without_retry_after(scripted: Scripted, caplog: pytest.LogCaptureFixture) -> None:
    scripted.script.reset(503, retry_after=None)
    with caplog.at_level(logging.INFO, logger="client"), Client(base_url=scripted.url) as hub:
        hub.models.list()
    assert scripted.script.attempts == 2
    (record,) = [r for r in caplog.records if "retrying" in r.getMessage()]
    assert "GET /v1/models" in record.getMessage()


def test_retry_delay_rules() -> None:
    delays = [retry_delay(n, None) for n in range(6)]
    assert 0.375 <= delays[0] <= 0.5 and 0.75 <= delays[1] <= 1.0  # jitter: 75-100 %
    assert all(6.0 <= d <= 8.0 for d in delays[4:])  # capped
    answer = httpx.Response(429, headers={"Retry-After": "3"})
    assert retry_delay(0, answer) == 3.0
    assert retry_delay(0, httpx.Response(429, headers={"Retry-After": "9999"})) == MAX_RETRY_AFTER
    assert parse_retry_after(formatdate(0, usegmt=True)) == 0.0  # a date in the past
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None


def test_timeout_raises_api_timeout_error(scripted: Scripted) -> None:
    scripted.script.reset(("sleep", 1.0))
    with (
        Client(base_url=scripted.url, timeout=0.2, max_retries=0) as hub,
        pytest.raises(APITimeoutError),
    ):
        hub.models.list()


def test_a_timed_out_post_is_not_repeated(scripted: Scripted) -> None:
    """The server may be working on it: a second fine-tuning job or generation must not
    start behind the caller's back."""
    scripted.script.reset(("sleep", 1.0))
    with Client(base_url=scripted.url, timeout=0.2, max_retries=2) as hub:
        with pytest.raises(APITimeoutError):
            hub.completions.create(model="m", prompt="p")
        assert scripted.script.attempts == 1
        # A GET is idempotent: it is retried, and the second attempt answers in time.
        scripted.script.reset(("sleep", 1.0))
        assert hub.models.list().data[0].id == "m"
        assert scripted.script.attempts == 2


def _refused_url() -> str:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    return f"http://127.0.0.1:{port}"


def test_connection_refused_is_retried_then_raised(caplog: pytest.LogCaptureFixture) -> None:
    with (
        caplog.at_level(logging.INFO, logger="client"),
        Client(base_url=_refused_url(), max_retries=1) as hub,
        pytest.raises(APIConnectionError) as info,
    ):
        hub.completions.create(model="m", prompt="p")  # a POST that never reached a server
    assert not isinstance(info.value, APITimeoutError)
    assert len([r for r in caplog.records if "retrying" in r.getMessage()]) == 1


def test_settings_from_the_environment(scripted: Scripted, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ADAPTERHUB_BASE_URL", scripted.url + "/v1/")
    monkeypatch.setenv("ADAPTERHUB_API_KEY", "sk-env")
    with Client() as hub:
        assert hub.base_url == scripted.url and hub.api_key == "sk-env"
        hub.models.list()
    with Client(api_key="sk-arg") as hub:
        hub.models.list()
    sent = [h.get("authorization") for h in scripted.script.headers]
    assert sent == ["Bearer sk-env", "Bearer sk-arg"]
    assert scripted.script.headers[0]["user-agent"].startswith("adapterhub-python/")


def test_defaults_and_no_key(scripted: Scripted, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ADAPTERHUB_BASE_URL", raising=False)
    monkeypatch.delenv("ADAPTERHUB_API_KEY", raising=False)
    with Client() as hub:
        assert hub.base_url == "http://localhost:8000" and hub.max_retries == 2
        assert hub.api_key is None
    with Client(base_url=scripted.url) as hub:
        hub.models.list()
    assert "authorization" not in scripted.script.headers[0]
    with pytest.raises(ValueError):
        Client(max_retries=-1)


@pytest.mark.anyio
async def test_async_retries_errors_and_timeouts(scripted: Scripted) -> None:
    script = scripted.script
    async with AsyncAdapterHubClient(base_url=scripted.url, api_key="k", timeout=0.5) as hub:
        script.reset(429, 503)
        assert (await hub.models.list()).data[0].id == "m"
        assert script.attempts == 3
        assert script.headers[0]["authorization"] == "Bearer k"
        script.reset(404)
        with pytest.raises(NotFoundError):
            await hub.models.list()
        assert script.attempts == 1
        script.reset(("sleep", 1.0))
        with pytest.raises(APITimeoutError):
            await hub.completions.create(model="m", prompt="p")
        assert script.attempts == 1
    async with AsyncAdapterHubClient(base_url=_refused_url(), max_retries=0) as hub:
        with pytest.raises(APIConnectionError):
            await hub.models.list()
