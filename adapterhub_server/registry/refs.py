"""Adapter references: `name`, `name@3` (a version) and `name@prod` (an alias).

Names follow DESIGN.md (`^[a-z0-9][a-z0-9._-]{0,63}$`, no `..`): they become directory names,
so anything that could traverse paths is refused before it reaches the store. Aliases use the
same alphabet but may not be all digits, so `name@3` can only ever mean version 3.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from adapterhub_server.errors import AdapterValidationError
from adapterhub_server.lora.adapter import ADAPTER_NAME_PATTERN, validate_adapter_name
from adapterhub_server.registry.errors import InvalidReferenceError

LATEST = "latest"
"""Built-in alias: `name@latest` is the newest ready version, the same as `name`."""

_ALIAS_RE = re.compile(ADAPTER_NAME_PATTERN)
# Leading zeros are refused so that every version has exactly one spelling ("3", not "03").
_VERSION_RE = re.compile(r"[1-9][0-9]{0,17}")
# The same bound for integers: the index stores versions as SQLite (64-bit) integers, and a
# larger number must be a 400, not an OverflowError from the driver.
_MAX_VERSION = 10**18 - 1


@dataclass(frozen=True)
class AdapterRef:
    """A parsed reference; at most one of `version` and `alias` is set."""

    name: str
    version: int | None = None
    alias: str | None = None

    def __str__(self) -> str:
        if self.version is not None:
            return f"{self.name}@{self.version}"
        if self.alias is not None:
            return f"{self.name}@{self.alias}"
        return self.name


def validate_alias(alias: str) -> str:
    """Return `alias` if it can be set, else raise InvalidReferenceError(param="alias")."""
    shown = repr(alias)[:80]
    if not isinstance(alias, str) or _ALIAS_RE.fullmatch(alias) is None or ".." in alias:
        raise InvalidReferenceError(
            f"invalid alias {shown}: aliases must match ^{ADAPTER_NAME_PATTERN}$ without '..'",
            param="alias",
        )
    if alias.isdigit():
        raise InvalidReferenceError(
            f"invalid alias {shown}: an all-digit alias would be read as a version number",
            param="alias",
        )
    if alias == LATEST:
        raise InvalidReferenceError(
            f"invalid alias {shown}: '{LATEST}' is built in and always means the newest version",
            param="alias",
        )
    return alias


def parse_version(text: str | int) -> int:
    """A version number >= 1 from `3` or `"3"`; raise InvalidReferenceError otherwise."""
    if isinstance(text, int) and not isinstance(text, bool):
        if 1 <= text <= _MAX_VERSION:
            return text
    elif isinstance(text, str) and _VERSION_RE.fullmatch(text):
        return int(text)
    raise InvalidReferenceError(
        f"invalid version {str(text)[:40]!r}: versions are integers from 1 to {_MAX_VERSION}",
        param="version",
    )


def parse_ref(ref: str) -> AdapterRef:
    """Parse `name`, `name@<version>` or `name@<alias>`.

    Raises InvalidReferenceError (param "model") for anything else, including names that
    break the naming rules, so callers never touch the store with an unsafe name.
    """
    if not isinstance(ref, str):
        raise InvalidReferenceError(f"adapter reference must be a string, got {type(ref).__name__}")
    name, sep, suffix = ref.partition("@")
    try:
        validate_adapter_name(name)
    except AdapterValidationError as exc:
        raise InvalidReferenceError(exc.message, param="model") from None
    if not sep:
        return AdapterRef(name)
    if suffix.isdigit():
        return AdapterRef(name, version=parse_version(suffix))
    if suffix == LATEST:
        return AdapterRef(name)
    try:
        return AdapterRef(name, alias=validate_alias(suffix))
    except InvalidReferenceError as exc:
        raise InvalidReferenceError(
            f"invalid adapter reference {ref[:80]!r}: expected name, name@<version> or "
            f"name@<alias> ({exc.message})",
            param="model",
        ) from None
