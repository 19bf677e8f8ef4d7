"""Convert a GGUF checkpoint into a plain Hugging Face directory, once, into a cache.

`transformers` can read a GGUF file (it dequantizes every tensor on load), but that takes
tens of seconds and `save_pretrained` refuses a GGUF-loaded model. So the server converts
the file once into `config.json` + `model.safetensors` + tokenizer files, and every later
start loads that directory in a fraction of a second.

The cached directory is written into a temporary sibling and renamed into place, under an
exclusive file lock, with a completion marker written last: a killed converter leaves at
most a stale temporary directory (cleaned by the next converter), never a half-written
model that a later start would trust.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

try:  # POSIX only; without it concurrent converters still never see a half-written dir.
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)

#: Name of the marker file that says a converted directory is complete. Written last.
COMPLETE_MARKER = ".adapterhub-converted.json"

#: Bump when the conversion output changes, so that old cached directories are not reused.
CONVERSION_FORMAT_VERSION = 2

# Keys that only make sense for the GGUF-loaded model or leak the converting machine's paths.
_CONFIG_KEYS_TO_DROP = ("quantization_config", "_model_name_or_path", "_name_or_path")
_TOKENIZER_CONFIG_KEYS_TO_DROP = ("is_local", "local_files_only", "name_or_path")


def converted_dir_name(gguf_path: Path, prefix: str) -> str:
    """Cache directory name for `gguf_path`: `<prefix>-<short hash>`.

    The hash covers the file's name and size (cheap, and a different quantization or release
    of the file changes at least one of them) plus the conversion format version.
    """
    size = gguf_path.stat().st_size
    key = f"{gguf_path.name}:{size}:v{CONVERSION_FORMAT_VERSION}"
    return f"{prefix}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def is_complete(directory: Path) -> bool:
    """True when `directory` holds a finished conversion (its marker exists)."""
    return (directory / COMPLETE_MARKER).is_file()


def ensure_converted(gguf_path: Path, cache_dir: Path, *, prefix: str) -> Path:
    """Return the cached HF directory for `gguf_path`, converting it first if needed.

    Safe to call from several processes at once: one converts, the others wait on the lock
    and then reuse its result.
    """
    cache_dir.mkdir(parents=True, exist_ok=True)
    name = converted_dir_name(gguf_path, prefix)
    target = cache_dir / name
    if is_complete(target):
        return target

    with _exclusive_lock(cache_dir / f".{name}.lock"):
        # Another process may have finished while we waited for the lock.
        if is_complete(target):
            return target
        _remove_leftovers(cache_dir, name, target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=cache_dir))
        try:
            logger.info(
                "converting %s into %s (one time; later starts reuse it)", gguf_path, target
            )
            started = time.monotonic()
            convert_gguf_to_hf(gguf_path, tmp)
            elapsed = time.monotonic() - started
            _write_marker(tmp, gguf_path, elapsed)
            # mkdtemp and safetensors create owner-only entries; the cache holds public
            # weights and may be shared (a Docker volume, a team cache), so open it up.
            for written in tmp.iterdir():
                written.chmod(0o644)
                _fsync_file(written)
            tmp.chmod(0o755)
            _fsync_dir(tmp)
            os.replace(tmp, target)
            _fsync_dir(cache_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        logger.info("converted %s in %.1f s", gguf_path.name, elapsed)
    return target


def convert_gguf_to_hf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantize `gguf_path` to float32 and write it as an HF directory into `out_dir`.

    Writes `config.json` (without `quantization_config`), `generation_config.json`, the
    tokenizer files and `model.safetensors`. `out_dir` must exist; nothing here is atomic
    (the caller renames the finished directory into place).
    """
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source_dir, file_name = str(gguf_path.parent), gguf_path.name
    model = AutoModelForCausalLM.from_pretrained(
        source_dir, gguf_file=file_name, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(source_dir, gguf_file=file_name)

    config = copy.deepcopy(model.config)
    for key in _CONFIG_KEYS_TO_DROP:
        if hasattr(config, key):
            delattr(config, key)
    # GGUF-derived configs carry no architectures; vLLM and other loaders need it.
    config.architectures = [type(model).__name__]
    config.save_pretrained(out_dir)
    _add_legacy_rope_keys(out_dir / "config.json")
    model.generation_config.save_pretrained(out_dir)

    tokenizer.save_pretrained(out_dir)
    flags = _gguf_special_token_flags(gguf_path)
    _normalize_tokenizer_config(out_dir, tokenizer, config, flags)
    _check_bos_behaviour(out_dir, tokenizer, flags)

    tied = bool(getattr(config, "tie_word_embeddings", False))
    state_dict = _state_dict_for_safetensors(model.state_dict(), drop_lm_head=tied)
    weights = out_dir / "model.safetensors"
    # "format": "pt" is what transformers expects in the header of a PyTorch checkpoint.
    save_file(state_dict, str(weights), metadata={"format": "pt"})


def _add_legacy_rope_keys(config_path: Path) -> None:
    """Also write RoPE settings the way transformers 4.x reads them.

    transformers 5 stores them as `rope_parameters`; transformers 4.x (and tools pinned to
    it) ignore that key and silently fall back to rope_theta=10000, which wrecks the
    model's output. transformers 5 still accepts the legacy keys, so writing both is safe.
    """
    data = json.loads(config_path.read_text(encoding="utf-8"))
    rope = data.get("rope_parameters")
    if not isinstance(rope, dict) or "rope_theta" not in rope:
        return
    data.setdefault("rope_theta", rope["rope_theta"])
    if rope.get("rope_type", "default") != "default":
        data.setdefault("rope_scaling", {k: v for k, v in rope.items() if k != "rope_theta"})
    _write_json(config_path, data)


def _state_dict_for_safetensors(
    state_dict: dict[str, Any], *, drop_lm_head: bool
) -> dict[str, Any]:
    """Contiguous tensors with no shared storage, as `safetensors.save_file` requires.

    With tied embeddings `lm_head.weight` is the same storage as `embed_tokens.weight`;
    saving it twice is refused by safetensors and transformers re-ties it on load.
    """
    out = {}
    for key, tensor in state_dict.items():
        if drop_lm_head and key == "lm_head.weight":
            continue
        out[key] = tensor.detach().contiguous()
    return out


def _gguf_special_token_flags(gguf_path: Path) -> dict[str, bool]:
    """`add_bos_token` / `add_eos_token` as the GGUF file's metadata states them.

    transformers 4.x ignores `tokenizer.ggml.add_bos_token` when it builds a Llama tokenizer
    from GGUF and adds a BOS token anyway (SmolLM2's says false); the flags are written into
    tokenizer_config.json so that every transformers version encodes prompts alike.
    """
    from gguf import GGUFReader

    reader = GGUFReader(str(gguf_path))
    flags: dict[str, bool] = {}
    for key in ("add_bos_token", "add_eos_token"):
        field = reader.fields.get(f"tokenizer.ggml.{key}")
        if field is not None and field.data:
            flags[key] = bool(field.parts[field.data[0]][0])
    return flags


def _check_bos_behaviour(out_dir: Path, tokenizer: Any, flags: dict[str, bool]) -> None:
    """Fail the conversion unless the saved tokenizer adds BOS/EOS as the GGUF file says.

    A silently doubled `<|im_start|>` at the start of every prompt degrades generation
    without any error, so it is checked here rather than discovered in outputs.
    """
    from transformers import AutoTokenizer

    probe = "Hello world"
    if flags:
        want = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
        if flags.get("add_bos_token") and tokenizer.bos_token_id is not None:
            want.insert(0, tokenizer.bos_token_id)
        if flags.get("add_eos_token") and tokenizer.eos_token_id is not None:
            want.append(tokenizer.eos_token_id)
    else:
        want = list(tokenizer(probe)["input_ids"])
    got = list(AutoTokenizer.from_pretrained(str(out_dir))(probe)["input_ids"])
    if got != want:
        raise RuntimeError(
            f"the converted tokenizer encodes {probe!r} as {got}, expected {want} "
            f"(GGUF special-token flags: {flags})"
        )


def _normalize_tokenizer_config(
    out_dir: Path, tokenizer: Any, config: Any, flags: dict[str, bool]
) -> None:
    """Make tokenizer_config.json portable across transformers 4.x/5.x and other loaders.

    transformers 5 writes `tokenizer_class: "TokenizersBackend"`, a class transformers 4
    does not know, plus machine-local keys; and a GGUF tokenizer has an unbounded
    `model_max_length`. The chat template is also kept inline in tokenizer_config.json
    (besides chat_template.jinja) because older tools only look there. `flags` (from the
    GGUF metadata) override whatever the loading transformers version assumed.
    """
    path = out_dir / "tokenizer_config.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    for key in _TOKENIZER_CONFIG_KEYS_TO_DROP:
        data.pop(key, None)
    data.update(flags)
    if data.get("tokenizer_class") in (None, "TokenizersBackend"):
        data["tokenizer_class"] = "PreTrainedTokenizerFast"
    max_positions = getattr(config, "max_position_embeddings", None)
    if isinstance(max_positions, int):
        data["model_max_length"] = max_positions
    if isinstance(tokenizer.chat_template, str) and tokenizer.chat_template:
        data["chat_template"] = tokenizer.chat_template
    _write_json(path, data)


def _write_marker(directory: Path, gguf_path: Path, elapsed_s: float) -> None:
    import transformers

    _write_json(
        directory / COMPLETE_MARKER,
        {
            "source": gguf_path.name,
            "source_size": gguf_path.stat().st_size,
            "format_version": CONVERSION_FORMAT_VERSION,
            "transformers_version": transformers.__version__,
            "converted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "conversion_seconds": round(elapsed_s, 2),
        },
    )


def _remove_leftovers(cache_dir: Path, name: str, target: Path) -> None:
    """Delete debris of earlier, interrupted conversions. Caller holds the lock.

    Only lock holders create `.<name>.tmp-*` directories, so any that exist now belong to a
    converter that died.
    """
    for stale in cache_dir.glob(f".{name}.tmp-*"):
        logger.warning("removing leftover of an interrupted conversion: %s", stale)
        shutil.rmtree(stale, ignore_errors=True)
    if target.exists():
        logger.warning("removing incomplete converted model (no completion marker): %s", target)
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        else:
            target.unlink()


@contextlib.contextmanager
def _exclusive_lock(lock_path: Path) -> Iterator[None]:
    with open(lock_path, "a+b") as handle:
        if fcntl is not None:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    """Persist a directory's entries (file creations, a rename) on POSIX file systems."""
    if os.name != "posix":  # pragma: no cover
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
