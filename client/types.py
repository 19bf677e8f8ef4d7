"""Wire schemas of the AdapterHub HTTP API.

The server validates requests and serializes responses with these models, and the client
parses responses with them, so the two cannot drift apart. Shapes follow the OpenAI API
where OpenAI has the concept; AdapterHub extensions (`top_k`, `stop_token_ids`, ...) are
marked as such.

This module depends on pydantic only: the client package must stay importable without torch
or the server's web framework.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_serializer, field_validator

__all__ = [
    "MAX_LOGPROBS",
    "MAX_STOP_SEQUENCES",
    "ChatCompletion",
    "ChatCompletionChoice",
    "ChatCompletionChunk",
    "ChatCompletionChunkChoice",
    "ChatCompletionMessage",
    "ChatCompletionRequest",
    "ChatCompletionTokenLogprob",
    "ChatContentPartText",
    "ChatLogprobs",
    "ChatMessage",
    "ChoiceDelta",
    "Completion",
    "CompletionChoice",
    "CompletionLogprobs",
    "CompletionRequest",
    "CompletionUsage",
    "ErrorDetail",
    "ErrorResponse",
    "FinishReason",
    "HealthStatus",
    "Model",
    "ModelList",
    "StreamOptions",
    "TopLogprob",
]

MAX_LOGPROBS = 20
"""Upper bound for `logprobs` (completions) and `top_logprobs` (chat)."""
MAX_STOP_SEQUENCES = 16
"""Upper bound on the number of stop strings in one request."""
LOGPROB_FLOOR = -9999.0
"""OpenAI reports this instead of -inf for impossible tokens, since JSON has no infinity."""

FinishReason = Literal["stop", "length"]
"""`stop`: a natural end, a stop string or a stop token. `length`: `max_tokens` was reached."""


def _is_none(value: object) -> bool:
    return value is None


def _finite_logprob(value: float) -> float:
    return value if math.isfinite(value) else LOGPROB_FLOOR


class _Wire(BaseModel):
    """Base of every schema.

    Unknown fields are kept rather than rejected so that a client parsing a newer server's
    responses (or a server receiving fields sent by OpenAI SDKs) keeps working.
    """

    model_config = ConfigDict(extra="allow", use_attribute_docstrings=True)


# --- errors -------------------------------------------------------------------------------


class ErrorDetail(_Wire):
    """What went wrong, in OpenAI's error shape."""

    message: str
    """Human-readable explanation."""
    type: str
    """Error class: `invalid_request_error` for client mistakes, `server_error` for faults."""
    param: str | None = None
    """The request field at fault (`temperature`, `messages[0].content`), if any."""
    code: str | None = None
    """Machine-readable code (`model_not_found`, `context_length_exceeded`, ...)."""


class ErrorResponse(_Wire):
    """Body of every non-2xx response, and of an error event inside a stream."""

    error: ErrorDetail
    """The error."""


# --- shared request pieces ------------------------------------------------------------------


class StreamOptions(_Wire):
    """Options that apply when `stream` is true."""

    include_usage: bool = False
    """Send one extra chunk before `[DONE]` with empty `choices` and the request's `usage`."""


