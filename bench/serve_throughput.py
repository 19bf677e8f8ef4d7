"""Decode throughput and latency of multi-adapter serving, side by side in one run.

N concurrent requests spread over K distinct LoRA adapters (rank r on all 7 projections),
each generating exactly `--new-tokens` tokens greedily, through:

  (a) engine       this engine, requests over K adapters
  (b) engine-base  this engine, the same requests with no adapter
  (c) peft-mixed   HF PEFT, one batched ``generate(adapter_names=...)`` over all requests
  (d) peft-swap    HF PEFT, ``set_adapter`` then ``generate`` per request, one at a time
  (e) http         the real server process over HTTP: N concurrent clients on
                   ``/v1/completions``
  (f) engine-dora  this engine, the same requests over K DoRA adapters (same ranks and
                   targets), loaded beside the plain ones: the cost of DoRA's column scale
  (g) engine-merge-cat   the same requests over K per-request merges (``merged_adapters``)
                   of two adapters each, 0.6/0.4, ``cat``: rank 2r adapters
  (h) engine-merge-ties  the same with ``ties`` (density 0.5): rank r, computed once
  (i) engine-bf16  a second engine with ``lora_dtype=bfloat16`` (adapter weights kept in
                   bfloat16, activations float32), the requests of (a)
  (j) bf16-engine, bf16-engine-base, bf16-peft-mixed   serving in bfloat16 (``dtype``):
                   (a), (b) and (c) with the base, the adapters and the activations in
                   bfloat16

The merge and DoRA configurations are measured against (a): ``engine-dora/engine`` etc.;
(a) and (i) against (b), and bf16-engine against bf16-engine-base, in tokens/s and in
median decode step time; each engine against the PEFT run of its dtype.

Every configuration runs `--repeats` times; medians are reported. Prints a table, writes
JSON (and a PNG bar chart) under ``bench/results/``.

    .venv/bin/python -m bench.serve_throughput              # default model, N=16, K=8
    .venv/bin/python -m bench.serve_throughput --smoke      # tiny random model, seconds
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import httpx
import torch

from bench.timing import cpu_run_title, median_run, save_figure

RESULTS = Path(__file__).parent / "results"
PROMPTS = [
    "Write a short poem about the sea.",
    "Explain what a LoRA adapter is in one paragraph.",
    "List three uses of a hash table.",
    "What is the capital of France? Answer briefly.",
    "Translate 'good morning' into Spanish and German.",
    "Give me a recipe for pancakes.",
    "Why is the sky blue?",
    "Summarise the plot of Hamlet in two sentences.",
    "How do I reverse a list in Python?",
    "Name three planets and one fact about each.",
    "What does HTTP stand for?",
    "Describe a cat to someone who has never seen one.",
    "What is 17 times 23?",
    "Suggest a name for a bakery.",
    "What is the difference between a process and a thread?",
    "Tell me a fun fact about octopuses.",
]


def make_adapters(
    base_dir: Path, out: Path, k: int, rank: int, *, dora: bool = False
) -> dict[str, Path]:
    """K random rank-r PEFT adapters on all 7 projections (B non-zero so they matter);
    with `dora`, DoRA adapters named ``dora<i>``."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    adapters = {}
    for i in range(k):
        base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        cfg = LoraConfig(
            r=rank,
            lora_alpha=2 * rank,
            target_modules=[
                "q_proj",
                "k_proj",
                "v_proj",
                "o_proj",
                "gate_proj",
                "up_proj",
                "down_proj",
            ],
            lora_dropout=0.0,
            use_dora=dora,
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(base, cfg)
        gen = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.01)
        name = f"{'dora' if dora else 'adapter'}{i}"
        path = out / name
        model.save_pretrained(path)
        adapters[name] = path
    return adapters


