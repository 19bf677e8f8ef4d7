"""How many chats run at once in a fixed KV budget: paged blocks vs static rows, side by side.

N concurrent chats (prompts of about `--prompt-tokens` tokens with the chat template, spread
over K rank-r LoRA adapters, `--max-tokens` greedy tokens each, EOS ignored), submitted at
once, through:

  paged     this engine: `--kv-cache-memory` of KV blocks, ``max_num_seqs`` 256; a sequence
            holds blocks for the tokens it has
  static    the engine before paged KV (a git worktree, `--old-tree`): every sequence holds
            a whole ``max_model_len`` (`--static-len`) row, so the same memory holds
            ``floor(kv_cache_memory / row bytes)`` rows, its ``max_num_seqs``
  preempt   this engine with a cache that holds only `--preempt-fraction` of the sequences
            at full length: it must preempt and recompute, and every request must still
            finish with all its tokens and no error (checked; a failure exits non-zero)

The number of running sequences is sampled after every step. Every run is a fresh worker
process (this file, run as a script with the tree's package on PYTHONPATH, so the same
workload code drives both trees); paged and static repeats are interleaved and medians
reported. Prints a table, writes JSON (and a PNG) under ``bench/results/``.

    .venv/bin/python -m bench.capacity              # default model, N=128, 1 GiB
    .venv/bin/python -m bench.capacity --smoke      # tiny random model, seconds
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).parent / "results"
_RESULT = "CAPACITY-RESULT "
"""Prefix of the worker's one line of JSON on stdout."""


# -- the worker: runs in either tree, so it uses only what both engines have -------------------


def worker(spec_path: Path) -> None:
    """Build the engine `spec` describes, run the workload once, print one JSON line."""
    import logging

    import torch

    import adapterhub_server
    from adapterhub_server.base_model import ResolvedBaseModel
    from adapterhub_server.config import EngineConfig
    from adapterhub_server.engine.build import build_engine
    from adapterhub_server.engine.sampling_params import SamplingParams

    logging.basicConfig(level=logging.WARNING)
    spec = json.loads(spec_path.read_text())
    package = Path(adapterhub_server.__file__).resolve().parent
    if not package.is_relative_to(Path(spec["tree"]).resolve()):
        raise RuntimeError(f"adapterhub_server came from {package}, not {spec['tree']}")
    base = ResolvedBaseModel(Path(spec["base_path"]), spec["model_id"], "local")
    adapters = {name: Path(p) for name, p in spec["adapters"].items()}
    engine = build_engine(base, EngineConfig(**spec["engine_config"]), lora_modules=adapters)
    engine.warm_up()
    warm = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    for i, name in enumerate(adapters):
        engine.add_request(f"warm-{i}", spec["prompts"][i][:8], warm, name)
    while engine.has_work():
        engine.step()
    kv = getattr(engine, "kv", None)  # the paged engine's block manager
    if kv is not None:
        kv.pool.reset_prefix_cache()
        queried0, hit0 = kv.stats.queried_tokens, kv.stats.hit_tokens
    preempted0 = getattr(engine.scheduler, "num_preemptions", 0)

    max_tokens = spec["max_tokens"]
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    ids = [f"c{i}" for i in range(len(spec["prompts"]))]
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    for rid, prompt, adapter in zip(ids, spec["prompts"], spec["adapter_of"]):
        engine.add_request(rid, prompt, params, adapter)
    tokens = dict.fromkeys(ids, 0)
    first: dict[str, float] = {}
    done: dict[str, float] = {}
    reasons: dict[str, str | None] = {}
    errors: list[str] = []
    timeline: list[tuple[float, int]] = []
    decode_steps: list[float] = []
    peak_usage = 0.0
    while engine.has_work():
        # Decode-only (nearly: a preempted sequence may be recomputing): every request had
        # its first token and none waits.
        decoding = len(first) == len(ids) and engine.num_waiting == 0
        s0 = time.perf_counter()
        outs = engine.step()
        dt = time.perf_counter() - s0
        now = time.perf_counter() - t0
        if decoding:
            decode_steps.append(dt)
        timeline.append((round(now, 4), engine.num_running))
        if kv is not None:
            peak_usage = max(peak_usage, kv.usage())
        for o in outs:
            tokens[o.request_id] += len(o.token_ids)
            if o.token_ids:
                first.setdefault(o.request_id, now)
            if o.finished:
                done[o.request_id] = now
                reasons[o.request_id] = o.finish_reason
                if o.error:
                    errors.append(f"{o.request_id}: {o.error}")
        if not outs and engine.idle:
            time.sleep(0.001)
    wall = time.perf_counter() - t0
    generated = sum(tokens.values())
    ok = sum(
        1
        for rid in ids
        if tokens[rid] == max_tokens and reasons.get(rid) == "length" and rid in done
    )
    running = [n for _, n in timeline]
    result = {
        "wall_s": wall,
        "generated_tokens": generated,
        "tokens_per_s": generated / wall,
        "peak_running": max(running),
        "mean_running": statistics.mean(running),
        "steps": len(timeline),
        "first_step_s": timeline[0][0],
        "median_decode_step_ms": statistics.median(decode_steps) * 1e3 if decode_steps else 0.0,
        "loadavg_1m_before": load,
        "ttft_p50_s": statistics.median(first.values()),
        "latency_p50_s": statistics.median(done.values()),
        "preemptions": getattr(engine.scheduler, "num_preemptions", 0) - preempted0,
        "requests_ok": ok,
        "errors": errors[:5],
        "torch_threads": torch.get_num_threads(),
        "package": str(package),
        "timeline": timeline,
    }
    if kv is not None:
        queried = kv.stats.queried_tokens - queried0
        result["prefix_hit_rate"] = (kv.stats.hit_tokens - hit0) / queried if queried else 0.0
        result["peak_kv_usage"] = peak_usage
        result["kv_blocks"] = kv.pool.usable_blocks
    print(_RESULT + json.dumps(result), flush=True)


