"""Attention on CPU over the paged KV cache: the C kernel vs gather + SDPA.

On the default model's shape (30 layers, 9 query heads over 3 KV heads of 64), through
`models.attention.attend` (the step's key/value writes included), both paths interleaved:
- decode: one step of 16 sequences whose blocks are scattered over the cache, at several
  context lengths;
- prefill: one chunk of C tokens after P cached tokens (a prefix-cache hit when P > 0).
Prints a table, writes ``bench/results/attention_cpu.json``.

    .venv/bin/python -m bench.attention_cpu [--contexts 64 256 1024] [--prefill 1000:20]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from unittest import mock

import torch

from adapterhub_server.models import cpu_attention
from adapterhub_server.models.attention import (
    AttentionMetadata,
    KVCache,
    attend,
    build_attention_metadata,
)
from bench.timing import machine_info

RESULTS = Path(__file__).parent / "results"
LAYERS, HEADS, KV_HEADS, HEAD_DIM, BLOCK = 30, 9, 3, 64, 16


def _cache(num_blocks: int, dtype: torch.dtype, gen: torch.Generator) -> KVCache:
    cache = KVCache(
        num_layers=LAYERS,
        num_blocks=num_blocks,
        block_size=BLOCK,
        num_kv_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        dtype=dtype,
        device="cpu",
    )
    cache.k.copy_(torch.randn(cache.k.shape, generator=gen))
    cache.v.copy_(torch.randn(cache.v.shape, generator=gen))
    return cache


def _paths_ms(
    cache: KVCache, meta: AttentionMetadata, tokens: int, gen: torch.Generator, repeats: int
) -> dict[str, float]:
    """Median ms of `attend` over every layer for `tokens` queries laid out by `meta`, per
    path, after checking that both paths agree."""
    dtype = cache.dtype
    q = torch.randn(tokens, HEADS, HEAD_DIM, generator=gen).to(dtype)
    k = torch.randn(tokens, KV_HEADS, HEAD_DIM, generator=gen).to(dtype)
    v = torch.randn(tokens, KV_HEADS, HEAD_DIM, generator=gen).to(dtype)

    def run() -> torch.Tensor:
        return torch.stack([attend(q, k, v, cache, layer, meta) for layer in range(LAYERS)])

    paths = {"kernel": cpu_attention.applies, "torch": lambda *_: False}
    outputs = {}
    for name, applies in paths.items():
        with mock.patch.object(cpu_attention, "applies", applies):
            outputs[name] = run()  # warm-up, and the outputs compared below
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(outputs["kernel"], outputs["torch"], rtol=tol, atol=tol)
    samples: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(repeats):  # interleaved, so that machine noise hits both alike
        for name, applies in paths.items():
            with mock.patch.object(cpu_attention, "applies", applies):
                t0 = time.perf_counter()
                run()
                samples[name].append((time.perf_counter() - t0) * 1e3)
    return {name: statistics.median(s) for name, s in samples.items()}


def decode_ms(context: int, sequences: int, dtype: torch.dtype, repeats: int) -> dict:
    """One decode step of `sequences` sequences at `context` tokens, blocks shuffled."""
    gen = torch.Generator().manual_seed(0)
    blocks_each = (context + BLOCK - 1) // BLOCK
    cache = _cache(1 + sequences * blocks_each, dtype, gen)
    order = (torch.randperm(sequences * blocks_each, generator=gen) + 1).tolist()
    tables = [order[i * blocks_each : (i + 1) * blocks_each] for i in range(sequences)]
    meta = build_attention_metadata(tables, [context - 1] * sequences, [], BLOCK)
    return _paths_ms(cache, meta, sequences, gen, repeats)


def prefill_ms(cached: int, chunk: int, dtype: torch.dtype, repeats: int) -> dict:
    """One prefill chunk of `chunk` tokens after `cached` tokens of the same sequence."""
    gen = torch.Generator().manual_seed(0)
    blocks = (cached + chunk + BLOCK - 1) // BLOCK
    cache = _cache(1 + blocks, dtype, gen)
    table = (torch.randperm(blocks, generator=gen) + 1).tolist()
    meta = build_attention_metadata([], [], [(table, cached, chunk)], BLOCK)
    return _paths_ms(cache, meta, chunk, gen, repeats)


def _cached_and_chunk(text: str) -> tuple[int, int]:
    """``CACHED:CHUNK`` (e.g. ``1000:20``) as two counts, a chunk of at least one token."""
    try:
        cached, chunk = (int(x) for x in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected CACHED:CHUNK, got {text!r}") from None
    if cached < 0 or chunk < 1:
        raise argparse.ArgumentTypeError(f"need CACHED >= 0 and CHUNK >= 1, got {text!r}")
    return cached, chunk


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", type=int, nargs="*", default=[64, 256, 1024])
    parser.add_argument("--sequences", type=int, default=16)
    parser.add_argument(
        "--prefill",
        nargs="*",
        type=_cached_and_chunk,
        default=[(1000, 20), (1000, 100), (0, 512)],
        help="CACHED:CHUNK pairs: a chunk of CHUNK tokens after CACHED cached ones",
    )
    parser.add_argument(
        "--dtype", choices=["float32", "bfloat16"], nargs="+", default=["float32", "bfloat16"]
    )
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--out", type=Path, default=RESULTS / "attention_cpu.json")
    args = parser.parse_args()
    if cpu_attention.load() is None:
        raise SystemExit("the CPU attention kernel cannot be built here")
    rows = []
    print(f"{'dtype':9s} {'case':28s} {'kernel ms':>10s} {'torch ms':>9s} {'speed-up':>9s}")
    cases = [
        (
            {"kind": "decode", "context": c},
            f"decode, {args.sequences} x {c} tokens",
            decode_ms,
            (c, args.sequences),
        )
        for c in args.contexts
    ] + [
        (
            {"kind": "prefill", "cached": cached, "chunk": chunk},
            f"prefill {chunk} after {cached} cached",
            prefill_ms,
            (cached, chunk),
        )
        for cached, chunk in args.prefill
    ]
    for dtype_name in args.dtype:
        for fields, label, measure, params in cases:
            ms = measure(*params, getattr(torch, dtype_name), args.repeats)
            rows.append({"dtype": dtype_name, **fields, **{f"{k}_ms": v for k, v in ms.items()}})
            print(
                f"{dtype_name:9s} {label:28s} {ms['kernel']:10.2f} {ms['torch']:9.2f} "
                f"{ms['torch'] / ms['kernel']:8.2f}x"
            )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "sequences": args.sequences,
        "layers": LAYERS,
        "repeats": args.repeats,
        **machine_info(),
    }
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
