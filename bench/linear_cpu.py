"""Frozen-linear GEMMs on CPU: ``F.linear`` vs the prepacked oneDNN path the engine uses.

Shapes are SmolLM2-135M's packed projections and lm_head at several row counts (decode
batches are one row per sequence). Prints a table, writes
``bench/results/linear_cpu.json``.

    .venv/bin/python -m bench.linear_cpu [--rows 1 16 64 512]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from adapterhub_server.frozen_linear import FrozenLinear
from bench.timing import median_us

RESULTS = Path(__file__).parent / "results"
SHAPES = {
    "qkv_proj": (960, 576),
    "o_proj": (576, 576),
    "gate_up_proj": (3072, 576),
    "down_proj": (576, 1536),
    "lm_head": (49152, 576),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 16, 64, 512])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--out", type=Path, default=RESULTS / "linear_cpu.json")
    args = parser.parse_args()
    rows = []
    print(f"{'layer':14s} {'rows':>5s} {'F.linear us':>12s} {'packed us':>10s} {'speed-up':>9s}")
    for name, (out_f, in_f) in SHAPES.items():
        weight = torch.randn(out_f, in_f) * 0.02
        layer = FrozenLinear(weight, None)
        if layer.packed is None:
            raise SystemExit("oneDNN weight prepacking is not available in this torch build")
        for n in args.rows:
            x = torch.randn(n, in_f)
            torch.testing.assert_close(layer(x), F.linear(x, weight), rtol=1e-4, atol=1e-4)
            plain = median_us(lambda x=x, weight=weight: F.linear(x, weight), args.repeats)
            packed = median_us(lambda x=x, layer=layer: layer(x), args.repeats)
            rows.append({"layer": name, "rows": n, "f_linear_us": plain, "packed_us": packed})
            print(f"{name:14s} {n:5d} {plain:12.1f} {packed:10.1f} {plain / packed:8.2f}x")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"device": "cpu", "threads": torch.get_num_threads(), "torch": torch.__version__}
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
