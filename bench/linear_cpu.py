"""Frozen-linear GEMMs on CPU: ``F.linear``, oneDNN's prepacked GEMM, and `cpu_gemm`.

Shapes are a model's packed projections and lm_head (`--shapes`: SmolLM2-135M's by default,
or Llama-3.2-1B's) at several row counts (decode batches are one row per sequence), two
ways:

* per layer, one weight called again and again (it stays in the caches: the GEMMs'
  arithmetic);
* the model's whole stack (`--layers` layers of the four packed projections, then the
  lm_head; SmolLM2-135M's 30 are 538 MB in float32), as a forward reads it: every weight once, from memory. This is what
  a decode step pays.

The three run interleaved, repeat by repeat; medians. Prints a table, writes
``bench/results/linear_cpu.json``.

    .venv/bin/python -m bench.linear_cpu [--rows 1 16 64 512] [--layers 30]
        [--shapes llama-3.2-1b --layers 3 --out bench/results/linear_cpu_1b.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from adapterhub_server import cpu_gemm

RESULTS = Path(__file__).parent / "results"
MODEL_SHAPES = {
    "smollm2-135m": {
        "qkv_proj": (960, 576),
        "o_proj": (576, 576),
        "gate_up_proj": (3072, 576),
        "down_proj": (576, 1536),
        "lm_head": (49152, 576),
    },
    "llama-3.2-1b": {
        "qkv_proj": (3072, 2048),
        "o_proj": (2048, 2048),
        "gate_up_proj": (16384, 2048),
        "down_proj": (2048, 8192),
        "lm_head": (128256, 2048),
    },
}
"""``[out, in]`` of each packed projection and the lm_head."""
LAYER_PROJECTIONS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
PATHS = ("f_linear", "onednn", "cpu_gemm")


def _weights(shape: tuple[int, int]) -> dict[str, torch.Tensor]:
    """One weight in the three forms (plain, oneDNN-packed, cpu_gemm-packed)."""
    weight = torch.randn(*shape) * 0.02
    onednn = torch.ops.mkldnn._reorder_linear_weight(weight, 16)
    packed = cpu_gemm.pack(weight)
    if packed is None:
        raise SystemExit("the C GEMM kernel cannot be built here (no C compiler?)")
    return {"f_linear": weight, "onednn": onednn, "cpu_gemm": packed}


def _call(path: str, x: torch.Tensor, w: torch.Tensor, out_features: int) -> torch.Tensor:
    if path == "f_linear":
        return F.linear(x, w)
    if path == "onednn":
        return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")
    return cpu_gemm.linear(x, w, None, out_features)


def _interleaved_ms(runs: dict[str, Callable[[], None]], repeats: int) -> dict[str, float]:
    """Median ms of each run, the runs alternated repeat by repeat (the machine is noisy)."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for run in runs.values():
        run()  # warm-up: first-touch faults, kernel build
    for _ in range(repeats):
        for name, run in runs.items():
            t0 = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) * 1e3 for name, ts in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 16, 64, 512])
    parser.add_argument("--repeats", type=int, default=15, help="stack passes per path")
    parser.add_argument("--layer-repeats", type=int, default=30, help="calls per layer path")
    parser.add_argument("--layers", type=int, default=30, help="layers in the stack")
    parser.add_argument("--shapes", choices=sorted(MODEL_SHAPES), default="smollm2-135m")
    parser.add_argument("--out", type=Path, default=RESULTS / "linear_cpu.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    shapes = MODEL_SHAPES[args.shapes]
    per_layer = {name: _weights(shape) for name, shape in shapes.items()}
    results: dict[str, list[dict]] = {"layers": [], "stack": []}

    print(f"{'layer':14s} {'rows':>5s}" + "".join(f" {p + ' us':>12s}" for p in PATHS))
    for name, forms in per_layer.items():
        out_f, in_f = shapes[name]
        for n in args.rows:
            x = torch.randn(n, in_f)
            ref = F.linear(x.double(), forms["f_linear"].double()).float()
            for path in PATHS:
                torch.testing.assert_close(
                    _call(path, x, forms[path], out_f), ref, rtol=1e-4, atol=1e-4
                )
            runs = {
                path: (lambda p=path, x=x, w=forms[path], o=out_f: _call(p, x, w, o))
                for path in PATHS
            }
            us = {p: ms * 1e3 for p, ms in _interleaved_ms(runs, args.layer_repeats).items()}
            results["layers"].append(
                {"layer": name, "rows": n, **{f"{p}_us": us[p] for p in PATHS}}
            )
            print(f"{name:14s} {n:5d}" + "".join(f" {us[p]:12.1f}" for p in PATHS))

    stack = [
        (name, _weights(shapes[name])) for _ in range(args.layers) for name in LAYER_PROJECTIONS
    ]
    stack.append(("lm_head", per_layer["lm_head"]))
    mb = sum(forms["f_linear"].numel() * 4 for _, forms in stack) / 1e6
    print(f"\nthe stack: {args.layers} layers and the lm_head, {mb:.0f} MB of float32 weights")
    print(f"{'rows':>5s}" + "".join(f" {p + ' ms':>12s}" for p in PATHS) + "  onednn/cpu_gemm")
    for n in args.rows:
        xs = {k: torch.randn(n, k) for k in {shapes[name][1] for name, _ in stack}}

        def run(path: str, n: int = n, xs: dict = xs) -> None:
            for name, forms in stack:
                out_f, in_f = shapes[name]
                _call(path, xs[in_f], forms[path], out_f)

        repeats = args.repeats if n <= 64 else max(3, args.repeats // 4)
        ms = _interleaved_ms({p: (lambda p=p: run(p)) for p in PATHS}, repeats)
        results["stack"].append({"rows": n, **{f"{p}_ms": ms[p] for p in PATHS}})
        print(
            f"{n:5d}"
            + "".join(f" {ms[p]:12.1f}" for p in PATHS)
            + f"  {ms['onednn'] / ms['cpu_gemm']:14.2f}x"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "device": "cpu",
        "shapes": args.shapes,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "stack_mb": mb,
    }
    args.out.write_text(json.dumps({"meta": meta, **results}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
