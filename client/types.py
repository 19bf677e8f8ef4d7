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
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    field_serializer,
    field_validator,
    model_validator,
)

__all__ = [
    "MAX_LOGPROBS",
    "MAX_STOP_SEQUENCES",
    "Adapter",
    "AdapterDeleted",
    "AdapterFile",
    "AdapterList",
    "AdapterVersion",
    "AliasState",
    "AliasUpdate",
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
    "FileDeleted",
    "FileList",
    "FileObject",
    "FilePurpose",
    "FineTuningHyperparameters",
    "FineTuningJob",
    "FineTuningJobCreateRequest",
    "FineTuningJobError",
    "FineTuningJobEvent",
    "FineTuningJobEventList",
    "FineTuningJobHyperparameters",
    "FineTuningJobList",
    "FineTuningJobMethod",
    "FineTuningJobStatus",
    "FineTuningJobSupervised",
    "FineTuningMethodRequest",
    "FinishReason",
    "HealthStatus",
    "MergeCreateRequest",
    "MergeStrategy",
    "MergedAdapters",
    "Model",
    "ModelList",
    "ReadyStatus",
    "StreamOptions",
    "SupervisedMethodRequest",
    "TopLogprob",
    "TrainingMethod",
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


class _Request(_Wire):
    """Base of every request body: JSON types are not coerced (`false` is no integer, `0.0`
    no boolean), so what the published schema calls invalid is refused, as OpenAI does."""

    model_config = ConfigDict(extra="allow", use_attribute_docstrings=True, strict=True)


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


class StreamOptions(_Request):
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


MergeStrategy = Literal["cat", "linear", "ties", "dare_linear", "dare_ties"]
"""How `merged_adapters` combines its adapters (PEFT's `add_weighted_adapter` types)."""


class MergedAdapters(_Request):
    """Extension (LoRAX's shape): serve the merge of several adapters for this request.

    The result equals PEFT's `add_weighted_adapter` with the same `combination_type`,
    weights and density; `model` must name the base model.
    """

    ids: list[str]
    """Adapter references (`name`, `name@3`, `name@alias`) to merge, 1 to 8."""
    weights: list[float] | None = None
    """One weight per id (negative subtracts); default 1.0 each."""
    merge_strategy: MergeStrategy = "cat"
    """`cat` (exact weighted sum, rank = sum of ranks), `linear`, `ties`, `dare_linear` or
    `dare_ties` (the last four need equal ranks)."""
    density: float | None = None
    """Fraction of values kept, in (0, 1]; required by `ties`, `dare_linear`, `dare_ties`."""
    majority_sign_method: Literal["total", "frequency"] = "total"
    """How `ties` and `dare_ties` elect each value's sign."""

    @field_validator("weights", mode="before")
    @classmethod
    def _integers_are_weights(cls, value: Any) -> Any:
        # Strict mode refuses 1 for a float; a weight of 1 is what anyone would write.
        if isinstance(value, list):
            return [
                float(v) if isinstance(v, int) and not isinstance(v, bool) else v for v in value
            ]
        return value

    @field_validator("density", mode="before")
    @classmethod
    def _integer_density(cls, value: Any) -> Any:
        return float(value) if isinstance(value, int) and not isinstance(value, bool) else value


class _GenerationRequest(_Request):
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
    merged_adapters: MergedAdapters | None = None
    """Extension: serve the merge of these adapters (with `model` naming the base model)."""
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    """In [-2, 2]: subtracted from the logit of every token already generated. Default 0."""
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    """In [-2, 2]: subtracted once per earlier occurrence in the output. Default 0."""
    logit_bias: dict[str, float] | None = None
    """Token id (as a string) -> bias in [-100, 100] added to its logit; at most 300."""
    repetition_penalty: float | None = Field(default=None, gt=0.0, le=2.0)
    """Extension, in (0, 2]: tokens of the prompt or output have positive logits divided
    and negative ones multiplied by it (transformers' and vLLM's meaning). Default 1."""
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    """Extension, in [0, 1]: drop tokens less likely than min_p times the top token."""
    min_tokens: int | None = Field(default=None, ge=0)
    """Extension: EOS and `stop_token_ids` cannot end generation before this many tokens."""

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


class ChatContentPartText(_Request):
    """A text part of a message's content."""

    type: Literal["text"]
    """Only text parts are supported."""
    text: str
    """The text."""


class ChatMessage(_Request):
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


class ReadyStatus(_Wire):
    """Response of `GET /ready` when the server can take requests (else 503, `not_ready`)."""

    status: Literal["ready"] = "ready"
    """`ready` once the model is loaded and warm and the engine loop runs."""


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
    kind: str | None = None
    """What the version holds: `lora`, `dora`, `lora+modules_to_save`, `trainable_tokens`,
    ... or `merge:<strategy>` for a published merge (from its adapter_config.json and
    lineage)."""


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


class AliasUpdate(_Request):
    """Body of ``PUT /v1/adapters/{name}/aliases/{alias}``."""

    version: int = Field(ge=1)
    """The version the alias should point at."""


class MergeCreateRequest(MergedAdapters):
    """Body of ``POST /v1/adapters/{name}/merges``: the merge to publish as a new version."""

    alias: str | None = None
    """Point this alias at the new version."""
    description: str | None = None
    """Free text stored with the version."""


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


# -- files (`/v1/files`) -----------------------------------------------------------------------

FilePurpose = Literal["fine-tune"]
"""The only purpose this server stores files for: training and validation data of jobs."""


class FileObject(_Wire):
    """An uploaded file, in OpenAI's `file` shape."""

    id: str
    """`file-<hex>`: what jobs name as `training_file` / `validation_file`."""
    object: Literal["file"] = "file"
    """Always `file`."""
    bytes: int
    """Size in bytes."""
    created_at: int
    """Unix seconds of the upload."""
    filename: str
    """The name the file was uploaded under (metadata only; stored under `id`)."""
    purpose: FilePurpose = "fine-tune"
    """Always `fine-tune`."""
    status: Literal["uploaded", "processed", "error"] = "processed"
    """Always `processed`: a file is validated before it is stored, or refused."""
    status_details: str | None = None
    """Deprecated by OpenAI; always null."""


class FileList(_Wire):
    """Response of `GET /v1/files`: every stored file, newest first."""

    object: Literal["list"] = "list"
    """Always `list`."""
    data: list[FileObject]
    """The files."""
    has_more: bool = False
    """Always false: the list is not paginated."""


class FileDeleted(_Wire):
    """Response of `DELETE /v1/files/{file_id}`."""

    id: str
    """The deleted file's id."""
    object: Literal["file"] = "file"
    """Always `file`."""
    deleted: Literal[True] = True
    """Always true."""


# -- fine-tuning jobs (`/v1/fine_tuning/jobs`) -------------------------------------------------

FineTuningJobStatus = Literal[
    "validating_files", "queued", "running", "succeeded", "failed", "cancelled"
]
"""A job's life: `queued` -> `running` -> `succeeded` | `failed`; `cancelled` from either of
the first two. `validating_files` is accepted from OpenAI but never reported: files are
validated when uploaded and when the job is created."""

TrainingMethod = Literal["lora", "full"]
"""`lora`: train a LoRA adapter. `full`: full-parameter SFT, then extract a LoRA adapter by
SVD (`extract_rank`) so that the result serves like any other adapter."""


class FineTuningHyperparameters(_Request):
    """Hyperparameters of a job request: OpenAI's three plus AdapterHub extensions.

    Unknown names are refused (400), so a typo never silently trains with a default.
    OpenAI's three accept `"auto"` (the trainer's default); every extension left out takes
    the trainer's default.
    """

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, strict=True)

    n_epochs: Annotated[int, Field(ge=1)] | Literal["auto"] = "auto"
    """Passes over the training data ("auto": 3); ignored when `max_steps` is set."""
    batch_size: Annotated[int, Field(ge=1)] | Literal["auto"] = "auto"
    """Sequences per micro-batch ("auto": 4)."""
    learning_rate_multiplier: (
        Annotated[float, Field(gt=0, allow_inf_nan=False)] | Literal["auto"]
    ) = "auto"
    """Peak learning rate = the method's default (1e-3 LoRA, 2e-5 full) x this ("auto": 1)."""
    training_method: TrainingMethod | None = None
    """Extension: `lora` (default) or `full`."""
    lora_r: int | None = Field(default=None, ge=1)
    """Extension: LoRA rank (default 16)."""
    lora_alpha: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    """Extension: LoRA alpha; scale = alpha / r (default 32)."""
    lora_dropout: float | None = Field(default=None, ge=0, lt=1)
    """Extension: dropout on the LoRA input during training (default 0.05)."""
    lora_target_modules: list[str] | None = Field(default=None, min_length=1)
    """Extension: leaf names of the linear modules to adapt (default all 7 projections)."""
    use_rslora: bool | None = None
    """Extension: rank-stabilised scaling alpha / sqrt(r)."""
    use_dora: bool | None = None
    """Extension, `lora` only: DoRA (a trained magnitude per output feature, as PEFT's
    `use_dora`)."""
    modules_to_save: list[str] | None = None
    """Extension, `lora` only: `lm_head` and/or `embed_tokens`, trained and saved in full
    (PEFT's `modules_to_save`)."""
    trainable_token_indices: list[Annotated[int, Field(ge=0)]] | None = Field(
        default=None, min_length=1
    )
    """Extension, `lora` only: token ids whose embedding rows are trained (PEFT's trainable
    tokens); each below the base's vocabulary size."""
    max_steps: int | None = Field(default=None, ge=1)
    """Extension: optimizer steps to run; overrides `n_epochs`."""
    warmup_ratio: float | None = Field(default=None, ge=0, lt=1)
    """Extension: fraction of the steps with a linear learning-rate warmup (default 0.1)."""
    max_seq_len: int | None = Field(default=None, ge=2)
    """Extension: sequences are truncated to this many tokens (default 512)."""
    grad_accum: int | None = Field(default=None, ge=1)
    """Extension: micro-batches per optimizer step (default 1)."""
    packing: bool | None = None
    """Extension: pack several short examples into one sequence."""
    extract_rank: int | None = Field(default=None, ge=1)
    """Extension, `full` only: rank of the LoRA adapter extracted from the trained weights."""

    @model_validator(mode="before")
    @classmethod
    def _known_names(cls, value: Any) -> Any:
        # One clear message naming the accepted hyperparameters, instead of pydantic's
        # generic "Extra inputs are not permitted" per unknown key.
        if isinstance(value, dict):
            unknown = sorted(k for k in value if k not in cls.model_fields)
            if unknown:
                raise ValueError(
                    f"unknown hyperparameter(s) {', '.join(map(repr, unknown))}; "
                    f"accepted: {', '.join(cls.model_fields)}"
                )
        return value