def prompt_ids(tokenizer, n: int) -> list[list[int]]:
    out = []
    for i in range(n):
        messages = [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        out.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    return out


def run_engine(engine, prompts, adapters, new_tokens: int) -> dict:
    from adapterhub_server.engine.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    t0 = time.perf_counter()
    for i, (ids, adapter) in enumerate(zip(prompts, adapters)):
        engine.add_request(f"r{time.monotonic_ns()}-{i}", ids, params, adapter)
    done: dict[str, float] = {}
    first: dict[str, float] = {}
    generated = 0
    decode_steps: list[float] = []
    while engine.has_work():
        if engine.idle:
            # Waiting on background adapter loads or merges: a busy loop here would hold
            # the GIL against the loader thread (as the server's engine loop does not).
            time.sleep(0.001)
        s0 = time.perf_counter()
        outs = engine.step()
        dt = time.perf_counter() - s0
        if outs and all(o.request_id in first for o in outs):
            decode_steps.append(dt)
        now = time.perf_counter() - t0
        for o in outs:
            generated += len(o.token_ids)
            first.setdefault(o.request_id, now)
            if o.finished:
                done[o.request_id] = now
    wall = time.perf_counter() - t0
    return {
        "wall_s": wall,
        "generated_tokens": generated,
        "tokens_per_s": generated / wall,
        "mean_latency_s": statistics.mean(done.values()),
        "mean_ttft_s": statistics.mean(first.values()),
        "median_decode_step_ms": statistics.median(decode_steps) * 1e3 if decode_steps else None,
    }


def run_peft_mixed(model, tokenizer, prompts, adapters, new_tokens: int) -> dict:
    width = max(len(p) for p in prompts)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):  # left padding, as batched generation needs
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            adapter_names=[a or "__base__" for a in adapters],
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=pad,
        )
    wall = time.perf_counter() - t0
    generated = int((out.shape[1] - width) * len(prompts))
    return {
        "wall_s": wall,
        "generated_tokens": generated,
        "tokens_per_s": generated / wall,
        "mean_latency_s": wall,
    }


