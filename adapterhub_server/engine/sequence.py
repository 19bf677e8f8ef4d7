"""State of one request as it moves through the engine."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from adapterhub_server.engine.detokenizer import IncrementalDetokenizer, StopChecker
from adapterhub_server.engine.outputs import FinishReason, TokenLogprob
from adapterhub_server.engine.sampling_params import SamplingParams
from adapterhub_server.engine.structured import GrammarMatcher
from adapterhub_server.lora.cache import AdapterLocation
from adapterhub_server.lora.ops import Route


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """One request: its tokens, where its KV lives, its adapter slot, and its output."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    adapter: AdapterLocation | None
    detokenizer: IncrementalDetokenizer
    stop_checker: StopChecker
    generator: torch.Generator | None
    arrival: float = field(default_factory=time.monotonic)
    status: SequenceStatus = SequenceStatus.WAITING
    output_ids: list[int] = field(default_factory=list)
    num_computed: int = 0
    """Tokens whose keys/values are in the cache (0 again after a preemption)."""
    route: Route | None = None
    """Adapter slot while running (None: base model)."""
    finish_reason: FinishReason | None = None
    error: str | None = None
    error_code: str | None = None
    """Machine-readable reason of an "error" or "abort" finish (see RequestOutput)."""
    text_emitted: int = 0
    """Characters of the detokenized output already handed to the consumer."""
    tokens_emitted: int = 0
    pending_logprobs: list[TokenLogprob] = field(default_factory=list)
    stop_at: int | None = None
    """Character index where a stop string begins (the text is cut there)."""
    matcher: GrammarMatcher | None = None
    """Where the output stands in the request's grammar (structured outputs): advanced by
    every committed token, so it stays valid across preemption (the recompute keeps the
    output tokens); None when unconstrained, and again once finished."""
    prompt_logprobs: list[TokenLogprob | None] | None = None
    """With `params.prompt_logprobs`: an entry per prompt token computed so far (the first is
    None); sent with the first output, then set to None."""

    @property
    def needs_prompt_logprobs(self) -> bool:
        """Its prompt's logprobs are still to compute (so no prefix-cache reads)."""
        entries = self.prompt_logprobs
        return entries is not None and len(entries) < len(self.prompt_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def prefilling(self) -> bool:
        """More than the last token is left to compute: a prompt, or a preempted sequence's
        prompt and output, being (re)computed in chunks."""
        return self.num_computed < self.num_tokens - 1

    def token_at(self, position: int) -> int:
        n = len(self.prompt_ids)
        return self.prompt_ids[position] if position < n else self.output_ids[position - n]

    def tokens(self, start: int, end: int) -> list[int]:
        """Tokens at positions ``[start, end)`` (prompt, then output)."""
        n = len(self.prompt_ids)
        if end <= n:
            return self.prompt_ids[start:end]
        return self.prompt_ids[start:] + self.output_ids[max(0, start - n) : end - n]

    @property
    def finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED
