"""Moving adapters between the registry and the Hugging Face Hub.

* `pull`: `hf://owner/repo[@revision]` -> a new registry version. The Hugging Face cache is
  tried first (`local_files_only`), so a repo that is already cached never touches the
  network and works with `HF_HUB_OFFLINE=1`; only the two adapter files and the model card
  are fetched, never pickles or code.
* `export_version`: a version -> a directory laid out as a PEFT repo, with a README.md model
  card naming the base model (the front matter the Hub uses to link adapter and base).
* `push_to_hub`: `export_version` into a temporary directory, then `HfApi.upload_folder`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from adapterhub_server.errors import InvalidRequestError
from adapterhub_server.lora.adapter import CONFIG_FILE, WEIGHTS_FILE
from adapterhub_server.registry.errors import HubError, InvalidReferenceError
from adapterhub_server.registry.records import VersionRecord
from adapterhub_server.registry.registry import ADAPTER_FILES, Registry

logger = logging.getLogger(__name__)

HUB_SCHEME = "hf://"
HUB_ALLOW_PATTERNS = [CONFIG_FILE, WEIGHTS_FILE, "README.md"]
"""What a pull fetches: the PEFT files and the model card; never pickles or code."""

_REPO_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
_REVISION_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,199}")
_TRUE_STRINGS = frozenset({"1", "true", "yes", "on"})


@dataclass(frozen=True)
class HubRef:
    """`hf://owner/repo[@revision]`."""

    repo_id: str
    revision: str | None = None

    def __str__(self) -> str:
        return f"{HUB_SCHEME}{self.repo_id}" + (f"@{self.revision}" if self.revision else "")


def validate_repo_id(repo_id: str) -> str:
    if not _REPO_ID_RE.fullmatch(repo_id) or ".." in repo_id or "--" in repo_id:
        raise InvalidReferenceError(
            f"invalid Hugging Face repo id {repo_id[:120]!r}: expected owner/name", param="repo_id"
        )
    return repo_id


def parse_hub_ref(text: str) -> HubRef:
    """Parse `hf://owner/repo` or `hf://owner/repo@revision` (branch, tag or commit)."""
    if not text.startswith(HUB_SCHEME):
        raise InvalidReferenceError(
            f"{text[:120]!r} is not a hub reference; expected {HUB_SCHEME}owner/repo[@revision]",
            param="source",
        )
    repo_id, sep, revision = text[len(HUB_SCHEME) :].partition("@")
    validate_repo_id(repo_id)
    if sep and (not _REVISION_RE.fullmatch(revision) or ".." in revision):
        raise InvalidReferenceError(
            f"invalid revision {revision[:120]!r} in {text[:160]!r}", param="source"
        )
    return HubRef(repo_id=repo_id, revision=revision or None)


def hf_cache_dir() -> Path:
    """The hub cache, read from the environment now (huggingface_hub froze it at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def hub_offline() -> bool:
    """HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE as set now."""
    values = [os.environ.get(n) for n in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")]
    if any(v is not None for v in values):
        return any((v or "").strip().lower() in _TRUE_STRINGS for v in values)
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def download_snapshot(
    ref: HubRef, *, cache_dir: Path | None = None, token: str | None = None
) -> Path:
    """Local directory holding the repo's adapter files: from the cache, else downloaded.

    Raises HubError saying what was tried when neither works.
    """
    from huggingface_hub import snapshot_download

    cache = cache_dir or hf_cache_dir()
    common: dict[str, Any] = {
        "repo_id": ref.repo_id,
        "revision": ref.revision,
        "cache_dir": cache,
        "allow_patterns": HUB_ALLOW_PATTERNS,
    }
    try:
        return Path(snapshot_download(local_files_only=True, **common))
    except Exception as exc:
        cached_problem = f"not in the Hugging Face cache at {cache} ({type(exc).__name__})"
    if hub_offline():
        raise HubError(
            f"{ref}: {cached_problem}, and the hub is off limits (HF_HUB_OFFLINE is set). "
            f"Download it on a machine with access (`hf download {ref.repo_id}`) and copy the "
            "cache, or push the adapter directory directly."
        )
    logger.info("downloading %s from the Hugging Face hub into %s", ref, cache)
    try:
        return Path(snapshot_download(token=token, **common))
    except Exception as exc:
        raise HubError(
            f"{ref}: {cached_problem}, and downloading it failed: {type(exc).__name__}: {exc}. "
            "For a private or gated repo set HF_TOKEN."
        ) from exc


def default_name(ref: HubRef) -> str:
    """A registry name derived from the repo name ("Owner/My_LoRA" -> "my_lora")."""
    return ref.repo_id.split("/", 1)[1].lower()


def pull(
    registry: Registry,
    source: str | HubRef,
    *,
    name: str | None = None,
    alias: str | None = None,
    description: str | None = None,
    cache_dir: Path | None = None,
    token: str | None = None,
) -> VersionRecord:
    """Push the adapter at `hf://owner/repo[@revision]` as a new version of `name`
    (default: the repo name, lowercased). Records the source and its commit in metadata."""
    ref = parse_hub_ref(source) if isinstance(source, str) else source
    snapshot = download_snapshot(ref, cache_dir=cache_dir, token=token)
    # Cache snapshots live in .../snapshots/<commit sha>: pin what was actually pulled.
    commit = snapshot.name if re.fullmatch(r"[0-9a-f]{40}", snapshot.name) else None
    metadata: dict[str, Any] = {"source": str(ref)}
    if commit is not None:
        metadata["source_commit"] = commit
    return registry.push(
        snapshot,
        name or default_name(ref),
        alias=alias,
        description=description,
        metadata=metadata,
    )


def _yaml_str(value: str) -> str:
    # A JSON string is a valid YAML scalar, quoted and escaped: no injection via ids.
    return json.dumps(value)


def model_card(record: VersionRecord) -> str:
    """README.md for an exported version: Hub front matter plus what the registry knows."""
    base = record.base_model_id or "unknown"
    lines = ["---"]
    if record.base_model_id:
        lines.append(f"base_model: {_yaml_str(record.base_model_id)}")
    lines += ["library_name: peft", "tags:", "- lora", "- adapterhub", "---", ""]
    lines += [f"# {record.name} (version {record.version})", ""]
    if record.description:
        lines += [record.description, ""]
    created = datetime.fromtimestamp(record.created, tz=timezone.utc).strftime(
        "%Y-%m-%d %H:%M:%S UTC"
    )
    lines += [
        f"A LoRA adapter for [{base}](https://huggingface.co/{base}) in the PEFT format, "
        "exported from an AdapterHub registry.",
        "",
        "| | |",
        "|---|---|",
        f"| base model | `{base}` |",
    ]
    if record.base_fingerprint:
        lines.append(f"| base weights sha256 | `{record.base_fingerprint}` |")
    lines += [
        f"| rank | {record.rank} |",
        f"| alpha | {record.alpha:g} |" if record.alpha is not None else "| alpha | |",
        f"| target modules | {', '.join(record.target_modules)} |",
        f"| created | {created} |",
    ]
    for filename, info in sorted(record.files.items()):
        lines.append(f"| `{filename}` sha256 | `{info.sha256}` |")
    lines.append("")
    if record.lineage is not None:
        lineage = record.lineage.to_dict()
        lines += ["## Lineage", ""]
        for key, value in lineage.items():
            shown = json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else value
            lines.append(f"- **{key}**: {shown}")
        lines.append("")
    lines += [
        "## Usage",
        "",
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM",
        "",
        f"base = AutoModelForCausalLM.from_pretrained({_yaml_str(base)})",
        'model = PeftModel.from_pretrained(base, "<this repo or directory>")',
        "```",
        "",
    ]
    return "\n".join(lines)


def export_version(registry: Registry, ref: str, out_dir: Path) -> Path:
    """Write a version's files (verified against their sha256) and a model card to `out_dir`,
    which must not exist or be empty. Returns `out_dir`."""
    record = registry.resolve(ref)
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise InvalidRequestError(
            f"export target {out_dir} exists and is not an empty directory", param="out_dir"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    for filename in ADAPTER_FILES:
        with (
            registry.open_file(record.name, record.version, filename) as src,
            open(out_dir / filename, "wb") as dst,
        ):
            shutil.copyfileobj(src, dst, 1 << 20)
    (out_dir / "README.md").write_text(model_card(record), encoding="utf-8")
    logger.info("exported %s to %s", record.key, out_dir)
    return out_dir


def push_to_hub(
    registry: Registry,
    ref: str,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
) -> str:
    """Upload a version to `repo_id` as a PEFT repo (created if needed); returns the commit URL."""
    import huggingface_hub

    validate_repo_id(repo_id)
    record = registry.resolve(ref)
    api = huggingface_hub.HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="adapterhub-export-") as tmp:
        folder = export_version(registry, record.key, Path(tmp) / "repo")
        try:
            api.create_repo(repo_id, private=private, exist_ok=True)
            info = api.upload_folder(
                repo_id=repo_id,
                folder_path=folder,
                revision=revision,
                commit_message=commit_message or f"Upload {record.key} from AdapterHub",
            )
        except Exception as exc:
            raise HubError(
                f"pushing {record.key} to {repo_id} failed: {type(exc).__name__}: {exc}"
            ) from exc
    url = getattr(info, "commit_url", None) or str(info)
    logger.info("pushed %s to the hub: %s", record.key, url)
    return url
