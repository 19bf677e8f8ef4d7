"""Raw checks of a safetensors file before the safetensors library touches it.

Uploaded adapters are untrusted. The safetensors library does validate its input, but its
errors are terse ("invalid offset for tensor `x`") and it only sees the header after the file
is mapped. Checking the raw bytes first lets the server refuse oversized, truncated or lying
files with a message that says exactly what is wrong, and lets it refuse non-float dtypes
before any tensor is materialised.

File layout (https://github.com/huggingface/safetensors#format):
    8 bytes  little-endian u64 N (header length)
    N bytes  JSON object: {"<tensor name>": {"dtype", "shape", "data_offsets": [begin, end]},
             optionally "__metadata__": {str: str}}
    rest     data area; offsets are relative to its start and must tile it exactly.
"""

from __future__ import annotations

import json
import logging
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from adapterhub_server.errors import AdapterValidationError

logger = logging.getLogger(__name__)

# The safetensors library refuses headers above this size too; matching it means a file we
# accept is never one the library then rejects for its header size.
MAX_HEADER_BYTES = 100_000_000

# LoRA weights are real-valued; integer, bool or fp8 tensors are a mistake or an attack, and
# refusing them here means they are never loaded at all.
FLOAT_DTYPE_SIZES: dict[str, int] = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8}

_METADATA_KEY = "__metadata__"
_ENTRY_FIELDS = ("dtype", "shape", "data_offsets")


@dataclass(frozen=True)
class TensorHeader:
    """One tensor's entry in a safetensors header, after validation."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    """Start of the tensor's bytes, relative to the data area."""
    end: int
    """End (exclusive) of the tensor's bytes, relative to the data area."""


def _fail(path: Path, detail: str) -> AdapterValidationError:
    return AdapterValidationError(f"{path.name}: {detail}", param="file")


def _is_int(value: object) -> bool:
    # JSON true/false decode to bool, which is an int subclass in Python.
    return isinstance(value, int) and not isinstance(value, bool)


def _reject_duplicate_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    # json.loads would silently keep the last duplicate; a header naming a tensor twice is
    # ambiguous, so it is refused rather than guessed at.
    out: dict[str, object] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def read_safetensors_header(path: Path, *, max_file_bytes: int) -> dict[str, TensorHeader]:
    """Validate the raw layout of the safetensors file at `path` and return its tensor entries.

    Raises AdapterValidationError (naming the file and the offending entry) when the file is
    larger than `max_file_bytes`, the header length is implausible or points past the end of
    the file, the header is not a JSON object, an entry has a non-float dtype, a malformed
    shape, or data offsets outside the data area, of the wrong size, overlapping, or leaving
    bytes of the data area unaccounted for.
    """
    try:
        file_size = path.stat().st_size
    except OSError as exc:
        raise _fail(path, f"cannot be read ({exc.strerror})") from exc
    if file_size > max_file_bytes:
        raise _fail(
            path, f"file is {file_size} bytes, over the server's limit of {max_file_bytes} bytes"
        )
    if file_size < 8:
        raise _fail(
            path,
            f"file is {file_size} bytes, too short to hold the 8-byte header length (truncated?)",
        )

    try:
        fh = path.open("rb")
    except OSError as exc:  # removed since the stat (a deleted version)
        raise _fail(path, f"cannot be read ({exc.strerror})") from exc
    with fh:
        (header_len,) = struct.unpack("<Q", fh.read(8))
        if header_len > MAX_HEADER_BYTES:
            raise _fail(
                path, f"header length {header_len} exceeds the {MAX_HEADER_BYTES}-byte limit"
            )
        if 8 + header_len > file_size:
            raise _fail(
                path,
                f"header length {header_len} needs {8 + header_len} bytes but the file has only "
                f"{file_size} (truncated file or corrupt header length)",
            )
        raw_header = fh.read(header_len)
    if len(raw_header) != header_len:
        raise _fail(path, "file shrank while being read")

    try:
        header = json.loads(raw_header.decode("utf-8"), object_pairs_hook=_reject_duplicate_keys)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise _fail(path, f"header is not valid UTF-8 JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise _fail(path, f"header must be a JSON object, got {type(header).__name__}")

    metadata = header.pop(_METADATA_KEY, None)
    if metadata is not None and not (
        isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())
    ):
        raise _fail(path, f"header {_METADATA_KEY!r} must be an object of string values")

    data_len = file_size - 8 - header_len
    entries = {name: _check_entry(path, name, entry, data_len) for name, entry in header.items()}
    _check_tiling(path, entries, data_len)
    return entries


