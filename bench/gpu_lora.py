"""GPU benchmark of multi-adapter serving (issue 7): decode, adapter cold loads, the kernels.

Three sections, each measured side by side in one run (medians of `--repeats`):

1. decode     N concurrent sequences over K distinct rank-16 adapters (all 7 projections),
              each decoding `--new-tokens` tokens greedily (ignore_eos), on a 1B-class
              Llama-architecture model with random weights (TinyLlama-1.1B shape, the
              embedded default model's tokenizer and vocabulary), through:

                engine        this engine as configured: LoRA ops as `--lora-kernel` picks
                              (Triton on CUDA), decode steps replayed from CUDA graphs
                engine-eager  the same, every step run eagerly (only when `engine` replays
                              graphs)
                engine-torch  the same engine with the torch LoRA ops, eager (only when
                              `engine` runs the Triton kernels)
                engine-base   the same engine and requests with no adapter (the baseline;
                              its steps replay graphs without LoRA kernels)
                peft          HF PEFT, one batched ``generate(adapter_names=...)``

              Decode only is timed: from the end of the step in which the last sequence got
              its first token to the end of the last step (PEFT: from the first logits
              processor call, right after the prefill forward, to the last; CUDA
              synchronized). Per-token latency is decode time / (new tokens - 1).
2. cold_load  an adapter of rank 8, 16 and 64 from its files to a device slot, through the
              engine's `AdapterCache` (sha256 check, read and validation: `load_now`; then
              `acquire`, which writes the slot, CUDA synchronized). The files are dropped
              from the page cache before each read where the OS allows.
3. kernels    one packed group (q/k/v, gate/up of the 1B shape), T tokens over K adapters:
              the Triton kernels (`add_lora_kernels`), the torch grouped ops (`add_lora`), a
              dense gather + `bmm` baseline, and the loop reference (small T only). CUDA
              events on a GPU. Each output is checked against the reference.

Correctness is checked once per configuration and recorded under ``checks``: engine and
PEFT greedy tokens for the first `--check-seqs` sequences (a pass/fail check in float32;
in bfloat16 random weights make near-ties, so agreement is recorded, not asserted), and
every kernel output against the loop reference within tolerance.

Prints tables, writes JSON to ``bench/results/gpu_lora_<device>.json`` and a PNG next to it.

    .venv/bin/python -m bench.gpu_lora --peft-repeats 1   # full sizes, on a GPU
    .venv/bin/python -m bench.gpu_lora --seqs 64 256 --adapters 1 8 64 --new-tokens 32 \\
        --repeats 2 --peft-repeats 1 --peft-max-adapters 8    # about 4 GPU minutes
    .venv/bin/python -m bench.gpu_lora --smoke            # CPU, tiny sizes, seconds (CI)

PEFT's mixed-adapter forward loops over the adapters in every LoRA layer, so at 256 adapters
a PEFT run takes minutes: `--peft-repeats`, `--peft-max-seqs`, `--peft-max-adapters` and
``--skip peft`` bound it. `--sections` runs a subset (to split a long run).

Without a GPU the Triton kernels run in Triton's interpreter (set here before any import of
triton), in float32: the figures then only show that everything runs.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import itertools
import json
import logging
import os
import re
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from bench.timing import machine_info, median_run

if not torch.cuda.is_available():
    # Triton reads this when a kernel is defined; nothing has imported triton yet (torch
    # does not), and every adapterhub_server import below is inside a function.
    os.environ.setdefault("TRITON_INTERPRET", "1")

RESULTS = Path(__file__).parent / "results"
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TINYLLAMA_SHAPE = {
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 22,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "max_position_embeddings": 2048,
}
B_STD = 0.02
"""Adapter B init: with A ~ N(0, 1/in) and alpha = 2r, a delta of about a fifth of the base
projection's output, so adapters visibly change greedy tokens."""
TOLERANCE = {torch.float32: (1e-3, 1e-3), torch.float16: (2e-2, 2e-2), torch.bfloat16: (5e-2, 5e-2)}


# -- models and adapters ----------------------------------------------------------------


def make_random_llama(
    path: Path, tokenizer_dir: Path, *, device: torch.device, dtype: torch.dtype
) -> Path:
    """A random-weight Llama of the TinyLlama-1.1B shape with `tokenizer_dir`'s tokenizer
    (vocabulary sized to it), saved as an HF directory."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        **TINYLLAMA_SHAPE,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    with torch.device(device):  # initialising 1B parameters is quick on the GPU
        model = LlamaForCausalLM(config)
    model.to(dtype).save_pretrained(path)
    tokenizer.save_pretrained(path)
    del model
    return path


def kv_bytes_per_token(base_dir: Path) -> int:
    """Keys and values of one token over every layer, in 16-bit."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(base_dir)
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    return 2 * cfg.num_hidden_layers * kv_heads * head_dim * 2


