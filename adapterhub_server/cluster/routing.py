"""Which adapter version a request needs: the key Ray Serve's model multiplexing routes by."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from adapterhub_server.config import ServerConfig
from adapterhub_server.lora.cache import AdapterSource, ChainedAdapterSource, StaticAdapterSource

logger = logging.getLogger(__name__)

ROUTED_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})
"""POST routes whose body's `model` picks an adapter; everything else goes to any replica."""


class AdapterKeyResolver:
    """Maps a request body's `model` to the cache key of the adapter version it names.

    The key is what each replica's adapter cache stores the adapter under (`name` for
    ``--lora-modules``, `name@<version>` for a registry version), so every spelling of one
    version (`name`, `name@3`, `name@prod`) routes to the replicas holding that version,
    and a new version gets a new key. Only a routing hint: each replica resolves the
    reference again itself, so a wrong or stale key can cost an adapter load, never serve
    another adapter.
    """

    def __init__(self, source: AdapterSource, *, base_model_id: str | None) -> None:
        self._source = source
        self._base_model_id = base_model_id

    @classmethod
    def from_config(cls, config: ServerConfig) -> AdapterKeyResolver:
        """The same sources a replica's engine reads (`server.build_server`), opened
        read-only: start-up adapters first, then the registry."""
        from adapterhub_server.server import resolve_base

        sources: list[AdapterSource] = [StaticAdapterSource(config.lora_modules)]
        base_model_id = config.served_model_name
        if config.registry is not None or base_model_id is None:
            base = resolve_base(config)
            base_model_id = base_model_id or base.model_id
            if config.registry is not None:
                sources.append(_registry_source(config, base.path, base_model_id))
        return cls(ChainedAdapterSource(sources), base_model_id=base_model_id)

    def key_for(self, method: str, path: str, body: bytes) -> str:
        """The multiplexed model id for this request; "" routes to any replica (the base
        model, other routes, or a body a replica will refuse anyway)."""
        if method != "POST" or path.rstrip("/") not in ROUTED_PATHS:
            return ""
        try:
            model = json.loads(body).get("model")
        except (ValueError, AttributeError):  # not JSON, or not an object
            return ""
        return self.key_for_model(model)

    def key_for_model(self, model: object) -> str:
        if not isinstance(model, str) or not model or model == self._base_model_id:
            return ""
        try:
            loc = self._source.locate(model)
        except Exception:  # a malformed or unknown reference: the replica answers 4xx
            logger.debug("no routing key for model %r", model, exc_info=True)
            return ""
        return loc.key if loc is not None else ""


def _registry_source(config: ServerConfig, base_path: Path, model_id: str) -> AdapterSource:
    from adapterhub_server.server import open_server_registry

    # A reader beside the replicas: crash recovery is the writers' business.
    return open_server_registry(config, base_path, model_id, recover=False)[1]
