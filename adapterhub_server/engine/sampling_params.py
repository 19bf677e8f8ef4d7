"""Per-request generation settings, validated at construction."""

from __future__ import annotations

from dataclasses import dataclass, field

MAX_TOP_LOGPROBS = 20
MAX_STOP_STRINGS = 16
GREEDY_TEMPERATURE = 1e-5
"""Temperatures below this decode greedily: dividing logits by a smaller number overflows
float32 (an empty answer from NaN probabilities), and the limit of sampling as the
temperature goes to 0 is the argmax anyway."""


class SamplingParamsError(ValueError):
    """A sampling value is out of range; `param` names the offending field."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class SamplingParams:
    """How one request is decoded. Every field has the OpenAI meaning."""

    max_tokens: int = 16
    """Upper bound on generated tokens (the prompt is not counted)."""
    temperature: float = 1.0
    """0 (or anything below `GREEDY_TEMPERATURE`) means greedy (argmax); otherwise logits
    are divided by it before sampling."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability sums to top_p."""
    top_k: int = -1
    """Keep only the k most likely tokens; -1 (or 0) disables the filter."""
    seed: int | None = None
    """Seeds this request's own generator, so the result does not depend on the batch."""
    stop: tuple[str, ...] = ()
    """Generation ends when the text contains one of these; the stop string is not returned."""
    stop_token_ids: tuple[int, ...] = ()
    """Generation ends after one of these tokens (in addition to EOS unless ignore_eos)."""
    ignore_eos: bool = False
    """Keep generating past the tokenizer's EOS token."""
    logprobs: int | None = None
    """None: no logprobs. k >= 0: the sampled token's logprob plus the k most likely tokens."""
    skip_special_tokens: bool = True
    """Drop special tokens (EOS, chat markers) from the returned text."""
    extra: dict[str, object] = field(default_factory=dict, compare=False)
    """Free-form annotations that travel with the request (not used for decoding)."""

    def __post_init__(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise SamplingParamsError("max_tokens must be an integer >= 1", "max_tokens")
        if not 0.0 <= self.temperature <= 2.0:
            raise SamplingParamsError("temperature must be between 0 and 2", "temperature")
        if not 0.0 < self.top_p <= 1.0:
            raise SamplingParamsError("top_p must be in (0, 1]", "top_p")
        if self.top_k < -1:
            raise SamplingParamsError("top_k must be -1 (disabled) or >= 0", "top_k")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            raise SamplingParamsError(
                f"logprobs must be between 0 and {MAX_TOP_LOGPROBS}", "logprobs"
            )
        if len(self.stop) > MAX_STOP_STRINGS:
            raise SamplingParamsError(f"at most {MAX_STOP_STRINGS} stop strings", "stop")
        if any(not s for s in self.stop):
            raise SamplingParamsError("stop strings must be non-empty", "stop")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise SamplingParamsError("seed must be in [0, 2**63)", "seed")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE
