"""`client.completions`: text completions (`POST /v1/completions`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, overload

from client._base import RequestOptions
from client._streaming import AsyncStream, Stream
from client.resources._resource import AsyncAPIResource, SyncAPIResource, request_body
from client.types import (
    Completion,
    MergedAdapters,
    ResponseFormat,
    StreamOptions,
    StructuredOutputs,
)

Prompt = str | list[str] | list[int] | list[list[int]]
"""One prompt (text or token ids) or several; each prompt yields its own choice."""


def _options(fields: dict[str, Any], extra_body: Mapping[str, Any] | None) -> RequestOptions:
    return RequestOptions("POST", "/v1/completions", json=request_body(fields, extra_body))


class Completions(SyncAPIResource):
    """Continue prompts with the base model or an adapter."""

    @overload
    def create(
        self,
        *,
        model: str,
        prompt: Prompt,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        n: int | None = None,
        stop: str | list[str] | None = None,
        seed: int | None = None,
        logprobs: int | None = None,
        echo: bool | None = None,
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
        prompt_logprobs: int | None = None,
        response_format: ResponseFormat | Mapping[str, Any] | None = None,
        structured_outputs: StructuredOutputs | Mapping[str, Any] | None = None,
        user: str | None = None,
        stream: Literal[False] = False,
        stream_options: StreamOptions | Mapping[str, Any] | None = None,
        extra_body: Mapping[str, Any] | None = None,
    ) -> Completion: ...

    @overload
    def create(
        self,
        *,
        model: str,
        prompt: Prompt,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        n: int | None = None,
        stop: str | list[str] | None = None,
        seed: int | None = None,
        logprobs: int | None = None,
        echo: bool | None = None,
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
        prompt_logprobs: int | None = None,
        response_format: ResponseFormat | Mapping[str, Any] | None = None,
        structured_outputs: StructuredOutputs | Mapping[str, Any] | None = None,
        user: str | None = None,
        stream: Literal[True],
        stream_options: StreamOptions | Mapping[str, Any] | None = None,
        extra_body: Mapping[str, Any] | None = None,
    ) -> Stream[Completion]: ...

    @overload
    def create(
        self,
        *,
        model: str,
        prompt: Prompt,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        n: int | None = None,
        stop: str | list[str] | None = None,
        seed: int | None = None,
        logprobs: int | None = None,
        echo: bool | None = None,
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
        prompt_logprobs: int | None = None,
        response_format: ResponseFormat | Mapping[str, Any] | None = None,
        structured_outputs: StructuredOutputs | Mapping[str, Any] | None = None,
        user: str | None = None,
        stream: bool,
        stream_options: StreamOptions | Mapping[str, Any] | None = None,
        extra_body: Mapping[str, Any] | None = None,
    ) -> Completion | Stream[Completion]: ...

    def create(
        self,
        *,
        model: str,
        prompt: Prompt,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        n: int | None = None,
        stop: str | list[str] | None = None,
        seed: int | None = None,
        logprobs: int | None = None,
        echo: bool | None = None,
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
        prompt_logprobs: int | None = None,
        response_format: ResponseFormat | Mapping[str, Any] | None = None,
        structured_outputs: StructuredOutputs | Mapping[str, Any] | None = None,
        user: str | None = None,
        stream: bool = False,
        stream_options: StreamOptions | Mapping[str, Any] | None = None,
        extra_body: Mapping[str, Any] | None = None,
    ) -> Completion | Stream[Completion]:
        """Continue `prompt` with `model` (the base model id, or an adapter reference
        `name`, `name@3`, `name@alias`).

        Arguments left as None take the server's defaults (`max_tokens` 16, `temperature`
        1). `temperature=0` is greedy; `seed` makes sampling reproducible whatever else is
        in the batch; `logprobs=k` returns the sampled token's logprob and the k most likely
        alternatives; `n` asks for several choices per prompt; `echo=True` prepends the
        prompt to each choice. `top_k`, `stop_token_ids`, `ignore_eos` and
        `skip_special_tokens` are AdapterHub extensions. With `stream=True` the result is a
        `Stream` of `Completion` chunks (close it, or use it in a `with` block, if you stop
        early).

        `presence_penalty`, `frequency_penalty` and `logit_bias` have OpenAI's meaning;
        `repetition_penalty`, `min_p`, `min_tokens` and `prompt_logprobs` (each choice's
        `prompt_logprobs`) are extensions (vLLM's meaning). `response_format` (JSON, or a
        JSON Schema) and the extension `structured_outputs` (vLLM's: a regex, a choice, a
        grammar or a JSON Schema) constrain the generated text. Each field is described in
        `client.types.CompletionRequest`.

        `merged_adapters` (an extension in LoRAX's shape: ids, weights, merge_strategy,
        density, majority_sign_method) serves the merge of several adapters, computed as
        PEFT's `add_weighted_adapter`, with `model` naming the base model.

        Raises `NotFoundError` for an unknown model, `BadRequestError` for invalid values,
        unknown or unsupported fields, or a prompt plus `max_tokens` over the context.
        """
        options = _options(
            {
                "model": model,
                "prompt": prompt,
                "max_tokens": max_tokens,
                "temperature": temperature,
                "top_p": top_p,
                "top_k": top_k,
                "n": n,
                "stop": stop,
                "seed": seed,
                "logprobs": logprobs,
                "echo": echo,
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
                "prompt_logprobs": prompt_logprobs,
                "response_format": response_format,
                "structured_outputs": structured_outputs,
                "user": user,
                "stream": stream or None,
                "stream_options": stream_options,
            },
            extra_body,
        )
        if stream:
            return self._client._request_stream(options, Completion)
        return self._client._request(options, Completion)


class AsyncCompletions(AsyncAPIResource):
    """Continue prompts with the base model or an adapter."""

    @overload
    async def create(
        self,
        *,
        model: str,
        prompt: Prompt,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        n: int | None = None,
        stop: str | list[str] | None = None,
        seed: int | None = None,
        logprobs: int | None = None,
        echo: bool | None = None,
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
        prompt_logprobs: int | None = None,
        response_format: ResponseFormat | Mapping[str, Any] | None = None,
        structured_outputs: StructuredOutputs | Mapping[str, Any] | None = None,
        user: str | None = None,
        stream: Literal[False] = False,
        stream_options: StreamOptions | Mapping[str, Any] | None = None,
        extra_body: Mapping[str, Any] | None = None,
    ) -> Completion: ...

    @overload
    async def create(
        self,
        *,
        model: str,
        prompt: Prompt,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        n: int | None = None,
        stop: str | list[str] | None = None,
        seed: int | None = None,
        logprobs: int | None = None,
        echo: bool | None = None,
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
        prompt_logprobs: int | None = None,
        response_format: ResponseFormat | Mapping[str, Any] | None = None,
        structured_outputs: StructuredOutputs | Mapping[str, Any] | None = None,
        user: str | None = None,
        stream: Literal[True],
        stream_options: StreamOptions | Mapping[str, Any] | None = None,
        extra_body: Mapping[str, Any] | None = None,
    ) -> AsyncStream[Completion]: ...

    @overload
    async def create(
        self,
        *,
        model: str,
        prompt: Prompt,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        n: int | None = None,
        stop: str | list[str] | None = None,
        seed: int | None = None,
        logprobs: int | None = None,
        echo: bool | None = None,
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
        prompt_logprobs: int | None = None,
        response_format: ResponseFormat | Mapping[str, Any] | None = None,
        structured_outputs: StructuredOutputs | Mapping[str, Any] | None = None,
        user: str | None = None,
        stream: bool,
        stream_options: StreamOptions | Mapping[str, Any] | None = None,
        extra_body: Mapping[str, Any] | None = None,
    ) -> Completion | AsyncStream[Completion]: ...

    async def create(
        self,
        *,
        model: str,
        prompt: Prompt,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        n: int | None = None,
        stop: str | list[str] | None = None,
        seed: int | None = None,
        logprobs: int | None = None,
        echo: bool | None = None,
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
        prompt_logprobs: int | None = None,
        response_format: ResponseFormat | Mapping[str, Any] | None = None,
        structured_outputs: StructuredOutputs | Mapping[str, Any] | None = None,
        user: str | None = None,
        stream: bool = False,
        stream_options: StreamOptions | Mapping[str, Any] | None = None,
        extra_body: Mapping[str, Any] | None = None,
    ) -> Completion | AsyncStream[Completion]:
        """Continue `prompt` with `model`; see `Completions.create` (same arguments).

        With `stream=True` the result is an `AsyncStream` of `Completion` chunks (use it in
        an `async with` block, or `await stream.close()`, if you stop early).
        """
        options = _options(
            {
                "model": model,
                "prompt": prompt,
                "max_tokens": max_tokens,
                "temperature": temperature,
                "top_p": top_p,
                "top_k": top_k,
                "n": n,
                "stop": stop,
                "seed": seed,
                "logprobs": logprobs,
                "echo": echo,
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
                "prompt_logprobs": prompt_logprobs,
                "response_format": response_format,
                "structured_outputs": structured_outputs,
                "user": user,
                "stream": stream or None,
                "stream_options": stream_options,
            },
            extra_body,
        )
        if stream:
            return await self._client._request_stream(options, Completion)
        return await self._client._request(options, Completion)