def adapter_targets(base_dir: Path) -> dict:
    """The base model's adaptable modules (`TargetShape`s), read from a meta-device copy."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from adapterhub_server.lora.adapter import adaptable_modules

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base_dir))
    return adaptable_modules(model)


def write_adapter(
    path: Path,
    targets: Mapping[str, Any],
    rank: int,
    *,
    seed: int,
    dtype: torch.dtype,
    device: torch.device,
) -> Path:
    """A PEFT LoRA adapter directory (rank `rank`, alpha 2r, all 7 projections, random A and
    non-zero B), written directly: building a PEFT model per adapter would load the 1B base
    model each time."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    gen = torch.Generator(device).manual_seed(seed)
    tensors = {}
    for name, shape in targets.items():
        a = torch.randn(rank, shape.in_features, generator=gen, device=device)
        b = torch.randn(shape.out_features, rank, generator=gen, device=device)
        prefix = f"base_model.model.{name}"
        tensors[f"{prefix}.lora_A.weight"] = (a / shape.in_features**0.5).to(dtype).cpu()
        tensors[f"{prefix}.lora_B.weight"] = (b * B_STD).to(dtype).cpu()
    path.mkdir(parents=True, exist_ok=True)
    weights = path / "adapter_model.safetensors"
    save_file(tensors, weights, metadata={"format": "pt"})
    LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        target_modules=list(PROJECTIONS),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
    ).save_pretrained(path)
    with open(weights, "rb") as f:  # flushed, so that the page cache can drop it later
        os.fsync(f.fileno())
    return path


