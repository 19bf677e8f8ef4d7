"""Adapter loads and throughput on Ray Serve: adapter-affinity routing vs Ray's default.

Two engine replicas of the default model behind the AdapterHub router on a local Ray
cluster (loopback), K adapters (rank r on all 7 projections), ``--max-loras 4
--max-cpu-loras 8``; N completion requests spread uniformly over the adapters at
concurrency C, side by side in one run:

  (a) multiplexed  requests routed by Ray Serve model multiplexing keyed by adapter version
  (b) default      the same deployment with no multiplexed model id: Ray's default routing

Each configuration is deployed afresh per repeat (cold caches) and reports adapter loads
while serving (``adapterhub_adapter_loads_total`` summed over both replicas' ``/metrics``,
less the loads of start-up, which validates every ``--lora-modules`` adapter), completion
tokens per second and the share of requests that found their adapter already on the
replica that served them. Medians over ``--repeats``; prints a table, writes JSON under
``bench/results/``.

    .venv/bin/python -m bench.cluster_routing             # default model, 2 replicas, K=16
    .venv/bin/python -m bench.cluster_routing --smoke     # tiny random model, seconds
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import platform
import re
import socket
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

RESULTS = Path(__file__).parent / "results"
MODES = ("multiplexed", "default")
_LOADS = re.compile(r"^adapterhub_adapter_loads_total\s+([0-9.e+]+)", re.MULTILINE)

logger = logging.getLogger(__name__)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _jobs(adapters: list[str], n: int, seed: int) -> list[str]:
    """N adapter names, each adapter equally often, in a seeded random order."""
    import random

    names = [adapters[i % len(adapters)] for i in range(n)]
    random.Random(seed).shuffle(names)
    return names


async def _drive(
    url: str, names: list[str], prompts: list[list[int]], new_tokens: int, concurrency: int
) -> dict[str, Any]:
    limit = asyncio.Semaphore(concurrency)
    served: list[tuple[str, str]] = []

    async def one(client: httpx.AsyncClient, i: int, name: str) -> int:
        async with limit:
            response = await client.post(
                f"{url}/v1/completions",
                json={
                    "model": name,
                    "prompt": prompts[i % len(prompts)],
                    "max_tokens": new_tokens,
                    "temperature": 0,
                    "ignore_eos": True,
                },
            )
            response.raise_for_status()
            served.append((name, response.headers["x-adapterhub-replica"]))
            return response.json()["usage"]["completion_tokens"]

    async with httpx.AsyncClient(timeout=600) as client:
        start = time.perf_counter()
        tokens = await asyncio.gather(*(one(client, i, n) for i, n in enumerate(names)))
        seconds = time.perf_counter() - start
    seen: dict[str, set[str]] = {}
    last: dict[str, str] = {}
    hits = same = counted = 0
    for name, replica in served:  # in completion order
        if name in seen:
            counted += 1
            hits += replica in seen[name]
            same += replica == last[name]
        seen.setdefault(name, set()).add(replica)
        last[name] = replica
    return {
        "seconds": seconds,
        "tokens_per_s": sum(tokens) / seconds,
        # Served by a replica that had served the adapter before (the measure)...
        "affinity": hits / counted if counted else 1.0,
        # ...and, stricter, by the replica that served the adapter's previous request.
        "same_replica_as_previous": same / counted if counted else 1.0,
        "replicas_per_adapter": statistics.mean(len(r) for r in seen.values()),
        # Distinct adapters each replica served over the run, and over its second half.
        "adapters_per_replica": _adapters_per_replica(served),
        "adapters_per_replica_second_half": _adapters_per_replica(served[len(served) // 2 :]),
    }


def _adapters_per_replica(served: list[tuple[str, str]]) -> dict[str, int]:
    by_replica: dict[str, set[str]] = {}
    for name, replica in served:
        by_replica.setdefault(replica, set()).add(name)
    return {replica: len(names) for replica, names in sorted(by_replica.items())}


def _replica_loads(url: str, replicas: int, patience_s: float = 60.0) -> dict[str, float]:
    """`adapterhub_adapter_loads_total` of every engine replica (requests without an
    adapter land on a replica the router picks; ask until each has answered)."""
    loads: dict[str, float] = {}
    deadline = time.monotonic() + patience_s
    with httpx.Client(timeout=60) as client:
        while time.monotonic() < deadline:
            if loads:
                # Spaced out over the patience: Ray Serve's router caches each replica's
                # queue length for up to 10 s (RAY_SERVE_QUEUE_LENGTH_CACHE_TIMEOUT_S), so
                # right after a run a replica last seen busy is passed over until its entry
                # expires; 200 asks in a row once all landed on the other one.
                time.sleep(0.05)
            response = client.get(f"{url}/metrics")
            response.raise_for_status()
            match = _LOADS.search(response.text)
            if match is None:
                raise RuntimeError("adapterhub_adapter_loads_total missing from /metrics")
            loads[response.headers["x-adapterhub-replica"]] = float(match.group(1))
            if len(loads) == replicas:
                return loads
    raise RuntimeError(f"saw {len(loads)} of {replicas} replicas on /metrics")


def run(args: argparse.Namespace, base_dir: Path, model_id: str, adapters: dict[str, Path]):
    import ray
    from ray import serve
    from transformers import AutoTokenizer

    from adapterhub_server.cluster.ray_app import APP_NAME, build_application
    from adapterhub_server.config import EngineConfig, ServerConfig

    tok = AutoTokenizer.from_pretrained(base_dir)
    prompts = [
        tok(f"Question {i}: tell me something about the number {i}.")["input_ids"]
        for i in range(16)
    ]
    config = ServerConfig(
        base_model=str(base_dir),
        served_model_name=model_id,
        lora_modules=adapters,
        registry=None,
        fine_tuning=False,
        engine=EngineConfig(
            max_loras=args.max_loras,
            max_cpu_loras=args.max_cpu_loras,
            max_num_seqs=args.concurrency,
            max_num_batched_tokens=max(256, args.concurrency),
            kv_cache_memory=256 * 1024**2,
            device="cpu",
            num_threads=args.threads,
        ),
    )
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    ray.init(
        address="local",
        _node_ip_address="127.0.0.1",
        include_dashboard=False,
        num_cpus=4,
        object_store_memory=200 * 1024**2,
        log_to_driver=False,
    )
    runs: list[dict[str, Any]] = []
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        for repeat in range(args.repeats):
            names = _jobs(sorted(adapters), args.requests, seed=repeat)
            for mode in args.modes:
                app = build_application(
                    config,
                    replicas=args.replicas,
                    engine_actor_options={"num_cpus": 0},
                    affinity=mode == "multiplexed",
                )
                serve.run(app, name=APP_NAME, route_prefix="/")
                # Start-up validates every --lora-modules adapter by loading it once; only
                # the loads that serving causes are counted.
                at_start = _replica_loads(url, args.replicas)
                result = asyncio.run(_drive(url, names, prompts, args.new_tokens, args.concurrency))
                at_end = _replica_loads(url, args.replicas)
                loads = {replica: at_end[replica] - at_start[replica] for replica in at_end}
                result.update(
                    mode=mode,
                    repeat=repeat,
                    adapter_loads=sum(loads.values()),
                    loads_per_replica=loads,
                    startup_loads=sum(at_start.values()),
                )
                runs.append(result)
                logger.info("%s", result)
                print(
                    f"  repeat {repeat} {mode:<12} loads {result['adapter_loads']:5.0f}  "
                    f"{result['tokens_per_s']:7.1f} tok/s  affinity {result['affinity']:.2f}",
                    flush=True,
                )
                serve.delete(APP_NAME)
    finally:
        serve.shutdown()
        ray.shutdown()
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--adapters", "-k", type=int, default=16)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--requests", "-n", type=int, default=192)
    parser.add_argument("--concurrency", "-c", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--max-loras", type=int, default=4)
    parser.add_argument("--max-cpu-loras", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per replica")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--base-model", default=None, help="default: the embedded model")
    parser.add_argument("--smoke", action="store_true", help="tiny random model, 1 repeat")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from bench.serve_throughput import make_adapters

    with tempfile.TemporaryDirectory() as tmp:
        if args.smoke:
            from tests.tiny_models import make_tiny_llama

            base_dir = make_tiny_llama(Path(tmp) / "base")
            model_id = "tiny-base"
            args.repeats, args.requests, args.adapters = 1, 24, 4
            args.max_loras, args.max_cpu_loras, args.rank = 1, 2, 4
        else:
            from adapterhub_server.base_model import resolve_base_model

            base = resolve_base_model(args.base_model)
            base_dir, model_id = base.path, base.model_id
        adapters = make_adapters(base_dir, Path(tmp) / "adapters", args.adapters, args.rank)
        runs = run(args, base_dir, model_id, adapters)

    summary = {}
    for mode in args.modes:
        mine = [r for r in runs if r["mode"] == mode]
        summary[mode] = {
            key: statistics.median(r[key] for r in mine)
            for key in (
                "adapter_loads",
                "tokens_per_s",
                "affinity",
                "same_replica_as_previous",
                "replicas_per_adapter",
            )
        }
        summary[mode]["adapter_loads_range"] = [
            min(r["adapter_loads"] for r in mine),
            max(r["adapter_loads"] for r in mine),
        ]
        summary[mode]["tokens_per_s_range"] = [
            min(r["tokens_per_s"] for r in mine),
            max(r["tokens_per_s"] for r in mine),
        ]
    ratios = {}
    if set(summary) == set(MODES):
        ratios = {
            "default/multiplexed adapter loads": summary["default"]["adapter_loads"]
            / max(summary["multiplexed"]["adapter_loads"], 1),
            "multiplexed/default throughput": summary["multiplexed"]["tokens_per_s"]
            / summary["default"]["tokens_per_s"],
        }
    meta = {
        "model": model_id,
        "replicas": args.replicas,
        "adapters": args.adapters,
        "rank": args.rank,
        "requests": args.requests,
        "concurrency": args.concurrency,
        "new_tokens": args.new_tokens,
        "max_loras": args.max_loras,
        "max_cpu_loras": args.max_cpu_loras,
        "threads_per_replica": args.threads,
        "repeats": args.repeats,
        "device": "cpu",
        "machine": platform.platform(),
    }
    print(f"\n{'mode':<12} {'adapter loads':>14} {'tok/s':>8} {'affinity':>9}")
    for mode, row in summary.items():
        print(
            f"{mode:<12} {row['adapter_loads']:>14.0f} {row['tokens_per_s']:>8.1f} "
            f"{row['affinity']:>9.2f}"
        )
    for name, value in ratios.items():
        print(f"{name}: {value:.2f}x")
    out = args.out or RESULTS / "cluster_routing_cpu.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps({"meta": meta, "summary": summary, "ratios": ratios, "runs": runs}, indent=2)
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
