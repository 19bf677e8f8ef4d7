"""Builds the FastAPI application around an engine."""

from __future__ import annotations

import logging
import re
import uuid
from typing import Any

from fastapi import FastAPI
from starlette.datastructures import MutableHeaders
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from adapterhub_server.api.access import AccessMiddleware
from adapterhub_server.api.adapters_service import AdapterAdminService
from adapterhub_server.api.auth import PUBLIC_PATHS, ApiKeyMiddleware, ApiKeys
from adapterhub_server.api.errors import error_response, install_error_handlers
from adapterhub_server.api.lora_admin import LoraAdminService
from adapterhub_server.api.metrics import ApiMetrics
from adapterhub_server.api.routes import adapters as adapter_routes
from adapterhub_server.api.routes import chat, completions, health, models
from adapterhub_server.api.routes import files as file_routes
from adapterhub_server.api.routes import fine_tuning as fine_tuning_routes
from adapterhub_server.api.routes import lora_admin as lora_admin_routes
from adapterhub_server.api.routes import metrics as metrics_routes
from adapterhub_server.api.routes import tokenize as tokenize_routes
from adapterhub_server.api.service import InferenceService
from adapterhub_server.api.tokenize_service import TokenizeService
from adapterhub_server.config import DEFAULT_MAX_PROMPTS_PER_REQUEST, DEFAULT_MAX_REQUEST_BYTES
from adapterhub_server.engine.protocol import EngineClient
from adapterhub_server.errors import PayloadTooLargeError
from adapterhub_server.finetune.service import FineTuningService
from adapterhub_server.logs import request_id_context

logger = logging.getLogger(__name__)

REQUEST_ID_HEADER = "x-request-id"
# A client-sent id is echoed into a header and into logs: accept only short, plain tokens.
_VALID_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")


def create_app(
    engine: EngineClient,
    *,
    served_model_name: str | None = None,
    adapters: AdapterAdminService | None = None,
    fine_tuning: FineTuningService | None = None,
    max_upload_bytes: int = 2 * 1024**3,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    max_prompts_per_request: int = DEFAULT_MAX_PROMPTS_PER_REQUEST,
    api_keys: ApiKeys | None = None,
    tool_call_parser: str = "auto",
    lora_admin: LoraAdminService | None = None,
    metrics_without_key: bool = False,
    admin_loopback_without_key: bool = False,
) -> FastAPI:
    """The OpenAI-compatible HTTP API over `engine`.

    `served_model_name` is the id under which clients address the base model (default: the
    engine's `base_model_id`). Inference, `/v1/models`, `/tokenize` and `/detokenize` are
    always mounted; with `adapters` (a registry), the `/v1/adapters` management routes too;
    with `fine_tuning`, `/v1/files` and `/v1/fine_tuning/jobs`. Uploads over
    `max_upload_bytes`, and other bodies over `max_request_bytes`, get 413 while the body is
    read; a completion request with more than `max_prompts_per_request` prompts is a 400.
    Neither the engine nor the job runner is started or stopped here: whoever owns them
    wires their lifetime to the app's lifespan. With `api_keys`, every route but `/health`
    and `/ready` needs a bearer key of the right scope. `tool_call_parser` is
    `--tool-call-parser`. With `lora_admin`, vLLM's `/v1/load_lora_adapter` and
    `/v1/unload_lora_adapter` are mounted (admin scope). `metrics_without_key` and
    `admin_loopback_without_key` are the flags of the same names (see `api/auth.py`).
    """
    app = FastAPI(
        title="AdapterHub",
        summary="Many LoRA adapters over one frozen base model, OpenAI-compatible.",
    )
    app.state.engine = engine
    # One registry per app: several apps in one process must not share counts.
    app.state.metrics = metrics = ApiMetrics(engine)
    app.state.service = InferenceService(
        engine,
        served_model_name=served_model_name,
        metrics=metrics,
        max_prompts_per_request=max_prompts_per_request,
        tool_call_parser=tool_call_parser,
    )
    app.state.tokenize_service = TokenizeService(app.state.service)
    install_error_handlers(app)
    routers = (health.router, metrics_routes.router, models.router, completions.router)
    for router in (*routers, chat.router, tokenize_routes.router):
        app.include_router(router)
    if adapters is not None:
        app.state.adapter_service = adapters
        app.include_router(adapter_routes.router)
    if lora_admin is not None:
        app.state.lora_admin_service = lora_admin
        app.include_router(lora_admin_routes.router)
    if fine_tuning is not None:
        app.state.fine_tuning_service = fine_tuning
        app.include_router(file_routes.router)
        app.include_router(fine_tuning_routes.router)
    app.add_middleware(
        BodySizeLimitMiddleware, max_upload_bytes=max_upload_bytes, max_bytes=max_request_bytes
    )
    keys = api_keys or ApiKeys()
    # Added after the size limit, so it runs before it: no body is read for a caller
    # without a key. Inside the request-id middleware, so refusals carry an id too.
    app.add_middleware(
        ApiKeyMiddleware,
        keys=keys,
        metrics_without_key=metrics_without_key,
        admin_loopback_without_key=admin_loopback_without_key,
    )
    # Outside auth (refusals are counted), inside the request id (access lines carry it).
    app.add_middleware(AccessMiddleware, metrics=metrics)
    app.add_middleware(RequestIdMiddleware)
    _customize_openapi(app, bearer_auth=keys.enabled)
    return app