def _check_stop(value: Any) -> Any:
    """Reject anything but a string or a short list of strings, with one clear message."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        if len(value) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed")
        return value
    raise ValueError("stop must be a string or a list of strings")


class _GenerationRequest(_Wire):
    """Fields shared by `/v1/completions` and `/v1/chat/completions`."""

    model: str = ""
    """The base model id or an adapter reference (`name`, `name@3`, `name@alias`).
    Empty means the base model."""
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    """Sampling temperature in [0, 2]; 0 is greedy decoding. Default 1."""
    top_p: float | None = Field(default=None, ge=0.0, le=1.0)
    """Nucleus sampling mass in (0, 1]. Default 1 (no filtering)."""
    n: int | None = Field(default=None, ge=1)
    """Number of choices per prompt. Only 1 is served for now."""
    stream: bool = False
    """Send server-sent events as tokens are generated, ending with `data: [DONE]`."""
    stream_options: StreamOptions | None = None
    """Streaming options; ignored unless `stream` is true."""
    stop: str | list[str] | None = None
    """Up to 16 strings; generation ends before the first one that appears. Not returned."""
    seed: int | None = None
    """Seeds this request's sampler, so the output does not depend on the rest of the batch."""
    user: str | None = None
    """End-user id, recorded for logging only."""
    top_k: int | None = Field(default=None, ge=-1)
    """Extension: keep only the k most likely tokens; -1 or 0 disables it."""
    stop_token_ids: list[int] | None = None
    """Extension: token ids that end generation (in addition to EOS)."""
    ignore_eos: bool = False
    """Extension: keep generating past the end-of-sequence token."""
    skip_special_tokens: bool = True
    """Extension: drop special tokens from the returned text."""

    @field_validator("stop", mode="before")
    @classmethod
    def _validate_stop(cls, value: Any) -> Any:
        return _check_stop(value)


# --- completions ----------------------------------------------------------------------------


def _check_prompt(value: Any) -> Any:
    """Accept the four OpenAI prompt forms; say which ones when the input is none of them."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        if all(isinstance(p, str) for p in value):
            return value
        if all(isinstance(t, int) and not isinstance(t, bool) for t in value):
            return value
        if all(
            isinstance(p, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in p)
            for p in value
        ):
            return value
    raise ValueError(
        "prompt must be a string, a list of strings, a list of token ids, "
        "or a list of lists of token ids"
    )


class CompletionRequest(_GenerationRequest):
    """Body of `POST /v1/completions`."""

    prompt: str | list[str] | list[int] | list[list[int]]
    """One prompt (text or token ids) or several; each prompt yields its own choice."""
    max_tokens: int | None = Field(default=None, ge=1)
    """Most tokens to generate per choice. Default 16."""
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    """Return the sampled token's logprob and this many most likely alternatives."""
    echo: bool = False
    """Prepend the prompt to the completion. Not supported: must be false."""

    @field_validator("prompt", mode="before")
    @classmethod
    def _validate_prompt(cls, value: Any) -> Any:
        return _check_prompt(value)


class CompletionLogprobs(_Wire):
    """Legacy completions logprobs: parallel lists, one entry per generated token."""

    tokens: list[str]
    """Each generated token as text."""
    token_logprobs: list[float | None]
    """Log probability of each generated token."""
    top_logprobs: list[dict[str, float] | None]
    """Per position: the most likely tokens (and the sampled one) mapped to logprobs."""
    text_offset: list[int]
    """Character offset of each token in the completion text."""

    @field_serializer("token_logprobs")
    def _finite_token_logprobs(self, values: list[float | None]) -> list[float | None]:
        return [None if v is None else _finite_logprob(v) for v in values]

    @field_serializer("top_logprobs")
    def _finite_top_logprobs(
        self, values: list[dict[str, float] | None]
    ) -> list[dict[str, float] | None]:
        return [
            None if d is None else {k: _finite_logprob(v) for k, v in d.items()} for d in values
        ]


class CompletionChoice(_Wire):
    """One generated continuation."""

    index: int
    """Position of the prompt this choice continues."""
    text: str
    """Generated text (a delta when streaming)."""
    logprobs: CompletionLogprobs | None = None
    """Token logprobs, when the request asked for them."""
    finish_reason: FinishReason | None = None
    """Why generation ended; null on stream chunks before the last one of this choice."""


class CompletionUsage(_Wire):
    """Token counts of one request (summed over its choices)."""

    prompt_tokens: int
    """Tokens in the prompt(s)."""
    completion_tokens: int
    """Tokens generated."""
    total_tokens: int
    """prompt_tokens + completion_tokens."""


class Completion(_Wire):
    """Response of `POST /v1/completions`, and each chunk of its stream (same shape)."""

    id: str
    """Unique id of the completion, `cmpl-...`; shared by all chunks of a stream."""
    object: Literal["text_completion"] = "text_completion"
    """Always `text_completion`."""
    created: int
    """Unix seconds when the request was accepted."""
    model: str
    """The `model` of the request."""
    choices: list[CompletionChoice]
    """One per prompt; empty in the usage chunk of a stream."""
    usage: CompletionUsage | None = Field(default=None, exclude_if=_is_none)
    """Token counts; always set on a full response, only on the last chunk of a stream."""


