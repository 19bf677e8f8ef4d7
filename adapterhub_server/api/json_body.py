"""JSON request bodies parsed off the event loop, within `json_limits`' bounds.

FastAPI parses and validates a JSON body on the event loop: a 15 MiB body stalls every other
client for its duration, and deep nesting or huge numbers reach the handlers (or raise
`RecursionError`, a 500). Routes of class `JsonLimitsRoute` parse the body first, within
`json_limits`' bounds, in a worker thread when it is large, and hand FastAPI the result.
"""

from __future__ import annotations

import email.message
from collections.abc import Callable, Coroutine
from typing import Any

import anyio
from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import Response

from adapterhub_server.api.errors import InvalidJsonError
from adapterhub_server.json_limits import JsonLimitError, parse_json

INLINE_BODY_BYTES = 64 * 1024
"""Bodies up to this size are parsed on the loop (about a millisecond at most): a thread hop
would cost as much."""


def is_json_content_type(value: str | None) -> bool:
    """`application/json` or any `application/*+json`, as FastAPI decides it."""
    if not value:
        return False
    message = email.message.Message()
    message["content-type"] = value
    if message.get_content_maintype() != "application":
        return False
    subtype = message.get_content_subtype()
    return subtype == "json" or subtype.endswith("+json")


def parse_body(body: bytes, model: type[BaseModel] | None) -> Any:
    """Parse `body` within the limits; with `model`, also validate it into that model.

    A validated instance passes FastAPI's own validation unchanged (pydantic does not
    revalidate instances), so the cost of validating a large body is paid here, off the
    loop. A body the model rejects is returned as parsed: FastAPI then reports the error in
    its usual shape. Raises `InvalidJsonError`.
    """
    try:
        value = parse_json(body)
    except JsonLimitError as exc:
        raise InvalidJsonError(str(exc)) from None
    if model is None:
        return value
    try:
        return model.model_validate(value)
    except ValidationError:
        return value


class JsonLimitsRoute(APIRoute):
    """An `APIRoute` whose JSON body is parsed (and, when large, validated) in a worker
    thread by `parse_body` before FastAPI sees it."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        model = _single_body_model(self)

        async def handle(request: Request) -> Response:
            if is_json_content_type(request.headers.get("content-type")):
                body = await request.body()
                if len(body) > INLINE_BODY_BYTES:
                    value = await anyio.to_thread.run_sync(parse_body, body, model)
                elif body:
                    value = parse_body(body, None)
                else:
                    return await handler(request)
                # Starlette's Request.json() returns this attribute when it is set.
                request._json = value
            return await handler(request)

        return handle


def _single_body_model(route: APIRoute) -> type[BaseModel] | None:
    """The pydantic model of the route's body when the body is exactly one model, not
    embedded under its parameter name (then FastAPI validates the whole body with it)."""
    params = route.dependant.body_params
    if len(params) != 1 or getattr(params[0].field_info, "embed", False):
        return None
    annotation = params[0].field_info.annotation
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None
