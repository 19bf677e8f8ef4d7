"""Put the pieces together: resolve the base model, build the engine, serve the app."""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from typing import Any

from adapterhub_server.base_model import resolve_base_model
from adapterhub_server.config import ServerConfig
from adapterhub_server.engine.async_engine import AsyncLLMEngine
from adapterhub_server.engine.build import build_engine

logger = logging.getLogger(__name__)


def build_async_engine(config: ServerConfig) -> AsyncLLMEngine:
    """Load the base model and adapters named in `config`; the engine thread is not started."""
    base = resolve_base_model(
        config.base_model, cache_dir=config.model_cache_dir, model_id=config.served_model_name
    )
    engine = build_engine(base, config.engine, lora_modules=config.lora_modules)
    return AsyncLLMEngine(engine, base_model_id=config.served_model_name or base.model_id)


def build_app(engine: AsyncLLMEngine) -> Any:
    """The FastAPI app over `engine`; the engine thread runs for the app's lifetime."""
    from adapterhub_server.api.app import create_app

    app = create_app(engine)
    inner = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(app_: Any):  # type: ignore[no-untyped-def]
        engine.start()
        try:
            async with inner(app_) as state:
                yield state
        finally:
            engine.shutdown()

    app.router.lifespan_context = lifespan
    return app


def run_server(config: ServerConfig) -> None:
    import uvicorn

    engine = build_async_engine(config)
    app = build_app(engine)
    logger.info("serving %s on http://%s:%d", engine.base_model_id, config.host, config.port)
    uvicorn.run(app, host=config.host, port=config.port, log_level=config.log_level)
