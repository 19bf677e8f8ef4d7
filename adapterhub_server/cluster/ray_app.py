"""AdapterHub as a Ray Serve application: engine replicas behind an adapter-affinity router.

Two deployments:

- `AdapterEngine`: one engine and the unchanged HTTP app per replica (`server.build_server`
  and `server.build_app`), driven in-process through ASGI. Its adapters are Ray Serve
  multiplexed models keyed by the resolved adapter version, with
  `max_num_models_per_replica` = `--max-cpu-loras`, so Ray's router knows which replicas
  hold which adapter.
- `AdapterRouter`: the HTTP ingress behind Ray's proxy. Clients do not send Serve's
  `serve_multiplexed_model_id` header, so it reads the body's `model`, resolves it to the
  version key (`routing.AdapterKeyResolver`) and calls the engine with
  `multiplexed_model_id` set: an adapter's requests go to replicas that already hold it,
  base-model and other requests anywhere.

Every response carries `x-adapterhub-replica`, the id of the engine replica that served
it. A replica that dies is replaced by Ray; a request it held is retried on another replica
while nothing has been sent to the client, else the stream ends with an error event, and a
request that cannot be placed gets 503 with Retry-After. Each replica resolves the
request's `model` itself, so routing can cost an adapter load but never serve another
adapter.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import signal
import threading
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve._private.request_router.pow_2_router import PowerOfTwoChoicesRequestRouter
from ray.serve.config import RequestRouterConfig
from ray.serve.handle import DeploymentHandle
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from adapterhub_server.api.errors import SERVER_ERROR, ApiError, error_response
from adapterhub_server.cluster.routing import AdapterKeyResolver
from adapterhub_server.config import ServerConfig

logger = logging.getLogger(__name__)

APP_NAME = "adapterhub"
ENGINE_DEPLOYMENT = "AdapterEngine"
ROUTER_DEPLOYMENT = "AdapterRouter"
REPLICA_HEADER = "x-adapterhub-replica"
PLACEMENT_ATTEMPTS = 3
LOCAL_OBJECT_STORE_BYTES = 256 * 1024**2
"""Tries per request while its replica dies before answering (Ray replaces it meanwhile)."""


class AdapterAffinityRouter(PowerOfTwoChoicesRequestRouter):
    """Ray Serve's multiplexed routing made deterministic per adapter.

    Ray's default picks at random among the replicas that hold an adapter, and at random
    among the least-loaded ones (fewest adapters) when none holds it. Both keep the
    replicas' adapter sets from settling: replicas report what they hold every 0.1 s or
    so, so two requests for a new adapter often land on two replicas, and a copy that lives
    on two replicas stays alive on both; when the replicas' capacities add up to about the
    adapters in use, each such copy pushes another adapter out, which lands at random
    again. Here the choice among holders, and among the least-loaded replicas, is the
    highest rendezvous hash of adapter and replica id: concurrent first requests agree, a
    spare copy gets no requests and ages out of its replica's LRU, and the replicas
    converge to disjoint adapter sets. While that replica's queue is at `spill_at` or more,
    Ray's own choice stands, so a hot adapter still spreads.
    """

    _spill_at = 64

    def initialize_state(self, spill_at: int = 64, **kwargs: Any) -> None:
        super().initialize_state(**kwargs)
        self._spill_at = spill_at

    async def choose_replicas(self, candidate_replicas: list[Any], pending_request: Any = None):
        ranks = await super().choose_replicas(candidate_replicas, pending_request)
        model_id = pending_request.metadata.multiplexed_model_id if pending_request else ""
        if not model_id or not ranks:
            return ranks
        pool = [r for r in candidate_replicas if model_id in r.multiplexed_model_ids]
        if not pool:
            fewest = self._get_replica_ids_with_fewest_multiplexed_models()
            pool = [r for r in candidate_replicas if r.replica_id in fewest]
        if not pool:
            return ranks
        first = max(pool, key=lambda r: _rendezvous(model_id, r.replica_id.unique_id))
        queued = self._replica_queue_len_cache.get(first.replica_id)
        if queued is not None and queued >= self._spill_at:
            return ranks
        return [[first]]


def _rendezvous(key: str, replica: str) -> bytes:
    return hashlib.blake2b(f"{key}\0{replica}".encode(), digest_size=8).digest()


@dataclass(frozen=True)
class _Resident:
    """What Ray's multiplexer holds per adapter: a marker only. The engine's own cache
    (`--max-cpu-loras` parsed copies, `--max-loras` device slots) owns the weights and
    never drops one a running request uses, so Ray's LRU unload needs no action."""

    key: str


