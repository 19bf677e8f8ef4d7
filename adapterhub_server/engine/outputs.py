"""What the engine hands back for a request, one delta per engine step."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

FinishReason = Literal["stop", "length", "abort", "error"]


@dataclass(frozen=True)
class TokenLogprob:
    """The logprob of one generated token and, if asked for, its top alternatives."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()
    """(token_id, logprob) of the most likely tokens at this position, most likely first."""
    rank: int | None = None
    """1 + how many tokens were more likely here (set for prompt tokens)."""


@dataclass
class RequestOutput:
    """The new part of one request's generation since the previous output.

    `text` and `token_ids` are deltas; the consumer concatenates them. The last output of a
    request has `finished=True` and a `finish_reason`.
    """

    request_id: str
    text: str
    token_ids: list[int]
    prompt_tokens: int
    completion_tokens: int
    """Total generated so far (not a delta)."""
    finished: bool = False
    finish_reason: FinishReason | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)
    """One entry per token in `token_ids` when the request asked for logprobs."""
    prompt_logprobs: list[TokenLogprob | None] | None = None
    """With `SamplingParams.prompt_logprobs`, on the request's first output only: one entry
    per prompt token (None for the first, which has no context)."""
    error: str | None = None
    """Set when finish_reason is "error": why this request (alone) failed."""
    error_code: str | None = None
    """Machine-readable reason for an "error" or "abort" finish: `out_of_memory` (transient,
    HTTP 503), `shutting_down`, or `internal_error`."""
