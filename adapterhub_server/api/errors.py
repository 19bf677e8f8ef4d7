"""Maps every failure to one HTTP status and the OpenAI error envelope.

`{"error": {"message", "type", "param", "code"}}` is the body of every non-2xx response and
of an error event inside a stream, whatever raised: a domain error from the engine, a
sampling value out of range, a body FastAPI could not validate, a route that does not exist,
or a bug (500, without the traceback).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

import client.types as wire
from adapterhub_server.engine.sampling_params import SamplingParamsError
from adapterhub_server.errors import (
    AdapterHubError,
    AdapterNotFoundError,
    AdapterValidationError,
    AuthenticationError,
    BaseModelError,
    CapacityError,
    ConflictError,
    ContextLengthError,
    InvalidRequestError,
    NotFoundError,
    PayloadTooLargeError,
    PermissionDeniedError,
    QueueFullError,
    ResourceExhaustedError,
    UpstreamError,
)
from client.types import ErrorDetail, ErrorResponse

logger = logging.getLogger(__name__)

INVALID_REQUEST = "invalid_request_error"
SERVER_ERROR = "server_error"
RETRY_AFTER_SECONDS = "1"
"""Sent with 429s and 503s: the queue drains within a few engine steps, so retrying soon is
fine."""

# Statuses for the domain errors; the first matching class wins.
_DOMAIN_STATUS: tuple[tuple[type[AdapterHubError], int], ...] = (
    (AuthenticationError, 401),
    (PermissionDeniedError, 403),
    (QueueFullError, 429),
    (ResourceExhaustedError, 503),
    (AdapterNotFoundError, 404),
    (NotFoundError, 404),
    (PayloadTooLargeError, 413),
    (ConflictError, 409),
    (UpstreamError, 502),
    (AdapterValidationError, 400),
    (ContextLengthError, 400),
    (InvalidRequestError, 400),
    (CapacityError, 503),
    (BaseModelError, 503),
)

# Pydantic tags a union member's errors with the member's type ("str", "list[int]"); these
# are not field names and must not leak into `param`.
_UNION_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict", "none"})


class ApiError(Exception):
    """An error the API layer itself raises, with its status and envelope fields."""

    def __init__(
        self,
        message: str,
        *,
        status: int,
        type: str,
        code: str | None = None,
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.type = type
        self.code = code
        self.param = param


class ClientDisconnectedError(ApiError):
    """The client went away before the response was ready; nobody reads the answer."""

    def __init__(self) -> None:
        # 499 is nginx's "client closed request": it keeps these out of the 5xx counts.
        super().__init__(
            "client disconnected", status=499, type=INVALID_REQUEST, code="client_disconnected"
        )


class InvalidJsonError(ApiError):
    """A request body that is not JSON within the limits of `adapterhub_server.json_limits`."""

    def __init__(self, reason: str) -> None:
        super().__init__(
            f"request body is not valid JSON: {reason}",
            status=400,
            type=INVALID_REQUEST,
            code="invalid_json",
        )


class NotReadyError(ApiError):
    """503 with Retry-After: the engine is still starting, or is shutting down."""

    def __init__(self) -> None:
        super().__init__(
            "the server is not ready to take requests",
            status=503,
            type=SERVER_ERROR,
            code="not_ready",
        )


class GenerationFailedError(ApiError):
    """The engine ended this request with an error (or aborted it) instead of finishing.

    `code` is the engine's reason: `out_of_memory` and `request_aborted` are transient
    (503, retry), anything else is a server fault (500).
    """

    _TRANSIENT = frozenset({"out_of_memory", "request_aborted", "shutting_down"})

    def __init__(self, message: str, *, code: str = "generation_failed") -> None:
        super().__init__(
            message,
            status=503 if code in self._TRANSIENT else 500,
            type=SERVER_ERROR,
            code=code,
        )


def describe_error(exc: BaseException) -> tuple[int, ErrorResponse, dict[str, str]]:
    """Status, envelope and extra headers for `exc`. Unknown exceptions are 500s."""
    headers: dict[str, str] = {}
    if isinstance(exc, ApiError):
        status, detail = exc.status, _detail(exc.message, exc.type, exc.param, exc.code)
        if status == 503:
            headers["Retry-After"] = RETRY_AFTER_SECONDS
    elif isinstance(exc, SamplingParamsError):
        status, detail = 400, _detail(str(exc), INVALID_REQUEST, exc.param, "invalid_value")
    elif isinstance(exc, AdapterHubError):
        status = next((s for cls, s in _DOMAIN_STATUS if isinstance(exc, cls)), 500)
        kind = INVALID_REQUEST if status < 500 else SERVER_ERROR
        param = exc.param
        if param is None and isinstance(exc, AdapterNotFoundError | AdapterValidationError):
            param = "model"
        detail = _detail(exc.message, kind, param, exc.code)
        if status in (429, 503):
            headers["Retry-After"] = RETRY_AFTER_SECONDS
        elif status == 401:
            headers["WWW-Authenticate"] = "Bearer"

    elif isinstance(exc, RequestValidationError):
        status, detail = 400, _validation_detail(exc.errors())
    elif isinstance(exc, StarletteHTTPException):
        status, detail = exc.status_code, _http_detail(exc)
        headers.update(exc.headers or {})
    else:
        status = 500
        detail = _detail("internal server error", SERVER_ERROR, None, "internal_error")
    return status, ErrorResponse(error=detail), headers


def error_response(exc: BaseException) -> JSONResponse:
    """The JSON response for `exc`."""
    status, body, headers = describe_error(exc)
    return JSONResponse(body.model_dump(mode="json"), status_code=status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    """Route every known exception class to `error_response`.

    Unexpected exceptions are not handled here: the request-id middleware turns them into
    500s, since Starlette would answer them outside every user middleware.
    """

    async def handle(request: Request, exc: Exception) -> JSONResponse:
        if isinstance(exc, StarletteHTTPException) and exc.status_code in (404, 405):
            # Name the attempted route: the most useful hint for a mistyped base URL.
            exc = StarletteHTTPException(
                exc.status_code,
                detail=f"{request.method} {request.url.path}",
                headers=exc.headers,
            )
        response = error_response(exc)
        if response.status_code >= 500:
            logger.warning(
                "request %s failed with %d: %s",
                getattr(request.state, "request_id", "-"),
                response.status_code,
                exc,
            )
        return response

    for cls in (
        ApiError,
        AdapterHubError,
        SamplingParamsError,
        RequestValidationError,
        StarletteHTTPException,
    ):
        app.add_exception_handler(cls, handle)


def _detail(message: str, type: str, param: str | None, code: str | None) -> ErrorDetail:
    return ErrorDetail(message=message, type=type, param=param, code=code)


def _http_detail(exc: StarletteHTTPException) -> ErrorDetail:
    if exc.status_code == 404:
        return _detail(f"no such route: {exc.detail}", INVALID_REQUEST, None, "not_found")
    if exc.status_code == 405:
        message = f"method not allowed: {exc.detail}"
        return _detail(message, INVALID_REQUEST, None, "method_not_allowed")
    kind = INVALID_REQUEST if exc.status_code < 500 else SERVER_ERROR
    return _detail(str(exc.detail), kind, None, None)


UNRECOGNIZED_ARGUMENT = "unrecognized_argument"
"""Code of a request field that is neither OpenAI's nor a documented extension."""

