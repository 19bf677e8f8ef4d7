"""The interface the serving layer sees of the engine.

The HTTP layer depends on this protocol only, so it can be exercised against any engine that
honours it and the engine never learns about HTTP.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from adapterhub_server.engine.outputs import RequestOutput
from adapterhub_server.engine.sampling_params import SamplingParams
from adapterhub_server.engine.structured import CompiledGrammar, GrammarSpec
from adapterhub_server.lora.merge import MergeSpec


@dataclass(frozen=True)
class ServableAdapter:
    """An adapter the engine can serve by name."""

    name: str
    rank: int | None
    """Known once the adapter's files have been parsed; None before."""
    created: int
    """Unix seconds when the adapter became servable."""
    source: str


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of the engine's load, read at scrape time by `/metrics`."""

    running: int
    """Sequences in the running batch."""
    waiting: int
    """Accepted requests waiting for a batch slot (or their adapter's files)."""
    max_num_seqs: int
    adapter_slots_used: int
    """Adapters resident in device slots."""
    adapter_slots_total: int
    adapters_in_host_memory: int
    adapter_loads: int
    """Adapters read and validated from files, since start."""
    adapter_evictions: int
    """Adapters dropped from a device slot to make room, since start."""
    adapter_cache_hits: int = 0
    """Admissions whose adapter was already in a device slot, since start."""
    adapter_cache_misses: int = 0
    """Admissions whose adapter had to be written into a device slot, since start."""
    kv_cache_usage: float = 0.0
    """Fraction of the KV cache's blocks held by running sequences (0-1)."""
    prefix_cache_queried_tokens: int = 0
    """Prompt tokens of admitted sequences looked up in the prefix cache, since start."""
    prefix_cache_hit_tokens: int = 0
    """Of those, tokens whose keys and values came from the cache, since start."""
    preemptions: int = 0
    """Running sequences that gave their KV blocks back to be recomputed later."""


class EngineClient(Protocol):
    """What routes call. Implemented by `AsyncLLMEngine`."""

    @property
    def base_model_id(self) -> str: ...

    @property
    def tokenizer(self) -> Any:
        """The base model's Hugging Face tokenizer (chat template included)."""

    @property
    def max_model_len(self) -> int:
        """Prompt tokens + max_tokens must not exceed this."""

    @property
    def ready(self) -> bool:
        """True once the model is loaded and warm and the engine loop runs."""

    def stats(self) -> EngineStats: ...

    def list_adapters(self) -> Sequence[ServableAdapter]: ...

    def resolve_adapter(self, model: str) -> str | None:
        """Map a request's `model` to an adapter name, or None for the base model.

        Raises `AdapterNotFoundError` when `model` is neither the base id nor an adapter.
        """

    def generate(
        self,
        *,
        request_id: str,
        prompt_token_ids: Sequence[int],
        params: SamplingParams,
        adapter: str | MergeSpec | None,
        follows: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Stream the request's outputs; the last one has `finished=True`.

        `follows` names an earlier request of the same prompt and adapter (choice 0 of an
        `n > 1` request): this one starts once that one's prompt is cached, and reads its
        keys and values instead of computing them again.

        Raises `ContextLengthError` if prompt + max_tokens exceed `max_model_len`, and
        `AdapterNotFoundError` / `AdapterValidationError` if the adapter cannot be served.
        Closing the iterator early (client gone) aborts the request and frees its slot.
        """

    async def abort(self, request_id: str) -> None: ...

    async def compile_grammar(self, spec: GrammarSpec) -> CompiledGrammar:
        """Compile a structured-output spec for `SamplingParams.grammar`, off the event loop
        and the engine thread, from a bounded cache.

        Raises `GrammarError` (400; the caller sets its `param`) when the spec is invalid,
        uses a construct the grammar engine does not implement (named in the message), or
        takes longer than the configured compile timeout; `InvalidRequestError` when this
        model's tokenizer cannot drive structured outputs.
        """
