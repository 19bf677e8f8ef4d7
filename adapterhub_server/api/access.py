"""Per-request bookkeeping: the request metrics and one access-log line.

uvicorn's own access log knows neither the route template nor the request id, so this
middleware writes the line that operators search by id. It sits inside the request-id
middleware (which sets the id's context variable) and outside everything else, so that it
sees every status: auth refusals, 413s, validation errors and 500s.
"""

from __future__ import annotations

import logging
import re
import time
import weakref
from typing import Any

from starlette.requests import ClientDisconnect
from starlette.routing import compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from adapterhub_server.api.metrics import (
    BASE_ADAPTER,
    INFERENCE_ROUTES,
    UNKNOWN_ADAPTER,
    UNMATCHED_ROUTE,
    ApiMetrics,
    request_labels,
)

access_logger = logging.getLogger("adapterhub_server.access")

QUIET_ROUTES = frozenset({"/health", "/ready", "/metrics"})
"""Probes and scrapes arrive every few seconds: their lines go out at DEBUG, not INFO."""

CLIENT_CLOSED = 499
"""nginx's "client closed request": what a request whose client left is counted as."""


class AccessMiddleware:
    """Counts and times every HTTP request and logs it once it has been answered."""

    def __init__(self, app: ASGIApp, *, metrics: ApiMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status: int | None = None

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        with request_labels() as labels:
            try:
                await self.app(scope, receive, send_status)
            except BaseException as exc:
                if status is None:
                    status = CLIENT_CLOSED if isinstance(exc, ClientDisconnect) else 500
                raise
            finally:
                seconds = time.perf_counter() - started
                route = route_template(scope)
                adapter = labels.adapter
                if adapter is None:
                    adapter = UNKNOWN_ADAPTER if route in INFERENCE_ROUTES else BASE_ADAPTER
                method = scope["method"]
                final = status if status is not None else 500
                self.metrics.observe_request(
                    route=route, method=method, status=final, adapter=adapter, seconds=seconds
                )
                access_logger.log(
                    logging.DEBUG if route in QUIET_ROUTES else logging.INFO,
                    "%s %s %d %.1fms",
                    method,
                    # Paths arrive percent-decoded: escape newlines and the like so that a
                    # crafted URL cannot forge lines in a text log.
                    scope["path"].encode("unicode_escape").decode("ascii"),
                    final,
                    seconds * 1e3,
                    extra={
                        "method": method,
                        "path": scope["path"],
                        "route": route,
                        "status": final,
                        "duration_ms": round(seconds * 1e3, 3),
                        "adapter": adapter,
                    },
                )


def route_template(scope: Scope) -> str:
    """The path template of the route that served `scope`, or would have served it."""
    route = scope.get("route")  # set by the router once it has matched
    path = getattr(route, "path", None)
    if isinstance(path, str):
        return path
    # Refused before routing (no key, body too large): find the route it was meant for.
    request_path = scope.get("path", "")
    for template, pattern in _templates(scope.get("app")):
        if pattern.fullmatch(request_path):
            return template
    return UNMATCHED_ROUTE


_TEMPLATE_CACHE: weakref.WeakKeyDictionary[Any, list[tuple[str, re.Pattern[str]]]] = (
    weakref.WeakKeyDictionary()
)


def _templates(app: Any) -> list[tuple[str, re.Pattern[str]]]:
    """(template, regex) of every route of `app`, included routers flattened; cached."""
    if app is None:
        return []
    cached = _TEMPLATE_CACHE.get(app)
    if cached is None:
        routes = getattr(getattr(app, "router", None), "routes", ())
        cached = [(t, compile_path(t)[0]) for t in _walk(routes, "")]
        _TEMPLATE_CACHE[app] = cached
    return cached


def _walk(routes: Any, prefix: str) -> list[str]:
    found: list[str] = []
    for route in routes:
        included = getattr(route, "original_router", None)
        if included is not None:  # FastAPI's record of an `include_router`
            found += _walk(included.routes, prefix + route.include_context.prefix)
        elif isinstance(getattr(route, "path", None), str):
            found.append(prefix + route.path)
    return found