# --- chat completions -----------------------------------------------------------------------


class ChatContentPartText(_Wire):
    """A text part of a message's content."""

    type: Literal["text"]
    """Only text parts are supported."""
    text: str
    """The text."""


class ChatMessage(_Wire):
    """One message of the conversation."""

    role: Literal["system", "developer", "user", "assistant"]
    """Who speaks. `developer` is treated as `system`."""
    content: str | list[ChatContentPartText] | None = None
    """Text, or a list of text parts (joined by newlines). Null only for assistant messages."""
    name: str | None = None
    """Optional participant name; ignored."""

    @field_validator("content", mode="before")
    @classmethod
    def _validate_content(cls, value: Any) -> Any:
        # Without this, a non-text part yields one error per union member, none of them clear.
        if isinstance(value, list):
            for part in value:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind != "text":
                    raise ValueError(
                        f"unsupported content part type {kind!r}: only 'text' parts are served"
                    )
        return value


class ChatCompletionRequest(_GenerationRequest):
    """Body of `POST /v1/chat/completions`."""

    messages: list[ChatMessage] = Field(min_length=1)
    """The conversation so far, rendered with the base model's chat template."""
    max_completion_tokens: int | None = Field(default=None, ge=1)
    """Most tokens to generate. Default: whatever room the context window leaves."""
    max_tokens: int | None = Field(default=None, ge=1)
    """Deprecated OpenAI alias of `max_completion_tokens`, which wins when both are set."""
    logprobs: bool = False
    """Return the logprob of each generated token."""
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    """With `logprobs`: also return this many most likely tokens per position."""


class TopLogprob(_Wire):
    """A candidate token at one position and its logprob."""

    token: str
    """The token as text."""
    logprob: float
    """Its log probability (-9999.0 stands for -inf)."""
    bytes: list[int] | None = None
    """UTF-8 bytes of `token`."""

    @field_serializer("logprob")
    def _finite(self, value: float) -> float:
        return _finite_logprob(value)


class ChatCompletionTokenLogprob(TopLogprob):
    """The sampled token at one position, with the most likely alternatives."""

    top_logprobs: list[TopLogprob] = Field(default_factory=list)
    """Most likely tokens at this position, most likely first (`top_logprobs` of them)."""


class ChatLogprobs(_Wire):
    """Logprobs of a chat choice."""

    content: list[ChatCompletionTokenLogprob] | None = None
    """One entry per generated token (per token of this delta when streaming)."""


class ChatCompletionMessage(_Wire):
    """The generated message."""

    role: Literal["assistant"] = "assistant"
    """Always `assistant`."""
    content: str | None = None
    """Generated text."""


class ChatCompletionChoice(_Wire):
    """One generated reply."""

    index: int
    """Choice number (always 0 while only n=1 is served)."""
    message: ChatCompletionMessage
    """The reply."""
    logprobs: ChatLogprobs | None = None
    """Token logprobs, when the request asked for them."""
    finish_reason: FinishReason
    """Why generation ended."""


class ChatCompletion(_Wire):
    """Response of `POST /v1/chat/completions` without streaming."""

    id: str
    """Unique id, `chatcmpl-...`."""
    object: Literal["chat.completion"] = "chat.completion"
    """Always `chat.completion`."""
    created: int
    """Unix seconds when the request was accepted."""
    model: str
    """The `model` of the request."""
    choices: list[ChatCompletionChoice]
    """The replies."""
    usage: CompletionUsage
    """Token counts."""


class ChoiceDelta(_Wire):
    """The part of the reply that a stream chunk adds."""

    role: Literal["assistant"] | None = Field(default=None, exclude_if=_is_none)
    """Set on the first chunk of each choice only."""
    content: str | None = Field(default=None, exclude_if=_is_none)
    """New text; absent on the final chunk when it carries no text."""


