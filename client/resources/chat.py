"""`client.chat.completions`: chat completions (`POST /v1/chat/completions`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal, overload

from client._base import RequestOptions
from client._streaming import AsyncStream, Stream
from client.resources._resource import AsyncAPIResource, SyncAPIResource, request_body
from client.types import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatMessage,
    MergedAdapters,
    StreamOptions,
)

if TYPE_CHECKING:
    from client._async_client import AsyncAdapterHubClient
    from client._client import AdapterHubClient

Messages = Sequence[ChatMessage | Mapping[str, Any]]
"""The conversation: `ChatMessage` objects or dicts such as `{"role": "user", "content": "hi"}`."""


def _options(fields: dict[str, Any], extra_body: Mapping[str, Any] | None) -> RequestOptions:
    return RequestOptions("POST", "/v1/chat/completions", json=request_body(fields, extra_body))


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
        user: str | None = None,
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
        user: str | None = None,
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
        user: str | None = None,
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
        user: str | None = None,
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
        `top_logprobs=k`) returns token logprobs. `top_k`, `stop_token_ids`, `ignore_eos`
        and `skip_special_tokens` are AdapterHub extensions. With `stream=True` the result
        is a `Stream` of `ChatCompletionChunk`s (close it, or use it in a `with` block, if
        you stop early).

        `presence_penalty`, `frequency_penalty` and `logit_bias` have OpenAI's meaning;
        `repetition_penalty`, `min_p` and `min_tokens` are extensions (vLLM's meaning).

        `merged_adapters` (an extension in LoRAX's shape: ids, weights, merge_strategy,
        density, majority_sign_method) serves the merge of several adapters, computed as
        PEFT's `add_weighted_adapter`, with `model` naming the base model.

        Raises `NotFoundError` for an unknown model, `BadRequestError` for invalid values or
        a conversation plus the token limit over the context.
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
                "user": user,
                "stream": stream or None,
                "stream_options": stream_options,
            },
            extra_body,
        )
        if stream:
            return self._client._request_stream(options, ChatCompletionChunk)
        return self._client._request(options, ChatCompletion)


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
        user: str | None = None,
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
        user: str | None = None,
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
        user: str | None = None,
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
        user: str | None = None,
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
                "user": user,
                "stream": stream or None,
                "stream_options": stream_options,
            },
            extra_body,
        )
        if stream:
            return await self._client._request_stream(options, ChatCompletionChunk)
        return await self._client._request(options, ChatCompletion)


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
