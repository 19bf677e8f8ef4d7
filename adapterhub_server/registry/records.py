"""Plain data the registry stores and returns: versions, files, lineage, reports."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from adapterhub_server.errors import InvalidRequestError
from adapterhub_server.json_limits import JsonLimitError, check_text, check_value
from adapterhub_server.registry.errors import InvalidValueError

VersionStatus = Literal["pending", "ready", "deleted"]
"""pending: number allocated, files being published; ready: servable; deleted: a tombstone
kept so that the number is never handed out again."""

MAX_JSON_BYTES = 64 * 1024
"""Cap on the encoded size of each of metadata and lineage: they live in index rows."""

MAX_DESCRIPTION_CHARS = 4096

LEGACY_KIND = "lora"
"""The kind of a ready version indexed before kinds were recorded: plain LoRA, the only kind
servers accepted then."""

MERGE_LINEAGE_KEY = "merge"
"""The lineage `extra` key holding a published merge's recipe (`registry.merge`)."""


def _is_set(value: object) -> bool:
    # PEFT writes null / false / [] / {} for options that are off.
    return value is not None and value is not False and value != [] and value != {} and value != ""


def adapter_kind(config: Mapping[str, Any], lineage: Lineage | None = None) -> str:
    """What a version holds, from its adapter_config.json and lineage.

    `merge:<strategy>` for a published merge (its lineage recipe); else the adapter's parts
    joined with "+": `lora` or `dora` (use_dora), then `modules_to_save` and
    `trainable_tokens` when set, e.g. `lora+modules_to_save`; a PEFT TRAINABLE_TOKENS
    adapter alone is `trainable_tokens`.
    """
    if lineage is not None:
        recipe = lineage.extra.get(MERGE_LINEAGE_KEY)
        if isinstance(recipe, Mapping) and isinstance(recipe.get("merge_strategy"), str):
            return f"merge:{recipe['merge_strategy']}"
    if config.get("peft_type") == "TRAINABLE_TOKENS":
        return "trainable_tokens"
    parts = ["dora" if config.get("use_dora") is True else "lora"]
    if _is_set(config.get("modules_to_save")):
        parts.append("modules_to_save")
    if _is_set(config.get("trainable_token_indices")):
        parts.append("trainable_tokens")
    return "+".join(parts)


@dataclass(frozen=True)
class FileRecord:
    """One stored file of a version."""

    sha256: str
    """Lowercase hex digest of the file's bytes."""
    size: int
    """Bytes."""


