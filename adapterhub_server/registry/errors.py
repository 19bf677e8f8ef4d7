"""Errors raised by the adapter registry.

Each subclasses one of the shared domain errors in `adapterhub_server.errors`, so the API maps
it to a status without importing the registry; the comments name that status.
"""

from __future__ import annotations

from adapterhub_server.errors import (
    AdapterHubError,
    AdapterNotFoundError,
    AdapterValidationError,
    ConflictError,
    InvalidRequestError,
    UpstreamError,
)
from adapterhub_server.errors import (
    PayloadTooLargeError as _PayloadTooLarge,
)


class RegistryError(AdapterHubError):
    """The store itself failed or is inconsistent: a server fault (HTTP 500)."""

    code = "registry_error"


class RegistryCorruptionError(RegistryError):
    """A stored file no longer matches its recorded sha256 or size, or is missing (500)."""

    code = "registry_corrupted"


class InvalidValueError(InvalidRequestError):
    """A field's value is malformed: text that is not valid Unicode, JSON beyond the limits
    of `adapterhub_server.json_limits` (400)."""

    code = "invalid_value"


class InvalidReferenceError(InvalidRequestError):
    """An adapter reference or alias name is malformed (400)."""

    code = "invalid_reference"


class AdapterVersionNotFoundError(AdapterNotFoundError):
    """The adapter exists but not that version (never written, or deleted) (404)."""


class AliasNotFoundError(AdapterNotFoundError):
    """The adapter has no alias of that name (404)."""


class VersionConflictError(ConflictError):
    """The change contradicts the registry's state, e.g. deleting an aliased version (409)."""

    code = "conflict"


PayloadTooLargeError = _PayloadTooLarge
"""The registry raises the server-wide 413 error (re-exported for registry callers)."""


class ChecksumMismatchError(AdapterValidationError):
    """Uploaded bytes do not match the sha256 the client declared (400)."""

    code = "checksum_mismatch"


class HubError(UpstreamError):
    """The Hugging Face Hub (or its local cache) cannot provide what was asked (502)."""

    code = "hub_error"
