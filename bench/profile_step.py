"""Profile the engine's decode step with torch.profiler: what dominates a step.

Runs N requests over K adapters to steady-state decode, then profiles `--steps` decode
steps and prints the top operators by self CPU time, grouped into base GEMMs, LoRA ops,
attention, and the rest. Writes ``bench/results/profile_step_cpu.json``.

    .venv/bin/python -m bench.profile_step [-n 16] [-k 8] [--rank 16] [--no-adapters]
        [--dtype bfloat16] [--lora-dtype bfloat16]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from bench.serve_throughput import make_adapters, prompt_ids

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--requests", type=int, default=16)
    parser.add_argument("-k", "--adapters", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--no-adapters", action="store_true")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    parser.add_argument("--lora-dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--out", type=Path, default=RESULTS / "profile_step_cpu.json")
    args = parser.parse_args()

    from adapterhub_server.base_model import resolve_base_model
    from adapterhub_server.config import EngineConfig
    from adapterhub_server.engine.build import build_engine
    from adapterhub_server.engine.sampling_params import SamplingParams

    base = resolve_base_model(None)
    adapters = make_adapters(base.path, Path(tempfile.mkdtemp()), args.adapters, args.rank)
    engine = build_engine(
        base,
        EngineConfig(
            max_num_seqs=args.requests,
            max_loras=args.adapters,
            max_model_len=1024,
            dtype=args.dtype,
            lora_dtype=args.lora_dtype,
        ),
        lora_modules=adapters,
    )
    names = list(adapters)
    params = SamplingParams(max_tokens=args.steps + 20, temperature=0, ignore_eos=True)
    for i, ids in enumerate(prompt_ids(engine.tokenizer, args.requests)):
        engine.add_request(
            f"p{i}", ids, params, None if args.no_adapters else names[i % len(names)]
        )
    for _ in range(5):  # prefill and a few decode steps before measuring
        engine.step()
    _label_cpu_kernel_calls()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            with record_function("engine.step"):
                engine.step()
    events = prof.key_averages()
    table = events.table(sort_by="self_cpu_time_total", row_limit=args.top)
    print(table)
    step_total = next(e for e in events if e.key == "engine.step").cpu_time_total / args.steps
    rows = sorted(
        (
            {
                "op": e.key,
                "self_ms_per_step": e.self_cpu_time_total / args.steps / 1e3,
                "calls_per_step": e.count / args.steps,
            }
            for e in events
            if e.key != "engine.step"
        ),
        key=lambda r: -r["self_ms_per_step"],
    )[: args.top]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "requests": args.requests,
                "adapters": 0 if args.no_adapters else args.adapters,
                "rank": args.rank,
                "dtype": args.dtype,
                "lora_dtype": args.lora_dtype,
                "step_ms": step_total / 1e3,
                "threads": torch.get_num_threads(),
                "top_ops": rows,
            },
            indent=2,
        )
    )
    print(f"step: {step_total / 1e3:.1f} ms; wrote {args.out}")


def _label_cpu_kernel_calls() -> None:
    """Time the CPU kernels' calls as ``base.cpu_gemm``, ``lora.cpu_kernel`` and
    ``attention.cpu_kernel``: they are called through ctypes, so the profiler would
    otherwise count their time as the step's own (Python) time."""
    from adapterhub_server import cpu_gemm
    from adapterhub_server.lora import ops
    from adapterhub_server.models import cpu_attention

    for owner, name, label in (
        (cpu_gemm, "linear", "base.cpu_gemm"),
        (ops, "add_lora_cpu", "lora.cpu_kernel"),
        (cpu_attention, "paged_attention", "attention.cpu_kernel"),
    ):
        kernel = getattr(owner, name)

        def labelled(*args, kernel=kernel, label=label, **kwargs) -> object:
            with record_function(label):
                return kernel(*args, **kwargs)

        setattr(owner, name, labelled)


if __name__ == "__main__":
    main()
