"""API-key authentication with two scopes, enforced in front of every route.

* `inference`: completions, chat, models, adapter reads, metrics, the OpenAPI document.
* `admin`: everything that changes or reveals operator state: adapter upload, delete and
  aliases, vLLM-style adapter load/unload, training files, fine-tuning jobs. An admin key
  also holds the inference scope.

The check is a middleware rather than a per-route dependency so that it denies by default:
a route added later is protected without anyone remembering to protect it. Only `/health`
and `/ready` are public, because load balancers and orchestrators probe them without keys.

Two opt-in exceptions, for Kubernetes: `--metrics-without-key` makes `/metrics` public (the
inference gateway's endpoint picker and Prometheus scrape without keys), and
`--admin-loopback-without-key` treats a request that carries no key at all and comes from
127.0.0.1 or ::1 as holding the admin key, for an adapter-syncer sidecar in the same pod.
The latter trusts everything that can open a loopback connection to the server: every
container of the pod, and any in-pod proxy (a service-mesh sidecar forwards outside
traffic from loopback); see docs/kubernetes.md.
"""

from __future__ import annotations

import enum
import functools
import hashlib
import hmac
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

from starlette.types import ASGIApp, Receive, Scope, Send

from adapterhub_server.api.errors import error_response
from adapterhub_server.errors import AuthenticationError, PermissionDeniedError

PUBLIC_PATHS = frozenset({"/health", "/ready"})
"""Answered without a key: liveness and readiness probes."""

_ADMIN_PREFIXES = (
    "/v1/files",
    "/v1/fine_tuning",
    "/v1/load_lora_adapter",
    "/v1/unload_lora_adapter",
)
"""Every method under these needs the admin scope (training data is the operator's)."""
_ADMIN_WRITE_PREFIXES = ("/v1/adapters",)
"""Writes under these need the admin scope; reads need the inference scope."""
_READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class AuthScope(enum.Enum):
    INFERENCE = "inference"
    ADMIN = "admin"


def required_scope(method: str, path: str) -> AuthScope | None:
    """The scope a request needs, or None for a public route."""
    if path in PUBLIC_PATHS:
        return None
    if _under(path, _ADMIN_PREFIXES):
        return AuthScope.ADMIN
    if _under(path, _ADMIN_WRITE_PREFIXES) and method.upper() not in _READ_METHODS:
        return AuthScope.ADMIN
    return AuthScope.INFERENCE


def _under(path: str, prefixes: Iterable[str]) -> bool:
    return any(path == p or path.startswith(p + "/") for p in prefixes)


@dataclass(frozen=True)
class ApiKeys:
    """The keys a server accepts. With none at all, authentication is off."""

    inference: tuple[str, ...] = ()
    admin: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if any(not key for key in self.inference + self.admin):
            raise ValueError("API keys must not be empty")

    @property
    def enabled(self) -> bool:
        return bool(self.inference or self.admin)

    def scopes_of(self, token: str) -> frozenset[AuthScope]:
        """Scopes `token` holds (empty: unknown key). Runs in time independent of which key,
        if any, matches: every configured key is compared, each through a fixed-length
        digest so neither content nor length leaks through timing."""
        given = _digest(token)
        is_admin = _matches_any(given, self._admin_digests)
        is_inference = _matches_any(given, self._inference_digests)
        if is_admin:
            return frozenset({AuthScope.ADMIN, AuthScope.INFERENCE})
        if is_inference:
            return frozenset({AuthScope.INFERENCE})
        return frozenset()

    @functools.cached_property
    def _admin_digests(self) -> tuple[bytes, ...]:
        return tuple(_digest(key) for key in self.admin)

    @functools.cached_property
    def _inference_digests(self) -> tuple[bytes, ...]:
        return tuple(_digest(key) for key in self.inference)


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def _matches_any(given: bytes, digests: tuple[bytes, ...]) -> bool:
    found = False
    for digest in digests:
        # No early exit: the loop's duration must not reveal which key matched.
        found |= hmac.compare_digest(given, digest)
    return found


class ApiKeyMiddleware:
    """Answers 401 without a valid bearer key and 403 for a key without the route's scope,
    before the route runs and before any request body is read."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        keys: ApiKeys,
        metrics_without_key: bool = False,
        admin_loopback_without_key: bool = False,
    ) -> None:
        self.app = app
        self.keys = keys
        self.metrics_without_key = metrics_without_key
        self.admin_loopback_without_key = admin_loopback_without_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.keys.enabled:
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        needed = required_scope(scope.get("method", "GET"), path)
        if needed is not None and self.metrics_without_key and path == "/metrics":
            needed = None
        if needed is not None:
            token = _bearer_token(scope)
            held = self.keys.scopes_of(token) if token is not None else frozenset()
            if (
                token is None
                and self.admin_loopback_without_key
                and not _has_authorization(scope)
                and is_loopback_client(scope)
            ):
                held = frozenset({AuthScope.ADMIN, AuthScope.INFERENCE})
            if not held:
                message = (
                    "missing API key: send it as 'Authorization: Bearer <key>'"
                    if token is None
                    else "invalid API key"
                )
                await error_response(AuthenticationError(message))(scope, receive, send)
                return
            if needed not in held:
                denied = PermissionDeniedError(
                    f"this key lacks the {needed.value} scope this route needs; "
                    "use an admin key (--admin-key)"
                )
                await error_response(denied)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _bearer_token(scope: Scope) -> str | None:
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            kind, _, token = value.decode("latin-1").partition(" ")
            token = token.strip()
            return token if kind.lower() == "bearer" and token else None
    return None


def _has_authorization(scope: Scope) -> bool:
    """Any Authorization header at all: a client that sends a wrong one is refused, never
    waved through as a keyless loopback caller."""
    return any(name == b"authorization" for name, _ in scope.get("headers", ()))


_LOOPBACK = (ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1"))


def is_loopback_client(scope: Scope) -> bool:
    """Whether the TCP peer is 127.0.0.1 or ::1 (or ::ffff:127.0.0.1). Only these two: the
    rest of 127.0.0.0/8 is where some service meshes (Istio's 127.0.0.6) forward outside
    traffic from. A Unix socket or an unknown peer is not loopback."""
    client = scope.get("client")
    if not client:
        return False
    try:
        address = ipaddress.ip_address(str(client[0]).strip("[]"))
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address in _LOOPBACK
