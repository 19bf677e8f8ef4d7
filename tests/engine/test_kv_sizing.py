"""Sizes on the command line and the KV budget arithmetic."""

from __future__ import annotations

import pytest

from adapterhub_server.cli import build_parser, config_from_args
from adapterhub_server.engine.kv_sizing import (
    adapter_pool_bytes,
    gpu_kv_budget,
    num_blocks_for,
    parse_size,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1048576", 1048576),
        ("2GiB", 2 * 2**30),
        ("1.5 GiB", 3 * 2**29),
        ("512MiB", 512 * 2**20),
        ("64kib", 64 * 1024),
        ("1GB", 10**9),
        ("250 MB", 250 * 10**6),
        ("3KB", 3000),
    ],
)
def test_sizes(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "GiB", "1.5", "-1GiB", "2 GiBs", "1e9", "one GiB"])
def test_bad_sizes(text: str) -> None:
    with pytest.raises(ValueError, match="invalid size"):
        parse_size(text)


def test_serve_flags_reach_the_engine_config() -> None:
    args = build_parser().parse_args(
        [
            "serve",
            "--kv-cache-memory",
            "1GiB",
            "--block-size",
            "32",
            "--no-prefix-caching",
            "--gpu-memory-utilization",
            "0.5",
        ]
    )
    engine = config_from_args(args).engine
    assert engine.kv_cache_memory == 2**30
    assert engine.block_size == 32
    assert engine.prefix_caching is False
    assert engine.gpu_memory_utilization == 0.5
    defaults = config_from_args(build_parser().parse_args(["serve"])).engine
    assert defaults.max_num_seqs == 256 and defaults.prefix_caching and defaults.block_size == 16
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--kv-cache-memory", "lots"])


def test_gpu_budget_leaves_room_for_everything_else() -> None:
    gib = 2**30
    kv = gpu_kv_budget(
        total_bytes=80 * gib,
        utilization=0.9,
        peak_torch_bytes=10 * gib,
        non_torch_bytes=1 * gib,
        adapter_reserve_bytes=2 * gib,
    )
    assert kv == int(80 * gib * 0.9) - 13 * gib
    with pytest.raises(ValueError, match="gpu-memory-utilization"):
        gpu_kv_budget(
            total_bytes=16 * gib,
            utilization=0.5,
            peak_torch_bytes=8 * gib,
            non_torch_bytes=0,
            adapter_reserve_bytes=0,
        )


def test_adapter_pool_bytes_counts_every_slot_at_the_largest_rank_class() -> None:
    # One q/k/v group (in 8; outs 8, 4, 4) and one single module (in 16, out 8); rank 12 -> 16.
    groups = [(8, (8, 4, 4)), (16, (8,))]
    per_slot = (3 * 16 * 8 + 16 * 16) + (1 * 16 * 16 + 16 * 8)
    assert adapter_pool_bytes(groups, slots=4, max_rank=12, element=2) == per_slot * 4 * 2


def test_num_blocks() -> None:
    assert num_blocks_for(10_000, 1000) == 10
    with pytest.raises(ValueError, match="fewer than 2 blocks"):
        num_blocks_for(1500, 1000)
