"""Put the pieces together: resolve the base model, build the engine, serve the app."""

from __future__ import annotations

import ipaddress
import logging
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from adapterhub_server.api.auth import ApiKeys
from adapterhub_server.api.lora_admin import LoraAdminService, ReplicaAdapterSource
from adapterhub_server.base_model import ResolvedBaseModel, resolve_base_model
from adapterhub_server.config import (
    DEFAULT_MAX_PROMPTS_PER_REQUEST,
    DEFAULT_MAX_REQUEST_BYTES,
    ServerConfig,
)
from adapterhub_server.engine.async_engine import AsyncLLMEngine
from adapterhub_server.engine.build import build_engine
from adapterhub_server.finetune import (
    BaseModelInfo,
    FineTuningLimits,
    FineTuningService,
    RunnerConfig,
    open_fine_tuning,
)
from adapterhub_server.lora.cache import AdapterSource, StaticAdapterSource
from adapterhub_server.registry import (
    BaseModelSpec,
    Registry,
    RegistryAdapterSource,
    RegistryLimits,
)
from adapterhub_server.registry.events import RegistryEventListener

logger = logging.getLogger(__name__)


@dataclass
class Server:
    """A built, not yet started server: the engine and (optionally) its registry and its
    fine-tuning jobs."""

    engine: AsyncLLMEngine
    registry: Registry | None
    max_upload_bytes: int
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    max_prompts_per_request: int = DEFAULT_MAX_PROMPTS_PER_REQUEST
    tool_call_parser: str = "auto"
    fine_tuning: FineTuningService | None = None
    api_keys: ApiKeys = field(default_factory=ApiKeys)
    replica_source: ReplicaAdapterSource | None = None
    """The engine's adapter source; `/v1/load_lora_adapter` changes what it serves."""
    static_adapters: dict[str, Path] = field(default_factory=dict)
    """`--lora-modules`: fixed at start-up; a load of one of these names only re-serves it."""
    allowed_local_adapter_dirs: tuple[Path, ...] = ()
    metrics_without_key: bool = False
    admin_loopback_without_key: bool = False


def resolve_base(config: ServerConfig) -> ResolvedBaseModel:
    """Find (download or convert, once) the base model `config` names."""
    return resolve_base_model(
        config.base_model, cache_dir=config.model_cache_dir, model_id=config.served_model_name
    )


def build_server(config: ServerConfig, base: ResolvedBaseModel | None = None) -> Server:
    """Load the base model, open the registry, validate start-up adapters.

    Adapters resolve first from ``--lora-modules`` (served beside the registry, not copied
    into it), then from the registry, where every reference form works. `base` is
    `resolve_base(config)` when the caller has it already.
    """
    base = base or resolve_base(config)
    model_id = config.served_model_name or base.model_id
    registry = None
    sources: list[AdapterSource] = [StaticAdapterSource(config.lora_modules)]
    if config.registry is not None:
        registry, source = open_server_registry(config, base.path, model_id)
        sources.append(source)
    # Per-replica view: names unloaded here, adapters loaded here without a registry.
    replica_source = ReplicaAdapterSource(sources)
    engine = AsyncLLMEngine.build(
        lambda: build_engine(
            base,
            config.engine,
            lora_modules=config.lora_modules,
            source=replica_source,
        ),
        base_model_id=model_id,
        max_queued_requests=config.engine.max_queued_requests,
    )
    if registry is not None and RegistryEventListener.supported(registry):
        # A shared registry: deletes made on other replicas evict here too.
        RegistryEventListener(registry, engine).start()
    fine_tuning = None
    if registry is not None and config.registry is not None and config.fine_tuning:
        # Jobs publish into this registry and train the model served here, by its path.
        fine_tuning = open_fine_tuning(
            registry,
            config.registry,
            base=BaseModelInfo.from_directory(base.path, model_id),
            jobs_dir=config.jobs_dir,
            runner=RunnerConfig(max_concurrent_jobs=config.max_concurrent_jobs),
            # Jobs are held to what this server can serve and to its work budget.
            limits=FineTuningLimits(
                max_fine_tuning_tokens=config.max_fine_tuning_tokens,
                max_lora_rank=config.engine.max_lora_rank,
            ),
            worker=config.fine_tuning_worker,
            lease_s=config.fine_tuning_lease_s,
            blobs_url=config.registry_blobs,
        )
    return Server(
        engine=engine,
        registry=registry,
        max_upload_bytes=config.max_upload_bytes,
        max_request_bytes=config.max_request_bytes,
        max_prompts_per_request=config.prompts_per_request_limit,
        tool_call_parser=config.tool_call_parser,
        fine_tuning=fine_tuning,
        api_keys=ApiKeys(inference=config.api_keys, admin=config.admin_keys),
        replica_source=replica_source,
        static_adapters=dict(config.lora_modules),
        allowed_local_adapter_dirs=config.allowed_local_adapter_dirs,
        metrics_without_key=config.metrics_without_key,
        admin_loopback_without_key=config.admin_loopback_without_key,
    )