@serve.deployment(name=ENGINE_DEPLOYMENT)
class AdapterEngine:
    """One engine replica: the single-machine server's app, called through ASGI."""

    async def __init__(self, config: ServerConfig) -> None:
        from adapterhub_server.server import build_app, build_server

        self.replica_id = serve.get_replica_context().replica_id.unique_id
        server = await asyncio.to_thread(build_server, config)
        self._app = build_app(server.engine, server)
        self._stop = asyncio.Event()
        started = asyncio.get_running_loop().create_future()
        self._lifespan = asyncio.create_task(self._run_lifespan(started))
        await started

        async def load(key: str) -> _Resident:
            return _Resident(key)

        self._hold = serve.multiplexed(max_num_models_per_replica=config.engine.max_cpu_loras)(load)

    async def _run_lifespan(self, started: asyncio.Future[None]) -> None:
        try:
            async with self._app.router.lifespan_context(self._app):
                started.set_result(None)
                await self._stop.wait()
        except BaseException as exc:
            if not started.done():
                started.set_exception(exc)
            raise

    async def __del__(self) -> None:
        self._stop.set()
        await self._lifespan

    async def serve_http(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any] | bytes]:
        """Serve one HTTP request (the dict `AdapterRouter` sends: method, path,
        query_string, headers, body, client): yields the response head ({"status",
        "headers"}) once, then body chunks as the app sends them."""
        key = serve.get_multiplexed_model_id()
        if key:
            await self._hold(key)
        messages: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        disconnected = asyncio.Event()
        sent_body = False

        async def receive() -> dict[str, Any]:
            nonlocal sent_body
            if not sent_body:
                sent_body = True
                return {"type": "http.request", "body": request["body"], "more_body": False}
            await disconnected.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            await messages.put(message)

        async def run() -> None:
            try:
                await self._app(_scope(request), receive, send)
            finally:
                await messages.put(None)

        task = asyncio.create_task(run())
        try:
            while (message := await messages.get()) is not None:
                if message["type"] == "http.response.start":
                    headers = [
                        (k.decode("latin-1"), v.decode("latin-1"))
                        for k, v in message.get("headers", [])
                    ]
                    headers.append((REPLICA_HEADER, self.replica_id))
                    yield {"status": message["status"], "headers": headers}
                elif message["type"] == "http.response.body":
                    if body := message.get("body", b""):
                        yield body
                    if not message.get("more_body", False):
                        break
            await task
        finally:
            # The caller went away (client disconnect): the app frees the request's slot.
            disconnected.set()
            if not task.done():
                await asyncio.wait({task}, timeout=5)
                task.cancel()


def _scope(request: Mapping[str, Any]) -> dict[str, Any]:
    path: str = request["path"]
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": request["method"],
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": request["query_string"],
        "headers": [(k.encode("latin-1"), v.encode("latin-1")) for k, v in request["headers"]],
        "client": request.get("client"),
        "server": None,
        "state": {},
    }


@serve.deployment(name=ROUTER_DEPLOYMENT)
class AdapterRouter:
    """HTTP ingress: routes each request to an engine replica by its adapter version."""

    def __init__(
        self, engine: DeploymentHandle, config: ServerConfig, affinity: bool = True
    ) -> None:
        self._engine = engine
        # Without affinity (a baseline for benchmarks) every request goes anywhere.
        self._resolver = AdapterKeyResolver.from_config(config) if affinity else None
        self._max_body = max(config.max_upload_bytes, config.max_request_bytes)

    async def __call__(self, request: Request) -> Response:
        body = await self._read_body(request)
        key = ""
        if self._resolver is not None:
            key = await asyncio.to_thread(
                self._resolver.key_for, request.method, request.url.path, body
            )
        payload = {
            "method": request.method,
            "path": request.url.path,
            "query_string": request.url.query.encode(),
            "headers": [(k, v) for k, v in request.headers.items()],
            "body": body,
            "client": (request.client.host, request.client.port) if request.client else None,
        }
        handle = self._engine.options(stream=True, multiplexed_model_id=key)
        for attempt in range(PLACEMENT_ATTEMPTS):
            stream = handle.serve_http.remote(payload)
            try:
                head = await stream.__anext__()
                if not _is_event_stream(head["headers"]):
                    # Buffered whole: a replica dying mid-answer can still be retried.
                    chunks = [chunk async for chunk in stream]
                    response = Response(b"".join(chunks), status_code=head["status"])
                    response.raw_headers = _raw(head["headers"])
                    return response
            except (RayActorError, ActorUnavailableError) as exc:
                stream.cancel()
                logger.warning(
                    "engine replica lost (attempt %d of %d): %s",
                    attempt + 1,
                    PLACEMENT_ATTEMPTS,
                    exc,
                )
                await asyncio.sleep(0.2 * (attempt + 1))
                continue
            response = StreamingResponse(_events(stream), status_code=head["status"])
            response.raw_headers = _raw(head["headers"])
            return response
        return error_response(
            ApiError(
                "no engine replica could take the request; retry shortly",
                status=503,
                type=SERVER_ERROR,
                code="replica_unavailable",
            )
        )

    async def _read_body(self, request: Request) -> bytes:
        # Past the largest limit the rest is not read: the replica sees a body over its limit
        # (or the declared Content-Length) and answers 413 itself.
        chunks, size = [], 0
        async for chunk in request.stream():
            chunks.append(chunk)
            size += len(chunk)
            if size > self._max_body:
                break
        return b"".join(chunks)


