"""How many KV blocks the engine gets: from `--kv-cache-memory`, or on CUDA from
`--gpu-memory-utilization` and what the model, its adapters and a full step already use."""

from __future__ import annotations

import re
from collections.abc import Iterable

_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*")

DEFAULT_CPU_KV_CACHE_BYTES = 2 * 2**30
"""`--kv-cache-memory` on CPU when it is not given."""


def parse_size(text: str) -> int:
    """Bytes in `text`: an integer, or a number with KiB/MiB/GiB/TiB (binary) or
    KB/MB/GB/TB (decimal), case-insensitive (``"1.5GiB"``, ``"512 MB"``, ``"1048576"``)."""
    match = _SIZE.fullmatch(text)
    unit = match.group(2).upper() if match else None
    if match is None or unit not in _UNITS:
        raise ValueError(
            f"invalid size {text!r}: use bytes, or a number with KiB, MiB, GiB (binary) or "
            "KB, MB, GB (decimal)"
        )
    number = match.group(1)
    if unit in ("", "B") and "." in number:
        raise ValueError(f"invalid size {text!r}: a byte count is an integer")
    return int(float(number) * _UNITS[unit])


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError("unreachable")


def gpu_kv_budget(
    *,
    total_bytes: int,
    utilization: float,
    peak_torch_bytes: int,
    non_torch_bytes: int,
    adapter_reserve_bytes: int,
) -> int:
    """KV bytes that keep the whole process within ``utilization * total_bytes``.

    Args:
        total_bytes: the device's memory.
        peak_torch_bytes: the most torch allocated at once while the engine ran its largest
            step (weights, adapters loaded so far, activations).
        non_torch_bytes: device memory in use by the process outside torch's allocator
            (CUDA context, cuBLAS workspaces), measured as used - reserved.
        adapter_reserve_bytes: what the adapter pool may still grow by (its full slots).
    Raises ValueError when nothing is left for the KV cache.
    """
    budget = int(total_bytes * utilization)
    kv = budget - peak_torch_bytes - non_torch_bytes - adapter_reserve_bytes
    if kv <= 0:
        raise ValueError(
            f"--gpu-memory-utilization {utilization} allows {format_bytes(budget)}, but the "
            f"model and one full step already use {format_bytes(peak_torch_bytes)} "
            f"(+{format_bytes(non_torch_bytes)} outside torch, "
            f"+{format_bytes(adapter_reserve_bytes)} reserved for adapter slots); raise it "
            "or give --kv-cache-memory"
        )
    return kv


def adapter_pool_bytes(
    groups: Iterable[tuple[int, tuple[int, ...]]], *, slots: int, max_rank: int, element: int
) -> int:
    """Bytes of the adapter weight pool with every slot holding an adapter of the largest
    rank class: A ``[slots, m * c, in]`` and B_j ``[slots, c, out_j]`` per packed group.

    Args:
        groups: per packed group, ``(in_features, out_features per member)``.
    """
    c = 8
    while c < max_rank:
        c *= 2
    per_slot = sum(len(outs) * c * fan_in + c * sum(outs) for fan_in, outs in groups)
    return per_slot * slots * element


def num_blocks_for(budget_bytes: int, bytes_per_block: int) -> int:
    """Blocks in `budget_bytes` (one of them is the null block)."""
    n = budget_bytes // bytes_per_block
    if n < 2:
        raise ValueError(
            f"the KV cache budget ({format_bytes(budget_bytes)}) holds fewer than 2 blocks of "
            f"{format_bytes(bytes_per_block)}; give more --kv-cache-memory or a smaller "
            "--block-size"
        )
    return n
