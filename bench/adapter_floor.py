"""The floor under the engine's adapter cost on CPU: its decode step with the LoRA kernel,
against the same step with the kernel swapped for a loop that only reads the kernel's bytes.

`bench/lora_ops.py --read-floor` bounds the kernel inside a stack of base GEMMs; this
bounds it inside the engine itself, where the issue's target is set (decode step with
adapters <= 1.10x the step without). Configurations, the same 16 chat requests, decode
steps timed one by one, all interleaved round by round:

* ``none``: no adapter (the engine's LoRA layers do no work);
* ``kernel-<dtype>``: 8 rank-16 adapters on every projection, the C kernel (the engine's
  own path), adapter weights in ``<dtype>`` (``lora_dtype``);
* ``read-<dtype>``: the same engine and routing, the kernel replaced by a C loop over the
  same threads that reads every byte the kernel reads (each routed slot's A and B of the
  call's group, slot by slot) and does no arithmetic with them: no LoRA kernel can cost
  less here, so ``read / none`` is the lowest ratio any kernel could reach on this machine.

Prints the medians and ratios; writes ``bench/results/adapter_floor_cpu.json``.

    .venv/bin/python -m bench.adapter_floor [--rounds 5] [--steps 20]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from unittest import mock

import torch

from bench.serve_throughput import make_adapters, prompt_ids
from bench.timing import machine_info

RESULTS = Path(__file__).parent / "results"

_READ_ONLY = r"""
/* The kernel's signature (`lora.cpu_kernel.lora_sgmv`); reads each group's A[slot] and
   B_j[slot] whole, 64 bytes at a time, over the kernel's threads, and keeps a sum only so
   that the reads are not optimised away. */
static volatile float sink;

