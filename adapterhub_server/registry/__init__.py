"""Versioned adapter registry: immutable, hashed versions behind a blob store and an index.

`Registry.open(root, base=BaseModelSpec.from_directory(...))` opens the embedded default
(a directory plus an SQLite index in WAL mode); `RegistryAdapterSource` serves it to the
engine's adapter cache; `registry.cli` is the `adapterhub-server registry` command.
"""

from adapterhub_server.registry.errors import (
    AdapterVersionNotFoundError,
    AliasNotFoundError,
    ChecksumMismatchError,
    HubError,
    InvalidReferenceError,
    PayloadTooLargeError,
    RegistryCorruptionError,
    RegistryError,
    VersionConflictError,
)
from adapterhub_server.registry.factory import describe_location, open_registry, registry_location
from adapterhub_server.registry.records import (
    AdapterInfo,
    FileRecord,
    GcReport,
    Lineage,
    VerifyProblem,
    VerifyReport,
    VersionRecord,
)
from adapterhub_server.registry.refs import AdapterRef, parse_ref, validate_alias
from adapterhub_server.registry.registry import (
    Registry,
    RegistryLimits,
    default_registry_dir,
    default_registry_location,
)
from adapterhub_server.registry.source import RegistryAdapterSource
from adapterhub_server.registry.targets import (
    BaseModelSpec,
    meta_model_from_dir,
    targets_from_config,
)

__all__ = [
    "AdapterInfo",
    "AdapterRef",
    "AdapterVersionNotFoundError",
    "AliasNotFoundError",
    "BaseModelSpec",
    "ChecksumMismatchError",
    "FileRecord",
    "GcReport",
    "HubError",
    "InvalidReferenceError",
    "Lineage",
    "PayloadTooLargeError",
    "Registry",
    "RegistryAdapterSource",
    "RegistryCorruptionError",
    "RegistryError",
    "RegistryLimits",
    "VerifyProblem",
    "VerifyReport",
    "VersionConflictError",
    "VersionRecord",
    "default_registry_dir",
    "default_registry_location",
    "describe_location",
    "meta_model_from_dir",
    "open_registry",
    "parse_ref",
    "registry_location",
    "targets_from_config",
    "validate_alias",
]
