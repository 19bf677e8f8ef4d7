"""Per-request generation settings, validated at construction."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from adapterhub_server.engine.structured import CompiledGrammar

MAX_TOP_LOGPROBS = 20
MAX_STOP_STRINGS = 16
MAX_LOGIT_BIAS = 300
"""OpenAI's limit on `logit_bias` entries."""
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
    prompt_logprobs: int | None = None
    """None: none. k >= 0: every prompt token's logprob (and rank) plus the k most likely
    tokens at its position; the prompt is then computed whole, never read from the prefix
    cache, since cached blocks hold no logits."""
    skip_special_tokens: bool = True
    """Drop special tokens (EOS, chat markers) from the returned text."""
    presence_penalty: float = 0.0
    """In [-2, 2]: subtracted from the logit of every token already generated (OpenAI)."""
    frequency_penalty: float = 0.0
    """In [-2, 2]: subtracted once per earlier occurrence in the output (OpenAI)."""
    repetition_penalty: float = 1.0
    """Extension, in (0, 2]: logits of tokens in the prompt or output are divided by it when
    positive and multiplied by it when negative (the CTRL / transformers / vLLM meaning)."""
    logit_bias: tuple[tuple[int, float], ...] = ()
    """(token id, bias in [-100, 100]) pairs added to the logits; at most 300 (OpenAI)."""
    min_p: float = 0.0
    """Extension, in [0, 1]: drop tokens whose probability (after temperature) is below
    min_p times the most likely token's."""
    min_tokens: int = 0
    """Extension: EOS and `stop_token_ids` cannot be chosen before this many tokens."""
    grammar: CompiledGrammar | None = field(default=None, compare=False)
    """Structured output: every generated token must keep the output inside this grammar
    (`EngineClient.compile_grammar` makes it); the sequence ends with finish_reason "stop"
    when the grammar is complete. The grammar's mask wins over logit_bias, penalties and
    min_tokens: no token outside it is ever chosen."""
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
        if self.prompt_logprobs is not None and not 0 <= self.prompt_logprobs <= MAX_TOP_LOGPROBS:
            raise SamplingParamsError(
                f"prompt_logprobs must be between 0 and {MAX_TOP_LOGPROBS}", "prompt_logprobs"
            )
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
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise SamplingParamsError(f"{name} must be between -2 and 2", name)
        if not 0.0 < self.repetition_penalty <= 2.0:
            raise SamplingParamsError("repetition_penalty must be in (0, 2]", "repetition_penalty")
        if len(self.logit_bias) > MAX_LOGIT_BIAS:
            raise SamplingParamsError(
                f"logit_bias may hold at most {MAX_LOGIT_BIAS} entries", "logit_bias"
            )
        for token, bias in self.logit_bias:
            if not isinstance(token, int) or token < 0:
                raise SamplingParamsError(
                    f"logit_bias keys must be token ids >= 0, got {token!r}", "logit_bias"
                )
            if not -100.0 <= bias <= 100.0:
                raise SamplingParamsError(
                    f"logit_bias values must be between -100 and 100, got {bias!r}",
                    "logit_bias",
                )
        if not 0.0 <= self.min_p <= 1.0:
            raise SamplingParamsError("min_p must be in [0, 1]", "min_p")
        if not isinstance(self.min_tokens, int) or not 0 <= self.min_tokens <= self.max_tokens:
            raise SamplingParamsError(
                "min_tokens must be an integer between 0 and max_tokens", "min_tokens"
            )

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE

    @property
    def processes_logits(self) -> bool:
        """Whether the logits are changed before choosing (penalties, bias, min_tokens)."""
        return bool(
            self.presence_penalty
            or self.frequency_penalty
            or self.repetition_penalty != 1.0
            or self.logit_bias
            or self.min_tokens
        )
