"""What the sync and async clients share: settings, request building, retries, error mapping.

Nothing here does I/O, so `_client.py` and `_async_client.py` differ only in how they send
and sleep.
"""

from __future__ import annotations

import email.utils
import json
import os
import random
import time
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pydantic

from client.errors import (
    APIConnectionError,
    APIResponseValidationError,
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    ConflictError,
    InternalServerError,
    NotFoundError,
    PayloadTooLargeError,
    PermissionDeniedError,
    RateLimitError,
    UnprocessableEntityError,
)

T = TypeVar("T", bound=pydantic.BaseModel)

BASE_URL_ENV = "ADAPTERHUB_BASE_URL"
API_KEY_ENV = "ADAPTERHUB_API_KEY"
DEFAULT_BASE_URL = "http://localhost:8000"
DEFAULT_TIMEOUT = httpx.Timeout(600.0, connect=5.0)
"""Generation on a busy CPU server can take minutes; a dead host should fail fast."""
DEFAULT_MAX_RETRIES = 2

INITIAL_RETRY_DELAY = 0.5
"""Seconds before the first retry when the server names no `Retry-After`; doubles after."""
MAX_RETRY_DELAY = 8.0
"""Cap of the exponential backoff."""
MAX_RETRY_AFTER = 60.0
"""A longer `Retry-After` is capped: a client call should not hang for minutes unasked."""

RETRY_STATUSES = frozenset({429, 503})
"""The server answers these before doing any work (queue full, busy, model unavailable), so
repeating the request is safe whatever the method. 500 is not retried: it is a bug or an
engine failure that a second identical request would most likely hit again."""
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})