class SupervisedMethodRequest(_Request):
    """`method.supervised` of a job request."""

    hyperparameters: FineTuningHyperparameters | None = None
    """The job's hyperparameters."""


class FineTuningMethodRequest(_Request):
    """`method` of a job request: only supervised fine-tuning."""

    type: Literal["supervised"] = "supervised"
    """Only `supervised`; OpenAI's `dpo` and `reinforcement` are refused (400)."""
    supervised: SupervisedMethodRequest | None = None
    """Settings of the supervised method."""


class FineTuningJobCreateRequest(_Request):
    """Body of `POST /v1/fine_tuning/jobs`."""

    model: str
    """Must be the id of the base model this server runs (see `GET /v1/models`)."""
    training_file: str
    """Id of an uploaded `fine-tune` file: JSONL of `{"messages": [...]}` or
    `{"prompt", "completion"}` records."""
    validation_file: str | None = None
    """Id of an uploaded `fine-tune` file to report an evaluation loss on."""
    suffix: str | None = None
    """The adapter name the result is published under in the registry; `fine_tuned_model`
    will be `<suffix>@<version>`. Names match `^[a-z0-9][a-z0-9._-]{0,63}$`. Absent: `ft-`
    and the first 8 characters of the job id after its `ftjob-` prefix (`ft-1a2b3c4d`), which
    the job reports as its `suffix`."""
    seed: int | None = Field(default=None, ge=0)
    """Seeds initialisation, dropout and the data order; random (and reported) when absent."""
    method: FineTuningMethodRequest | None = None
    """The method and its hyperparameters."""
    hyperparameters: FineTuningHyperparameters | None = None
    """Deprecated OpenAI spelling of `method.supervised.hyperparameters`; give one of them."""


