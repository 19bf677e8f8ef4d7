"""`client.chat.completions`: chat completions (`POST /v1/chat/completions`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal, TypeVar, overload

import pydantic

from client._base import RequestOptions
from client._streaming import AsyncStream, Stream
from client.resources._resource import AsyncAPIResource, SyncAPIResource, request_body
from client.types import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionTool,
    ChatMessage,
    MergedAdapters,
    ParsedChatCompletion,
    ResponseFormat,
    StreamOptions,
    StructuredOutputs,
    ToolChoice,
)

if TYPE_CHECKING:
    from client._async_client import AsyncAdapterHubClient
    from client._client import AdapterHubClient

ParsedT = TypeVar("ParsedT", bound=pydantic.BaseModel)

Messages = Sequence[ChatMessage | Mapping[str, Any]]
"""The conversation: `ChatMessage` objects or dicts such as `{"role": "user", "content": "hi"}`."""


def _options(fields: dict[str, Any], extra_body: Mapping[str, Any] | None) -> RequestOptions:
    return RequestOptions("POST", "/v1/chat/completions", json=request_body(fields, extra_body))


def json_schema_format(model: type[pydantic.BaseModel]) -> dict[str, Any]:
    """The `response_format` that asks for JSON in the shape of `model`."""
    return {
        "type": "json_schema",
        "json_schema": {
            "name": model.__name__,
            "schema": model.model_json_schema(),
            "strict": True,
        },
    }


class ChatCompletions(SyncAPIResource):
    """Reply to conversations with the base model or an adapter."""

    @overload
    def create(
        self,
        *,
        model: str,
        messages: Messages,
        max_completion_tokens: int | None = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        n: int | None = None,
        stop: str | list[str] | None = None,
        seed: int | None = None,
        logprobs: bool | None = None,
        top_logprobs: int | None = None,
        stop_token_ids: list[int] | None = None,
        ignore_eos: bool | None = None,
        skip_special_tokens: bool | None = None,
        merged_adapters: MergedAdapters | Mapping[str, Any] | None = None,
        presence_penalty: float | None = None,
        frequency_penalty: float | None = None,
        logit_bias: Mapping[str, float] | None = None,
        repetition_penalty: float | None = None,
        min_p: float | None = None,
        min_tokens: int | None = None,
        response_format: ResponseFormat | Mapping[str, Any] | None = None,
        structured_outputs: StructuredOutputs | Mapping[str, Any] | None = None,
        tools: Sequence[ChatCompletionTool | Mapping[str, Any]] | None = None,
        tool_choice: ToolChoice | Mapping[str, Any] | None = None,
        parallel_tool_calls: bool | None = None,
        chat_template_kwargs: Mapping[str, Any] | None = None,
        user: str | None = None,
        metadata: Mapping[str, str] | None = None,
        store: bool | None = None,
        service_tier: Literal["auto", "default"] | None = None,
        prompt_cache_key: str | None = None,
        safety_identifier: str | None = None,
        stream: Literal[False] = False,
        stream_options: StreamOptions | Mapping[str, Any] | None = None,
        extra_body: Mapping[str, Any] | None = None,
    ) -> ChatCompletion: ...

    @overload
    def create(
        self,
        *,
        model: str,
        messages: Messages,
        max_completion_tokens: int | None = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        n: int | None = None,
        stop: str | list[str] | None = None,
        seed: int | None = None,
        logprobs: bool | None = None,
        top_logprobs: int | None = None,
        stop_token_ids: list[int] | None = None,
        ignore_eos: bool | None = None,
        skip_special_tokens: bool | None = None,
        merged_adapters: MergedAdapters | Mapping[str, Any] | None = None,
        presence_penalty: float | None = None,
        frequency_penalty: float | None = None,
        logit_bias: Mapping[str, float] | None = None,
        repetition_penalty: float | None = None,
        min_p: float | None = None,
        min_tokens: int | None = None,
        response_format: ResponseFormat | Mapping[str, Any] | None = None,
        structured_outputs: StructuredOutputs | Mapping[str, Any] | None = None,
        tools: Sequence[ChatCompletionTool | Mapping[str, Any]] | None = None,
        tool_choice: ToolChoice | Mapping[str, Any] | None = None,
        parallel_tool_calls: bool | None = None,
        chat_template_kwargs: Mapping[str, Any] | None = None,
        user: str | None = None,
        metadata: Mapping[str, str] | None = None,
        store: bool | None = None,
        service_tier: Literal["auto", "default"] | None = None,
        prompt_cache_key: str | None = None,
        safety_identifier: str | None = None,
        stream: Literal[True],
        stream_options: StreamOptions | Mapping[str, Any] | None = None,
        extra_body: Mapping[str, Any] | None = None,
    ) -> Stream[ChatCompletionChunk]: ...

    @overload
    def create(
        self,
        *,
        model: str,
        messages: Messages,
        max_completion_tokens: int | None = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        n: int | None = None,
        stop: str | list[str] | None = None,
        seed: int | None = None,
        logprobs: bool | None = None,
        top_logprobs: int | None = None,
        stop_token_ids: list[int] | None = None,
        ignore_eos: bool | None = None,
        skip_special_tokens: bool | None = None,
        merged_adapters: MergedAdapters | Mapping[str, Any] | None = None,
        presence_penalty: float | None = None,
        frequency_penalty: float | None = None,
        logit_bias: Mapping[str, float] | None = None,
        repetition_penalty: float | None = None,
        min_p: float | None = None,
        min_tokens: int | None = None,
        response_format: ResponseFormat | Mapping[str, Any] | None = None,
        structured_outputs: StructuredOutputs | Mapping[str, Any] | None = None,
        tools: Sequence[ChatCompletionTool | Mapping[str, Any]] | None = None,
        tool_choice: ToolChoice | Mapping[str, Any] | None = None,
        parallel_tool_calls: bool | None = None,
        chat_template_kwargs: Mapping[str, Any] | None = None,
        user: str | None = None,
        metadata: Mapping[str, str] | None = None,
        store: bool | None = None,
        service_tier: Literal["auto", "default"] | None = None,
        prompt_cache_key: str | None = None,
        safety_identifier: str | None = None,
        stream: bool,
        stream_options: StreamOptions | Mapping[str, Any] | None = None,
        extra_body: Mapping[str, Any] | None = None,
    ) -> ChatCompletion | Stream[ChatCompletionChunk]: ...

    def create(
        self,
        *,
        model: str,
        messages: Messages,
        max_completion_tokens: int | None = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        n: int | None = None,
        stop: str | list[str] | None = None,
        seed: int | None = None,
        logprobs: bool | None = None,
        top_logprobs: int | None = None,
        stop_token_ids: list[int] | None = None,
        ignore_eos: bool | None = None,
        skip_special_tokens: bool | None = None,
        merged_adapters: MergedAdapters | Mapping[str, Any] | None = None,
        presence_penalty: float | None = None,
        frequency_penalty: float | None = None,
        logit_bias: Mapping[str, float] | None = None,
        repetition_penalty: float | None = None,
        min_p: float | None = None,
        min_tokens: int | None = None,
        response_format: ResponseFormat | Mapping[str, Any] | None = None,
        structured_outputs: StructuredOutputs | Mapping[str, Any] | None = None,
        tools: Sequence[ChatCompletionTool | Mapping[str, Any]] | None = None,
        tool_choice: ToolChoice | Mapping[str, Any] | None = None,
        parallel_tool_calls: bool | None = None,
        chat_template_kwargs: Mapping[str, Any] | None = None,
        user: str | None = None,
        metadata: Mapping[str, str] | None = None,
        store: bool | None = None,
        service_tier: Literal["auto", "default"] | None = None,
        prompt_cache_key: str | None = None,
        safety_identifier: str | None = None,
        stream: bool = False,
        stream_options: StreamOptions | Mapping[str, Any] | None = None,
        extra_body: Mapping[str, Any] | None = None,
    ) -> ChatCompletion | Stream[ChatCompletionChunk]:
        """Reply to `messages` with `model` (the base model id, or an adapter reference
        `name`, `name@3`, `name@alias`); the conversation is rendered with the base model's
        chat template.

        Arguments left as None take the server's defaults (`max_completion_tokens`: the
        room the context leaves; `temperature` 1). `max_tokens` is OpenAI's deprecated
        spelling of `max_completion_tokens`. `temperature=0` is greedy; `seed` makes
        sampling reproducible whatever else is in the batch; `logprobs=True` (plus
        `top_logprobs=k`) returns token logprobs; `n` asks for several replies. With
        `stream=True` the result is a `Stream` of `ChatCompletionChunk`s (close it, or use
        it in a `with` block, if you stop early).

        `response_format` constrains the reply to JSON or to a JSON Schema (see `parse()`
        for a typed result); `tools`, `tool_choice` and `parallel_tool_calls` let the model
        call functions (`message.tool_calls`; in a stream, `accumulate_tool_calls`).
        `user`, `metadata`, `prompt_cache_key` and `safety_identifier` are logged; `store`
        may only be false and `service_tier` only `auto` or `default`.

        AdapterHub extensions: `top_k`, `stop_token_ids`, `ignore_eos`,
        `skip_special_tokens`, `repetition_penalty`, `min_p`, `min_tokens` (vLLM's
        meaning), `structured_outputs` (vLLM's: a regex, a choice, a grammar or a JSON
        Schema), `chat_template_kwargs` (extra chat-template variables) and
        `merged_adapters` (LoRAX's shape: ids, weights, merge_strategy, density,
        majority_sign_method), which serves the merge of several adapters, computed as
        PEFT's `add_weighted_adapter`, with `model` naming the base model. Each field is
        described in `client.types.ChatCompletionRequest`.

        Raises `NotFoundError` for an unknown model, `BadRequestError` for invalid values,
        unknown or unsupported fields, or a conversation plus the token limit over the
        context.
        """
        options = _options(
            {
                "model": model,
                "messages": messages,
                "max_completion_tokens": max_completion_tokens,
                "max_tokens": max_tokens,
                "temperature": temperature,
                "top_p": top_p,
                "top_k": top_k,
                "n": n,
                "stop": stop,
                "seed": seed,
                "logprobs": logprobs,
                "top_logprobs": top_logprobs,
                "stop_token_ids": stop_token_ids,
                "ignore_eos": ignore_eos,
                "skip_special_tokens": skip_special_tokens,
                "merged_adapters": merged_adapters,
                "presence_penalty": presence_penalty,
                "frequency_penalty": frequency_penalty,
                "logit_bias": logit_bias,
                "repetition_penalty": repetition_penalty,
                "min_p": min_p,
                "min_tokens": min_tokens,
                "response_format": response_format,
                "structured_outputs": structured_outputs,
                "tools": tools,
                "tool_choice": tool_choice,
                "parallel_tool_calls": parallel_tool_calls,
                "chat_template_kwargs": chat_template_kwargs,
                "user": user,
                "metadata": metadata,
                "store": store,
                "service_tier": service_tier,
                "prompt_cache_key": prompt_cache_key,
                "safety_identifier": safety_identifier,
                "stream": stream or None,
                "stream_options": stream_options,
            },
            extra_body,
        )
        if stream:
            return self._client._request_stream(options, ChatCompletionChunk)
        return self._client._request(options, ChatCompletion)

    def parse(
        self,
        *,
        model: str,
        messages: Messages,
        max_completion_tokens: int | None = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        n: int | None = None,
        stop: str | list[str] | None = None,
        seed: int | None = None,
        logprobs: bool | None = None,
        top_logprobs: int | None = None,
        stop_token_ids: list[int] | None = None,
        ignore_eos: bool | None = None,
        skip_special_tokens: bool | None = None,
        merged_adapters: MergedAdapters | Mapping[str, Any] | None = None,
        presence_penalty: float | None = None,
        frequency_penalty: float | None = None,
        logit_bias: Mapping[str, float] | None = None,
        repetition_penalty: float | None = None,
        min_p: float | None = None,
        min_tokens: int | None = None,
        response_format: type[ParsedT],
        structured_outputs: StructuredOutputs | Mapping[str, Any] | None = None,
        tools: Sequence[ChatCompletionTool | Mapping[str, Any]] | None = None,
        tool_choice: ToolChoice | Mapping[str, Any] | None = None,
        parallel_tool_calls: bool | None = None,
        chat_template_kwargs: Mapping[str, Any] | None = None,
        user: str | None = None,
        metadata: Mapping[str, str] | None = None,
        store: bool | None = None,
        service_tier: Literal["auto", "default"] | None = None,
        prompt_cache_key: str | None = None,
        safety_identifier: str | None = None,
        extra_body: Mapping[str, Any] | None = None,
    ) -> ParsedChatCompletion[ParsedT]:
        """Reply in the shape of the pydantic model `response_format`, parsed.

        Sends `response_format={"type": "json_schema", "json_schema": {"name":
        Model.__name__, "schema": Model.model_json_schema(), "strict": True}}`; each
        choice's `message.parsed` is the reply validated into the model, or None when the
        reply did not end with `stop` (cut off by the token limit, or a tool call) or has
        no content. Other arguments as in `create()` (no streaming). Raises
        `APIResponseValidationError` if a finished reply does not validate.
        """
        options = _options(
            {
                "model": model,
                "messages": messages,
                "max_completion_tokens": max_completion_tokens,
                "max_tokens": max_tokens,
                "temperature": temperature,
                "top_p": top_p,
                "top_k": top_k,
                "n": n,
                "stop": stop,
                "seed": seed,
                "logprobs": logprobs,
                "top_logprobs": top_logprobs,
                "stop_token_ids": stop_token_ids,
                "ignore_eos": ignore_eos,
                "skip_special_tokens": skip_special_tokens,
                "merged_adapters": merged_adapters,
                "presence_penalty": presence_penalty,
                "frequency_penalty": frequency_penalty,
                "logit_bias": logit_bias,
                "repetition_penalty": repetition_penalty,
                "min_p": min_p,
                "min_tokens": min_tokens,
                "response_format": json_schema_format(response_format),
                "structured_outputs": structured_outputs,
                "tools": tools,
                "tool_choice": tool_choice,
                "parallel_tool_calls": parallel_tool_calls,
                "chat_template_kwargs": chat_template_kwargs,
                "user": user,
                "metadata": metadata,
                "store": store,
                "service_tier": service_tier,
                "prompt_cache_key": prompt_cache_key,
                "safety_identifier": safety_identifier,
            },
            extra_body,
        )
        return self._client._request(options, ParsedChatCompletion[response_format])


class AsyncChatCompletions(AsyncAPIResource):
    """Reply to conversations with the base model or an adapter."""

    @overload
    async def create(
        self,
        *,
        model: str,
        messages: Messages,
        max_completion_tokens: int | None = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        n: int | None = None,
        stop: str | list[str] | None = None,
        seed: int | None = None,
        logprobs: bool | None = None,
        top_logprobs: int | None = None,
        stop_token_ids: list[int] | None = None,
        ignore_eos: bool | None = None,
        skip_special_tokens: bool | None = None,
        merged_adapters: MergedAdapters | Mapping[str, Any] | None = None,
        presence_penalty: float | None = None,
        frequency_penalty: float | None = None,
        logit_bias: Mapping[str, float] | None = None,
        repetition_penalty: float | None = None,
        min_p: float | None = None,
        min_tokens: int | None = None,
        response_format: ResponseFormat | Mapping[str, Any] | None = None,
        structured_outputs: StructuredOutputs | Mapping[str, Any] | None = None,
        tools: Sequence[ChatCompletionTool | Mapping[str, Any]] | None = None,
        tool_choice: ToolChoice | Mapping[str, Any] | None = None,
        parallel_tool_calls: bool | None = None,
        chat_template_kwargs: Mapping[str, Any] | None = None,
        user: str | None = None,
        metadata: Mapping[str, str] | None = None,
        store: bool | None = None,
        service_tier: Literal["auto", "default"] | None = None,
        prompt_cache_key: str | None = None,
        safety_identifier: str | None = None,
        stream: Literal[False] = False,
        stream_options: StreamOptions | Mapping[str, Any] | None = None,
        extra_body: Mapping[str, Any] | None = None,
    ) -> ChatCompletion: ...

    @overload
    async def create(
        self,
        *,
        model: str,
        messages: Messages,
        max_completion_tokens: int | None = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        n: int | None = None,
        stop: str | list[str] | None = None,
        seed: int | None = None,
        logprobs: bool | None = None,
        top_logprobs: int | None = None,
        stop_token_ids: list[int] | None = None,
        ignore_eos: bool | None = None,
        skip_special_tokens: bool | None = None,
        merged_adapters: MergedAdapters | Mapping[str, Any] | None = None,
        presence_penalty: float | None = None,
        frequency_penalty: float | None = None,
        logit_bias: Mapping[str, float] | None = None,
        repetition_penalty: float | None = None,
        min_p: float | None = None,
        min_tokens: int | None = None,
        response_format: ResponseFormat | Mapping[str, Any] | None = None,
        structured_outputs: StructuredOutputs | Mapping[str, Any] | None = None,
        tools: Sequence[ChatCompletionTool | Mapping[str, Any]] | None = None,
        tool_choice: ToolChoice | Mapping[str, Any] | None = None,
        parallel_tool_calls: bool | None = None,
        chat_template_kwargs: Mapping[str, Any] | None = None,
        user: str | None = None,
        metadata: Mapping[str, str] | None = None,
        store: bool | None = None,
        service_tier: Literal["auto", "default"] | None = None,
        prompt_cache_key: str | None = None,
        safety_identifier: str | None = None,
        stream: Literal[True],
        stream_options: StreamOptions | Mapping[str, Any] | None = None,
        extra_body: Mapping[str, Any] | None = None,
    ) -> AsyncStream[ChatCompletionChunk]: ...

    @overload
    async def create(
        self,
        *,
        model: str,
        messages: Messages,
        max_completion_tokens: int | None = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        n: int | None = None,
        stop: str | list[str] | None = None,
        seed: int | None = None,
        logprobs: bool | None = None,
        top_logprobs: int | None = None,
        stop_token_ids: list[int] | None = None,
        ignore_eos: bool | None = None,
        skip_special_tokens: bool | None = None,
        merged_adapters: MergedAdapters | Mapping[str, Any] | None = None,
        presence_penalty: float | None = None,
        frequency_penalty: float | None = None,
        logit_bias: Mapping[str, float] | None = None,
        repetition_penalty: float | None = None,
        min_p: float | None = None,
        min_tokens: int | None = None,
        response_format: ResponseFormat | Mapping[str, Any] | None = None,
        structured_outputs: StructuredOutputs | Mapping[str, Any] | None = None,
        tools: Sequence[ChatCompletionTool | Mapping[str, Any]] | None = None,
        tool_choice: ToolChoice | Mapping[str, Any] | None = None,
        parallel_tool_calls: bool | None = None,
        chat_template_kwargs: Mapping[str, Any] | None = None,
        user: str | None = None,
        metadata: Mapping[str, str] | None = None,
        store: bool | None = None,
        service_tier: Literal["auto", "default"] | None = None,
        prompt_cache_key: str | None = None,
        safety_identifier: str | None = None,
        stream: bool,
        stream_options: StreamOptions | Mapping[str, Any] | None = None,
        extra_body: Mapping[str, Any] | None = None,
    ) -> ChatCompletion | AsyncStream[ChatCompletionChunk]: ...

    async def create(
        self,
        *,
        model: str,
        messages: Messages,
        max_completion_tokens: int | None = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        n: int | None = None,
        stop: str | list[str] | None = None,
        seed: int | None = None,
        logprobs: bool | None = None,
        top_logprobs: int | None = None,
        stop_token_ids: list[int] | None = None,
        ignore_eos: bool | None = None,
        skip_special_tokens: bool | None = None,
        merged_adapters: MergedAdapters | Mapping[str, Any] | None = None,
        presence_penalty: float | None = None,
        frequency_penalty: float | None = None,
        logit_bias: Mapping[str, float] | None = None,
        repetition_penalty: float | None = None,
        min_p: float | None = None,
        min_tokens: int | None = None,
        response_format: ResponseFormat | Mapping[str, Any] | None = None,
        structured_outputs: StructuredOutputs | Mapping[str, Any] | None = None,
        tools: Sequence[ChatCompletionTool | Mapping[str, Any]] | None = None,
        tool_choice: ToolChoice | Mapping[str, Any] | None = None,
        parallel_tool_calls: bool | None = None,
        chat_template_kwargs: Mapping[str, Any] | None = None,
        user: str | None = None,
        metadata: Mapping[str, str] | None = None,
        store: bool | None = None,
        service_tier: Literal["auto", "default"] | None = None,
        prompt_cache_key: str | None = None,
        safety_identifier: str | None = None,
        stream: bool = False,
        stream_options: StreamOptions | Mapping[str, Any] | None = None,
        extra_body: Mapping[str, Any] | None = None,
    ) -> ChatCompletion | AsyncStream[ChatCompletionChunk]:
        """Reply to `messages` with `model`; see `ChatCompletions.create` (same arguments).

        With `stream=True` the result is an `AsyncStream` of `ChatCompletionChunk`s (use it
        in an `async with` block, or `await stream.close()`, if you stop early).
        """
        options = _options(
            {
                "model": model,
                "messages": messages,
                "max_completion_tokens": max_completion_tokens,
                "max_tokens": max_tokens,
                "temperature": temperature,
                "top_p": top_p,
                "top_k": top_k,
                "n": n,
                "stop": stop,
                "seed": seed,
                "logprobs": logprobs,
                "top_logprobs": top_logprobs,
                "stop_token_ids": stop_token_ids,
                "ignore_eos": ignore_eos,
                "skip_special_tokens": skip_special_tokens,
                "merged_adapters": merged_adapters,
                "presence_penalty": presence_penalty,
                "frequency_penalty": frequency_penalty,
                "logit_bias": logit_bias,
                "repetition_penalty": repetition_penalty,
                "min_p": min_p,
                "min_tokens": min_tokens,
                "response_format": response_format,
                "structured_outputs": structured_outputs,
                "tools": tools,
                "tool_choice": tool_choice,
                "parallel_tool_calls": parallel_tool_calls,
                "chat_template_kwargs": chat_template_kwargs,
                "user": user,
                "metadata": metadata,
                "store": store,
                "service_tier": service_tier,
                "prompt_cache_key": prompt_cache_key,
                "safety_identifier": safety_identifier,
                "stream": stream or None,
                "stream_options": stream_options,
            },
            extra_body,
        )
        if stream:
            return await self._client._request_stream(options, ChatCompletionChunk)
        return await self._client._request(options, ChatCompletion)

    async def parse(
        self,
        *,
        model: str,
        messages: Messages,
        max_completion_tokens: int | None = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        n: int | None = None,
        stop: str | list[str] | None = None,
        seed: int | None = None,
        logprobs: bool | None = None,
        top_logprobs: int | None = None,
        stop_token_ids: list[int] | None = None,
        ignore_eos: bool | None = None,
        skip_special_tokens: bool | None = None,
        merged_adapters: MergedAdapters | Mapping[str, Any] | None = None,
        presence_penalty: float | None = None,
        frequency_penalty: float | None = None,
        logit_bias: Mapping[str, float] | None = None,
        repetition_penalty: float | None = None,
        min_p: float | None = None,
        min_tokens: int | None = None,
        response_format: type[ParsedT],
        structured_outputs: StructuredOutputs | Mapping[str, Any] | None = None,
        tools: Sequence[ChatCompletionTool | Mapping[str, Any]] | None = None,
        tool_choice: ToolChoice | Mapping[str, Any] | None = None,
        parallel_tool_calls: bool | None = None,
        chat_template_kwargs: Mapping[str, Any] | None = None,
        user: str | None = None,
        metadata: Mapping[str, str] | None = None,
        store: bool | None = None,
        service_tier: Literal["auto", "default"] | None = None,
        prompt_cache_key: str | None = None,
        safety_identifier: str | None = None,
        extra_body: Mapping[str, Any] | None = None,
    ) -> ParsedChatCompletion[ParsedT]:
        """Reply in the shape of the pydantic model `response_format`, parsed; see
        `ChatCompletions.parse` (same arguments)."""
        options = _options(
            {
                "model": model,
                "messages": messages,
                "max_completion_tokens": max_completion_tokens,
                "max_tokens": max_tokens,
                "temperature": temperature,
                "top_p": top_p,
                "top_k": top_k,
                "n": n,
                "stop": stop,
                "seed": seed,
                "logprobs": logprobs,
                "top_logprobs": top_logprobs,
                "stop_token_ids": stop_token_ids,
                "ignore_eos": ignore_eos,
                "skip_special_tokens": skip_special_tokens,
                "merged_adapters": merged_adapters,
                "presence_penalty": presence_penalty,
                "frequency_penalty": frequency_penalty,
                "logit_bias": logit_bias,
                "repetition_penalty": repetition_penalty,
                "min_p": min_p,
                "min_tokens": min_tokens,
                "response_format": json_schema_format(response_format),
                "structured_outputs": structured_outputs,
                "tools": tools,
                "tool_choice": tool_choice,
                "parallel_tool_calls": parallel_tool_calls,
                "chat_template_kwargs": chat_template_kwargs,
                "user": user,
                "metadata": metadata,
                "store": store,
                "service_tier": service_tier,
                "prompt_cache_key": prompt_cache_key,
                "safety_identifier": safety_identifier,
            },
            extra_body,
        )
        return await self._client._request(options, ParsedChatCompletion[response_format])


class Chat(SyncAPIResource):
    """`client.chat`: holds `completions`, as in the openai package."""

    def __init__(self, client: AdapterHubClient) -> None:
        super().__init__(client)
        self.completions = ChatCompletions(client)
        """Chat completions."""


class AsyncChat(AsyncAPIResource):
    """`client.chat`: holds `completions`, as in the openai package."""

    def __init__(self, client: AsyncAdapterHubClient) -> None:
        super().__init__(client)
        self.completions = AsyncChatCompletions(client)
        """Chat completions."""
