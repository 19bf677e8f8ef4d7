"""The exceptions the client raises: one class per HTTP status family, as openai-python does.

Every error the server answers carries OpenAI's envelope
`{"error": {"message", "type", "param", "code"}}`; `APIStatusError` exposes its fields and
the `x-request-id` header, which names the request in the server's logs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import httpx

if TYPE_CHECKING:
    from client.types import FineTuningJob

__all__ = [
    "APIConnectionError",
    "APIError",
    "APIResponseValidationError",
    "APIStatusError",
    "APITimeoutError",
    "AdapterHubError",
    "AuthenticationError",
    "BadRequestError",
    "ConflictError",
    "FineTuningJobCancelledError",
    "FineTuningJobFailedError",
    "FineTuningJobTimeoutError",
    "IntegrityError",
    "InternalServerError",
    "NotFoundError",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "RateLimitError",
    "UnprocessableEntityError",
]


class AdapterHubError(Exception):
    """Base of every exception this package raises."""


class APIError(AdapterHubError):
    """A request failed: no answer, an error answer, or an answer that does not parse."""

    message: str
    """What went wrong."""
    request: httpx.Request | None
    """The request that failed, when one was sent."""
    body: Any
    """The decoded JSON error body (the OpenAI envelope), or the raw text, or None."""

    def __init__(self, message: str, *, request: httpx.Request | None, body: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.request = request
        self.body = body


class APIConnectionError(APIError):
    """The server could not be reached, or the connection broke before an answer came."""

    def __init__(
        self, message: str = "connection error", *, request: httpx.Request | None = None
    ) -> None:
        super().__init__(message, request=request)


class APITimeoutError(APIConnectionError):
    """The request took longer than the client's `timeout`."""

    def __init__(self, *, request: httpx.Request | None = None) -> None:
        super().__init__("request timed out", request=request)


class APIResponseValidationError(APIError):
    """A 2xx answer did not match the expected schema (a server of another version?)."""

    response: httpx.Response
    status_code: int

    def __init__(self, message: str, *, response: httpx.Response, body: Any = None) -> None:
        super().__init__(message, request=response.request, body=body)
        self.response = response
        self.status_code = response.status_code


class APIStatusError(APIError):
    """The server answered with a 4xx or 5xx status.

    Subclasses name the common statuses; this class itself covers the rest (413, 405, ...).
    """

    status_code: int
    """The HTTP status (for an error event inside a stream: the status it stands for)."""
    response: httpx.Response | None
    """The response, when there was one."""
    request_id: str | None
    """The `x-request-id` response header: quote it when reporting a server problem."""
    code: str | None
    """The envelope's machine-readable code (`model_not_found`, `context_length_exceeded`)."""
    param: str | None
    """The request field at fault (`model`, `messages[0].content`), if any."""
    type: str | None
    """The envelope's error type: `invalid_request_error` or `server_error`."""

    def __init__(
        self,
        message: str,
        *,
        status_code: int,
        response: httpx.Response | None = None,
        body: Any = None,
    ) -> None:
        super().__init__(
            message, request=response.request if response is not None else None, body=body
        )
        self.status_code = status_code
        self.response = response
        self.request_id = response.headers.get("x-request-id") if response is not None else None
        detail = body.get("error") if isinstance(body, dict) else None
        detail = detail if isinstance(detail, dict) else {}
        self.code = _str_or_none(detail.get("code"))
        self.param = _str_or_none(detail.get("param"))
        self.type = _str_or_none(detail.get("type"))

    def __str__(self) -> str:
        suffix = f" (request id {self.request_id})" if self.request_id else ""
        return f"{self.status_code} {self.message}{suffix}"


class BadRequestError(APIStatusError):
    """400: an invalid request (a value out of range, a prompt over the context, ...)."""


class AuthenticationError(APIStatusError):
    """401: a missing or wrong API key."""


class PermissionDeniedError(APIStatusError):
    """403: the key may not do this (e.g. an inference key on an admin route)."""


class NotFoundError(APIStatusError):
    """404: an unknown model, adapter, version, alias, file, job or route."""


class ConflictError(APIStatusError):
    """409: the resource is in use, aliased, or already finished."""


class PayloadTooLargeError(APIStatusError):
    """413: an upload over the server's `--max-upload-bytes`."""


class UnprocessableEntityError(APIStatusError):
    """422: the request was well-formed but cannot be processed."""


class RateLimitError(APIStatusError):
    """429: too many requests; retried automatically, honouring `Retry-After`."""


class InternalServerError(APIStatusError):
    """5xx: a fault on the server's side (503 busy is retried automatically)."""


class IntegrityError(AdapterHubError):
    """A downloaded file's sha256 differs from the one the registry recorded."""


class FineTuningJobFailedError(AdapterHubError):
    """A fine-tuning job that `wait()` followed ended without succeeding."""

    job: FineTuningJob
    """The job as last seen, with `status` and `error`."""
    code: str | None
    """The job error's code (`invalid_training_data`, `trainer_crashed`, ...), if any."""

    def __init__(self, job: FineTuningJob) -> None:
        self.job = job
        self.code = job.error.code if job.error is not None else None
        reason = job.error.message if job.error is not None else "no reason given"
        super().__init__(f"fine-tuning job {job.id} {job.status}: {reason}")


class FineTuningJobCancelledError(FineTuningJobFailedError):
    """The job was cancelled before it finished."""


class FineTuningJobTimeoutError(AdapterHubError, TimeoutError):
    """`wait()` gave up before the job finished; the job itself keeps running."""

    job: FineTuningJob
    """The job as last seen."""

    def __init__(self, job: FineTuningJob, timeout: float) -> None:
        self.job = job
        super().__init__(
            f"fine-tuning job {job.id} still {job.status} after {timeout:g} s "
            "(it keeps running on the server)"
        )


def _str_or_none(value: object) -> str | None:
    return value if isinstance(value, str) else None
