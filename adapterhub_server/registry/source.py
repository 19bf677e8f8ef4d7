"""The registry as the engine's `AdapterSource`: references in, verified file locations out."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from adapterhub_server.errors import AdapterNotFoundError, AdapterValidationError
from adapterhub_server.lora.cache import AdapterLocation
from adapterhub_server.registry.errors import InvalidReferenceError
from adapterhub_server.registry.records import VersionRecord
from adapterhub_server.registry.registry import Registry

logger = logging.getLogger(__name__)


class RegistryAdapterSource:
    """`AdapterSource` over a `Registry`.

    `locate("name" | "name@3" | "name@prod")` resolves to one immutable version and returns
    it under the key `name@<version>`, so every spelling of one version shares one cache
    entry, and pushing a new version (or moving an alias) makes the next request resolve to
    a new key instead of serving a stale cached copy. The location carries the recorded
    sha256 of every file; the adapter cache verifies them before parsing.

    `list()` returns the newest ready version of every adapter (key `name@<N>`); a server
    presents them to clients by bare name (the key up to "@"), since `name` is what resolves
    to that version.

    With `base_fingerprint`, versions validated against different base weights are refused
    (AdapterValidationError from `locate`, left out of `list`); versions recorded without a
    fingerprint are accepted.
    """

    def __init__(self, registry: Registry, *, base_fingerprint: str | None = None) -> None:
        self.registry = registry
        self.base_fingerprint = base_fingerprint

    def _compatible(self, record: VersionRecord) -> bool:
        return (
            self.base_fingerprint is None
            or record.base_fingerprint is None
            or record.base_fingerprint == self.base_fingerprint
        )

    def _location(self, record: VersionRecord) -> AdapterLocation:
        return AdapterLocation(
            key=record.key,
            path=self.registry.blobs.version_path(record.name, record.version),
            created=int(record.created),
            sha256=record.sha256,
        )

    def locate(self, ref: str) -> AdapterLocation | None:
        """The version `ref` names, or None if it is unknown or not a valid reference."""
        try:
            record = self.registry.resolve(ref)
        except (AdapterNotFoundError, InvalidReferenceError):
            return None
        if not self._compatible(record):
            raise AdapterValidationError(
                f"adapter {record.key} was validated against base weights "
                f"{record.base_fingerprint[:12]}... ({record.base_model_id}), not the base model "
                f"this server runs ({self.base_fingerprint[:12]}...)",
                param="model",
            )
        return self._location(record)

    def list(self) -> Sequence[AdapterLocation]:
        """Newest ready version of every adapter, keyed `name@<N>`."""
        return [
            self._location(info.latest)
            for info in self.registry.list_adapters()
            if self._compatible(info.latest)
        ]
