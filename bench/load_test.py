"""Load generator: many concurrent clients over many adapters against a real server process.

Three phases against one `adapterhub-server serve` process that has more adapters than
device slots (so adapters churn through the slots all the time):

  steady    `--clients` closed-loop clients, each sending one completion after another
            for `--duration` seconds, every request for a random adapter. The queue limit
            (`--max-num-seqs` + `--max-queued-requests`) is at least the number of
            clients, so no request may fail.
  burst     limit + `--burst-extra` long streaming requests sent at once: exactly
            `--burst-extra` of them must be refused with 429 and `Retry-After`, and the
            others are accepted. Then the clients disconnect, which must free every slot.
  overload  `--overload-factor` x limit clients hammering for `--overload-seconds`,
            retrying each 429 at once: the server's RSS must stay flat, since refused
            requests allocate nothing.

Reports throughput, p50/p99 latency, status counts and the server's RSS; writes JSON under
``bench/results/``; exits 1 if an invariant above does not hold.

    .venv/bin/python -m bench.load_test              # default model, 64 clients, 16 adapters
    .venv/bin/python -m bench.load_test --smoke      # tiny random model, seconds (CI)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from bench.serve_throughput import PROMPTS, RESULTS, _server_process, make_adapters
from bench.timing import machine_info


@dataclass
class PhaseResult:
    statuses: Counter[int] = field(default_factory=Counter)
    latencies_s: list[float] = field(default_factory=list)
    tokens: int = 0
    wrong_model: int = 0
    """200 responses that name another model than the one asked for."""
    retry_after_missing: int = 0
    wall_s: float = 0.0

    def summary(self) -> dict[str, object]:
        ok = self.statuses.get(200, 0)
        lat = sorted(self.latencies_s)
        return {
            "requests": sum(self.statuses.values()),
            "ok": ok,
            "failed": sum(n for s, n in self.statuses.items() if s not in (200, 429)),
            "rejected_429": self.statuses.get(429, 0),
            "statuses": {str(s): n for s, n in sorted(self.statuses.items())},
            "wrong_model": self.wrong_model,
            "retry_after_missing": self.retry_after_missing,
            "wall_s": round(self.wall_s, 3),
            "requests_per_s": round(ok / self.wall_s, 3) if self.wall_s else 0.0,
            "tokens_per_s": round(self.tokens / self.wall_s, 2) if self.wall_s else 0.0,
            "p50_latency_s": round(_percentile(lat, 50), 4) if lat else None,
            "p99_latency_s": round(_percentile(lat, 99), 4) if lat else None,
        }


def _percentile(sorted_values: list[float], q: float) -> float:
    if len(sorted_values) == 1:
        return sorted_values[0]
    return statistics.quantiles(sorted_values, n=100, method="inclusive")[int(q) - 1]


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


async def _closed_loop(
    url: str,
    headers: dict[str, str],
    models: list[str],
    *,
    clients: int,
    seconds: float,
    max_tokens: int,
    seed: int,
) -> PhaseResult:
    """`clients` clients, each sending its next request when the previous one is answered;
    a 429 is retried at once (that is the overload pressure)."""
    result = PhaseResult()
    deadline = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async def client(index: int, http: httpx.AsyncClient) -> None:
        rng = random.Random(seed * 1000 + index)
        while time.perf_counter() < deadline:
            model = rng.choice(models)
            t0 = time.perf_counter()
            r = await http.post(
                "/v1/completions",
                json={
                    "model": model,
                    "prompt": rng.choice(PROMPTS),
                    "max_tokens": max_tokens,
                    "temperature": 0,
                    "ignore_eos": True,
                },
            )
            result.statuses[r.status_code] += 1
            if r.status_code == 200:
                result.latencies_s.append(time.perf_counter() - t0)
                body = r.json()
                result.tokens += body["usage"]["completion_tokens"]
                result.wrong_model += body["model"] != model
            elif r.status_code == 429 and "retry-after" not in r.headers:
                result.retry_after_missing += 1

    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits, headers=headers) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(i, http) for i in range(clients)))
        result.wall_s = time.perf_counter() - t0
    return result


async def _burst(
    url: str,
    headers: dict[str, str],
    models: list[str],
    *,
    total: int,
    expected_429: int,
    max_tokens: int,
) -> PhaseResult:
    """Send `total` long streaming requests at once and count the refusals.

    Accepted requests answer only once they produce their first token (queued ones later),
    so the phase waits until the refusals stop coming, then disconnects everything.
    """
    result = PhaseResult()
    limits = httpx.Limits(max_connections=total + 8, max_keepalive_connections=total + 8)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits, headers=headers) as http:

        async def one(i: int) -> None:
            request = http.build_request(
                "POST",
                "/v1/completions",
                json={
                    "model": models[i % len(models)],
                    "prompt": PROMPTS[i % len(PROMPTS)],
                    "max_tokens": max_tokens,
                    "temperature": 0,
                    "ignore_eos": True,
                    "stream": True,
                },
            )
            response = await http.send(request, stream=True)
            try:
                result.statuses[response.status_code] += 1
                if response.status_code == 429 and "retry-after" not in response.headers:
                    result.retry_after_missing += 1
                if response.status_code == 200:
                    await asyncio.Event().wait()  # hold the stream open until cancelled
            finally:
                await response.aclose()

        t0 = time.perf_counter()
        tasks = [asyncio.create_task(one(i)) for i in range(total)]
        # Refusals are immediate; give stragglers a moment to show there are no more.
        while result.statuses.get(429, 0) < expected_429 and time.perf_counter() - t0 < 30:
            await asyncio.sleep(0.05)
        await asyncio.sleep(1.0)
        result.wall_s = time.perf_counter() - t0
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return result


async def _wait_idle(url: str, headers: dict[str, str], timeout: float = 60) -> bool:
    """True once the server reports no running and no queued sequences."""
    deadline = time.perf_counter() + timeout
    async with httpx.AsyncClient(base_url=url, timeout=10, headers=headers) as http:
        while time.perf_counter() < deadline:
            text = (await http.get("/metrics")).text
            gauges = {
                line.split()[0]: float(line.split()[1])
                for line in text.splitlines()
                if line.startswith(("adapterhub_running_sequences", "adapterhub_queued_sequences"))
            }
            if gauges and not any(gauges.values()):
                return True
            await asyncio.sleep(0.1)
    return False


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--adapters", type=int, default=16)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--max-loras", type=int, default=8, help="device slots (< adapters)")
    parser.add_argument("--max-num-seqs", type=int, default=32)
    parser.add_argument("--max-queued-requests", type=int, default=32)
    parser.add_argument("--duration", type=float, default=30.0, help="steady phase, seconds")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--burst-extra", type=int, default=16)
    parser.add_argument("--overload-factor", type=int, default=4)
    parser.add_argument("--overload-seconds", type=float, default=15.0)
    parser.add_argument("--base-model", default=None, help="default: the embedded model")
    parser.add_argument("--smoke", action="store_true", help="tiny random model, seconds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    from adapterhub_server.base_model import ResolvedBaseModel, resolve_base_model
    from adapterhub_server.config import EngineConfig

    tmp = Path(tempfile.mkdtemp(prefix="adapterhub-load-"))
    if args.smoke:
        from tests.tiny_models import make_tiny_llama

        # A long context so that burst requests outlast the burst by far.
        base = ResolvedBaseModel(
            make_tiny_llama(tmp / "base", max_position_embeddings=8192), "tiny", "local"
        )
        args.clients, args.adapters, args.rank, args.max_loras = 8, 6, 4, 2
        args.max_num_seqs, args.max_queued_requests = 4, 4
        args.duration, args.burst_extra, args.overload_seconds = 3.0, 5, 3.0
        args.new_tokens, args.overload_factor = 8, 3
        max_model_len, burst_tokens = 8192, 8000
    else:
        base = resolve_base_model(args.base_model)
        max_model_len, burst_tokens = 2048, 1500
    limit = args.max_num_seqs + args.max_queued_requests
    if args.clients > limit:
        parser.error(f"--clients ({args.clients}) must not exceed the queue limit ({limit})")
    if args.max_loras >= args.adapters:
        parser.error("--max-loras must be below --adapters, so that adapters churn")
    out_path = args.out or RESULTS / ("load_test_smoke.json" if args.smoke else "load_test.json")

    adapters = make_adapters(base.path, tmp, args.adapters, args.rank)
    models = list(adapters)
    config = EngineConfig(
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=max(512, args.max_num_seqs),
        max_loras=args.max_loras,
        max_model_len=max_model_len,
    )
    key = "sk-load-test"
    extra = [
        "--max-queued-requests", str(args.max_queued_requests),
        "--api-key", key,
    ]  # fmt: skip
    procs: list = []
    with _server_process(base.path, "base", adapters, config, extra, procs.append) as url:
        pid = procs[0].pid
        headers = {"Authorization": f"Bearer {key}"}

        async def run() -> dict[str, object]:
            steady = await _closed_loop(
                url,
                headers,
                models,
                clients=args.clients,
                seconds=args.duration,
                max_tokens=args.new_tokens,
                seed=args.seed,
            )
            idle_after_steady = await _wait_idle(url, headers)
            burst = await _burst(
                url,
                headers,
                models,
                total=limit + args.burst_extra,
                expected_429=args.burst_extra,
                max_tokens=burst_tokens,
            )
            idle_after_burst = await _wait_idle(url, headers)
            rss_before = _rss_mib(pid)
            overload = await _closed_loop(
                url,
                headers,
                models,
                clients=args.overload_factor * limit,
                seconds=args.overload_seconds,
                max_tokens=args.new_tokens,
                seed=args.seed + 1,
            )
            rss_after = _rss_mib(pid)
            idle_after_overload = await _wait_idle(url, headers)
            return {
                "steady": steady.summary(),
                "burst": burst.summary(),
                "overload": overload.summary(),
                "server_rss_mib": {
                    "before_overload": round(rss_before, 1),
                    "after_overload": round(rss_after, 1),
                },
                "idle_after": {
                    "steady": idle_after_steady,
                    "burst": idle_after_burst,
                    "overload": idle_after_overload,
                },
            }

        with httpx.Client(base_url=url, headers=headers) as http:
            http.post("/v1/completions", json={"model": "base", "prompt": "hi", "max_tokens": 1})
        phases = asyncio.run(run())

    steady, burst, overload = phases["steady"], phases["burst"], phases["overload"]
    rss = phases["server_rss_mib"]
    checks = {
        "steady: no failed request below the queue limit": steady["failed"] == 0
        and steady["rejected_429"] == 0
        and steady["wrong_model"] == 0,
        f"burst: exactly {args.burst_extra} x 429, all with Retry-After": burst["rejected_429"]
        == args.burst_extra
        and burst["retry_after_missing"] == 0
        and burst["failed"] == 0,
        "overload: only 200s and 429s": overload["failed"] == 0 and overload["wrong_model"] == 0,
        "overload: server RSS grows < 10%": rss["after_overload"] < 1.10 * rss["before_overload"],
        "every phase ends with no running or queued sequence": all(
            phases["idle_after"].values()  # type: ignore[union-attr]
        ),
    }
    result = {
        "config": {
            "base_model": "tiny-random (smoke)" if args.smoke else base.model_id,
            "clients": args.clients,
            "adapters": args.adapters,
            "rank": args.rank,
            "max_loras": args.max_loras,
            "max_num_seqs": args.max_num_seqs,
            "max_queued_requests": args.max_queued_requests,
            "queue_limit": limit,
            "duration_s": args.duration,
            "new_tokens": args.new_tokens,
            "burst_requests": limit + args.burst_extra,
            "overload_clients": args.overload_factor * limit,
            "overload_s": args.overload_seconds,
        },
        "machine": machine_info(),
        **phases,
        "checks": checks,
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=2) + "\n")

    print(f"{'phase':<9} {'requests':>8} {'ok':>6} {'429':>5} {'failed':>6} "
          f"{'req/s':>7} {'tok/s':>8} {'p50 s':>7} {'p99 s':>7}")  # fmt: skip
    for name in ("steady", "burst", "overload"):
        row = phases[name]
        print(
            f"{name:<9} {row['requests']:>8} {row['ok']:>6} {row['rejected_429']:>5} "
            f"{row['failed']:>6} {row['requests_per_s']:>7} {row['tokens_per_s']:>8} "
            f"{row['p50_latency_s']!s:>7} {row['p99_latency_s']!s:>7}"
        )
    print(
        f"server RSS: {rss['before_overload']} MiB before overload, {rss['after_overload']} after"
    )
    for name, ok in checks.items():
        print(f"[{'ok' if ok else 'FAIL'}] {name}")
    print(f"wrote {out_path}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
