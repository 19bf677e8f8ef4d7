"""Per-request bookkeeping: the request metrics and one access-log line.

uvicorn's own access log knows neither the route template nor the request id, so this
middleware writes the line that operators search by id. It sits inside the request-id
middleware (which sets the id's context variable) and outside everything else, so that it
sees every status: auth refusals, 413s, validation errors and 500s.
"""

from __future__ import annotations

import logging
import time

from starlette.requests import ClientDisconnect
from starlette.routing import Match
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
    if route is None:
        # Refused before routing (no key, body too large): find the route it was meant for.
        routes = getattr(getattr(scope.get("app"), "router", None), "routes", ())
        matches = [(candidate.matches(scope)[0], candidate) for candidate in routes]
        route = next((r for m, r in matches if m is Match.FULL), None) or next(
            (r for m, r in matches if m is Match.PARTIAL), None
        )
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else UNMATCHED_ROUTE