def _drop_page_cache(directory: Path) -> bool:
    """Ask the OS to forget the files' cached pages (clean pages only; best effort)."""
    if not hasattr(os, "posix_fadvise"):
        return False
    for file in directory.iterdir():
        fd = os.open(file, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return True


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- 1. decode ----------------------------------------------------------------------------


_request_ids = itertools.count()


def run_engine(engine, prompts, adapters, new_tokens: int) -> dict:
    """Submit every request, step to the end; time decode apart from prefill."""
    from adapterhub_server.engine.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    ids = []
    for p, a in zip(prompts, adapters):
        ids.append(f"bench-{next(_request_ids)}")
        engine.add_request(ids[-1], p, params, a)
    tokens: dict[str, list[int]] = {r: [] for r in ids}
    t0 = time.perf_counter()
    decode_start = None
    steps: list[float] = []
    while engine.has_work():
        s0 = time.perf_counter()
        outs = engine.step()
        s1 = time.perf_counter()
        if engine.idle:  # waiting for adapter files: not expected, adapters are preloaded
            time.sleep(0.001)
        for o in outs:
            if o.error:
                raise RuntimeError(f"request {o.request_id} failed: {o.error}")
            tokens[o.request_id].extend(o.token_ids)
        if decode_start is None:
            if all(tokens[r] for r in ids):
                decode_start = s1
        else:
            steps.append(s1 - s0)
    end = time.perf_counter()
    assert decode_start is not None
    decode_s = end - decode_start
    decode_tokens = sum(len(t) - 1 for t in tokens.values())
    generated = sum(len(t) for t in tokens.values())
    return {
        "decode_tokens_per_s": decode_tokens / decode_s,
        "per_token_ms": decode_s / (new_tokens - 1) * 1e3,
        "median_step_ms": statistics.median(steps) * 1e3 if steps else decode_s * 1e3,
        "decode_s": decode_s,
        "prefill_s": decode_start - t0,
        "wall_s": end - t0,
        "tokens_per_s": generated / (end - t0),
        "generated_tokens": generated,
        "tokens": [tokens[r] for r in ids],
    }


def run_peft(model, prompts, adapters, new_tokens: int, device: torch.device, pad: int) -> dict:
    """One batched mixed-adapter `generate`; decode timed by a logits processor."""
    from transformers import LogitsProcessor, LogitsProcessorList

    class StepClock(LogitsProcessor):
        """Called once per generated token, right after that step's forward."""

        def __init__(self) -> None:
            self.times: list[float] = []

        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            _sync(device)
            self.times.append(time.perf_counter())
            return scores

    clock = StepClock()
    ids = torch.tensor(prompts, dtype=torch.long, device=device)  # equal lengths: no padding
    _sync(device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            adapter_names=list(adapters),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=pad,
            logits_processor=LogitsProcessorList([clock]),
        )
    _sync(device)
    end = time.perf_counter()
    decode_s = clock.times[-1] - clock.times[0]
    generated = int(out.shape[1] - ids.shape[1]) * len(prompts)
    return {
        "decode_tokens_per_s": len(prompts) * (new_tokens - 1) / decode_s,
        "per_token_ms": decode_s / (new_tokens - 1) * 1e3,
        "decode_s": decode_s,
        "prefill_s": clock.times[0] - t0,
        "wall_s": end - t0,
        "tokens_per_s": generated / (end - t0),
        "generated_tokens": generated,
        "tokens": out[:, ids.shape[1] :].tolist(),
    }


@contextlib.contextmanager
def engine_variant(engine, variant: str) -> Iterator[None]:
    """Run `engine` as `variant` (see the module docstring) for the duration."""
    from adapterhub_server.lora.ops import TORCH_OPS

    saved = engine.lora_backend, engine.decode_graphs
    if variant in ("engine-eager", "engine-torch"):
        engine.decode_graphs = None
    if variant == "engine-torch":
        engine.lora_backend = TORCH_OPS
    try:
        yield
    finally:
        engine.lora_backend, engine.decode_graphs = saved


def _token_check(ours: list[list[int]], theirs: list[list[int]], n: int) -> dict:
    prefixes = []
    for a, b in zip(ours[:n], theirs[:n]):
        k = 0
        while k < min(len(a), len(b)) and a[k] == b[k]:
            k += 1
        prefixes.append(k)
    return {
        "seqs": len(prefixes),
        "equal": all(a == b for a, b in zip(ours[:n], theirs[:n])),
        "first_token_equal": all(k > 0 for k in prefixes),
        "min_common_prefix": min(prefixes),
        "tokens": len(ours[0]),
    }


def bench_decode(args, base_dir: Path, device: torch.device, dtype: torch.dtype) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from adapterhub_server.base_model import ResolvedBaseModel
    from adapterhub_server.config import EngineConfig
    from adapterhub_server.engine.build import build_engine

    plan = {
        n: sorted({min(k, n) for k in args.adapters}) for n in sorted(set(args.seqs))
    }  # adapters capped at the number of sequences
    k_max = max(max(ks) for ks in plan.values())
    targets = adapter_targets(base_dir)
    root = Path(tempfile.mkdtemp(prefix="adapterhub-gpu-lora-"))
    t0 = time.perf_counter()
    dirs = {
        f"a{i}": write_adapter(
            root / f"a{i}", targets, args.rank, seed=i, dtype=dtype, device=device
        )
        for i in range(k_max)
    }
    print(f"  wrote {k_max} rank-{args.rank} adapters in {time.perf_counter() - t0:.1f} s")
    names = list(dirs)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    vocab = len(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    gen = torch.Generator().manual_seed(0)
    low = min(100, vocab // 2)  # clear of the special tokens at the start of the vocabulary

    peft_model = None
    peft_k = min(k_max, args.peft_max_adapters or k_max)
    if "peft" not in args.skip:
        from peft import PeftModel

        t0 = time.perf_counter()
        hf = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype).to(device).eval()
        peft_model = PeftModel.from_pretrained(hf, dirs[names[0]], adapter_name=names[0])
        for name in names[1:peft_k]:
            peft_model.load_adapter(dirs[name], adapter_name=name, low_cpu_mem_usage=True)
        peft_model.eval()
        print(f"  PEFT: base model and {peft_k} adapters in {time.perf_counter() - t0:.1f} s")

    rows = []
    checks: dict[str, bool] = {}
    lora_ops = None
    graphs = False
    for n, ks in plan.items():
        prompts = torch.randint(low, vocab, (n, args.prompt_len), generator=gen).tolist()
        # Room for every sequence at full length twice over, given explicitly: the default
        # (a fraction of the device) would count the previous engine's memory as taken.
        kv_bytes = 2 * n * (args.prompt_len + args.new_tokens) * kv_bytes_per_token(base_dir)
        config = EngineConfig(
            max_num_seqs=n,
            max_num_batched_tokens=max(n * args.prompt_len, 512),
            kv_cache_memory=kv_bytes,
            max_loras=max(ks),
            max_model_len=args.prompt_len + args.new_tokens,
            max_lora_rank=max(64, args.rank),
            lora_kernel=args.lora_kernel,
        )
        base = ResolvedBaseModel(base_dir, "random-llama", "local")
        t0 = time.perf_counter()
        engine = build_engine(base, config, lora_modules={a: dirs[a] for a in names[: max(ks)]})
        print(f"  engine for {n} seqs ready in {time.perf_counter() - t0:.1f} s")
        kernels = engine.lora_backend.supports_cuda_graphs
        lora_ops = str(engine.lora_backend)
        graphs = engine.decode_graphs is not None
        variants = ["engine"]
        if graphs and "engine-eager" not in args.skip:
            variants.append("engine-eager")
        if kernels and "engine-torch" not in args.skip:
            variants.append("engine-torch")
        # Warm-up: every adapter into its slot, allocator, Triton compiles, and (replaying
        # graphs) a capture of every batch and key-length bucket the runs go through.
        warm = args.new_tokens if graphs else 2
        for variant in variants:
            with engine_variant(engine, variant):
                run_engine(engine, prompts, [names[i % max(ks)] for i in range(n)], warm)
        run_engine(engine, prompts, [None] * n, warm)

        runs: dict[tuple[int, str], list[dict]] = {}
        base_runs: list[dict] = []
        for _ in range(args.repeats):  # interleaved, so that noise hits every config alike
            if "engine-base" not in args.skip:
                base_runs.append(run_engine(engine, prompts, [None] * n, args.new_tokens))
            for k in ks:
                with_adapters = [names[i % k] for i in range(n)]
                for variant in variants:
                    with engine_variant(engine, variant):
                        runs.setdefault((k, variant), []).append(
                            run_engine(engine, prompts, with_adapters, args.new_tokens)
                        )
                peft_ok = n <= (args.peft_max_seqs or n) and k <= peft_k
                peft_ok = peft_ok and len(runs.get((k, "peft"), [])) < args.peft_repeats
                if peft_model is not None and peft_ok:
                    runs.setdefault((k, "peft"), []).append(
                        run_peft(peft_model, prompts, with_adapters, args.new_tokens, device, pad)
                    )
                line = "  ".join(
                    f"{m} {r[-1]['decode_tokens_per_s']:8.0f}"
                    for (kk, m), r in runs.items()
                    if kk == k
                )
                print(f"  seqs {n:4d} adapters {k:4d}  decode tok/s: {line}", flush=True)

        base_summary = median_run(base_runs) if base_runs else None
        for k in ks:
            row: dict[str, Any] = {
                "seqs": n,
                "adapters": k,
                "lora_ops": lora_ops,
                "cuda_graphs": graphs,
            }
            for m in ("engine", "engine-eager", "engine-torch", "peft"):
                if (k, m) in runs:
                    row[m] = median_run(runs[(k, m)])
            if base_summary is not None:
                row["engine-base"] = base_summary
            ratios = {}
            eng = row["engine"]["decode_tokens_per_s"]
            for other in ("engine-base", "engine-eager", "engine-torch", "peft"):
                if other in row:
                    ratios[f"engine/{other}"] = eng / row[other]["decode_tokens_per_s"]
            row["ratios"] = ratios
            ours = runs[(k, "engine")][0]["tokens"]
            row["checks"] = {}
            if base_runs:
                row["checks"]["adapters_change_tokens"] = any(
                    a != b for a, b in zip(ours, base_runs[0]["tokens"])
                )
            if (k, "peft") in runs:
                agree = _token_check(ours, runs[(k, "peft")][0]["tokens"], args.check_seqs)
                row["checks"]["engine_vs_peft"] = agree
                # Greedy tokens must agree exactly in float32; in bfloat16 random weights
                # make near-ties that rounding decides, so agreement is only recorded.
                if dtype == torch.float32:
                    checks[f"decode/n{n}/k{k}/engine==peft"] = agree["equal"]
            rows.append(row)
        engine.adapters.close()
        del engine
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {
        "rows": rows,
        "checks": checks,
        "lora_ops": lora_ops,
        "cuda_graphs": graphs,
        "peft_adapters": peft_k,
    }


# -- 2. adapter cold load -----------------------------------------------------------------


class _Source:
    """An `AdapterSource` over fixed locations (sha256 included, as the registry's are)."""

    def __init__(self, locations: Mapping[str, Any]) -> None:
        self._locations = dict(locations)

    def locate(self, ref: str):
        return self._locations.get(ref)

    def list(self):
        return list(self._locations.values())


def bench_cold_load(args, base_dir: Path, device: torch.device, dtype: torch.dtype) -> dict:
    from adapterhub_server.lora.cache import AdapterCache, AdapterLocation
    from adapterhub_server.lora.pool import LoRAWeightPool, packed_groups

    targets = adapter_targets(base_dir)
    root = Path(tempfile.mkdtemp(prefix="adapterhub-cold-load-"))
    locations = {}
    for r in args.ranks:
        path = write_adapter(root / f"r{r}", targets, r, seed=1000 + r, dtype=dtype, device=device)
        sha = {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in path.iterdir()}
        locations[f"r{r}"] = AdapterLocation(f"r{r}", path, int(time.time()), sha)
    pool = LoRAWeightPool(
        packed_groups(targets), max_slots=len(args.ranks), dtype=dtype, device=device
    )
    cache = AdapterCache(
        _Source(locations),
        pool,
        targets,
        max_loras=len(args.ranks),
        max_cpu_loras=len(args.ranks),
        max_lora_rank=max(args.ranks),
    )
    rows = []
    dropped = False
    try:
        for r in args.ranks:
            loc = cache.locate(f"r{r}")
            samples = []
            for i in range(args.repeats + 1):  # the first allocates the pool: not counted
                dropped = _drop_page_cache(loc.path)
                t0 = time.perf_counter()
                cache.load_now(loc)
                t1 = time.perf_counter()
                route = cache.acquire(loc)
                _sync(device)
                t2 = time.perf_counter()
                assert route is not None, "no free slot"
                cache.release(loc.key)
                cache.evict(loc.key)
                if i:
                    samples.append({"read_ms": (t1 - t0) * 1e3, "write_ms": (t2 - t1) * 1e3})
            read = statistics.median(s["read_ms"] for s in samples)
            write = statistics.median(s["write_ms"] for s in samples)
            total = statistics.median(s["read_ms"] + s["write_ms"] for s in samples)
            size = sum(f.stat().st_size for f in loc.path.iterdir())
            rows.append(
                {"rank": r, "read_ms": read, "write_ms": write, "total_ms": total,
                 "file_mib": size / 2**20, "runs": len(samples)}
            )  # fmt: skip
    finally:
        cache.close()
    return {"rows": rows, "page_cache_dropped": dropped}


# -- 3. the kernels alone -----------------------------------------------------------------


def _time_us(fn: Callable[[], object], repeats: int, iters: int, device: torch.device) -> float:
    """Median per-call time in microseconds (CUDA events on a GPU), after a warm-up call."""
    fn()
    _sync(device)
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iters):
                fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) * 1e3 / iters)
        else:
            t0 = time.perf_counter()
            for _ in range(iters):
                fn()
            samples.append((time.perf_counter() - t0) * 1e6 / iters)
    return statistics.median(samples)