class ChatCompletionChunkChoice(_Wire):
    """One choice's part of a stream chunk."""

    index: int
    """Choice number."""
    delta: ChoiceDelta
    """What this chunk adds."""
    logprobs: ChatLogprobs | None = None
    """Logprobs of the tokens in `delta`, when requested."""
    finish_reason: FinishReason | None = None
    """Set on the last chunk of this choice."""


class ChatCompletionChunk(_Wire):
    """One server-sent event of a streamed chat completion."""

    id: str
    """Same for every chunk of a stream, `chatcmpl-...`."""
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    """Always `chat.completion.chunk`."""
    created: int
    """Same for every chunk of a stream."""
    model: str
    """The `model` of the request."""
    choices: list[ChatCompletionChunkChoice]
    """Deltas; empty in the usage chunk."""
    usage: CompletionUsage | None = Field(default=None, exclude_if=_is_none)
    """Only on the final chunk, when `stream_options.include_usage` is true."""


# --- models and health ----------------------------------------------------------------------


class Model(_Wire):
    """A model that requests can name: the base model or one of its adapters."""

    id: str
    """What to pass as `model`."""
    object: Literal["model"] = "model"
    """Always `model`."""
    created: int
    """Unix seconds when it became servable."""
    owned_by: str = "adapterhub"
    """Always `adapterhub`."""
    parent: str | None = None
    """For an adapter: the base model id it applies to. Null for the base model."""
    root: str | None = None
    """The base model every entry derives from."""


class ModelList(_Wire):
    """Response of `GET /v1/models`: the base model first, then every adapter."""

    object: Literal["list"] = "list"
    """Always `list`."""
    data: list[Model]
    """The models."""


class HealthStatus(_Wire):
    """Response of `GET /health`."""

    status: Literal["ok"] = "ok"
    """`ok` while the process serves requests."""


# -- adapter registry (`/v1/adapters`) ---------------------------------------------------------


class AdapterFile(_Wire):
    """One stored file of an adapter version."""

    sha256: str
    """Hex sha256 of the file as stored; checked again before it is served."""
    size: int
    """Bytes."""


class AdapterVersion(_Wire):
    """One immutable version of an adapter in the registry."""

    name: str
    version: int
    ref: str
    """``name@version``: the reference that always means exactly this version."""
    status: str
    """``ready`` (servable), ``pending`` (being written) or ``deleted``."""
    created: float
    """Unix seconds."""
    deleted: float | None = None
    aliases: list[str] = Field(default_factory=list)
    base_model_id: str | None = None
    base_fingerprint: str | None = None
    """sha256 fingerprint of the base weights the adapter was validated against."""
    rank: int | None = None
    alpha: float | None = None
    target_modules: list[str] = Field(default_factory=list)
    size: int | None = None
    """Total bytes of the version's files."""
    files: dict[str, AdapterFile] = Field(default_factory=dict)
    description: str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    lineage: dict[str, Any] | None = None
    """How it was made, when known: dataset sha256, hyperparameters, losses, versions."""


class Adapter(_Wire):
    """An adapter name with its versions and aliases."""

    name: str
    latest: AdapterVersion
    """The newest ready version: what ``name`` alone resolves to."""
    versions: list[int]
    """Ready version numbers, oldest first."""
    aliases: dict[str, int]
    """alias -> version."""


class AdapterList(_Wire):
    object: Literal["list"] = "list"
    data: list[Adapter]


class AliasUpdate(_Wire):
    """Body of ``PUT /v1/adapters/{name}/aliases/{alias}``."""

    version: int = Field(ge=1)
    """The version the alias should point at."""


class AliasState(_Wire):
    name: str
    alias: str
    version: int
    """The version the alias points at now (or pointed at before deletion)."""
    previous: int | None = None
    """The version it pointed at before this change, if any."""


class AdapterDeleted(_Wire):
    name: str
    versions: list[int]
    """Versions deleted by this call; their numbers are never reused."""
    deleted: Literal[True] = True