# Validation error types (pydantic's, or raised by `client.types`) that get their own code;
# any other type is `invalid_value`.
_CODES = {
    "extra_forbidden": UNRECOGNIZED_ARGUMENT,
    "unsupported_parameter": "unsupported_parameter",
    "unsupported_value": "unsupported_value",
    "missing": "missing_required_parameter",
}
# Reported before anything else wrong with the body, as OpenAI does: a misspelt field would
# otherwise hide behind the error its absence causes.
_FIRST = ("extra_forbidden", "unsupported_parameter", "unsupported_value")


def _validation_detail(errors: Sequence[Any]) -> ErrorDetail:
    """One envelope for FastAPI's list of validation errors: the most specific first error."""
    if not errors:
        return _detail("invalid request body", INVALID_REQUEST, None, "invalid_value")
    first = errors[0]
    if first.get("type") == "json_invalid":
        reason = (first.get("ctx") or {}).get("error", "")
        message = f"request body is not valid JSON: {reason}".rstrip(": ")
        return _detail(message, INVALID_REQUEST, None, "invalid_json")
    param = _error_param(first)
    if param is None and first.get("type") == "model_attributes_type":
        return _detail(
            "request body must be a JSON object sent with Content-Type: application/json",
            INVALID_REQUEST,
            None,
            "invalid_json",
        )
    chosen = next((e for e in errors if e.get("type") in _FIRST), None)
    if chosen is None:
        # Among errors on the same field (the members of a union), the deepest names the cause.
        same_field = [e for e in errors if (_error_param(e) or "").startswith(param or "")]
        chosen = max(same_field, key=lambda e: len(_error_loc(e)), default=first)
    kind = chosen.get("type")
    param = _error_param(chosen) or param
    code = _CODES.get(kind, "invalid_value")
    if kind == "extra_forbidden":
        return _detail(
            f"Unrecognized request argument supplied: {param}", INVALID_REQUEST, param, code
        )
    message = str(chosen.get("msg", "invalid value")).removeprefix("Value error, ")
    nested = param is not None and ("." in param or "[" in param)
    if param and (kind not in _FIRST or nested):
        message = f"{param}: {message}"
    return _detail(message, INVALID_REQUEST, param, code)


def _error_loc(error: Any) -> tuple[Any, ...]:
    """The error's location, extended by the field a model validator named in `ctx.field`
    (`"tools.1.function.name"`: dotted, list indices as digits)."""
    loc = tuple(error.get("loc", ()))
    field = (error.get("ctx") or {}).get("field")
    if isinstance(field, str) and field:
        loc += tuple(int(part) if part.isdigit() else part for part in field.split("."))
    return loc


def _error_param(error: Any) -> str | None:
    return _param(_error_loc(error))


def _param(loc: Sequence[Any]) -> str | None:
    """`("body", "messages", 0, "content")` -> `"messages[0].content"`.

    Union members' tags are left out: pydantic's type names (`str`, `list[int]`,
    `function-after[...]`) and the names of the wire models (`ChatCompletionNamedToolChoice`),
    which are never field names.
    """
    parts = list(loc)
    if parts and parts[0] in ("body", "query", "path", "header"):
        parts = parts[1:]
    text = ""
    for part in parts:
        if isinstance(part, int):
            text += f"[{part}]"
        elif isinstance(part, str) and not (
            "[" in part or "-" in part or part in _UNION_TAGS or _is_wire_model(part)
        ):
            text += f".{part}" if text else part
    return text or None


def _is_wire_model(name: str) -> bool:
    value = getattr(wire, name, None) if name[:1].isupper() else None
    return isinstance(value, type) and issubclass(value, BaseModel)