def bench_kernels(args, groups: dict, device: torch.device, dtype: torch.dtype) -> dict:
    from adapterhub_server.lora.ops import (
        add_lora,
        add_lora_reference,
        build_lora_batch,
        rank_class,
    )
    from adapterhub_server.lora.triton_ops import (
        add_lora_kernels,
        build_kernel_mappings,
        triton_available,
    )

    use_triton = triton_available() and "triton" not in args.skip
    c = rank_class(args.rank)
    slots = max(args.kernel_adapters)
    atol, rtol = TOLERANCE[dtype]
    rows = []
    checks: dict[str, bool] = {}
    for name, (d_in, outs) in groups.items():
        gen = torch.Generator().manual_seed(0)
        a = torch.randn(slots, len(outs) * c, d_in, generator=gen) / d_in**0.5
        a *= (torch.arange(c) < args.rank).float().repeat(len(outs))[None, :, None]
        bs = [torch.randn(slots, c, o, generator=gen) / args.rank**0.5 for o in outs]
        pools = {c: (a.to(device, dtype), tuple(b.to(device, dtype) for b in bs))}
        # The reference runs in float32 on the same (rounded) weights.
        ref_pools = {c: (pools[c][0].float(), tuple(b.float() for b in pools[c][1]))}
        done = set()
        for t in args.kernel_tokens:
            for k_req in args.kernel_adapters:
                k = min(k_req, t)
                if (t, k) in done:
                    continue
                done.add((t, k))
                routes = [(c, i % k) for i in range(t)]
                x = torch.randn(t, d_in, generator=gen).to(device, dtype)
                y0 = torch.randn(t, sum(outs), generator=gen).to(device, dtype)
                y_ref = y0.to(torch.float32, copy=True)
                add_lora_reference(y_ref, x.float(), ref_pools, routes)
                idx = torch.tensor([s for _, s in routes], device=device)
                batch = build_lora_batch(routes, device=device, dtype=dtype)

                def gather_bmm(y: torch.Tensor, x=x, idx=idx, pools=pools, outs=outs) -> None:
                    a3, b3s = pools[c]
                    h = torch.bmm(x[:, None, :], a3[idx].transpose(1, 2))  # [T, 1, m * c]
                    o = 0
                    for j, b in enumerate(b3s):
                        hj = h[..., j * c : (j + 1) * c]  # [T, 1, c]
                        y[:, o : o + outs[j]] += torch.bmm(hj, b[idx])[:, 0]
                        o += outs[j]

                methods: dict[str, Callable[[torch.Tensor], None]] = {
                    "torch_grouped": lambda y, x=x, pools=pools, batch=batch: add_lora(
                        y, x, pools, batch
                    ),
                    "gather_bmm": gather_bmm,
                }
                if use_triton:
                    maps = build_kernel_mappings(routes, device)
                    methods["triton"] = lambda y, x=x, pools=pools, maps=maps: add_lora_kernels(
                        y, x, pools, maps
                    )
                if t <= args.reference_max_tokens:
                    methods["reference"] = lambda y, x=x, pools=pools, routes=routes: (
                        add_lora_reference(y, x, pools, routes)
                    )
                row: dict[str, Any] = {"group": name, "tokens": t, "adapters": k, "errors": {}}
                for m, fn in methods.items():
                    y = y0.clone()
                    fn(y)
                    err = (y.float() - y_ref).abs().max().item()
                    row["errors"][m] = err
                    checks[f"kernels/{name}/t{t}/k{k}/{m}"] = torch.allclose(
                        y.float(), y_ref, atol=atol, rtol=rtol
                    )
                    y = y0.clone()
                    row[f"{m}_us"] = _time_us(
                        lambda fn=fn, y=y: fn(y), args.kernel_repeats, args.kernel_iters, device
                    )
                # The per-step routing each path builds once for all layers (host + copy).
                row["route_torch_us"] = _time_us(
                    lambda routes=routes: build_lora_batch(routes, device=device, dtype=dtype),
                    args.kernel_repeats,
                    args.kernel_iters,
                    torch.device("cpu"),
                )
                if use_triton:
                    row["route_triton_us"] = _time_us(
                        lambda routes=routes: build_kernel_mappings(routes, device),
                        args.kernel_repeats,
                        args.kernel_iters,
                        torch.device("cpu"),
                    )
                rows.append(row)
                print(
                    f"  {name} T={t:4d} K={k:3d}  "
                    + "  ".join(f"{m} {row[f'{m}_us']:9.1f} us" for m in methods),
                    flush=True,
                )
    groups_meta = {n: {"in": d, "outs": list(o)} for n, (d, o) in groups.items()}
    return {"rows": rows, "checks": checks, "groups": groups_meta, "triton": use_triton}