@dataclass(frozen=True)
class Lineage:
    """How an adapter was produced, when known. Every field is optional."""

    dataset_sha256: str | None = None
    """sha256 of the training data file(s) as the trainer read them."""
    hyperparameters: Mapping[str, Any] = field(default_factory=dict)
    """Learning rate, epochs, batch size, LoRA r/alpha/dropout, seed, ..."""
    train_loss: float | None = None
    """Final (or last logged) training loss."""
    eval_loss: float | None = None
    """Final evaluation loss, if an eval set was used."""
    package_versions: Mapping[str, str] = field(default_factory=dict)
    """e.g. {"torch": "2.5.1", "transformers": "4.46.0", "adapterhub": "0.1.0"}."""
    hardware: Mapping[str, Any] | str | None = None
    """Device description, e.g. {"device": "cuda", "name": "NVIDIA H100", "count": 1}."""
    wall_time_s: float | None = None
    """Training wall-clock time in seconds."""
    extra: Mapping[str, Any] = field(default_factory=dict)
    """Anything else the producer recorded (keys not listed above)."""

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Lineage:
        """Build from JSON; unknown keys go to `extra` rather than being dropped."""
        if not isinstance(data, Mapping):
            raise InvalidRequestError("lineage must be a JSON object", param="lineage")
        known = {f for f in cls.__dataclass_fields__ if f != "extra"}
        extra = dict(data.get("extra") or {})
        extra.update({k: v for k, v in data.items() if k not in known and k != "extra"})
        kwargs = {k: v for k, v in data.items() if k in known and v is not None}
        for key in ("train_loss", "eval_loss", "wall_time_s"):
            value = kwargs.get(key)
            if value is not None and (
                not isinstance(value, (int, float)) or isinstance(value, bool)
            ):
                raise InvalidRequestError(f"lineage.{key} must be a number", param="lineage")
        for key in ("hyperparameters", "package_versions"):
            if not isinstance(kwargs.get(key, {}), Mapping):
                raise InvalidRequestError(f"lineage.{key} must be an object", param="lineage")
        if not isinstance(kwargs.get("dataset_sha256", ""), str):
            raise InvalidRequestError("lineage.dataset_sha256 must be a string", param="lineage")
        return cls(**kwargs, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; empty and unset fields are left out."""
        out: dict[str, Any] = {}
        for key in self.__dataclass_fields__:
            value = getattr(self, key)
            if value is None or (isinstance(value, Mapping) and not value):
                continue
            out[key] = dict(value) if isinstance(value, Mapping) else value
        return out


@dataclass(frozen=True)
class VersionRecord:
    """One immutable adapter version as the index describes it."""

    name: str
    version: int
    status: VersionStatus
    created: float
    """Unix time the version was allocated."""
    files: Mapping[str, FileRecord] = field(default_factory=dict)
    base_model_id: str | None = None
    base_fingerprint: str | None = None
    """sha256 over the base weights the adapter was validated against."""
    rank: int | None = None
    """Largest LoRA rank over its modules."""
    alpha: float | None = None
    """lora_alpha from adapter_config.json."""
    target_modules: tuple[str, ...] = ()
    """Projection leaf names it adapts, e.g. ("q_proj", "v_proj")."""
    description: str | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)
    """Free-form JSON object given at push time (e.g. {"source": "hf://owner/repo@sha"})."""
    lineage: Lineage | None = None
    aliases: tuple[str, ...] = ()
    """Aliases that point at this version, sorted."""
    deleted: float | None = None
    """Unix time of deletion, for tombstones."""
    kind: str | None = None
    """What the version holds (`adapter_kind`): `lora`, `dora`, `merge:ties`, ..."""

    @property
    def key(self) -> str:
        """`name@version`: a stable identity, the key the engine's adapter cache uses."""
        return f"{self.name}@{self.version}"

    @property
    def size(self) -> int:
        """Total bytes of its files."""
        return sum(f.size for f in self.files.values())

    @property
    def sha256(self) -> dict[str, str]:
        """{filename: hex digest}, the shape `AdapterLocation.sha256` expects."""
        return {name: f.sha256 for name, f in self.files.items()}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready view, used by the CLI's --json and suitable for HTTP responses."""
        return {
            "name": self.name,
            "version": self.version,
            "ref": self.key,
            "status": self.status,
            "created": self.created,
            "deleted": self.deleted,
            "aliases": list(self.aliases),
            "base_model_id": self.base_model_id,
            "base_fingerprint": self.base_fingerprint,
            "kind": self.kind,
            "rank": self.rank,
            "alpha": self.alpha,
            "target_modules": list(self.target_modules),
            "size": self.size,
            "files": {
                name: {"sha256": f.sha256, "size": f.size} for name, f in sorted(self.files.items())
            },
            "description": self.description,
            "metadata": dict(self.metadata),
            "lineage": self.lineage.to_dict() if self.lineage is not None else None,
        }


@dataclass(frozen=True)
class AdapterInfo:
    """An adapter name with its ready versions and aliases."""

    name: str
    latest: VersionRecord
    """The newest ready version: what `name` alone resolves to."""
    versions: tuple[VersionRecord, ...]
    """Ready versions, oldest first."""
    aliases: Mapping[str, int]
    """alias -> version."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "latest": self.latest.to_dict(),
            "versions": [v.version for v in self.versions],
            "aliases": dict(sorted(self.aliases.items())),
        }


@dataclass(frozen=True)
class PendingVersion:
    """A version number handed to a writer that has not committed (yet, or ever)."""

    name: str
    version: int
    writer: str
    """Token of the writer's liveness lock in the blob store."""
    created: float
    writer_pid: int | None = None
    writer_host: str | None = None


@dataclass(frozen=True)
class VerifyProblem:
    """One thing `Registry.verify` found wrong."""

    ref: str
    """`name@version`."""
    filename: str | None
    message: str


@dataclass(frozen=True)
class VerifyReport:
    checked: int
    """Ready versions whose files were re-hashed."""
    problems: tuple[VerifyProblem, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {
            "checked": self.checked,
            "ok": self.ok,
            "problems": [
                {"ref": p.ref, "file": p.filename, "message": p.message} for p in self.problems
            ],
        }


@dataclass(frozen=True)
class GcReport:
    removed: tuple[str, ...] = ()
    """Paths removed (or that would be, with dry_run)."""
    discarded_pending: tuple[str, ...] = ()
    """`name@version` of uncommitted versions whose writers died."""
    dry_run: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "dry_run": self.dry_run,
            "removed": list(self.removed),
            "discarded_pending": list(self.discarded_pending),
        }


def encode_json_object(value: Mapping[str, Any] | None, *, what: str) -> str:
    """Canonical JSON for an index column; refuses non-objects, NaN, oversized values, and
    values beyond `json_limits` (text that is not valid Unicode, nesting over 64 levels)."""
    if value is None:
        return "{}"
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise InvalidRequestError(f"{what} must be a JSON object with string keys", param=what)
    try:
        # Stored text must be valid Unicode, or every later read that encodes it fails.
        check_value(dict(value))
    except JsonLimitError as exc:
        raise InvalidValueError(f"{what}: {exc}", param=what) from None
    try:
        text = json.dumps(value, sort_keys=True, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise InvalidRequestError(f"{what} is not JSON-serializable: {exc}", param=what) from None
    if len(text.encode()) > MAX_JSON_BYTES:
        raise InvalidRequestError(
            f"{what} is {len(text.encode())} bytes as JSON, over the {MAX_JSON_BYTES}-byte limit",
            param=what,
        )
    try:
        # Again on what will be read back: tuples and other sequences became lists.
        check_value(json.loads(text))
    except JsonLimitError as exc:
        raise InvalidValueError(f"{what}: {exc}", param=what) from None
    return text


def check_description(description: str | None) -> str | None:
    if description is None:
        return None
    if not isinstance(description, str):
        raise InvalidRequestError("description must be a string", param="description")
    try:
        check_text(description)
    except JsonLimitError as exc:
        raise InvalidValueError(f"description: {exc}", param="description") from None
    if len(description) > MAX_DESCRIPTION_CHARS:
        raise InvalidRequestError(
            f"description is {len(description)} characters, over the {MAX_DESCRIPTION_CHARS} limit",
            param="description",
        )
    return description