async def _events(stream: AsyncIterator[Any]) -> AsyncIterator[bytes]:
    try:
        async for chunk in stream:
            yield chunk
    except (RayActorError, ActorUnavailableError):
        # Tokens already went out, so no retry: end the stream with an error event.
        logger.warning("engine replica lost mid-stream", exc_info=True)
        yield (
            b'data: {"error": {"message": "the engine replica serving this stream stopped; '
            b'retry the request", "type": "server_error", "param": null, '
            b'"code": "replica_unavailable"}}\n\n'
        )


def _is_event_stream(headers: Sequence[tuple[str, str]]) -> bool:
    return any(
        k.lower() == "content-type" and v.startswith("text/event-stream") for k, v in headers
    )


def _raw(headers: Sequence[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
    return [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers]


def build_application(
    config: ServerConfig,
    *,
    replicas: int | None = None,
    engine_actor_options: Mapping[str, Any] | None = None,
    affinity: bool = True,
) -> Any:
    """The Ray Serve application (router over `replicas` engine replicas; None leaves the
    count to the deployment's config, e.g. its autoscaling settings). `affinity=False`
    routes every request with Ray Serve's default policy (the benchmark's baseline)."""
    device = config.engine.device
    gpu = device.startswith("cuda") or (
        device == "auto" and config.engine.torch_device().type == "cuda"
    )
    actor_options = dict(engine_actor_options or {"num_cpus": 1, "num_gpus": 1 if gpu else 0})
    options: dict[str, Any] = {
        "ray_actor_options": actor_options,
        # Each replica has its own bounded queue (429 past it); Ray may send as many.
        "max_ongoing_requests": config.engine.max_num_seqs + config.engine.max_queued_requests,
        "health_check_timeout_s": 60,
        "graceful_shutdown_timeout_s": config.shutdown_timeout,
    }
    if affinity:
        options["request_router_config"] = RequestRouterConfig(
            request_router_class=AdapterAffinityRouter,
            request_router_kwargs={"spill_at": config.engine.max_num_seqs},
        )
    if replicas is not None:
        options["num_replicas"] = replicas
    engine = AdapterEngine.options(**options).bind(config)
    return AdapterRouter.options(
        ray_actor_options={"num_cpus": 0}, max_ongoing_requests=10_000
    ).bind(engine, config, affinity)


def app_builder(args: Mapping[str, Any]) -> Any:
    """Application builder for `serve run` / `serve deploy` config files: `args` maps
    `adapterhub-server cluster` flags, without the dashes (`max_loras: 4`,
    `lora_modules: ["a=/path"]`, `no_registry: true`), to their values."""
    from adapterhub_server.cli import build_parser, config_from_args

    parsed = build_parser().parse_args(["cluster", *args_to_argv(args)])
    # Without `replicas` the config file's autoscaling settings (or num_replicas) decide.
    replicas = parsed.replicas if "replicas" in args else None
    return build_application(config_from_args(parsed), replicas=replicas)


def args_to_argv(args: Mapping[str, Any]) -> list[str]:
    """`{"max_loras": 4, "no_registry": True, "lora_modules": ["a=/p"]}` ->
    `["--max-loras", "4", "--no-registry", "--lora-modules", "a=/p"]`."""
    argv: list[str] = []
    for name, value in args.items():
        flag = "--" + str(name).replace("_", "-")
        if value is None or value is False:
            continue
        if value is True:
            argv.append(flag)
        elif isinstance(value, list | tuple):
            argv += [flag, *(str(v) for v in value)]
        else:
            argv += [flag, str(value)]
    return argv


def run_cluster(config: ServerConfig, *, replicas: int, ray_address: str | None) -> int:
    """`adapterhub-server cluster`: deploy the application on Ray (the cluster at
    `ray_address`, else a local one) with Ray's HTTP proxy on `config.host:config.port`, and
    keep it up until SIGTERM or SIGINT."""
    import ray

    from adapterhub_server.server import check_exposure

    check_exposure(config)
    own_ray = False
    if not ray.is_initialized():
        address = ray_address or os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address)
        else:
            # A Ray of our own on this machine: loopback only (the HTTP proxy still binds
            # `config.host`), and a small object store: only request and response bodies
            # pass through it (Ray spills larger ones, such as uploads, to disk).
            ray.init(
                address="local",
                _node_ip_address="127.0.0.1",
                include_dashboard=False,
                object_store_memory=LOCAL_OBJECT_STORE_BYTES,
            )
            own_ray = True
    # Installed after ray.init (which sets its own SIGTERM handler) and before the
    # deployment, so a signal during start-up stops it cleanly too.
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": config.host, "port": config.port})
        serve.run(
            build_application(config, replicas=replicas),
            name=APP_NAME,
            route_prefix="/",
            blocking=False,
        )
        logger.info(
            "serving %d engine replicas on http://%s:%d (Ray Serve)",
            replicas,
            config.host,
            config.port,
        )
        stop.wait()
        logger.info("stopping the Ray Serve application")
        serve.delete(APP_NAME)
    finally:
        if own_ray:  # a shared cluster's Serve instance is not ours to stop
            serve.shutdown()
            ray.shutdown()
    return 0