class FineTuningJobHyperparameters(_Wire):
    """The hyperparameters a job runs with, every default resolved."""

    n_epochs: int
    """Passes over the data (ignored when `max_steps` is set)."""
    batch_size: int
    """Sequences per micro-batch."""
    learning_rate_multiplier: float
    """Multiplier of the method's base learning rate (1e-3 LoRA, 2e-5 full)."""
    learning_rate: float | None = None
    """Extension: the resulting peak learning rate."""
    training_method: str | None = None
    """Extension: `lora` or `full`."""
    lora_r: int | None = None
    lora_alpha: float | None = None
    lora_dropout: float | None = None
    lora_target_modules: list[str] | None = None
    use_rslora: bool | None = None
    use_dora: bool | None = None
    modules_to_save: list[str] | None = None
    trainable_token_indices: list[int] | None = None
    max_steps: int | None = None
    warmup_ratio: float | None = None
    max_seq_len: int | None = None
    grad_accum: int | None = None
    packing: bool | None = None
    extract_rank: int | None = None


class FineTuningJobSupervised(_Wire):
    """`method.supervised` of a job."""

    hyperparameters: FineTuningJobHyperparameters
    """The resolved hyperparameters (the same as the job's top-level `hyperparameters`)."""


class FineTuningJobMethod(_Wire):
    """`method` of a job."""

    type: Literal["supervised"] = "supervised"
    """Always `supervised`."""
    supervised: FineTuningJobSupervised
    """Its settings."""


