"""Decode throughput with structured outputs: constrained and free rows in one batch.

N concurrent greedy requests on the default model (no adapters), each generating exactly
`--new-tokens` tokens, in three configurations run interleaved in one process:

  none   no request constrained
  half   every other request constrained by a JSON schema
  all    every request constrained

The schema's first property is a string of at least 400 characters, so no constrained
row can finish before `--new-tokens` (every configuration generates the same tokens per
row and the ratios compare like with like). Reports the medians of tokens/s and decode
step time over `--repeats` (configurations interleaved, their order rotated), and the
ratios half/none and all/none (target: half >= 0.9). Prints a table and writes JSON under
``bench/results/``.

    .venv/bin/python -m bench.structured_throughput            # default model, N=16
    .venv/bin/python -m bench.structured_throughput --smoke    # tiny random model
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.serve_throughput import prompt_ids
from bench.timing import machine_info

RESULTS = Path(__file__).parent / "results"
SCHEMA = {
    "type": "object",
    "properties": {
        "summary": {"type": "string", "minLength": 400},
        "sentiment": {"enum": ["positive", "negative", "neutral"]},
        "topics": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
        "details": {
            "type": "object",
            "properties": {"words": {"type": "integer"}, "language": {"type": "string"}},
            "required": ["words", "language"],
            "additionalProperties": False,
        },
    },
    "required": ["summary", "sentiment", "topics", "details"],
    "additionalProperties": False,
}


def run(engine: Any, prompts: list[list[int]], grammars: list[Any], new_tokens: int) -> dict:
    """One batch through the engine; tokens/s over the whole run and the median decode
    step (steps where every request had already produced its first token)."""
    from adapterhub_server.engine.sampling_params import SamplingParams

    t0 = time.perf_counter()
    for i, (ids, grammar) in enumerate(zip(prompts, grammars)):
        params = SamplingParams(
            max_tokens=new_tokens, temperature=0.0, ignore_eos=True, grammar=grammar
        )
        engine.add_request(f"r{time.monotonic_ns()}-{i}", ids, params)
    started: set[str] = set()
    reasons: dict[str, str | None] = {}
    generated = 0
    steps: list[float] = []
    while engine.has_work():
        s0 = time.perf_counter()
        outs = engine.step()
        dt = time.perf_counter() - s0
        if outs and all(o.request_id in started for o in outs):
            steps.append(dt)
        for o in outs:
            started.add(o.request_id)
            generated += len(o.token_ids)
            if o.finished:
                reasons[o.request_id] = o.finish_reason
    wall = time.perf_counter() - t0
    if any(r != "length" for r in reasons.values()):
        raise RuntimeError(f"a request ended early: {sorted(set(reasons.values()))}")
    return {
        "tokens": generated,
        "wall_s": wall,
        "tokens_per_s": generated / wall,
        "median_decode_step_ms": statistics.median(steps) * 1e3 if steps else 0.0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", "-n", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--smoke", action="store_true", help="tiny random model, 1 repeat")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from adapterhub_server.base_model import ResolvedBaseModel, resolve_base_model
    from adapterhub_server.config import EngineConfig
    from adapterhub_server.engine.build import build_engine
    from adapterhub_server.engine.structured import GrammarSpec

    if args.smoke:
        from tests.tiny_models import make_tiny_llama

        tmp = Path(tempfile.mkdtemp(prefix="adapterhub-bench-"))
        base = ResolvedBaseModel(make_tiny_llama(tmp / "base"), "tiny", "local")
        args.requests, args.new_tokens, args.repeats = 4, 4, 1
    else:
        base = resolve_base_model(None)
    config = EngineConfig(
        max_num_seqs=args.requests,
        max_num_batched_tokens=max(512, args.requests),
        max_model_len=1024 if not args.smoke else None,
    )
    engine = build_engine(base, config)
    compiler = engine.grammar_compiler
    assert compiler is not None, "this tokenizer cannot drive structured outputs"
    t0 = time.perf_counter()
    grammar = compiler.compile(GrammarSpec("json_schema", json.dumps(SCHEMA)), timeout=60)
    compile_ms = (time.perf_counter() - t0) * 1e3
    prompts = prompt_ids(engine.tokenizer, args.requests)
    n = args.requests
    layouts = {
        "none": [None] * n,
        "half": [grammar if i % 2 else None for i in range(n)],
        "all": [grammar] * n,
    }
    run(engine, prompts, layouts["half"], 2)  # warm-up: allocator, mask worker, executor
    runs: dict[str, list[dict]] = {k: [] for k in layouts}
    # Interleaved, so that machine noise hits every configuration alike, and rotated, so
    # that none always runs right after the same other one.
    names = list(layouts)
    for rep in range(args.repeats):
        for name in names[rep % 3 :] + names[: rep % 3]:
            runs[name].append(run(engine, prompts, layouts[name], args.new_tokens))
            r = runs[name][-1]
            print(
                f"  {name:5s} {r['tokens_per_s']:8.1f} tok/s  "
                f"step {r['median_decode_step_ms']:6.1f} ms",
                flush=True,
            )

    summary = {
        name: {
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in rs),
            "median_decode_step_ms": statistics.median(r["median_decode_step_ms"] for r in rs),
            "tokens": rs[0]["tokens"],
            "spread_tokens_per_s": [
                round(min(r["tokens_per_s"] for r in rs), 1),
                round(max(r["tokens_per_s"] for r in rs), 1),
            ],
        }
        for name, rs in runs.items()
    }
    ratios = {
        f"{k}/none": summary[k]["tokens_per_s"] / summary["none"]["tokens_per_s"]
        for k in ("half", "all")
    }
    print(f"\n{'config':8s} {'tok/s':>9s} {'step ms':>9s} {'min-max tok/s':>16s}")
    for name, s in summary.items():
        lo, hi = s["spread_tokens_per_s"]
        print(
            f"{name:8s} {s['tokens_per_s']:9.1f} {s['median_decode_step_ms']:9.1f} "
            f"{lo:7.1f}-{hi:<7.1f}"
        )
    for k, v in ratios.items():
        print(f"{k:10s} {v:6.3f}x")
    meta = {
        **machine_info(),
        "model": base.model_id,
        "requests": n,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "schema_compile_ms": round(compile_ms, 2),
        "grammar_engine": "llguidance",
    }
    out = args.out or RESULTS / (
        "structured_throughput_smoke.json" if args.smoke else "structured_throughput_cpu.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps({"meta": meta, "summary": summary, "ratios": ratios, "runs": runs}, indent=2)
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