# -- driver -------------------------------------------------------------------------------


def _device_tag(device: torch.device) -> str:
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "_", torch.cuda.get_device_name(device).lower()).strip("_")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sections",
        nargs="+",
        default=["decode", "cold_load", "kernels"],
        choices=["decode", "cold_load", "kernels"],
    )
    parser.add_argument("--seqs", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--adapters", type=int, nargs="+", default=[1, 8, 32, 64, 128, 256])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--check-seqs",
        type=int,
        default=4,
        help="sequences whose greedy tokens are compared with PEFT's",
    )
    parser.add_argument(
        "--peft-max-seqs",
        type=int,
        default=None,
        help="run PEFT only for batches up to this many sequences",
    )
    parser.add_argument(
        "--peft-max-adapters",
        type=int,
        default=None,
        help="run PEFT only up to this many adapters (and load only those)",
    )
    parser.add_argument(
        "--peft-repeats",
        type=int,
        default=None,
        help="repeats of the (slow) PEFT runs; default --repeats",
    )
    parser.add_argument("--lora-kernel", default="auto", choices=["auto", "triton", "torch"])
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 16, 64], help="cold-load ranks")
    parser.add_argument("--kernel-tokens", type=int, nargs="+", default=[1, 16, 64, 256])
    parser.add_argument("--kernel-adapters", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--kernel-repeats", type=int, default=10)
    parser.add_argument("--kernel-iters", type=int, default=20, help="calls per timed sample")
    parser.add_argument(
        "--reference-max-tokens",
        type=int,
        default=16,
        help="run the (slow) loop reference only up to this many tokens",
    )
    parser.add_argument(
        "--tokenizer",
        type=Path,
        default=None,
        help="tokenizer directory; default: the embedded default model's",
    )
    parser.add_argument(
        "--base-model",
        type=Path,
        default=None,
        help="an HF Llama directory to use instead of the random 1B model",
    )
    parser.add_argument(
        "--skip",
        nargs="*",
        default=[],
        help="configs to skip: engine-eager engine-torch engine-base peft triton",
    )
    parser.add_argument(
        "--smoke", action="store_true", help="tiny random model and sizes on CPU, 1 repeat (CI)"
    )
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.peft_repeats is None:
        args.peft_repeats = args.repeats
    logging.basicConfig(level=logging.WARNING)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tmp = Path(tempfile.mkdtemp(prefix="adapterhub-gpu-lora-"))
    if args.smoke:
        from tests.tiny_models import make_tiny_llama

        args.seqs, args.adapters, args.prompt_len, args.new_tokens = [4], [1, 4], 8, 4
        args.repeats, args.peft_repeats, args.ranks = 1, 1, [8, 16, 64]
        args.kernel_tokens, args.kernel_adapters, args.reference_max_tokens = [1, 8], [1, 4], 8
        args.kernel_repeats, args.kernel_iters = 2, 1
        base_dir = args.base_model or make_tiny_llama(tmp / "base")
        model_name = "tiny-llama (random)"
    elif args.base_model is not None:
        base_dir, model_name = args.base_model, args.base_model.name
    else:
        from adapterhub_server.base_model import resolve_base_model

        tok_dir = args.tokenizer or resolve_base_model(None).path
        t0 = time.perf_counter()
        base_dir = make_random_llama(tmp / "base", tok_dir, device=device, dtype=dtype)
        print(f"random 1B model written in {time.perf_counter() - t0:.1f} s")
        model_name = "llama-1.1b (random, TinyLlama shape)"
    if device.type != "cuda" and not args.smoke:
        print("warning: no CUDA device; full sizes on CPU will take very long")

    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(base_dir)
    hidden, inter = cfg.hidden_size, cfg.intermediate_size
    kv_out = cfg.num_key_value_heads * (hidden // cfg.num_attention_heads)
    groups = {
        "qkv_proj": (hidden, (hidden, kv_out, kv_out)),
        "gate_up_proj": (hidden, (inter, inter)),
    }

    tag = "smoke" if args.smoke else _device_tag(device)
    out_path = args.out or RESULTS / f"gpu_lora_{tag}.json"
    meta = {
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "machine": machine_info(),
        "model": model_name,
        "model_shape": {
            "hidden": hidden, "intermediate": inter, "layers": cfg.num_hidden_layers,
            "heads": cfg.num_attention_heads, "kv_heads": cfg.num_key_value_heads,
            "vocab": cfg.vocab_size,
        },
        "dtype": str(dtype).removeprefix("torch."),
        "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
        "smoke": args.smoke,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "decode_timing": (
            "decode only. engine: from the end of the step in which the last sequence got its "
            "first token to the end of the last step; peft: from the first logits-processor "
            "call (after the prefill forward) to the last; CUDA synchronized"
        ),
        "units": {"decode": "tokens/s, ms", "cold_load": "ms", "kernels": "us per call"},
    }  # fmt: skip
    result: dict[str, Any] = {}
    checks: dict[str, bool] = {}
    out_path.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        # After each section (the last one: below), so that a run cut short by a borrowed
        # machine's time limit still leaves the sections it finished.
        out_path.write_text(json.dumps({"meta": meta, **result, "checks": checks}, indent=2))

    if "kernels" in args.sections:
        print("kernels: one packed group, T tokens over K adapters (us per call)")
        result["kernels"] = bench_kernels(args, groups, device, dtype)
        checks.update(result["kernels"]["checks"])
        save()
    if "cold_load" in args.sections:
        print("cold_load: adapter files -> device slot")
        result["cold_load"] = bench_cold_load(args, base_dir, device, dtype)
        save()
    if "decode" in args.sections:
        print("decode: N sequences over K adapters")
        result["decode"] = bench_decode(args, base_dir, device, dtype)
        checks.update(result["decode"]["checks"])

    _print_tables(result)
    failed = [k for k, ok in checks.items() if not ok]
    print(
        f"checks: {len(checks) - len(failed)}/{len(checks)} passed"
        + (f"; FAILED: {failed}" if failed else "")
    )
    save()
    print(f"wrote {out_path}")
    _plot(result, meta, out_path.with_suffix(".png"))


def _print_tables(result: dict) -> None:
    if "decode" in result:
        print()
        d = result["decode"]
        print(
            f"decode (LoRA ops: {d['lora_ops']}, CUDA graphs: {d['cuda_graphs']}): "
            "decode tokens/s, ms per token"
        )
        print(f"{'seqs':>5} {'K':>4} {'engine':>9} {'ms/tok':>7} {'eager':>9} {'torch-ops':>9} "
              f"{'base':>9} {'peft':>9} {'ms/tok':>7} {'eng/base':>8} {'eng/peft':>8} "
              f"{'eng/eager':>9} {'eng/torch':>9} {'=peft':>7}")  # fmt: skip
        for r in result["decode"]["rows"]:

            def tps(m: str, r=r) -> str:
                return f"{r[m]['decode_tokens_per_s']:9.0f}" if m in r else f"{'-':>9}"

            def ms(m: str, r=r) -> str:
                return f"{r[m]['per_token_ms']:7.1f}" if m in r else f"{'-':>7}"

            def ratio(key: str, width: int, r=r) -> str:
                v = r["ratios"].get(key)
                return f"{v:{width}.2f}" if v is not None else f"{'-':>{width}}"

            agree = r["checks"].get("engine_vs_peft")
            same = "-" if agree is None else f"{agree['min_common_prefix']}/{agree['tokens']}"
            print(f"{r['seqs']:5d} {r['adapters']:4d} {tps('engine')} {ms('engine')} "
                  f"{tps('engine-eager')} {tps('engine-torch')} {tps('engine-base')} {tps('peft')} "
                  f"{ms('peft')} {ratio('engine/engine-base', 8)} {ratio('engine/peft', 8)} "
                  f"{ratio('engine/engine-eager', 9)} {ratio('engine/engine-torch', 9)} "
                  f"{same:>7}")  # fmt: skip
    if "cold_load" in result:
        print()
        print("cold load (files -> device slot), ms")
        print(f"{'rank':>5} {'read+validate':>14} {'slot write':>11} {'total':>8} {'MiB':>7}")
        for r in result["cold_load"]["rows"]:
            print(f"{r['rank']:5d} {r['read_ms']:14.2f} {r['write_ms']:11.2f} {r['total_ms']:8.2f} {r['file_mib']:7.1f}")  # fmt: skip
    if "kernels" in result:
        print()
        print("kernels, us per call (one packed group; routing is built once per step)")
        names = [
            "triton",
            "torch_grouped",
            "gather_bmm",
            "reference",
            "route_triton",
            "route_torch",
        ]
        print(f"{'group':>13} {'T':>4} {'K':>3} " + " ".join(f"{n:>13}" for n in names))
        for r in result["kernels"]["rows"]:
            cells = [f"{r[n + '_us']:13.1f}" if n + "_us" in r else f"{'-':>13}" for n in names]
            print(f"{r['group']:>13} {r['tokens']:4d} {r['adapters']:3d} " + " ".join(cells))


def _plot(result: dict, meta: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    if "decode" in result:
        ax = axes[0]
        rows = result["decode"]["rows"]
        colours = {
            "engine": "#2b6cb0",
            "engine-eager": "#90cdf4",
            "engine-torch": "#68d391",
            "peft": "#e53e3e",
        }
        for n, style in zip(sorted({r["seqs"] for r in rows}), ("-o", "--s", ":^", "-.v")):
            sub = [r for r in rows if r["seqs"] == n]
            for m, colour in colours.items():
                pts = [(r["adapters"], r[m]["decode_tokens_per_s"]) for r in sub if m in r]
                if pts:
                    ax.plot(*zip(*pts), style, color=colour, label=f"{m}, {n} seqs")
            if "engine-base" in sub[0]:
                base = sub[0]["engine-base"]["decode_tokens_per_s"]
                ax.axhline(base, color="grey", ls=style[:-1], lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("distinct adapters in the batch (grey: no adapters)")
        ax.set_ylabel("decode tokens / s")
        ax.legend(fontsize=7)
    if "cold_load" in result:
        ax = axes[1]
        rows = result["cold_load"]["rows"]
        labels = [f"r{r['rank']}" for r in rows]
        read = [r["read_ms"] for r in rows]
        ax.bar(labels, read, label="read + validate", color="#a0aec0")
        ax.bar(labels, [r["write_ms"] for r in rows], bottom=read, label="slot write",
               color="#2b6cb0")  # fmt: skip
        ax.set_ylabel("cold load, ms")
        ax.legend(fontsize=7)
    if "kernels" in result:
        ax = axes[2]
        rows = result["kernels"]["rows"]
        group = rows[-1]["group"]
        sub = [r for r in rows if r["group"] == group]
        x = range(len(sub))
        for m in ("triton", "torch_grouped", "gather_bmm", "reference"):
            pts = [(i, r[f"{m}_us"]) for i, r in zip(x, sub) if f"{m}_us" in r]
            if pts:
                ax.plot(*zip(*pts), "-o", label=m)
        ax.set_xticks(list(x), [f"T{r['tokens']}\nK{r['adapters']}" for r in sub], fontsize=7)
        ax.set_yscale("log")
        ax.set_ylabel(f"{group}: us per call")
        ax.legend(fontsize=7)
    fig.suptitle(f"{meta['model']}, {meta['device_name']}, {meta['dtype']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