def _customize_openapi(app: FastAPI, *, bearer_auth: bool) -> None:
    """Drop FastAPI's generated 422 responses (validation errors are answered with 400) and,
    when keys are required, declare the bearer scheme on every protected operation."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = generate()
            for route, path in schema.get("paths", {}).items():
                for operation in path.values():
                    operation.get("responses", {}).pop("422", None)
                    if bearer_auth and route not in PUBLIC_PATHS:
                        operation["security"] = [{"bearer": []}]
            if bearer_auth:
                schemes = schema.setdefault("components", {}).setdefault("securitySchemes", {})
                schemes["bearer"] = {"type": "http", "scheme": "bearer"}
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


class RequestIdMiddleware:
    """Tags every response with `x-request-id`, and answers unexpected errors with a 500.

    The id is the client's own `x-request-id` when it sent a sane one, else a new one; it
    is stored as `request.state.request_id`. Unexpected exceptions are turned into the error
    envelope here rather than by Starlette's outermost handler, which would answer outside
    this middleware (no request id) and in plain text.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = _client_request_id(scope) or uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                MutableHeaders(scope=message)[REQUEST_ID_HEADER] = request_id
            await send(message)

        # Every log record written while serving the request carries its id.
        with request_id_context(request_id):
            try:
                await self.app(scope, receive, send_with_id)
            except ClientDisconnect:
                # How ASGI 2.4 servers end a stream whose client left: normal, no answer.
                logger.debug("client of request %s disconnected", request_id)
            except Exception as exc:
                if started:  # too late for a status; the server closes the connection
                    raise
                logger.exception("unhandled error in request %s", request_id)
                await error_response(exc)(scope, receive, send_with_id)


def _client_request_id(scope: Scope) -> str | None:
    for name, value in scope.get("headers", ()):
        if name == REQUEST_ID_HEADER.encode():
            text = value.decode("latin-1")
            return text if _VALID_REQUEST_ID.fullmatch(text) else None
    return None


UPLOAD_ROUTES = {"/v1/adapters": "files", "/v1/files": "file"}
"""POST routes whose bodies are uploads, and the multipart field that carries the payload."""


class BodySizeLimitMiddleware:
    """Refuses request bodies over the limit with 413, counting bytes as they arrive.

    Uploads (`UPLOAD_ROUTES`) may be up to `max_upload_bytes`; every other body (JSON) up
    to `max_bytes`. Content-Length is checked up front but not trusted: a chunked or lying
    body is cut off the moment it passes the limit, before it is buffered anywhere.
    """

    def __init__(self, app: ASGIApp, *, max_upload_bytes: int, max_bytes: int) -> None:
        self.app = app
        self.max_upload_bytes = max_upload_bytes
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        param = UPLOAD_ROUTES.get(scope.get("path", "")) if scope["method"] == "POST" else None
        limit = self.max_upload_bytes if param is not None else self.max_bytes
        for key, value in scope.get("headers", []):
            if key == b"content-length" and value.isdigit() and int(value) > limit:
                await error_response(_too_large(limit, param))(scope, receive, send)
                return
        seen = 0
        too_large: PayloadTooLargeError | None = None
        answered = False

        async def counting_receive() -> Message:
            nonlocal seen, too_large
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    too_large = _too_large(limit, param)
                    raise too_large
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal answered
            if too_large is None:
                await send(message)
            elif not answered:
                # Body parsers turn the error into their own 400 ("error parsing the body");
                # whatever the app answers then, the client gets the 413.
                answered = True
                await error_response(too_large)(scope, receive, send)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except PayloadTooLargeError:
            if too_large is None or answered:
                raise
            await error_response(too_large)(scope, receive, send)


def _too_large(limit: int, param: str | None) -> PayloadTooLargeError:
    flag = "--max-upload-bytes" if param is not None else "--max-request-bytes"
    return PayloadTooLargeError.over("the request body", limit, flag=flag, param=param)