class FineTuningJobError(_Wire):
    """Why a job failed."""

    code: str
    """Machine-readable: `invalid_training_data`, `trainer_crashed`, `server_restarted`, ..."""
    message: str
    """What happened, with the trainer's own message where it gave one."""
    param: str | None = None
    """The request field at fault, if any."""


class FineTuningJob(_Wire):
    """A fine-tuning job, in OpenAI's `fine_tuning.job` shape."""

    id: str
    """`ftjob-<hex>`."""
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    """Always `fine_tuning.job`."""
    created_at: int
    """Unix seconds of the request."""
    finished_at: int | None = None
    """Unix seconds when it reached `succeeded`, `failed` or `cancelled`."""
    model: str
    """The base model id."""
    fine_tuned_model: str | None = None
    """The registry reference `<suffix>@<version>` once published: servable at once as
    `model` of completions and chat requests."""
    organization_id: str = "adapterhub"
    """Always `adapterhub`."""
    status: FineTuningJobStatus
    """Where the job is in its life."""
    training_file: str
    """Training file id."""
    validation_file: str | None = None
    """Validation file id, if any."""
    hyperparameters: FineTuningJobHyperparameters
    """The resolved hyperparameters."""
    method: FineTuningJobMethod
    """The method and the resolved hyperparameters."""
    seed: int
    """The seed the job trains with."""
    trained_tokens: int | None = None
    """Tokens the loss covered, summed over all steps; set on success."""
    error: FineTuningJobError | None = None
    """Set when `status` is `failed`."""
    result_files: list[str] = Field(default_factory=list)
    """Always empty: the result is the registry version named by `fine_tuned_model`."""
    estimated_finish: int | None = None
    """Unix seconds when a running job should finish, from the trainer's latest estimate."""
    integrations: list[Any] | None = None
    """Unsupported; always null."""
    metadata: dict[str, str] | None = None
    """Unsupported; always null."""
    suffix: str
    """Extension: the adapter name the job publishes under."""


class FineTuningJobList(_Wire):
    """Response of `GET /v1/fine_tuning/jobs`: newest first."""

    object: Literal["list"] = "list"
    """Always `list`."""
    data: list[FineTuningJob]
    """One page of jobs."""
    has_more: bool
    """Whether older jobs follow; pass the last id as `after` to get them."""


class FineTuningJobEvent(_Wire):
    """One entry of a job's log, in OpenAI's `fine_tuning.job.event` shape."""

    id: str
    """`ftevent-<hex>`."""
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    """Always `fine_tuning.job.event`."""
    created_at: int
    """Unix seconds."""
    level: Literal["info", "warn", "error"]
    """Severity."""
    message: str
    """Human-readable."""
    type: Literal["message", "metrics"] = "message"
    """`metrics` for training progress (`data` holds step, train_loss, lr, ...)."""
    data: dict[str, Any] | None = None
    """Structured details; `data.event` names the trainer event (`started`, `checkpoint`,
    `published`, ...) for events that came from the trainer."""


class FineTuningJobEventList(_Wire):
    """Response of `GET /v1/fine_tuning/jobs/{id}/events`: newest first."""

    object: Literal["list"] = "list"
    """Always `list`."""
    data: list[FineTuningJobEvent]
    """One page of events."""
    has_more: bool
    """Whether older events follow; pass the last id as `after` to get them."""