int lora_sgmv(const void *x, int64_t x_stride, void *y, int64_t y_stride, const char *a,
              int64_t in, int64_t c, int64_t m, const char *const *bs, const int64_t *outs,
              const int64_t *tokens, const int64_t *slots, const int64_t *starts,
              int64_t groups, int64_t num_threads) {
    (void)x; (void)x_stride; (void)y; (void)y_stride; (void)tokens; (void)starts;
    const int64_t a_bytes = m * c * in * (int64_t)ELEMENT;
    float total = 0;
#pragma omp parallel for schedule(static) num_threads(num_threads) reduction(+ : total)
    for (int64_t g = 0; g < groups; g++) {
        v16 acc = {0};
        const char *p = a + slots[g] * a_bytes;
        for (int64_t i = 0; i + 64 <= a_bytes; i += 64) acc += load16((const float *)(p + i));
        for (int64_t j = 0; j < m; j++) {
            const int64_t b_bytes = c * outs[j] * (int64_t)ELEMENT;
            const char *q = bs[j] + slots[g] * b_bytes;
            for (int64_t i = 0; i + 64 <= b_bytes; i += 64) acc += load16((const float *)(q + i));
        }
        total += hsum(acc);
    }
    sink = total;
    return 0;
}
"""


def _read_only_kernel(weights: torch.dtype) -> Callable[..., int]:
    from adapterhub_server.c_build import VECTOR_HELPERS, load_function

    p, i = ctypes.c_void_p, ctypes.c_int64
    size = torch.empty(0, dtype=weights).element_size()
    fn = load_function(
        VECTOR_HELPERS + _READ_ONLY,
        "lora_sgmv",
        [p, i, p, i, p, i, i, i, p, p, p, p, p, i, i],
        defines=(f"-DELEMENT={size}",),
        switch="ADAPTERHUB_CPU_LORA_KERNEL",
    )
    if fn is None:
        raise SystemExit("the read-only stand-in cannot be built here (no C compiler?)")
    return fn


read_calls: dict[str, int] = {}
"""Calls of each read-only stand-in, by weight dtype."""


def _counted(fn: Callable[..., int], label: str) -> Callable[..., int]:
    """`fn`, counting its calls in `read_calls` (~0.2 us a call: it errs against the
    stand-in, so the floor it measures is, if anything, a little high)."""
    read_calls[label] = 0

    def call(*args: object) -> int:
        read_calls[label] += 1
        return fn(*args)

    return call


@contextmanager
def _kernel(fn: Callable[..., int] | None) -> Iterator[None]:
    """Within: pools met for the first time get `fn` as their kernel (None: the real one).
    The kernel is bound to a pool once, at its first call, so each engine keeps its own."""
    from adapterhub_server.lora import cpu_kernel

    if fn is None:
        yield
        return
    with mock.patch.object(cpu_kernel, "load", lambda *_: fn):
        yield


def _decode_steps(engine, prompts, adapters, steps: int) -> list[float]:
    """Seconds per decode step of the requests once all have their first token."""
    from adapterhub_server.engine.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=steps + 4, temperature=0.0, ignore_eos=True)
    for i, (ids, adapter) in enumerate(zip(prompts, adapters)):
        engine.add_request(f"f{time.monotonic_ns()}-{i}", ids, params, adapter)
    for _ in range(3):  # prefill, and the first decode steps
        engine.step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t0)
    while engine.has_work():
        engine.step()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", "-n", type=int, default=16)
    parser.add_argument("--adapters", "-k", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20, help="decode steps timed per round")
    parser.add_argument("--smoke", action="store_true", help="tiny random model, seconds")
    parser.add_argument("--out", type=Path, default=RESULTS / "adapter_floor_cpu.json")
    args = parser.parse_args()

    from adapterhub_server.base_model import ResolvedBaseModel, resolve_base_model
    from adapterhub_server.config import EngineConfig
    from adapterhub_server.engine.build import build_engine

    tmp = Path(tempfile.mkdtemp(prefix="adapterhub-bench-"))
    if args.smoke:
        from tests.tiny_models import make_tiny_llama

        base = ResolvedBaseModel(make_tiny_llama(tmp / "base"), "tiny", "local")
        args.requests, args.adapters, args.rounds, args.steps = 4, 2, 1, 2
    else:
        base = resolve_base_model(None)
    dirs = make_adapters(base.path, tmp, args.adapters, args.rank)
    names = list(dirs)
    routed = [names[i % len(names)] for i in range(args.requests)]
    config = EngineConfig(
        max_num_seqs=args.requests,
        max_loras=args.adapters,
        max_lora_rank=max(64, 2 * args.rank),
        max_model_len=1024 if not args.smoke else None,
    )
    runs: dict[str, tuple] = {}  # name -> (engine, adapters per request, kernel override)
    for dtype in (torch.float32, torch.bfloat16):
        label = str(dtype).removeprefix("torch.")
        engine_config = replace(config, lora_dtype=label)
        real = build_engine(base, engine_config, lora_modules=dirs)
        if dtype == torch.float32:
            runs["none"] = (real, [None] * args.requests, None)
        runs[f"kernel-{label}"] = (real, routed, None)
        read = build_engine(base, engine_config, lora_modules=dirs)
        runs[f"read-{label}"] = (read, routed, _counted(_read_only_kernel(dtype), label))
    prompts = prompt_ids(runs["none"][0].tokenizer, args.requests)

    samples: dict[str, list[float]] = {name: [] for name in runs}
    for engine, adapters, fn in runs.values():  # warm-up: slots, kernel builds
        with _kernel(fn):
            _decode_steps(engine, prompts, adapters, 1)
    for _ in range(args.rounds):
        for name, (engine, adapters, fn) in runs.items():
            with _kernel(fn):
                before = sum(read_calls.values())
                samples[name] += _decode_steps(engine, prompts, adapters, args.steps)
                # The stand-in served the read-only engine's steps, and only those.
                if (sum(read_calls.values()) > before) != name.startswith("read-"):
                    raise SystemExit(f"{name}: the kernel swap did not hold")
    step_ms = {name: statistics.median(s) * 1e3 for name, s in samples.items()}
    ratios = {f"{name}/none": step_ms[name] / step_ms["none"] for name in runs if name != "none"}
    result = {
        "meta": {
            **machine_info(),
            "requests": args.requests,
            "adapters": args.adapters,
            "rank": args.rank,
            "rounds": args.rounds,
            "steps_per_round": args.steps,
            "base_model": base.model_id,
        },
        "median_decode_step_ms": step_ms,
        "ratios": ratios,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    for name, ms in step_ms.items():
        ratio = f"{ratios[name + '/none']:.3f}x" if name != "none" else ""
        print(f"{name:>15} {ms:8.2f} ms {ratio}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