def run_peft_swap(model, tokenizer, prompts, adapters, new_tokens: int) -> dict:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    t0 = time.perf_counter()
    generated = 0
    finish: list[float] = []
    with torch.inference_mode():
        for p, a in zip(prompts, adapters):
            model.set_adapter(a)
            out = model.generate(
                input_ids=torch.tensor([p]),
                attention_mask=torch.ones(1, len(p), dtype=torch.long),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=pad,
            )
            generated += out.shape[1] - len(p)
            finish.append(time.perf_counter() - t0)
    wall = time.perf_counter() - t0
    return {
        "wall_s": wall,
        "generated_tokens": generated,
        "tokens_per_s": generated / wall,
        "mean_latency_s": statistics.mean(finish),
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def _server_process(
    base_path: Path,
    model_id: str,
    adapters: dict[str, Path],
    config,
    extra_args: Sequence[str] = (),
    on_start: Callable[[subprocess.Popen], None] | None = None,
) -> Iterator[str]:
    """The real `adapterhub-server serve` in its own process on a free loopback port.

    A separate process is how the server is deployed, and it keeps the benchmark's own
    torch work (the other configurations) from sharing the server's thread pools.
    """
    port = _free_port()
    cmd = [
        sys.executable, "-m", "adapterhub_server", "serve",
        "--base-model", str(base_path), "--served-model-name", model_id,
        "--port", str(port), "--no-registry", "--log-level", "warning",
        "--max-num-seqs", str(config.max_num_seqs),
        "--max-num-batched-tokens", str(config.max_num_batched_tokens),
        "--max-loras", str(config.max_loras),
        "--lora-modules", *[f"{n}={p}" for n, p in adapters.items()],
    ]  # fmt: skip
    if config.max_model_len:
        cmd += ["--max-model-len", str(config.max_model_len)]
    proc = subprocess.Popen([*cmd, *extra_args])
    if on_start is not None:
        on_start(proc)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}")
            try:
                if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                raise RuntimeError("server did not become ready")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def run_http(url: str, prompts, adapters, base_id: str, new_tokens: int) -> dict:
    async def one(
        client: httpx.AsyncClient, ids: list[int], adapter: str | None
    ) -> tuple[int, float]:
        t0 = time.perf_counter()
        r = await client.post(
            "/v1/completions",
            json={
                "model": adapter or base_id,
                "prompt": ids,
                "max_tokens": new_tokens,
                "temperature": 0,
                "ignore_eos": True,
            },
        )
        r.raise_for_status()
        return r.json()["usage"]["completion_tokens"], time.perf_counter() - t0

    async def main() -> tuple[list[tuple[int, float]], float]:
        async with httpx.AsyncClient(base_url=url, timeout=600) as client:
            t0 = time.perf_counter()
            res = await asyncio.gather(*(one(client, p, a) for p, a in zip(prompts, adapters)))
            return res, time.perf_counter() - t0

    res, wall = asyncio.run(main())
    generated = sum(n for n, _ in res)
    return {
        "wall_s": wall,
        "generated_tokens": generated,
        "tokens_per_s": generated / wall,
        "mean_latency_s": statistics.mean(t for _, t in res),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", "-n", type=int, default=16)
    parser.add_argument("--adapters", "-k", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--base-model", default=None, help="default: the embedded model")
    parser.add_argument("--smoke", action="store_true", help="tiny random model, 1 repeat")
    parser.add_argument("--skip", nargs="*", default=[], help="configs to skip, e.g. peft-swap")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from adapterhub_server.base_model import ResolvedBaseModel, resolve_base_model
    from adapterhub_server.config import EngineConfig
    from adapterhub_server.engine.build import build_engine
    from adapterhub_server.lora.merge import MergeSpec

    tmp = Path(tempfile.mkdtemp(prefix="adapterhub-bench-"))
    if args.smoke:
        from tests.tiny_models import make_tiny_llama

        base = ResolvedBaseModel(make_tiny_llama(tmp / "base"), "tiny", "local")
        args.requests, args.adapters, args.new_tokens, args.repeats = 4, 2, 4, 1
    else:
        base = resolve_base_model(args.base_model)
    out_path = args.out or RESULTS / (
        "serve_throughput_smoke.json" if args.smoke else "serve_throughput_cpu.json"
    )

    adapter_dirs = make_adapters(base.path, tmp, args.adapters, args.rank)
    names = list(adapter_dirs)
    with_adapters = [names[i % len(names)] for i in range(args.requests)]
    no_adapters: list[str | None] = [None] * args.requests
    dora_dirs = {}
    if "engine-dora" not in args.skip:
        dora_dirs = make_adapters(base.path, tmp, args.adapters, args.rank, dora=True)
    dora_names = list(dora_dirs)
    with_dora = (
        [dora_names[i % len(dora_names)] for i in range(args.requests)] if dora_names else []
    )

    merges: dict[str, list] = {}
    for strategy in ("cat", "ties"):
        if f"engine-merge-{strategy}" in args.skip or len(names) < 2:
            continue
        specs = [
            MergeSpec(
                ids=(names[i], names[(i + 1) % len(names)]),
                weights=(0.6, 0.4),
                strategy=strategy,
                density=None if strategy == "cat" else 0.5,
            )
            for i in range(len(names))
        ]
        merges[strategy] = [specs[i % len(specs)] for i in range(args.requests)]

    config = EngineConfig(
        max_num_seqs=max(args.requests, 1),
        max_num_batched_tokens=max(512, args.requests),
        max_loras=max(args.adapters * (1 + len(merges)) + len(dora_dirs), 1),
        max_lora_rank=max(64, 2 * args.rank),
        max_model_len=1024 if not args.smoke else None,
    )
    engine = build_engine(base, config, lora_modules={**adapter_dirs, **dora_dirs})
    prompts = prompt_ids(engine.tokenizer, args.requests)
    bf16_engine = None
    if "engine-bf16" not in args.skip:
        bf16_engine = build_engine(
            base, replace(config, lora_dtype="bfloat16"), lora_modules=adapter_dirs
        )

    bf16_serving = None
    if not {"bf16-engine", "bf16-engine-base"} <= set(args.skip):
        bf16_serving = build_engine(
            base, replace(config, dtype="bfloat16"), lora_modules=adapter_dirs
        )

    def load_peft(dtype: torch.dtype) -> PeftModel:
        hf = AutoModelForCausalLM.from_pretrained(base.path, dtype=dtype).eval()
        model = PeftModel.from_pretrained(hf, adapter_dirs[names[0]], adapter_name=names[0])
        for n in names[1:]:
            model.load_adapter(adapter_dirs[n], adapter_name=n)
        return model.eval()

    peft_model = None
    if not {"peft-mixed", "peft-swap"} <= set(args.skip):
        peft_model = load_peft(torch.float32)
    bf16_peft = None if "bf16-peft-mixed" in args.skip else load_peft(torch.bfloat16)

    configs: dict[str, Callable[[], dict]] = {
        "engine": lambda: run_engine(engine, prompts, with_adapters, args.new_tokens),
        "engine-base": lambda: run_engine(engine, prompts, no_adapters, args.new_tokens),
        "engine-dora": lambda: run_engine(engine, prompts, with_dora, args.new_tokens),
        "engine-bf16": lambda: run_engine(bf16_engine, prompts, with_adapters, args.new_tokens),
        **{
            f"engine-merge-{s}": (
                lambda reqs=reqs: run_engine(engine, prompts, reqs, args.new_tokens)
            )
            for s, reqs in merges.items()
        },
        "peft-mixed": lambda: run_peft_mixed(
            peft_model, engine.tokenizer, prompts, with_adapters, args.new_tokens
        ),
        "peft-swap": lambda: run_peft_swap(
            peft_model, engine.tokenizer, prompts, with_adapters, args.new_tokens
        ),
        "bf16-engine": lambda: run_engine(bf16_serving, prompts, with_adapters, args.new_tokens),
        "bf16-engine-base": lambda: run_engine(bf16_serving, prompts, no_adapters, args.new_tokens),
        "bf16-peft-mixed": lambda: run_peft_mixed(
            bf16_peft, engine.tokenizer, prompts, with_adapters, args.new_tokens
        ),
    }
    runs: dict[str, list[dict]] = {k: [] for k in configs if k not in args.skip}
    # Warm-up: adapters into slots, the allocator, and the no-adapter prefill (its first
    # run otherwise pays ~0.8 s more TTFT, which the base's figures would carry).
    run_engine(engine, prompts, with_adapters, 2)
    run_engine(engine, prompts, no_adapters, 2)
    if with_dora:
        run_engine(engine, prompts, with_dora, 2)
    if bf16_engine is not None:
        run_engine(bf16_engine, prompts, with_adapters, 2)
    if bf16_serving is not None:
        run_engine(bf16_serving, prompts, with_adapters, 2)
        run_engine(bf16_serving, prompts, no_adapters, 2)
    for reqs in merges.values():  # computes each merge once, as a first request would
        run_engine(engine, prompts, reqs, 2)
    # Interleave repeats so that machine noise hits every configuration alike.
    for _ in range(args.repeats):
        for name in runs:
            runs[name].append(configs[name]())
            print(f"  {name:18s} {runs[name][-1]['tokens_per_s']:8.1f} tok/s", flush=True)

    if "http" not in args.skip:
        runs["http"] = []
        with _server_process(base.path, base.model_id, adapter_dirs, config) as url:
            run_http(url, prompts, with_adapters, base.model_id, 2)
            for _ in range(args.repeats):
                runs["http"].append(
                    run_http(url, prompts, with_adapters, base.model_id, args.new_tokens)
                )
                print(f"  {'http':18s} {runs['http'][-1]['tokens_per_s']:8.1f} tok/s", flush=True)

    summary = {name: median_run(r) for name, r in runs.items()}
    ratios = {}
    for ours, other in (
        ("engine", "peft-mixed"),
        ("engine", "peft-swap"),
        ("bf16-engine", "bf16-peft-mixed"),
    ):
        if ours in summary and other in summary:
            ratios[f"{ours}/{other}"] = (
                summary[ours]["tokens_per_s"] / summary[other]["tokens_per_s"]
            )
    for ours, base_run in (
        ("engine", "engine-base"),
        ("engine-bf16", "engine-base"),
        ("bf16-engine", "bf16-engine-base"),
    ):
        if ours not in summary or base_run not in summary:
            continue
        ratios[f"{ours}/{base_run}"] = (
            summary[ours]["tokens_per_s"] / summary[base_run]["tokens_per_s"]
        )
        step, base_step = (summary[k].get("median_decode_step_ms") for k in (ours, base_run))
        if step and base_step:  # the measure: a decode step's cost
            ratios[f"{ours}/{base_run} decode step"] = step / base_step
        # The same ratios per repeat, then their median: the two runs of a repeat are
        # next to each other in time, so drift in the machine's speed (a shared
        # machine's memory bandwidth moves by a quarter over a day) cancels out.
        pairs = list(zip(runs[ours], runs[base_run]))
        ratios[f"{ours}/{base_run} paired"] = statistics.median(
            a["tokens_per_s"] / b["tokens_per_s"] for a, b in pairs
        )
        if all(a["median_decode_step_ms"] and b["median_decode_step_ms"] for a, b in pairs):
            ratios[f"{ours}/{base_run} decode step paired"] = statistics.median(
                a["median_decode_step_ms"] / b["median_decode_step_ms"] for a, b in pairs
            )
    if "engine" in summary:
        for kind in ("engine-dora", "engine-merge-cat", "engine-merge-ties"):
            if kind in summary:
                ratios[f"{kind}/engine"] = (
                    summary[kind]["tokens_per_s"] / summary["engine"]["tokens_per_s"]
                )
        if "http" in summary and "peft-mixed" in summary:
            ratios["http/peft-mixed"] = (
                summary["http"]["tokens_per_s"] / summary["peft-mixed"]["tokens_per_s"]
            )

    print()
    print(
        f"{'config':18s} {'tok/s':>9s} {'wall s':>8s} {'mean latency s':>15s} {'decode step ms':>15s}"
    )
    for name, s in summary.items():
        step = s.get("median_decode_step_ms")
        print(
            f"{name:18s} {s['tokens_per_s']:9.1f} {s['wall_s']:8.2f} {s['mean_latency_s']:15.2f} "
            f"{(f'{step:.1f}' if step else '-'):>15s}"
        )
    for k, v in ratios.items():
        print(f"{k:24s} {v:6.2f}x")

    meta = {
        "model": base.model_id,
        "device": "cpu",
        "processor": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "requests": args.requests,
        "adapters": args.adapters,
        "rank": args.rank,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "dtype": "float32, and bfloat16 for the bf16- configurations",
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(
        json.dumps({"meta": meta, "summary": summary, "ratios": ratios, "runs": runs}, indent=2)
    )
    print(f"wrote {out_path}")
    _plot(summary, meta, out_path.with_suffix(".png"))


def _plot(summary: dict, meta: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    names = list(summary)
    values = [summary[n]["tokens_per_s"] for n in names]
    fig, ax = plt.subplots(figsize=(9, 3.8))
    bars = ax.bar(
        names,
        values,
        color=[
            "#2b6cb0" if n.startswith(("engine", "http", "bf16-engine")) else "#a0aec0"
            for n in names
        ],
    )
    ax.bar_label(bars, fmt="%.0f")
    ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    ax.margins(y=0.12)
    ax.set_ylabel("generated tokens / s")
    ax.set_title(
        cpu_run_title(
            meta,
            f"{meta['requests']} requests over {meta['adapters']} rank-{meta['rank']} adapters",
        ),
        fontsize=9,
    )
    save_figure(fig, path)


if __name__ == "__main__":
    main()