def _check_entry(path: Path, name: str, entry: object, data_len: int) -> TensorHeader:
    where = f"tensor {name!r}"
    if not isinstance(entry, dict):
        raise _fail(path, f"{where}: header entry must be an object, got {type(entry).__name__}")
    missing = [f for f in _ENTRY_FIELDS if f not in entry]
    if missing:
        raise _fail(path, f"{where}: header entry lacks {', '.join(missing)}")

    dtype = entry["dtype"]
    if dtype not in FLOAT_DTYPE_SIZES:
        raise _fail(
            path,
            f"{where} has dtype {dtype!r}; LoRA weights must be a float dtype "
            f"({', '.join(FLOAT_DTYPE_SIZES)})",
        )

    shape = entry["shape"]
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise _fail(path, f"{where}: shape must be a list of non-negative integers, got {shape!r}")

    offsets = entry["data_offsets"]
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
        raise _fail(path, f"{where}: data_offsets must be [begin, end] integers, got {offsets!r}")
    begin, end = offsets
    if not 0 <= begin <= end <= data_len:
        raise _fail(
            path,
            f"{where}: data_offsets [{begin}, {end}] fall outside the data area of {data_len} bytes "
            "(truncated file or lying header)",
        )
    expected = math.prod(shape) * FLOAT_DTYPE_SIZES[dtype]
    if end - begin != expected:
        raise _fail(
            path,
            f"{where}: data_offsets [{begin}, {end}] span {end - begin} bytes but dtype {dtype} "
            f"with shape {shape} needs {expected} bytes (lying header)",
        )
    return TensorHeader(name=name, dtype=dtype, shape=tuple(shape), begin=begin, end=end)


def _check_tiling(path: Path, entries: dict[str, TensorHeader], data_len: int) -> None:
    """Tensors must cover the data area exactly: no overlap, no gap, no trailing bytes.

    Overlap would let two tensors alias the same bytes; gaps and trailing bytes hide data the
    header does not describe. The safetensors library refuses both too, with vaguer errors.
    """
    position = 0
    previous: TensorHeader | None = None
    for entry in sorted(entries.values(), key=lambda e: (e.begin, e.end)):
        if entry.begin < position:
            assert previous is not None
            raise _fail(
                path,
                f"tensor {entry.name!r} (bytes {entry.begin}-{entry.end}) overlaps tensor "
                f"{previous.name!r} (bytes {previous.begin}-{previous.end}) (lying header)",
            )
        if entry.begin > position:
            raise _fail(
                path,
                f"bytes {position}-{entry.begin} of the data area belong to no tensor (lying header)",
            )
        position = entry.end
        previous = entry
    if position != data_len:
        raise _fail(
            path,
            f"the data area has {data_len} bytes but the header accounts for only {position} "
            "(trailing data or lying header)",
        )


def load_checked_safetensors(path: Path, *, max_file_bytes: int) -> dict[str, torch.Tensor]:
    """Check `path` with `read_safetensors_header`, then load every tensor (native dtype, CPU).

    Nothing is unpickled: safetensors is a plain header plus raw bytes.
    """
    from safetensors import safe_open

    headers = read_safetensors_header(path, max_file_bytes=max_file_bytes)
    tensors: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            for name, info in headers.items():
                tensor = fh.get_tensor(name)
                # Guards against the file changing between the raw check and this read.
                if tuple(tensor.shape) != info.shape or not tensor.is_floating_point():
                    raise _fail(path, f"tensor {name!r} changed while the file was being read")
                tensors[name] = tensor
    except AdapterValidationError:
        raise
    except Exception as exc:  # the library raises its own SafetensorError and OSError types
        # The library's messages may name the file's path, which must not reach clients.
        reason = str(exc).replace(str(path), path.name)
        raise _fail(path, f"could not be read by the safetensors library ({reason})") from exc
    logger.debug("read %d tensors from %s", len(tensors), path)
    return tensors