# -- the driver -----------------------------------------------------------------------------


def chat_prompts(tokenizer, n: int, target_tokens: int) -> list[list[int]]:
    """N distinct chats of at least `target_tokens` tokens (a few questions in one message)."""
    from bench.serve_throughput import PROMPTS

    out = []
    for i in range(n):
        text = f"Chat {i + 1}."
        j = 0
        while True:
            messages = [{"role": "user", "content": text}]
            templated = tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=False
            )
            ids = tokenizer(templated, add_special_tokens=False)["input_ids"]
            if len(ids) >= target_tokens:
                break
            text += " " + PROMPTS[(i + 7 * j) % len(PROMPTS)]
            j += 1
        out.append(ids)
    return out


def kv_bytes_per_token(model_dir: Path, dtype_bytes: int = 4) -> int:
    """Keys and values of one token over all layers, from the model's config.json."""
    cfg = json.loads((model_dir / "config.json").read_text())
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    return 2 * cfg["num_hidden_layers"] * kv_heads * head_dim * dtype_bytes


def run_worker(tree: Path, spec: dict, workdir: Path, script: Path) -> dict:
    spec_path = workdir / f"spec-{time.monotonic_ns()}.json"
    spec_path.write_text(json.dumps({**spec, "tree": str(tree)}))
    env = {**os.environ, "PYTHONPATH": str(tree), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, str(script), "--worker", str(spec_path)],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        timeout=3600,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith(_RESULT)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"worker in {tree} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix(_RESULT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", "-n", type=int, default=128)
    parser.add_argument("--adapters", "-k", type=int, default=4, help="0: base model only")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=50)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--kv-cache-memory", default="1GiB")
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--static-len", type=int, default=2048, help="the static engine's rows")
    parser.add_argument("--preempt-fraction", type=float, default=0.4)
    parser.add_argument("--repeats", type=int, default=3, help="of paged and static")
    parser.add_argument("--old-tree", type=Path, default=Path("/tmp/after"))
    parser.add_argument("--base-model", default=None, help="default: the embedded model")
    parser.add_argument("--smoke", action="store_true", help="tiny random model, 1 repeat")
    parser.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.worker is not None:
        worker(args.worker)
        return

    from transformers import AutoTokenizer

    from adapterhub_server.base_model import resolve_base_model
    from adapterhub_server.engine.kv_sizing import format_bytes, parse_size
    from bench.serve_throughput import make_adapters
    from bench.timing import machine_info, median_run, source_state

    source = source_state()  # before the run: the tree may change while it runs
    tmp = Path(tempfile.mkdtemp(prefix="adapterhub-bench-"))
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)  # the adapters: 150 MB
    if args.smoke:
        from tests.tiny_models import make_tiny_llama

        base_path, model_id = make_tiny_llama(tmp / "base"), "tiny"
        args.requests, args.adapters, args.max_tokens, args.repeats = 16, 2, 8, 1
        args.kv_cache_memory, args.static_len = "1MiB", 256
    else:
        base = resolve_base_model(args.base_model)
        base_path, model_id = base.path, base.model_id
    out_path = args.out or RESULTS / ("capacity_smoke.json" if args.smoke else "capacity_cpu.json")
    # The worker runs from a copy, outside either tree, so neither tree's files shadow it.
    script = tmp / "capacity_worker.py"
    shutil.copy(__file__, script)

    tokenizer = AutoTokenizer.from_pretrained(base_path)
    prompts = chat_prompts(tokenizer, args.requests, args.prompt_tokens)
    adapter_dirs = make_adapters(base_path, tmp, args.adapters, args.rank) if args.adapters else {}
    names = list(adapter_dirs)
    adapter_of = [names[i % len(names)] if names else None for i in range(args.requests)]
    kv_bytes = parse_size(args.kv_cache_memory)
    per_token = kv_bytes_per_token(base_path)
    block_size = 16
    static_rows = kv_bytes // (per_token * args.static_len)
    full_len = max(map(len, prompts)) + args.max_tokens
    blocks_per_seq = -(-full_len // block_size)
    # Blocks for `preempt_fraction` of the sequences at full length, plus the null block.
    preempt_blocks = int(args.preempt_fraction * args.requests * blocks_per_seq) + 1
    preempt_bytes = preempt_blocks * block_size * per_token
    if static_rows < 1:
        raise SystemExit(f"{args.kv_cache_memory} holds no {args.static_len}-token row")

    workload = {
        "base_path": str(base_path),
        "model_id": model_id,
        "adapters": {n: str(p) for n, p in adapter_dirs.items()},
        "prompts": prompts,
        "adapter_of": adapter_of,
        "max_tokens": args.max_tokens,
    }
    common = {"max_loras": max(len(names), 1), "max_num_batched_tokens": 512}
    configs = {
        "paged": (
            REPO,
            {
                **common,
                "max_num_seqs": args.max_num_seqs,
                "kv_cache_memory": kv_bytes,
                "block_size": block_size,
            },
        ),
        "static": (
            args.old_tree,
            {**common, "max_num_seqs": static_rows, "max_model_len": args.static_len},
        ),
        "preempt": (
            REPO,
            {
                **common,
                "max_num_seqs": args.max_num_seqs,
                "kv_cache_memory": preempt_bytes,
                "block_size": block_size,
            },
        ),
    }
    print(
        f"{args.requests} chats of {min(map(len, prompts))}-{max(map(len, prompts))} prompt "
        f"tokens + {args.max_tokens}; KV {per_token} B/token; {args.kv_cache_memory}: "
        f"{kv_bytes // (per_token * block_size) - 1} blocks of {block_size} (paged) or "
        f"{static_rows} rows of {args.static_len} (static); preempt: {format_bytes(preempt_bytes)}"
        f" = {preempt_blocks - 1} blocks, {(preempt_blocks - 1) // blocks_per_seq} sequences "
        "at full length",
        flush=True,
    )
    if not args.old_tree.is_dir():
        print(f"  no old tree at {args.old_tree}: static skipped", flush=True)
        del configs["static"]

    runs: dict[str, list[dict]] = {name: [] for name in configs}
    order = [n for n in ("paged", "static") if n in configs]
    schedule = [order if r % 2 == 0 else order[::-1] for r in range(args.repeats)]
    for name in [*(n for o in schedule for n in o), "preempt"]:
        tree, config = configs[name]
        result = run_worker(tree, {**workload, "engine_config": config}, tmp, script)
        runs[name].append(result)
        print(
            f"  {name:8s} peak running {result['peak_running']:4d}  "
            f"{result['tokens_per_s']:7.1f} tok/s  wall {result['wall_s']:7.1f} s  "
            f"preemptions {result['preemptions']}  ok {result['requests_ok']}/{args.requests}",
            flush=True,
        )

    summary = {name: median_run(rs) for name, rs in runs.items()}
    ratios = {}
    if "static" in summary:
        for key in ("peak_running", "tokens_per_s"):
            ratios[f"{key} paged/static"] = summary["paged"][key] / summary["static"][key]
        ratios["wall_s static/paged"] = summary["static"]["wall_s"] / summary["paged"]["wall_s"]
    pre = runs["preempt"]
    checks = {
        f"paged peak_running >= {min(100, args.requests)}": (
            summary["paged"]["peak_running"] >= min(100, args.requests)
        ),
        "preempt: preemptions > 0": all(r["preemptions"] > 0 for r in pre),
        "preempt: every request finished with max_tokens, no error": all(
            r["requests_ok"] == args.requests and not r["errors"] for r in pre
        ),
    }
    for name, rs in runs.items():
        checks[f"{name}: every request ok"] = all(r["requests_ok"] == args.requests for r in rs)

    print()
    print(
        f"{'config':8s} {'max seqs':>8s} {'peak run':>8s} {'mean run':>8s} {'tok/s':>8s} "
        f"{'wall s':>8s} {'ttft p50':>8s} {'steps':>6s} {'dec ms':>6s} {'preempt':>7s} {'hit':>5s} "
        f"{'ok':>5s}"
    )
    for name, s in summary.items():
        hit = s.get("prefix_hit_rate")
        print(
            f"{name:8s} {configs[name][1]['max_num_seqs']:8d} {s['peak_running']:8.0f} "
            f"{s['mean_running']:8.1f} {s['tokens_per_s']:8.1f} {s['wall_s']:8.1f} "
            f"{s['ttft_p50_s']:8.2f} {s['steps']:6.0f} {s['median_decode_step_ms']:6.0f} "
            f"{s['preemptions']:7.0f} "
            f"{(f'{hit:.2f}' if hit is not None else '-'):>5s} {s['requests_ok']:5.0f}"
        )
    for k, v in ratios.items():
        print(f"{k:24s} {v:6.2f}x")
    print("checks:")
    for k, ok in checks.items():
        print(f"  [{'ok' if ok else 'FAIL'}] {k}")

    meta = {
        "model": model_id,
        "device": "cpu",
        **machine_info(),
        "requests": args.requests,
        "adapters": args.adapters,
        "rank": args.rank,
        "prompt_tokens": [min(map(len, prompts)), max(map(len, prompts))],
        "max_tokens": args.max_tokens,
        "kv_cache_memory": args.kv_cache_memory,
        "kv_bytes_per_token": per_token,
        "block_size": block_size,
        "static_len": args.static_len,
        "static_rows": static_rows,
        "preempt_fraction": args.preempt_fraction,
        "preempt_kv_cache_memory": preempt_bytes,
        "source": source,
        "old_tree": str(args.old_tree),
        "old_tree_source": source_state(args.old_tree) if args.old_tree.is_dir() else None,
        "env": {k: v for k, v in os.environ.items() if k.startswith("ADAPTERHUB_")},
        "engine_configs": {name: config for name, (_, config) in configs.items()},
        "repeats": args.repeats,
        "dtype": "float32",
    }
    # The timeline of each setting's median run (by wall time).
    timelines = {
        name: sorted(rs, key=lambda r: r["wall_s"])[len(rs) // 2]["timeline"]
        for name, rs in runs.items()
    }
    for rs in runs.values():
        for r in rs:
            r.pop("timeline", None)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(
        json.dumps(
            {
                "meta": meta,
                "summary": summary,
                "ratios": ratios,
                "checks": checks,
                "runs": runs,
                "timelines": timelines,
            },
            indent=2,
        )
    )
    print(f"wrote {out_path}")
    _plot(summary, timelines, meta, out_path.with_suffix(".png"))
    if not all(checks.values()):
        raise SystemExit("checks failed: " + ", ".join(k for k, ok in checks.items() if not ok))


def _plot(summary: dict, timelines: dict, meta: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    from bench.timing import cpu_run_title, save_figure

    colors = {"paged": "#2b6cb0", "static": "#a0aec0", "preempt": "#dd6b20"}
    labels = {
        "paged": f"paged, {meta['kv_cache_memory']}",
        "static": f"static rows, {meta['kv_cache_memory']} ({meta['static_rows']} rows)",
        "preempt": f"paged, {meta['preempt_kv_cache_memory'] / 2**20:.0f} MiB (preempting)",
    }
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8), width_ratios=[3, 2])
    for name, timeline in timelines.items():
        t = [0.0] + [p[0] for p in timeline]
        n = [0] + [p[1] for p in timeline]
        left.step(t, n, where="post", color=colors[name], label=labels[name])
    left.set_xlabel("seconds since all requests were submitted (median run)")
    left.set_ylabel("running sequences")
    left.legend(fontsize=8)
    names = list(summary)
    bars = right.bar(
        names, [summary[n]["tokens_per_s"] for n in names], color=[colors[n] for n in names]
    )
    right.bar_label(
        bars,
        labels=[
            f"{summary[n]['tokens_per_s']:.0f} tok/s\npeak {summary[n]['peak_running']:.0f}\n"
            f"{summary[n]['wall_s']:.0f} s"
            for n in names
        ],
        fontsize=8,
    )
    right.set_ylabel("generated tokens / s (median)")
    right.margins(y=0.3)
    fig.suptitle(
        cpu_run_title(
            meta,
            f"{meta['requests']} chats x {meta['max_tokens']} tokens over {meta['adapters']} "
            f"rank-{meta['rank']} adapters",
        ),
        fontsize=9,
    )
    save_figure(fig, path)


if __name__ == "__main__":
    main()
