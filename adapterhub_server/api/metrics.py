"""Prometheus metrics of one app: HTTP requests, generation, and the engine's load.

Each app owns its `CollectorRegistry` (never the process-global one), so several apps in
one process (tests, or two servers) keep separate counts. Three kinds of sources feed it:

* the HTTP middleware (`AccessMiddleware`) and the inference service, as requests pass;
* the engine thread, through `LLMEngine.step_observer` and the adapter cache's
  `load_observer` (see `observe_engine`); prometheus-client's metrics are thread-safe;
* `engine.stats()`, read at scrape time by `EngineCollector`, for gauges and for counters
  the engine already keeps.

Label values stay bounded: routes are templates (`/v1/adapters/{name}`), never raw paths,
and the adapter label is an adapter's display name, `""` for the base model, or
`UNKNOWN_ADAPTER` when a request named no servable model, so a client cannot mint series.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from adapterhub_server.engine.protocol import EngineClient
from adapterhub_server.lora.cache import display_name
from adapterhub_server.lora.merge import MergeSpec

if TYPE_CHECKING:
    from fastapi import FastAPI

    from adapterhub_server.engine.engine import LLMEngine

logger = logging.getLogger(__name__)

# A `*_created` timestamp series beside every labelled counter and histogram would double
# the series count for nothing (Prometheus derives resets itself). Process-wide setting.
disable_created_metrics()

PREFIX = "adapterhub"
BASE_ADAPTER = ""
"""The adapter label of requests for the base model (and of routes that name no model)."""
UNKNOWN_ADAPTER = "<unknown>"
MERGED_ADAPTER = "<merge>"
"""The adapter label of per-request merges: one label for all of them keeps the metric's
cardinality bounded (a merge's key is per request)."""
"""The adapter label of inference requests whose model did not resolve (404, bad body).
Adapter names start with a letter or digit, so no real adapter can collide with it."""
UNMATCHED_ROUTE = "<unmatched>"
"""The route label of requests for paths no route serves (404)."""
INFERENCE_ROUTES = frozenset({"/v1/completions", "/v1/chat/completions"})
"""Routes whose requests name a model: their adapter label defaults to UNKNOWN_ADAPTER."""

# Generation on a CPU takes seconds to minutes; uploads and long streams take minutes.
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_BATCH_SEQ_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
_BATCH_TOKEN_BUCKETS = (1, 4, 16, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
_LOAD_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


def adapter_label(adapter: str | MergeSpec | None) -> str:
    """The label of a resolved adapter reference: `name@3` and `name@prod` -> `name`."""
    if isinstance(adapter, MergeSpec):
        return MERGED_ADAPTER
    return display_name(adapter) if adapter else BASE_ADAPTER


class ApiMetrics:
    """The metrics of one app, and the hooks that update them."""

    def __init__(self, engine: EngineClient | None = None) -> None:
        """With `engine`, its `stats()` and `ready` are exported at every scrape."""
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            f"{PREFIX}_http_requests",
            "HTTP requests answered, by route template, method, status and adapter.",
            ["route", "method", "status", "adapter"],
            registry=r,
        )
        self.request_duration = Histogram(
            f"{PREFIX}_http_request_duration_seconds",
            "Time from receiving a request to the end of its response (streams included).",
            ["route", "method"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.time_to_first_token = Histogram(
            f"{PREFIX}_time_to_first_token_seconds",
            "Time from handing a prompt to the engine to its first generated token.",
            ["adapter"],
            buckets=_TTFT_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            f"{PREFIX}_prompt_tokens",
            "Prompt tokens of answered requests.",
            ["adapter"],
            registry=r,
        )
        self.generation_tokens = Counter(
            f"{PREFIX}_generation_tokens",
            "Tokens generated (including those of requests cut short).",
            ["adapter"],
            registry=r,
        )
        self.batch_sequences = Histogram(
            f"{PREFIX}_batch_sequences",
            "Sequences in each engine step (prefills and decodes).",
            buckets=_BATCH_SEQ_BUCKETS,
            registry=r,
        )
        self.batch_tokens = Histogram(
            f"{PREFIX}_batch_tokens",
            "Tokens in each engine step (prefill chunks plus one per decode).",
            buckets=_BATCH_TOKEN_BUCKETS,
            registry=r,
        )
        self.adapter_load_seconds = Histogram(
            f"{PREFIX}_adapter_load_seconds",
            "Time to read, hash-check and validate one adapter's files.",
            buckets=_LOAD_BUCKETS,
            registry=r,
        )
        if engine is not None:
            r.register(EngineCollector(engine))
        # Resident memory and CPU time (`process_*`, the names dashboards expect):
        # "memory stays flat" is checked on these. Silent where /proc does not exist.
        ProcessCollector(registry=r)

    # -- hooks -------------------------------------------------------------------------

    def observe_request(
        self, *, route: str, method: str, status: int, adapter: str, seconds: float
    ) -> None:
        self.requests.labels(route, method, str(status), adapter).inc()
        self.request_duration.labels(route, method).observe(seconds)

    def observe_first_token(self, adapter: str, seconds: float) -> None:
        self.time_to_first_token.labels(adapter).observe(seconds)

    def observe_tokens(self, adapter: str, *, prompt: int, generated: int) -> None:
        self.prompt_tokens.labels(adapter).inc(prompt)
        self.generation_tokens.labels(adapter).inc(generated)

    def observe_step(self, num_seqs: int, num_tokens: int) -> None:
        """`LLMEngine.step_observer`: runs on the engine thread once per step."""
        self.batch_sequences.observe(num_seqs)
        self.batch_tokens.observe(num_tokens)

    def observe_adapter_load(self, key: str, seconds: float) -> None:
        """`AdapterCache.load_observer`: runs on the adapter-loading thread."""
        self.adapter_load_seconds.observe(seconds)

    def render(self) -> tuple[bytes, str]:
        """The Prometheus text exposition of everything, and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def observe_engine(app: FastAPI, engine: LLMEngine) -> None:
    """Feed `app`'s batch-size and adapter-load histograms from `engine`'s own threads.

    Call once after `create_app`, with the `LLMEngine` behind the app's `AsyncLLMEngine`
    (`async_engine.engine`). Engines without these hooks (test fakes) simply lack the data.
    """
    metrics: ApiMetrics = app.state.metrics
    engine.step_observer = metrics.observe_step
    engine.adapters.load_observer = metrics.observe_adapter_load


class EngineCollector(Collector):
    """Reads `engine.stats()` and `engine.ready` at scrape time."""

    def __init__(self, engine: EngineClient) -> None:
        self._engine = engine

    def collect(self) -> Iterable[Any]:
        yield _gauge("ready", "1 while the engine accepts requests, else 0.", self._engine.ready)
        try:
            stats = self._engine.stats()
        except Exception:  # a scrape during start-up or shutdown must still answer
            logger.debug("engine stats unavailable", exc_info=True)
            return
        yield _gauge("running_sequences", "Sequences in the running batch.", stats.running)
        yield _gauge(
            "queued_sequences",
            "Accepted requests waiting for a batch slot or their adapter's files.",
            stats.waiting,
        )
        yield _gauge("max_running_sequences", "Capacity of the running batch.", stats.max_num_seqs)
        yield _gauge(
            "adapter_slots_used", "Adapters resident in device slots.", stats.adapter_slots_used
        )
        yield _gauge("adapter_slots_total", "Device slots for adapters.", stats.adapter_slots_total)
        yield _gauge(
            "adapters_in_host_memory",
            "Parsed adapters kept in host memory.",
            stats.adapters_in_host_memory,
        )
        yield _counter(
            "adapter_cache_hits",
            "Admissions whose adapter was already in a device slot.",
            stats.adapter_cache_hits,
        )
        yield _counter(
            "adapter_cache_misses",
            "Admissions whose adapter had to be written into a device slot.",
            stats.adapter_cache_misses,
        )
        yield _gauge(
            "kv_cache_usage_ratio",
            "Fraction of the KV cache's blocks held by running sequences (0-1).",
            stats.kv_cache_usage,
        )
        yield _counter(
            "prefix_cache_queries_tokens",
            "Prompt tokens looked up in the prefix cache at admission.",
            stats.prefix_cache_queried_tokens,
        )
        yield _counter(
            "prefix_cache_hits_tokens",
            "Prompt tokens whose keys and values came from the prefix cache.",
            stats.prefix_cache_hit_tokens,
        )
        yield _counter(
            "preemptions",
            "Running sequences preempted for lack of KV blocks (recomputed later).",
            stats.preemptions,
        )
        yield _counter(
            "adapter_loads", "Adapters read and validated from files.", stats.adapter_loads
        )
        yield _counter(
            "adapter_evictions",
            "Idle adapters dropped from a device slot to make room.",
            stats.adapter_evictions,
        )
        lora_info = _lora_requests_info(self._engine, stats.adapter_slots_total)
        if lora_info is not None:
            yield lora_info


def _lora_requests_info(engine: EngineClient, max_lora: int) -> GaugeMetricFamily | None:
    """`adapterhub_lora_requests_info`, shaped as vLLM's `vllm:lora_requests_info`: one
    sample whose labels name the adapters of running and of waiting requests
    (comma-separated, as clients name them in `model`) and the device slots (`max_lora`),
    and whose value is the time it was taken. The inference gateway's endpoint picker reads
    it (`--lora-info-metric`) to send a request where its adapter is already active."""
    snapshot = getattr(engine, "adapter_requests", None)
    if snapshot is None:  # engines without adapters (test fakes)
        return None
    running, waiting = snapshot()
    family = GaugeMetricFamily(
        f"{PREFIX}_lora_requests_info",
        "Running and waiting adapters (vLLM's lora_requests_info); value: unix time.",
        labels=["running_lora_adapters", "waiting_lora_adapters", "max_lora"],
    )
    family.add_metric([",".join(running), ",".join(waiting), str(max_lora)], time.time())
    return family


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"{PREFIX}_{name}", doc, value=float(value))


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(f"{PREFIX}_{name}", doc, value=float(value))


# -- the adapter of the request being served -------------------------------------------------


@dataclass
class _RequestLabels:
    adapter: str | None = None


_current: ContextVar[_RequestLabels | None] = ContextVar("adapterhub_metrics", default=None)


@contextmanager
def request_labels() -> Iterator[_RequestLabels]:
    """Collect the labels the handler learns (its adapter) for the middleware to record.

    The holder is mutable so that code running in copied contexts (task groups, worker
    threads) still writes into this request's labels.
    """
    labels = _RequestLabels()
    token = _current.set(labels)
    try:
        yield labels
    finally:
        _current.reset(token)


def note_adapter(label: str) -> None:
    """Record which adapter the current request resolved to (no-op outside a request)."""
    labels = _current.get()
    if labels is not None:
        labels.adapter = label
