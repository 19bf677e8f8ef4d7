"""sha256 of files and streams, and the one message for bytes that are not what was stored.

The registry records each file's sha256 and size; the registry's `verify`, the S3 blob
store's downloads, the adapter cache's loads and the vLLM-style load endpoint all check
bytes against such a record, and all say what is wrong the same way.
"""

from __future__ import annotations

import hashlib
import os
from typing import BinaryIO

CHUNK = 1 << 20


def hash_stream(handle: BinaryIO) -> tuple[str, int]:
    """(hex sha256, byte count) of what is left to read in `handle`."""
    digest = hashlib.sha256()
    size = 0
    while chunk := handle.read(CHUNK):
        digest.update(chunk)
        size += len(chunk)
    return digest.hexdigest(), size


def hash_file(path: str | os.PathLike[str]) -> tuple[str, int]:
    """(hex sha256, byte count) of the file at `path`."""
    with open(path, "rb") as handle:
        return hash_stream(handle)


def mismatch(
    found_sha256: str, found_size: int, expected_sha256: str, expected_size: int | None = None
) -> str | None:
    """None if the found bytes are the expected ones, else what differs (a size difference
    first: it is the cheaper clue to a truncated copy)."""
    if expected_size is not None and found_size != expected_size:
        return (
            f"size mismatch (stored file is corrupted: expected {expected_size} bytes, "
            f"found {found_size})"
        )
    if found_sha256 != expected_sha256:
        return (
            f"sha256 mismatch (stored file is corrupted: expected {expected_sha256}, "
            f"found {found_sha256})"
        )
    return None
