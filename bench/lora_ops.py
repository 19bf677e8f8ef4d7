"""Compare CPU strategies for the batched multi-LoRA op, side by side in one run.

Strategies, for a decode-shaped batch (one token per sequence, mixed adapters):

* ``loop``        the loop reference (one token at a time);
* ``gather_bmm``  gather each token's A and B, then two batched matmuls;
* ``segmented``   sort tokens by adapter, one shrink + expand per distinct adapter;
* ``dense_span``  one GEMM over all active adapters' rows, a row mask, one GEMM back;
* ``grouped``     tokens gathered per adapter, two ``bmm`` and a scatter (``add_lora``'s
                  torch ops; ``grouped_op_only`` excludes building the routing);
* ``cpu_kernel``  the fused C kernel (``lora/cpu_kernel.py``, the engine's choice on CPU
                  in float32), routing included.

``--read-floor`` times the same LoRA work between the engine's prepacked base GEMMs, as in
a decode step, against a plain read of the same adapter bytes: the floor for any kernel.

``--decode-step`` instead times a whole decode step's LoRA work, model-shaped (SmolLM2-135M:
30 layers of q/k/v, o, gate/up and down, hidden 576, intermediate 1536, k/v 192), torch ops
against the kernel with float32 and with bfloat16 weights (``lora_dtype``), over token/adapter
mixes: the adapter weights (tens of MB) do not fit in
cache there, as in the engine, while the single-op table above runs with them cached.

Prints a table and writes JSON to ``bench/results/lora_ops_cpu.json`` (``--decode-step``:
``lora_decode_step_cpu.json``).
Run: ``.venv/bin/python -m bench.lora_ops [--tokens 16] [--adapters 8] [--rank 16]
[--decode-step]``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from adapterhub_server.frozen_linear import FrozenLinear
from adapterhub_server.lora.cpu_kernel import load as load_cpu_kernel
from adapterhub_server.lora.ops import (
    CPU_KERNEL,
    TORCH_OPS,
    add_lora,
    add_lora_reference,
    build_lora_batch,
)
from bench.timing import machine_info, median_us

RESULTS = Path(__file__).parent / "results"


def run(tokens: int, adapters: int, rank: int, d_in: int, d_out: int, repeats: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    a3 = torch.randn(adapters, rank, d_in, generator=gen)
    b3 = torch.randn(adapters, rank, d_out, generator=gen)
    pools = {rank: (a3, (b3,))}
    x = torch.randn(tokens, d_in, generator=gen)
    slots = [t % adapters for t in range(tokens)]
    routes = [(rank, s) for s in slots]
    idx = torch.tensor(slots)

    def loop() -> None:
        add_lora_reference(torch.zeros(tokens, d_out), x, pools, routes)

    def gather_bmm() -> None:
        h = torch.bmm(x[:, None, :], a3[idx].transpose(1, 2))
        y = torch.zeros(tokens, d_out)
        y += torch.bmm(h, b3[idx])[:, 0]

    order = torch.argsort(idx, stable=True)
    counts = torch.bincount(idx, minlength=adapters).tolist()

    def segmented() -> None:
        y = torch.zeros(tokens, d_out)
        xs = x[order]
        out = torch.empty(tokens, d_out)
        start = 0
        for s, c in enumerate(counts):
            if c:
                out[start : start + c] = (xs[start : start + c] @ a3[s].T) @ b3[s]
                start += c
        y.index_add_(0, order, out)

    a_flat = a3.view(-1, d_in)
    b_flat = b3.view(-1, d_out)
    cols = torch.arange(adapters * rank)
    mask = (cols[None, :] // rank == idx[:, None]).float()

    def dense_span() -> None:
        y = torch.zeros(tokens, d_out)
        h = (x @ a_flat.T).mul_(mask)
        y.addmm_(h, b_flat)

    def grouped() -> None:
        batch = build_lora_batch(routes, backend=TORCH_OPS)
        add_lora(torch.zeros(tokens, d_out), x, pools, batch)

    prebuilt = build_lora_batch(routes, backend=TORCH_OPS)

    def grouped_op_only() -> None:
        add_lora(torch.zeros(tokens, d_out), x, pools, prebuilt)

    def cpu_kernel() -> None:
        batch = build_lora_batch(routes, backend=CPU_KERNEL)
        add_lora(torch.zeros(tokens, d_out), x, pools, batch)

    fns: dict[str, Callable[[], None]] = {
        "loop": loop,
        "gather_bmm": gather_bmm,
        "segmented": segmented,
        "dense_span": dense_span,
        "grouped": grouped,
        "grouped_op_only": grouped_op_only,
    }
    if load_cpu_kernel() is not None:
        fns["cpu_kernel"] = cpu_kernel
    return {name: median_us(fn, repeats) for name, fn in fns.items()}


# SmolLM2-135M's adapted groups per layer: (in_features, out_features of each member).
_HIDDEN, _INTER, _KV = 576, 1536, 192
_LAYER_GROUPS = [
    (_HIDDEN, (_HIDDEN, _KV, _KV)),  # q/k/v
    (_HIDDEN, (_HIDDEN,)),  # o
    (_HIDDEN, (_INTER, _INTER)),  # gate/up
    (_INTER, (_HIDDEN,)),  # down
]


def decode_step(tokens: int, adapters: int, rank: int, layers: int, repeats: int) -> dict:
    """One decode step's LoRA work over a model-shaped stack, tokens spread round-robin
    over `adapters` slots; torch ops and the kernel interleaved, medians in ms."""
    gen = torch.Generator().manual_seed(0)
    calls = []
    for _ in range(layers):
        for d_in, outs in _LAYER_GROUPS:
            a = torch.randn(adapters, len(outs) * rank, d_in, generator=gen) * 0.05
            bs = tuple(torch.randn(adapters, rank, o, generator=gen) * 0.05 for o in outs)
            x = torch.randn(tokens, d_in, generator=gen)
            calls.append(({rank: (a, bs)}, x, torch.zeros(tokens, sum(outs))))
    routes = [(rank, t % adapters) for t in range(tokens)]

    bf16_calls = [
        ({c: (a.bfloat16(), tuple(b.bfloat16() for b in bs)) for c, (a, bs) in pools.items()}, x, y)
        for pools, x, y in calls
    ]

    def step(kernel: bool, weights: list = calls) -> Callable[[], None]:
        def run() -> None:
            batch = build_lora_batch(routes, backend=CPU_KERNEL if kernel else TORCH_OPS)
            for pools, x, y in weights:
                add_lora(y, x, pools, batch)

        return run

    fns = {"torch_ops": step(False)}
    if load_cpu_kernel() is not None:
        fns["cpu_kernel"] = step(True)
    if load_cpu_kernel(torch.bfloat16) is not None:
        fns["cpu_kernel_bf16"] = step(True, bf16_calls)
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    # Interleaved, so that machine noise hits both alike.
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - t0)
    weights_mb = sum(
        a.nbytes + sum(b.nbytes for b in bs) for pools, _, _ in calls for a, bs in pools.values()
    )
    return {
        "weights_mb": weights_mb / 1e6,
        **{f"{n}_ms": statistics.median(v) * 1e3 for n, v in samples.items()},
    }


def read_floor(tokens: int, adapters: int, rank: int, layers: int, repeats: int) -> dict:
    """The adapter cost inside a model-shaped stack of the engine's prepacked base GEMMs
    (`FrozenLinear`, plus the lm_head), each followed, as in the engine, by nothing, by the
    CPU kernel, or by a plain read of the same number of adapter bytes (one ``sum`` over
    them, no LoRA arithmetic): the read is a floor no LoRA kernel can go below here. Per
    adapter-weight dtype, medians in ms per step, the three variants interleaved."""
    gen = torch.Generator().manual_seed(0)
    stack = []
    for _ in range(layers):
        for d_in, outs in _LAYER_GROUPS:
            base = FrozenLinear(torch.randn(sum(outs), d_in, generator=gen) * 0.02, None)
            a = torch.randn(adapters, len(outs) * rank, d_in, generator=gen) * 0.05
            bs = tuple(torch.randn(adapters, rank, o, generator=gen) * 0.05 for o in outs)
            x = torch.randn(tokens, d_in, generator=gen)
            stack.append((base, x, a, bs))
    head = FrozenLinear(torch.randn(49152, _HIDDEN, generator=gen) * 0.02, None)
    head_x = torch.randn(tokens, _HIDDEN, generator=gen)
    batch = build_lora_batch([(rank, t % adapters) for t in range(tokens)], backend=CPU_KERNEL)
    result: dict[str, float] = {}
    for dtype in (torch.float32, torch.bfloat16):
        calls = [
            (base, x, {rank: (a.to(dtype), tuple(b.to(dtype) for b in bs))})
            for base, x, a, bs in stack
        ]
        flats = [
            torch.cat([a.flatten()] + [b.flatten() for b in bs]).to(dtype) for _, _, a, bs in stack
        ]

        def step(variant: str, calls: list = calls, flats: list = flats) -> None:
            for (base, x, pools), flat in zip(calls, flats):
                y = base(x)
                if variant == "kernel":
                    add_lora(y, x, pools, batch)
                elif variant == "read":
                    flat.sum()
            head(head_x)

        samples: dict[str, list[float]] = {v: [] for v in ("base", "kernel", "read")}
        for variant in samples:
            step(variant)
        for _ in range(repeats):
            for variant in samples:
                t0 = time.perf_counter()
                step(variant)
                samples[variant].append(time.perf_counter() - t0)
        med = {v: statistics.median(s) * 1e3 for v, s in samples.items()}
        name = "fp32" if dtype == torch.float32 else "bf16"
        result["base_ms"] = med["base"]
        result[f"kernel_{name}_ms"] = med["kernel"] - med["base"]
        result[f"read_{name}_ms"] = med["read"] - med["base"]
    return result


def _print_table(rows: list[dict], keys: tuple[str, ...], width: int) -> None:
    names = [k for k in rows[0] if k not in keys]
    print(" ".join(f"{k:>8}" for k in keys) + " " + " ".join(f"{n:>{width}}" for n in names))
    for r in rows:
        print(
            " ".join(f"{r[k]:>8}" for k in keys)
            + " "
            + " ".join(f"{r[n]:>{width}.1f}" for n in names)
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--adapters", type=int, nargs="+", default=[1, 8, 16])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--d-in", type=int, default=576)
    parser.add_argument("--d-out", type=int, default=1536)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument(
        "--decode-step",
        action="store_true",
        help="time a model-shaped decode step's LoRA work (torch ops vs the CPU kernel)",
    )
    parser.add_argument(
        "--read-floor",
        action="store_true",
        help="the adapter cost between the base GEMMs: the kernel vs a plain read of its bytes",
    )
    parser.add_argument("--layers", type=int, default=30, help="with --decode-step, --read-floor")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    if args.read_floor or args.decode_step:
        measure, name, unit = (
            (
                read_floor,
                "lora_read_floor_cpu.json",
                "milliseconds per decode step (median): base GEMMs, and what the kernel or a "
                "plain read of the adapter bytes adds to them",
            )
            if args.read_floor
            else (decode_step, "lora_decode_step_cpu.json", "milliseconds per decode step (median)")
        )
        rows = [
            {"tokens": t, "adapters": k, **measure(t, k, args.rank, args.layers, args.repeats)}
            for t in args.tokens
            for k in args.adapters
        ]
        _print_table(rows, ("tokens", "adapters"), 14)
        out = args.out or RESULTS / name
        meta = {**machine_info(), "rank": args.rank, "layers": args.layers, "unit": unit}
    else:
        rows = []
        for t in args.tokens:
            for k in args.adapters:
                us = run(t, k, args.rank, args.d_in, args.d_out, args.repeats)
                rows.append({"tokens": t, "adapters": k, **{f"{n}_us": v for n, v in us.items()}})
        _print_table(rows, ("tokens", "adapters"), 18)
        out = args.out or RESULTS / "lora_ops_cpu.json"
        meta = {
            "device": "cpu",
            "processor": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "rank": args.rank,
            "d_in": args.d_in,
            "d_out": args.d_out,
            "unit": "microseconds per call (median)",
        }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
