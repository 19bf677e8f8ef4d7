"""`/tokenize` and `/detokenize` (vLLM's shapes) on the engine's tokenizer.

A prompt is tokenized as `/v1/completions` tokenizes it, and chat messages are rendered and
tokenized as `/v1/chat/completions` renders them, so a client can count a request's prompt
tokens before sending it. The tokenizer runs in worker threads, after the same byte bound
on the text as the inference routes apply.
"""

from __future__ import annotations

from typing import TypeVar

from adapterhub_server.api.service import InferenceService, message_bytes, utf8_length
from adapterhub_server.api.tools import render_conversation
from adapterhub_server.engine.request_checks import check_token_ids
from client.types import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeRequest,
    TokenizeResponse,
)

T = TypeVar("T")


class TokenizeService:
    """Answers `/tokenize` and `/detokenize` for the engine of an `InferenceService`, with
    its model resolution, text bounds and worker threads."""

    def __init__(self, inference: InferenceService) -> None:
        self._inference = inference
        self._engine = inference.engine

    async def tokenize(self, request: TokenizeRequest) -> TokenizeResponse:
        """The tokens of `request.prompt`, or of `request.messages` rendered for a reply."""
        inference = self._inference
        inference.resolve_model(request.model or "")
        if request.prompt is not None:
            await inference.check_text_size(utf8_length(request.prompt), "prompt")
            tokens = await inference.in_worker(
                self._encode, request.prompt, request.add_special_tokens is not False
            )
        else:
            size = sum(message_bytes(m) for m in request.messages or [])
            await inference.check_text_size(size, "messages")
            tokens = await inference.in_worker(self._render, request)
        token_strs = None
        if request.return_token_strs:
            convert = self._engine.tokenizer.convert_ids_to_tokens
            token_strs = await inference.in_worker(convert, tokens)
        return TokenizeResponse(
            count=len(tokens),
            max_model_len=self._engine.max_model_len,
            tokens=tokens,
            token_strs=token_strs,
        )

    async def detokenize(self, request: DetokenizeRequest) -> DetokenizeResponse:
        """The text of `request.tokens`, special tokens included."""
        self._inference.resolve_model(request.model or "")
        tokenizer = self._engine.tokenizer
        check_token_ids(request.tokens, len(tokenizer), param="tokens")
        prompt = await self._inference.in_worker(tokenizer.decode, request.tokens)
        return DetokenizeResponse(prompt=prompt)

    def _encode(self, text: str, add_special_tokens: bool) -> list[int]:
        if not text:
            return []
        encoded = self._engine.tokenizer(text, add_special_tokens=add_special_tokens)
        return list(encoded.input_ids)

    def _render(self, request: TokenizeRequest) -> list[int]:
        tools = [t.model_dump(exclude_none=True) for t in request.tools] if request.tools else None
        # The renderer chat requests use, so the count is what a chat request would send.
        return render_conversation(
            self._engine.tokenizer,
            [m.model_dump(exclude_none=True, by_alias=True) for m in request.messages or []],
            tools=tools,
            chat_template_kwargs=request.chat_template_kwargs,
            add_generation_prompt=request.add_generation_prompt,
        ).token_ids