_STATUS_ERRORS: dict[int, type[APIStatusError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    409: ConflictError,
    413: PayloadTooLargeError,
    422: UnprocessableEntityError,
    429: RateLimitError,
}

# Error events inside a stream carry no status (the response was already a 200); the
# envelope's code says which status the server would have answered with.
_CODE_STATUS = {
    "model_not_found": 404,
    "not_found": 404,
    "conflict": 409,
    "payload_too_large": 413,
    "server_busy": 503,
    "request_aborted": 503,
    "base_model_unavailable": 503,
}

FileContent = bytes | Path
"""A multipart file part: bytes in memory, or a path opened afresh for every attempt."""
FilePart = tuple[str, tuple[str, FileContent, str]]
"""`(field, (filename, content, content type))`."""


@dataclass(frozen=True)
class RequestOptions:
    """One API call, independent of how many times it is attempted."""

    method: str
    path: str
    """Relative to the server root, e.g. `/v1/models`."""
    params: Mapping[str, Any] | None = None
    json: Any = None
    data: Mapping[str, str] | None = None
    """Multipart form fields (with `files`)."""
    files: Sequence[FilePart] | None = None
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ClientSettings:
    """Constructor arguments after the environment-variable fallbacks."""

    base_url: str
    api_key: str | None
    timeout: httpx.Timeout
    max_retries: int

    @classmethod
    def resolve(
        cls,
        *,
        base_url: str | None,
        api_key: str | None,
        timeout: float | httpx.Timeout | None,
        max_retries: int,
    ) -> ClientSettings:
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        url = base_url or os.environ.get(BASE_URL_ENV) or DEFAULT_BASE_URL
        key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
        if isinstance(timeout, httpx.Timeout):
            resolved = timeout
        else:
            resolved = httpx.Timeout(timeout)
        return cls(
            base_url=normalize_base_url(url),
            api_key=key or None,
            timeout=resolved,
            max_retries=max_retries,
        )

    def headers(self) -> dict[str, str]:
        headers = {"User-Agent": f"adapterhub-python/{_version()}", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers


def normalize_base_url(url: str) -> str:
    """The server root: a trailing `/` or `/v1` (the openai SDK's convention) is dropped."""
    url = url.rstrip("/")
    if url.endswith("/v1"):
        url = url[: -len("/v1")]
    return url


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("adapterhub")
    except Exception:  # not installed as a distribution (a bare checkout)
        return "unknown"


def build_request(
    http: httpx.Client | httpx.AsyncClient,
    settings: ClientSettings,
    options: RequestOptions,
    stack: ExitStack,
) -> httpx.Request:
    """An httpx request for one attempt; files given as paths are opened into `stack`.

    The URL, headers and timeout come from `settings` rather than from `http`, so that an
    `http_client` passed in by the caller needs no particular configuration.
    """
    files = None
    if options.files is not None:
        files = [
            (name, (filename, _open(content, stack), kind))
            for name, (filename, content, kind) in options.files
        ]
    return http.build_request(
        options.method,
        settings.base_url + options.path,
        params=_drop_none(options.params),
        json=options.json,
        data=options.data,
        files=files,
        headers={**settings.headers(), **options.headers},
        timeout=settings.timeout,
    )


def _open(content: FileContent, stack: ExitStack) -> Any:
    if isinstance(content, Path):
        return stack.enter_context(open(content, "rb"))
    return content


def _drop_none(params: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if params is None:
        return None
    return {k: v for k, v in params.items() if v is not None}


def should_retry_error(exc: httpx.TransportError, method: str) -> bool:
    """Whether a transport failure may be repeated.

    Connect-phase failures never reached the server, so every method is safe. After the
    request was sent, only idempotent methods are: repeating a timed-out POST could create a
    second fine-tuning job or run a generation twice.
    """
    if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout):
        return True
    return method.upper() in IDEMPOTENT_METHODS


def transport_error(exc: httpx.TransportError, request: httpx.Request | None) -> Exception:
    """The client exception for an httpx transport failure."""
    if isinstance(exc, httpx.TimeoutException):
        return APITimeoutError(request=request)
    return APIConnectionError(f"connection error: {exc}", request=request)


def retry_delay(attempt: int, response: httpx.Response | None) -> float:
    """Seconds to wait before retry number `attempt + 1` (attempt counts from 0).

    The server's `Retry-After` wins (seconds or an HTTP date, capped); otherwise exponential
    backoff with jitter, so that many clients refused at once do not return in lockstep.
    """
    if response is not None:
        after = parse_retry_after(response.headers.get("retry-after"))
        if after is not None:
            return min(after, MAX_RETRY_AFTER)
    base = min(INITIAL_RETRY_DELAY * 2.0**attempt, MAX_RETRY_DELAY)
    return base * (1 - 0.25 * random.random())


def parse_retry_after(value: str | None) -> float | None:
    """`Retry-After` in seconds: a number, or an HTTP date; None when absent or unreadable."""
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError, IndexError):
            return None
    if seconds != seconds:  # NaN
        return None
    return max(seconds, 0.0)


def decode_body(response: httpx.Response) -> Any:
    """The response's JSON, or its text when it is not JSON (a proxy's HTML page)."""
    try:
        return response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return response.text


def status_error(response: httpx.Response) -> APIStatusError:
    """The exception for a 4xx/5xx response whose body has been read."""
    body = decode_body(response)
    return make_status_error(response.status_code, body, response)


def make_status_error(status: int, body: Any, response: httpx.Response | None) -> APIStatusError:
    """The exception class for `status`, carrying the envelope in `body`."""
    detail = body.get("error") if isinstance(body, dict) else None
    if isinstance(detail, dict) and isinstance(detail.get("message"), str):
        message = detail["message"]
    elif isinstance(body, str) and body:
        message = body[:500]
    else:
        message = f"HTTP {status}"
    cls = _STATUS_ERRORS.get(status)
    if cls is None:
        cls = InternalServerError if status >= 500 else APIStatusError
    return cls(message, status_code=status, response=response, body=body)


def stream_error(body: dict[str, Any], response: httpx.Response) -> APIStatusError:
    """The exception for an error event sent after a stream had started."""
    detail = body.get("error")
    detail = detail if isinstance(detail, dict) else {}
    status = _CODE_STATUS.get(str(detail.get("code")))
    if status is None:
        status = 500 if detail.get("type") == "server_error" else 400
    return make_status_error(status, body, response)


def parse_model(response: httpx.Response, cast_to: type[T]) -> T:
    """The body of a 2xx response as `cast_to`."""
    body = decode_body(response)
    try:
        return cast_to.model_validate(body)
    except pydantic.ValidationError as exc:
        raise APIResponseValidationError(
            f"the response of {response.request.method} {response.request.url.path} "
            f"is not a valid {cast_to.__name__}: {exc}",
            response=response,
            body=body,
        ) from exc