def open_server_registry(
    config: ServerConfig, base_path: Path, model_id: str, *, recover: bool = True
) -> tuple[Registry, RegistryAdapterSource]:
    """`config.registry` opened for serving `model_id` (uploads held to what this server
    can serve), and the adapter source that resolves requests from it. `recover=False`
    for a reader beside the replicas (crash recovery is the writers' business)."""
    assert config.registry is not None
    spec = BaseModelSpec.from_directory(base_path, model_id)
    registry = Registry.open(
        config.registry,
        blobs=config.registry_blobs,
        base=spec,
        limits=RegistryLimits(
            max_lora_rank=config.engine.max_lora_rank,
            max_upload_bytes=config.max_upload_bytes,
            serving_dtype=config.engine.torch_dtype(),
        ),
        recover=recover,
    )
    return registry, RegistryAdapterSource(registry, base_fingerprint=spec.fingerprint)


def build_async_engine(config: ServerConfig) -> AsyncLLMEngine:
    """The engine alone (no registry routes); the engine thread is not started."""
    return build_server(replace(config, registry=None)).engine


def build_app(engine: AsyncLLMEngine, server: Server | None = None) -> Any:
    """The FastAPI app over `engine`; the engine thread and the fine-tuning job runner run
    for the app's lifetime."""
    import anyio

    from adapterhub_server.api.adapters_service import AdapterAdminService
    from adapterhub_server.api.app import create_app
    from adapterhub_server.api.metrics import observe_engine

    adapters = None
    if server is not None and server.registry is not None:
        adapters = AdapterAdminService(server.registry, engine)
    lora_admin = None
    if server is not None and server.replica_source is not None:
        lora_admin = LoraAdminService(
            engine,
            server.replica_source,
            registry=server.registry,
            allowed_local_dirs=server.allowed_local_adapter_dirs,
            static_adapters=server.static_adapters,
        )
    fine_tuning = server.fine_tuning if server is not None else None
    app = create_app(
        engine,
        adapters=adapters,
        fine_tuning=fine_tuning,
        max_upload_bytes=server.max_upload_bytes if server else 2 * 1024**3,
        max_request_bytes=server.max_request_bytes if server else DEFAULT_MAX_REQUEST_BYTES,
        max_prompts_per_request=(
            server.max_prompts_per_request if server else DEFAULT_MAX_PROMPTS_PER_REQUEST
        ),
        api_keys=server.api_keys if server else None,
        tool_call_parser=server.tool_call_parser if server else "auto",
        lora_admin=lora_admin,
        metrics_without_key=server.metrics_without_key if server else False,
        admin_loopback_without_key=server.admin_loopback_without_key if server else False,
    )
    # Batch sizes and adapter load times are observed on the engine's own thread.
    observe_engine(app, engine.engine)
    inner = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(app_: Any):  # type: ignore[no-untyped-def]
        engine.start()
        try:
            if fine_tuning is not None:
                await anyio.to_thread.run_sync(fine_tuning.start)
            async with inner(app_) as state:
                yield state
        finally:
            if fine_tuning is not None:
                # Running trainers get SIGTERM, save a checkpoint and are requeued; this can
                # take a while, so it runs off the event loop.
                await anyio.to_thread.run_sync(fine_tuning.stop)
            engine.shutdown()

    app.router.lifespan_context = lifespan
    return app


def check_exposure(config: ServerConfig) -> None:
    """Refuse to serve an open API on a non-loopback address unless explicitly allowed."""
    if config.api_keys or config.admin_keys or config.allow_unauthenticated:
        return
    if not is_loopback(config.host):
        raise ValueError(
            f"refusing to listen on {config.host} without API keys: anyone who can reach it "
            "could upload adapters and start training jobs. Give --api-key/--admin-key "
            "(or ADAPTERHUB_API_KEY/ADAPTERHUB_ADMIN_KEY), bind 127.0.0.1, or pass "
            "--allow-unauthenticated"
        )


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def run_server(config: ServerConfig) -> int:
    """Serve until SIGTERM or SIGINT; returns the process exit code (0 after a graceful stop,
    1 if the engine failed to load).

    The base model is resolved first, so a wrong `--base-model` fails at once with a clear
    message. HTTP then starts while the engine loads: `/health` answers, and every other
    route is 503 `not_ready` until the model is loaded and warm.

    On SIGTERM the listener closes, the engine refuses new requests with 503, in-flight ones
    get `shutdown_timeout` seconds to finish and are aborted after that, then the job
    runner and the engine stop.
    """
    import uvicorn

    from adapterhub_server.graceful import GracefulServer
    from adapterhub_server.http_timeouts import timed_protocol
    from adapterhub_server.startup import StartupApp

    check_exposure(config)
    base = resolve_base(config)

    def load() -> Any:
        server = build_server(config, base)
        return build_app(server.engine, server)

    def stop(_: BaseException) -> None:
        http.should_exit = True

    startup = StartupApp(load, on_failure=stop)
    model_id = config.served_model_name or base.model_id
    logger.info("serving %s on http://%s:%d", model_id, config.host, config.port)
    uv_config = uvicorn.Config(
        startup,
        host=config.host,
        port=config.port,
        log_level=config.log_level,
        # uvicorn's records go through our handler (text or JSON); its access log lacks
        # the request id, so the app writes its own.
        log_config=None,
        access_log=False,
        # A backstop only: the drain below ends every request within shutdown_timeout.
        timeout_graceful_shutdown=config.shutdown_timeout + 5,
        timeout_keep_alive=config.timeout_keep_alive,
        # uvicorn itself waits forever for a slow client's headers and body.
        http=timed_protocol(
            header_timeout=config.timeout_request_header,
            body_timeout=config.timeout_request_body,
        ),
    )
    http = GracefulServer(uv_config, drain=lambda: startup.drain(config.shutdown_timeout))
    http.run()
    return 1 if startup.failed is not None else 0
