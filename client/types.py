"""Wire schemas of the AdapterHub HTTP API.

The server validates requests and serializes responses with these models, and the client
parses responses with them, so the two cannot drift apart. Shapes follow the OpenAI API
where OpenAI has the concept; AdapterHub extensions (`top_k`, `stop_token_ids`, ...) are
marked as such.

This module depends on pydantic only: the client package must stay importable without torch
or the server's web framework.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Generic, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    field_serializer,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

__all__ = [
    "MAX_LOGPROBS",
    "MAX_METADATA_KEYS",
    "MAX_N",
    "MAX_STOP_SEQUENCES",
    "MAX_TOOLS",
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
    "ChatCompletionMessageToolCall",
    "ChatCompletionNamedToolChoice",
    "ChatCompletionRequest",
    "ChatCompletionTokenLogprob",
    "ChatCompletionTool",
    "ChatContentPartText",
    "ChatLogprobs",
    "ChatMessage",
    "ChoiceDelta",
    "ChoiceDeltaToolCall",
    "ChoiceDeltaToolCallFunction",
    "Completion",
    "CompletionChoice",
    "CompletionLogprobs",
    "CompletionRequest",
    "CompletionUsage",
    "DetokenizeRequest",
    "DetokenizeResponse",
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
    "FunctionCall",
    "FunctionDefinition",
    "HealthStatus",
    "JsonSchemaFormat",
    "MergeCreateRequest",
    "MergeStrategy",
    "MergedAdapters",
    "Model",
    "ModelList",
    "ParsedChatCompletion",
    "ParsedChatCompletionChoice",
    "ParsedChatCompletionMessage",
    "PromptLogprob",
    "ReadyStatus",
    "ResponseFormat",
    "StreamOptions",
    "StructuredOutputs",
    "SupervisedMethodRequest",
    "TokenizeRequest",
    "TokenizeResponse",
    "ToolCallFunctionParam",
    "ToolCallParam",
    "ToolChoice",
    "ToolChoiceFunction",
    "TopLogprob",
    "TrainingMethod",
    "accumulate_tool_calls",
]

MAX_LOGPROBS = 20
"""Upper bound for `logprobs` (completions) and `top_logprobs` (chat)."""
MAX_STOP_SEQUENCES = 16
"""Upper bound on the number of stop strings in one request."""
LOGPROB_FLOOR = -9999.0
"""OpenAI reports this instead of -inf for impossible tokens, since JSON has no infinity."""

MAX_N = 128
"""Upper bound for `n` (OpenAI's); the server's per-request limit on prompts x n also applies."""
MAX_TOOLS = 128
"""Upper bound on the number of `tools` in one chat request (OpenAI's)."""
MAX_METADATA_KEYS = 16
"""Upper bound on the number of `metadata` entries (OpenAI's), keys of at most 64 characters,
values of at most 512."""

FinishReason = Literal["stop", "length", "tool_calls"]
"""`stop`: a natural end, a stop string or a stop token. `length`: `max_tokens` was reached.
`tool_calls` (chat only): the reply is a call of one or more of the request's `tools`."""


def _is_none(value: object) -> bool:
    return value is None


def _finite_logprob(value: float) -> float:
    return value if math.isfinite(value) else LOGPROB_FLOOR


class _Wire(BaseModel):
    """Base of every response schema.

    Unknown fields are kept rather than rejected so that a client parsing a newer server's
    responses keeps working.
    """

    model_config = ConfigDict(extra="allow", use_attribute_docstrings=True)


@dataclass(frozen=True)
class _Unsupported:
    """A field OpenAI defines on a request object that this server does not implement.

    A request that leaves it out, sends null, or sends a value that `accepts` (one the
    server serves as asked anyway, such as `modalities: ["text"]`) is served; any other
    value is refused with 400, `param` naming the field, code `unsupported_parameter` (or
    `unsupported_value` for a field that is `per_value`).
    """

    hint: str = ""
    """Appended to the error message: what to use instead."""
    accepts: Callable[[Any, Mapping[str, Any]], bool] | None = None
    """(value, whole object) -> True if the value asks for nothing the server does not do."""
    per_value: bool = False
    """The field is served for some values (those `accepts`): refusals name the value,
    with code `unsupported_value`."""


def _field_error(kind: str, field: str, message: str) -> PydanticCustomError:
    """A validation error raised by a model validator that names one of the model's fields:
    `ctx.field` extends the error's location, so the HTTP error's `param` names the field."""
    return PydanticCustomError(kind, message, {"field": field})


class _Request(_Wire):
    """Base of every request body (and of every object nested in one).

    Strict on input, as OpenAI is: JSON types are not coerced (`false` is no integer, `0.0`
    no boolean), and a field that is neither OpenAI's nor a documented extension is refused
    (400, code `unrecognized_argument`) rather than silently ignored. Fields OpenAI defines
    but this server does not implement are listed in `UNSUPPORTED` and refused with their
    own message (code `unsupported_parameter`) unless absent or null.
    """

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, strict=True)

    UNSUPPORTED: ClassVar[Mapping[str, _Unsupported]] = {}
    """OpenAI fields of this object that the server does not implement."""

    @model_validator(mode="before")
    @classmethod
    def _refuse_unsupported(cls, value: Any) -> Any:
        if not isinstance(value, dict) or not cls.UNSUPPORTED:
            return value
        present = [name for name in value if name in cls.UNSUPPORTED]
        for name in present:
            entry = cls.UNSUPPORTED[name]
            given = value[name]
            if given is None or (entry.accepts is not None and entry.accepts(given, value)):
                continue
            if not entry.per_value:
                kind = "unsupported_parameter"
                message = f"Unsupported parameter: '{name}' is not supported by this server"
            else:
                kind = "unsupported_value"
                shown = json.dumps(given, default=str)
                shown = shown if len(shown) <= 80 else shown[:77] + "..."
                message = f"Unsupported value: '{name}' does not support {shown} on this server"
            if entry.hint:
                message += f"; {entry.hint}"
            raise PydanticCustomError(kind, message, {"field": name})
        # What is left asks for nothing: drop it so the model's own fields stay the schema.
        return {k: v for k, v in value.items() if k not in present} if present else value


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


def _is_false(value: Any, _: Mapping[str, Any]) -> bool:
    return value is False


def _is_empty(value: Any, _: Mapping[str, Any]) -> bool:
    return value == [] or value == {}


class StreamOptions(_Request):
    """Options of a streamed response (only with `stream: true`)."""

    UNSUPPORTED: ClassVar[Mapping[str, _Unsupported]] = {
        "include_obfuscation": _Unsupported(
            "stream events are never obfuscated; send false or leave it out",
            accepts=_is_false,
            per_value=True,
        ),
    }

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


# --- structured outputs ---------------------------------------------------------------------

_NAME_PATTERN = r"^[a-zA-Z0-9_-]{1,64}$"


class JsonSchemaFormat(_Request):
    """`response_format.json_schema`: the JSON Schema the reply must match."""

    model_config = ConfigDict(
        extra="forbid", use_attribute_docstrings=True, strict=True, serialize_by_alias=True
    )

    name: str = Field(pattern=_NAME_PATTERN)
    """Name of the format: letters, digits, `_` and `-`, at most 64."""
    description: str | None = None
    """What the format is for (not shown to the model by this server)."""
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    """The JSON Schema (sent as `schema`); absent means any JSON value."""
    strict: bool | None = None
    """Accepted for OpenAI compatibility: the reply always matches `schema` exactly, since
    decoding is constrained by it, whatever this says."""


class ResponseFormat(_Request):
    """`response_format`: what form the reply's text takes (OpenAI's three kinds)."""

    type: Literal["text", "json_object", "json_schema"]
    """`text`: free text (the default). `json_object`: any valid JSON object.
    `json_schema`: JSON matching `json_schema.schema`."""
    json_schema: JsonSchemaFormat | None = None
    """Required with `type: "json_schema"`, refused with the other types."""

    @model_validator(mode="after")
    def _schema_iff_json_schema(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise _field_error("missing", "json_schema", "required when type is 'json_schema'")
        if self.type != "json_schema" and self.json_schema is not None:
            raise _field_error(
                "value_error", "json_schema", f"not allowed when type is {self.type!r}"
            )
        return self


class StructuredOutputs(_Request):
    """Extension (vLLM's `structured_outputs`): constrain the output to exactly one of a
    regular expression, a list of choices, a grammar or a JSON Schema."""

    model_config = ConfigDict(
        extra="forbid", use_attribute_docstrings=True, strict=True, serialize_by_alias=True
    )

    regex: str | None = Field(default=None, min_length=1)
    """The output matches this regular expression in full."""
    choice: list[str] | None = Field(default=None, min_length=1)
    """The output is exactly one of these strings."""
    grammar: str | None = Field(default=None, min_length=1)
    """The output is a sentence of this context-free grammar (EBNF, as vLLM accepts it)."""
    json_: dict[str, Any] | None = Field(default=None, alias="json")
    """The output is JSON matching this JSON Schema (sent as `json`)."""

    @model_validator(mode="after")
    def _exactly_one(self) -> StructuredOutputs:
        given = [
            name
            for name, value in (
                ("regex", self.regex),
                ("choice", self.choice),
                ("grammar", self.grammar),
                ("json", self.json_),
            )
            if value is not None
        ]
        if len(given) != 1:
            raise PydanticCustomError(
                "value_error",
                "give exactly one of regex, choice, grammar, json (got {given})",
                {"given": ", ".join(given) or "none"},
            )
        return self


# --- tools ----------------------------------------------------------------------------------


class FunctionDefinition(_Request):
    """A function the model may call."""

    name: str = Field(pattern=_NAME_PATTERN)
    """Letters, digits, `_` and `-`, at most 64 characters; unique among the tools."""
    description: str | None = None
    """What the function does: shown to the model by the chat template."""
    parameters: dict[str, Any] | None = None
    """JSON Schema of the arguments object; absent means no arguments."""
    strict: bool | None = None
    """Accepted for OpenAI compatibility."""


class ChatCompletionTool(_Request):
    """An entry of `tools`."""

    type: Literal["function"]
    """Only `function` tools exist here."""
    function: FunctionDefinition
    """The function."""


class ToolChoiceFunction(_Request):
    """The function `tool_choice` forces."""

    name: str
    """Name of one of the request's `tools`."""


class ChatCompletionNamedToolChoice(_Request):
    """`tool_choice` forcing one function."""

    type: Literal["function"]
    """Always `function`."""
    function: ToolChoiceFunction
    """The function to call."""


ToolChoice = Literal["none", "auto", "required"] | ChatCompletionNamedToolChoice
"""`none`: never call a tool. `auto`: the model decides (the default with tools). `required`:
call at least one tool. A named function: call exactly that one."""


class ToolCallFunctionParam(_Request):
    """The function a past assistant message called."""

    name: str
    """The function's name."""
    arguments: str
    """The arguments as a JSON text, as the model produced them."""


class ToolCallParam(_Request):
    """A tool call of a past assistant message (as a reply's `message.tool_calls` holds it)."""

    id: str
    """The call's id; the `tool` message answering it carries it as `tool_call_id`."""
    type: Literal["function"]
    """Always `function`."""
    function: ToolCallFunctionParam
    """What was called."""


# --- generation requests --------------------------------------------------------------------


class _GenerationRequest(_Request):
    """Fields shared by `/v1/completions` and `/v1/chat/completions`."""

    model: str = ""
    """The base model id or an adapter reference (`name`, `name@3`, `name@alias`).
    Empty means the base model."""
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    """Sampling temperature in [0, 2]; 0 is greedy decoding. Default 1."""
    top_p: float | None = Field(default=None, ge=0.0, le=1.0)
    """Nucleus sampling mass in (0, 1]. Default 1 (no filtering)."""
    n: int | None = Field(default=None, ge=1, le=MAX_N)
    """Number of choices per prompt, 1 to 128 (default 1); prompts x n is also bounded by the
    server's per-request limit."""
    stream: bool = False
    """Send server-sent events as tokens are generated, ending with `data: [DONE]`."""
    stream_options: StreamOptions | None = None
    """Streaming options; only allowed with `stream: true`."""
    stop: str | list[str] | None = None
    """Up to 16 strings; generation ends before the first one that appears. Not returned."""
    seed: int | None = None
    """Seeds this request's sampler, so the output does not depend on the rest of the batch."""
    user: str | None = None
    """End-user id: logged with the request, nothing else."""
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
    response_format: ResponseFormat | None = None
    """Constrain the output to JSON (`json_object`) or to a JSON Schema (`json_schema`);
    decoding is constrained, so the output parses whenever generation ends with `stop`."""
    structured_outputs: StructuredOutputs | None = None
    """Extension (vLLM's): constrain the output to a regex, a choice, a grammar or a JSON
    Schema. Not together with a `response_format` other than `text`."""

    @field_validator("stop", mode="before")
    @classmethod
    def _validate_stop(cls, value: Any) -> Any:
        return _check_stop(value)

    @model_validator(mode="after")
    def _check_generation_fields(self) -> _GenerationRequest:
        if self.stream_options is not None and not self.stream:
            raise _field_error("value_error", "stream_options", "only allowed when stream is true")
        constrained = self.response_format is not None and self.response_format.type != "text"
        if constrained and self.structured_outputs is not None:
            raise _field_error(
                "value_error",
                "structured_outputs",
                "give either structured_outputs or a response_format other than 'text'",
            )
        return self


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


def _best_of_is_n(value: Any, body: Mapping[str, Any]) -> bool:
    n = body.get("n")
    return value == (1 if n is None else n)


def _no_suffix(value: Any, _: Mapping[str, Any]) -> bool:
    return value == ""


class CompletionRequest(_GenerationRequest):
    """Body of `POST /v1/completions`."""

    UNSUPPORTED: ClassVar[Mapping[str, _Unsupported]] = {
        "best_of": _Unsupported(
            "only best_of equal to n (every candidate returned) is served",
            accepts=_best_of_is_n,
            per_value=True,
        ),
        "suffix": _Unsupported("insertion (fill-in-the-middle) is not served", accepts=_no_suffix),
    }

    prompt: str | list[str] | list[int] | list[list[int]]
    """One prompt (text or token ids) or several; each prompt yields `n` choices."""
    max_tokens: int | None = Field(default=None, ge=1)
    """Most tokens to generate per choice. Default 16."""
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    """Return the sampled token's logprob and this many most likely alternatives."""
    echo: bool = False
    """Prepend the prompt to each choice's text (with `logprobs`, its tokens come first in
    the logprobs too, the first one's logprob null)."""
    prompt_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    """Extension (vLLM's): return each choice's `prompt_logprobs`, the logprob of every
    prompt token and this many most likely alternatives at each position."""

    @field_validator("prompt", mode="before")
    @classmethod
    def _validate_prompt(cls, value: Any) -> Any:
        return _check_prompt(value)


class PromptLogprob(_Wire):
    """A token at one prompt position, in vLLM's `prompt_logprobs` shape."""

    logprob: float
    """Its log probability (-9999.0 stands for -inf)."""
    rank: int | None = None
    """1 for the most likely token at the position."""
    decoded_token: str | None = None
    """The token as text."""

    @field_serializer("logprob")
    def _finite(self, value: float) -> float:
        return _finite_logprob(value)


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
    """Position of the choice: prompt index x n + sample index."""
    text: str
    """Generated text (a delta when streaming)."""
    logprobs: CompletionLogprobs | None = None
    """Token logprobs, when the request asked for them."""
    finish_reason: FinishReason | None = None
    """Why generation ended; null on stream chunks before the last one of this choice."""
    prompt_logprobs: list[dict[str, PromptLogprob] | None] | None = Field(
        default=None, exclude_if=_is_none
    )
    """Extension, with `prompt_logprobs`: per prompt token, its token id (as a string) and the
    most likely alternatives mapped to their logprobs; null for the first token. Omitted
    otherwise (in a stream: on the first chunk of the choice only)."""


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

    UNSUPPORTED: ClassVar[Mapping[str, _Unsupported]] = {
        "prompt_cache_breakpoint": _Unsupported(
            "prefix caching here is automatic, without breakpoints"
        ),
    }

    type: Literal["text"]
    """Only text parts are supported."""
    text: str
    """The text."""


class ChatMessage(_Request):
    """One message of the conversation.

    `tool_calls` and `reasoning_content` belong to assistant messages, `tool_call_id` to
    tool messages (where it is required); content may be null only for assistant messages.
    """

    UNSUPPORTED: ClassVar[Mapping[str, _Unsupported]] = {
        "function_call": _Unsupported("deprecated by OpenAI: use tool_calls"),
        "refusal": _Unsupported("send the refusal as content"),
        "audio": _Unsupported("audio is not served"),
    }

    role: Literal["system", "developer", "user", "assistant", "tool"]
    """Who speaks. `developer` is treated as `system`; `tool` answers an assistant's tool
    call."""
    content: str | list[ChatContentPartText] | None = None
    """Text, or a list of text parts (joined by newlines). Null only for assistant messages."""
    name: str | None = None
    """Participant name, passed to the chat template (most templates do not show it)."""
    tool_calls: list[ToolCallParam] | None = None
    """Assistant messages: the tool calls the assistant made."""
    tool_call_id: str | None = None
    """Tool messages (required): the id of the tool call this message answers."""
    reasoning_content: str | None = None
    """Extension, assistant messages: the reasoning that preceded the reply, as replies
    return it; passed to the chat template (most templates drop past reasoning)."""

    @field_validator("content", mode="before")
    @classmethod
    def _validate_content(cls, value: Any) -> Any:
        # Without this, a non-text part yields one error per union member, none of them clear.
        if isinstance(value, list):
            for index, part in enumerate(value):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind != "text":
                    raise PydanticCustomError(
                        "unsupported_value",
                        "Unsupported value: content part type {kind} is not served; only "
                        "'text' parts are",
                        {"kind": repr(kind), "field": f"{index}.type"},
                    )
        return value

    @model_validator(mode="after")
    def _fields_of_the_role(self) -> ChatMessage:
        role = self.role
        if self.content is None and role != "assistant":
            raise _field_error("missing", "content", f"a {role} message needs content")
        if role == "tool" and self.tool_call_id is None:
            raise _field_error("missing", "tool_call_id", "a tool message needs tool_call_id")
        for name, owner in (
            ("tool_calls", "assistant"),
            ("reasoning_content", "assistant"),
            ("tool_call_id", "tool"),
        ):
            if getattr(self, name) is not None and role != owner:
                raise _field_error(
                    "value_error", name, f"only {owner} messages carry {name}, not {role}"
                )
        return self


def _text_only(value: Any, _: Mapping[str, Any]) -> bool:
    return value == ["text"]


def _in_memory(value: Any, _: Mapping[str, Any]) -> bool:
    return value == "in_memory"


class ChatCompletionRequest(_GenerationRequest):
    """Body of `POST /v1/chat/completions`."""

    UNSUPPORTED: ClassVar[Mapping[str, _Unsupported]] = {
        "audio": _Unsupported("audio output is not served"),
        "modalities": _Unsupported('only ["text"] is served', accepts=_text_only, per_value=True),
        "prediction": _Unsupported("predicted outputs are not served"),
        "web_search_options": _Unsupported("web search is not served"),
        "function_call": _Unsupported("deprecated by OpenAI: use tool_choice"),
        "functions": _Unsupported("deprecated by OpenAI: use tools"),
        "reasoning_effort": _Unsupported(
            "reasoning cannot be budgeted here; chat_template_kwargs switches it on or off "
            "for templates that support it (e.g. enable_thinking)"
        ),
        "verbosity": _Unsupported("the reply's length cannot be steered here; use max_tokens"),
        "moderation": _Unsupported("moderation is not served"),
        "prompt_cache_options": _Unsupported(
            "prefix caching here is automatic, without breakpoints or lifetimes",
            accepts=_is_empty,
        ),
        "prompt_cache_retention": _Unsupported(
            "the prefix cache lives in memory only",
            accepts=_in_memory,
            per_value=True,
        ),
    }

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
    tools: list[ChatCompletionTool] | None = Field(default=None, max_length=MAX_TOOLS)
    """Up to 128 functions the model may call; shown to it by the chat template."""
    tool_choice: ToolChoice | None = None
    """Whether and which tool to call (`none`, `auto`, `required` or a named function);
    default `auto` with tools. `required` and a named function need `tools`."""
    parallel_tool_calls: bool | None = None
    """Whether one reply may hold several tool calls (default true)."""
    chat_template_kwargs: dict[str, Any] | None = None
    """Extension (vLLM's): extra variables for the chat template, e.g.
    `{"enable_thinking": false}`."""
    metadata: dict[str, str] | None = None
    """Up to 16 string pairs (keys up to 64 characters, values up to 512), logged with the
    request."""
    store: bool | None = None
    """Only false or null: this server never stores completions."""
    service_tier: str | None = None
    """Only `auto`, `default` or null: this server has one tier."""
    prompt_cache_key: str | None = None
    """Accepted like `user` (logged). Prefix caching here is automatic and keyed by the
    adapter's content and the tokens, never by this key."""
    safety_identifier: str | None = None
    """End-user id for abuse monitoring, logged like `user`."""

    @field_validator("metadata")
    @classmethod
    def _check_metadata(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value is None:
            return value
        if len(value) > MAX_METADATA_KEYS:
            raise ValueError(f"at most {MAX_METADATA_KEYS} entries are allowed")
        for key, text in value.items():
            if len(key) > 64:
                raise ValueError(f"key {key[:70]!r}... is longer than 64 characters")
            if len(text) > 512:
                raise ValueError(f"the value of {key!r} is longer than 512 characters")
        return value

    @field_validator("store")
    @classmethod
    def _never_store(cls, value: bool | None) -> bool | None:
        if value:
            raise PydanticCustomError(
                "unsupported_value",
                "Unsupported value: 'store' does not support true on this server: completions "
                "are never stored",
            )
        return value

    @field_validator("service_tier")
    @classmethod
    def _one_tier(cls, value: str | None) -> str | None:
        if value not in (None, "auto", "default"):
            raise PydanticCustomError(
                "unsupported_value",
                "Unsupported value: 'service_tier' does not support {value} on this server; "
                "use 'auto' or 'default'",
                {"value": json.dumps(value, default=str)[:80]},
            )
        return value

    @model_validator(mode="after")
    def _check_tools(self) -> ChatCompletionRequest:
        names = []
        for index, tool in enumerate(self.tools or ()):
            if tool.function.name in names:
                raise _field_error(
                    "value_error",
                    f"tools.{index}.function.name",
                    f"duplicate function name {tool.function.name!r}",
                )
            names.append(tool.function.name)
        choice = self.tool_choice
        if choice is not None and choice != "none" and choice != "auto" and not names:
            raise _field_error("value_error", "tool_choice", "needs tools")
        if isinstance(choice, ChatCompletionNamedToolChoice) and choice.function.name not in names:
            raise _field_error(
                "value_error",
                "tool_choice.function.name",
                f"{choice.function.name!r} is not the name of one of the tools",
            )
        return self


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


class FunctionCall(_Wire):
    """The function a tool call calls."""

    name: str
    """The function's name, one of the request's `tools`."""
    arguments: str
    """The arguments, a JSON text as the model wrote it (see `parsed_arguments`)."""

    def parsed_arguments(self) -> Any:
        """`arguments` decoded from JSON (raises `json.JSONDecodeError` if it is not JSON)."""
        return json.loads(self.arguments)


class ChatCompletionMessageToolCall(_Wire):
    """A tool call in a reply."""

    id: str
    """The call's id: send it back as the `tool_call_id` of the `tool` message answering it."""
    type: Literal["function"] = "function"
    """Always `function`."""
    function: FunctionCall
    """What to call, with which arguments."""


class ChatCompletionMessage(_Wire):
    """The generated message."""

    role: Literal["assistant"] = "assistant"
    """Always `assistant`."""
    content: str | None = None
    """Generated text; null when the reply is only tool calls."""
    tool_calls: list[ChatCompletionMessageToolCall] | None = Field(
        default=None, exclude_if=_is_none
    )
    """The tools the model called (`finish_reason` is then `tool_calls`); omitted if none."""
    reasoning_content: str | None = Field(default=None, exclude_if=_is_none)
    """Extension (vLLM's name): the model's reasoning, split off from `content`, for models
    that think before they answer; omitted if none."""


class ChatCompletionChoice(_Wire):
    """One generated reply."""

    index: int
    """Choice number, 0 to n - 1."""
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


class ChoiceDeltaToolCallFunction(_Wire):
    """The part of a tool call's function that a stream chunk adds."""

    name: str | None = Field(default=None, exclude_if=_is_none)
    """The function's name: on the call's first delta only."""
    arguments: str | None = Field(default=None, exclude_if=_is_none)
    """More characters of the arguments' JSON text; concatenate them in order."""


class ChoiceDeltaToolCall(_Wire):
    """The part of one tool call that a stream chunk adds."""

    index: int
    """Which tool call of the choice this adds to (0, 1, ...)."""
    id: str | None = Field(default=None, exclude_if=_is_none)
    """The call's id: on its first delta only."""
    type: Literal["function"] | None = Field(default=None, exclude_if=_is_none)
    """`function`: on the call's first delta only."""
    function: ChoiceDeltaToolCallFunction | None = Field(default=None, exclude_if=_is_none)
    """The name (first delta) and more of the arguments."""


class ChoiceDelta(_Wire):
    """The part of the reply that a stream chunk adds."""

    role: Literal["assistant"] | None = Field(default=None, exclude_if=_is_none)
    """Set on the first chunk of each choice only."""
    content: str | None = Field(default=None, exclude_if=_is_none)
    """New text; absent on the final chunk when it carries no text."""
    tool_calls: list[ChoiceDeltaToolCall] | None = Field(default=None, exclude_if=_is_none)
    """Parts of tool calls; see `accumulate_tool_calls` to assemble them."""
    reasoning_content: str | None = Field(default=None, exclude_if=_is_none)
    """Extension: more of the model's reasoning (see `ChatCompletionMessage`)."""


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


def accumulate_tool_calls(
    deltas: Iterable[ChoiceDelta | ChatCompletionChunk], *, choice: int = 0
) -> list[ChatCompletionMessageToolCall]:
    """The complete tool calls of one choice of a stream, from its chunks (or the deltas of
    that choice), in order of their `index`."""
    calls: dict[int, dict[str, str]] = {}
    for item in deltas:
        if isinstance(item, ChatCompletionChunk):
            found = [c.delta for c in item.choices if c.index == choice]
        else:
            found = [item]
        for delta in found:
            for part in delta.tool_calls or ():
                call = calls.setdefault(part.index, {"id": "", "name": "", "arguments": ""})
                if part.id:
                    call["id"] = part.id
                if part.function is not None:
                    call["name"] += part.function.name or ""
                    call["arguments"] += part.function.arguments or ""
    return [
        ChatCompletionMessageToolCall(
            id=call["id"], function=FunctionCall(name=call["name"], arguments=call["arguments"])
        )
        for _, call in sorted(calls.items())
    ]


ParsedT = TypeVar("ParsedT", bound=BaseModel)


class ParsedChatCompletionMessage(ChatCompletionMessage, Generic[ParsedT]):
    """A reply whose content was parsed into the `response_format` model (client side)."""

    parsed: ParsedT | None = None
    """`content` validated into the model; None when the reply did not end with `stop`, or
    has no content, or is a refusal."""


class ParsedChatCompletionChoice(ChatCompletionChoice, Generic[ParsedT]):
    """A choice of a `ParsedChatCompletion`."""

    message: ParsedChatCompletionMessage[ParsedT]
    """The reply, with `parsed`."""

    @model_validator(mode="before")
    @classmethod
    def _parse_content(cls, value: Any) -> Any:
        # Only a reply that ended on its own is whole: one cut off by max_tokens is not JSON.
        if not isinstance(value, dict) or value.get("finish_reason") != "stop":
            return value
        message = value.get("message")
        if not isinstance(message, dict) or message.get("refusal"):
            return value
        content = message.get("content")
        parsed = json.loads(content) if isinstance(content, str) else None
        return {**value, "message": {**message, "parsed": parsed}}


class ParsedChatCompletion(ChatCompletion, Generic[ParsedT]):
    """What `chat.completions.parse()` returns: a `ChatCompletion` whose messages carry the
    content parsed into the requested model."""

    choices: list[ParsedChatCompletionChoice[ParsedT]]
    """The replies, each with `message.parsed`."""


# --- tokenizer ------------------------------------------------------------------------------


class TokenizeRequest(_Request):
    """Body of `POST /tokenize` (vLLM's shape): a `prompt`, or chat `messages` rendered as
    `/v1/chat/completions` renders them."""

    model: str | None = None
    """The base model id or an adapter reference (all share the base tokenizer); checked
    like `model` of a completion. Empty or null means the base model."""
    prompt: str | None = None
    """Text to tokenize as `/v1/completions` would. Give `prompt` or `messages`."""
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    """A conversation to render with the chat template and tokenize."""
    add_special_tokens: bool | None = None
    """With `prompt`: add the tokenizer's special tokens (BOS), as completions do (default
    true). With `messages` only false or null: the template writes its own."""
    add_generation_prompt: bool = True
    """With `messages`: end with the assistant's turn opening, as chat requests do."""
    chat_template_kwargs: dict[str, Any] | None = None
    """With `messages`: extra variables for the chat template."""
    tools: list[ChatCompletionTool] | None = Field(default=None, max_length=MAX_TOOLS)
    """With `messages`: the tools, shown to the model by the chat template."""
    return_token_strs: bool = False
    """Also return each token as its vocabulary string (`token_strs`)."""

    @model_validator(mode="after")
    def _prompt_or_messages(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise _field_error("missing", "prompt", "give exactly one of prompt and messages")
        if self.messages is not None and self.add_special_tokens:
            raise _field_error("value_error", "add_special_tokens", "only false with messages")
        if self.prompt is not None:
            for name in ("chat_template_kwargs", "tools"):
                if getattr(self, name) is not None:
                    raise _field_error("value_error", name, "only allowed with messages")
            if "add_generation_prompt" in self.model_fields_set:
                raise _field_error(
                    "value_error", "add_generation_prompt", "only allowed with messages"
                )
        return self


class TokenizeResponse(_Wire):
    """Response of `POST /tokenize`."""

    count: int
    """Number of tokens."""
    max_model_len: int
    """The model's context: prompt tokens + generated tokens must fit in it."""
    tokens: list[int]
    """The token ids."""
    token_strs: list[str] | None = None
    """Each token's vocabulary string, with `return_token_strs`; else null."""


class DetokenizeRequest(_Request):
    """Body of `POST /detokenize` (vLLM's shape)."""

    model: str | None = None
    """As in `TokenizeRequest`."""
    tokens: list[Annotated[int, Field(ge=0)]]
    """Token ids, each below the vocabulary size."""


class DetokenizeResponse(_Wire):
    """Response of `POST /detokenize`."""

    prompt: str
    """The decoded text (special tokens included)."""


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

    UNSUPPORTED: ClassVar[Mapping[str, _Unsupported]] = {
        "dpo": _Unsupported("only supervised fine-tuning is served"),
        "reinforcement": _Unsupported("only supervised fine-tuning is served"),
    }

    type: Literal["supervised"] = "supervised"
    """Only `supervised`; OpenAI's `dpo` and `reinforcement` are refused (400)."""
    supervised: SupervisedMethodRequest | None = None
    """Settings of the supervised method."""


class FineTuningJobCreateRequest(_Request):
    """Body of `POST /v1/fine_tuning/jobs`."""

    UNSUPPORTED: ClassVar[Mapping[str, _Unsupported]] = {
        "integrations": _Unsupported("jobs report to their event log only", accepts=_is_empty),
        "metadata": _Unsupported("jobs store no metadata", accepts=_is_empty),
    }

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
