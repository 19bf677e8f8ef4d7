"""Compare CPU strategies for the batched multi-LoRA op, side by side in one run.

Strategies, for a decode-shaped batch (one token per sequence, mixed adapters):

* ``loop``        the loop reference (one token at a time);
* ``gather_bmm``  gather each token's A and B, then two batched matmuls;
* ``segmented``   sort tokens by adapter, one shrink + expand per distinct adapter;
* ``dense_span``  one GEMM over all active adapters' rows, a row mask, one GEMM back;
* ``grouped``     tokens gathered per adapter, two ``bmm`` and a scatter (the engine's
                  ``add_lora``; ``grouped_op_only`` excludes building the routing).

Prints a table and writes JSON to ``bench/results/lora_ops_cpu.json``.
Run: ``.venv/bin/python -m bench.lora_ops [--tokens 16] [--adapters 8] [--rank 16]``.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch

from adapterhub_server.lora.ops import add_lora, add_lora_reference, build_lora_batch
from bench.timing import median_us

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
        batch = build_lora_batch(routes)
        add_lora(torch.zeros(tokens, d_out), x, pools, batch)

    prebuilt = build_lora_batch(routes)

    def grouped_op_only() -> None:
        add_lora(torch.zeros(tokens, d_out), x, pools, prebuilt)

    fns = {
        "loop": loop,
        "gather_bmm": gather_bmm,
        "segmented": segmented,
        "dense_span": dense_span,
        "grouped": grouped,
        "grouped_op_only": grouped_op_only,
    }
    return {name: median_us(fn, repeats) for name, fn in fns.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--adapters", type=int, nargs="+", default=[1, 8, 16])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--d-in", type=int, default=576)
    parser.add_argument("--d-out", type=int, default=1536)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--out", type=Path, default=RESULTS / "lora_ops_cpu.json")
    args = parser.parse_args()

    rows = []
    for t in args.tokens:
        for k in args.adapters:
            us = run(t, k, args.rank, args.d_in, args.d_out, args.repeats)
            rows.append({"tokens": t, "adapters": k, **{f"{n}_us": v for n, v in us.items()}})
    names = [k for k in rows[0] if k.endswith("_us")]
    print(f"{'tokens':>6} {'adapters':>8} " + " ".join(f"{n[:-3]:>18}" for n in names))
    for r in rows:
        print(f"{r['tokens']:>6} {r['adapters']:>8} " + " ".join(f"{r[n]:>18.1f}" for n in names))
    args.out.parent.mkdir(parents=True, exist_ok=True)
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
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
