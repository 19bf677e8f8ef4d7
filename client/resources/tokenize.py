"""Request bodies of `POST /tokenize` and `POST /detokenize` (vLLM's shapes), shared by the
sync and async clients' `tokenize()` and `detokenize()`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from client._base import RequestOptions
from client.resources._resource import request_body
from client.resources.chat import Messages
from client.types import ChatCompletionTool


def tokenize_options(
    *,
    model: str | None,
    prompt: str | None,
    messages: Messages | None,
    add_special_tokens: bool | None,
    add_generation_prompt: bool | None,
    chat_template_kwargs: Mapping[str, Any] | None,
    tools: Sequence[ChatCompletionTool | Mapping[str, Any]] | None,
    return_token_strs: bool | None,
) -> RequestOptions:
    """The call of `POST /tokenize`; None leaves a field to the server's default."""
    fields = {
        "model": model,
        "prompt": prompt,
        "messages": messages,
        "add_special_tokens": add_special_tokens,
        "add_generation_prompt": add_generation_prompt,
        "chat_template_kwargs": chat_template_kwargs,
        "tools": tools,
        "return_token_strs": return_token_strs,
    }
    return RequestOptions("POST", "/tokenize", json=request_body(fields, None))


def detokenize_options(*, model: str | None, tokens: Sequence[int]) -> RequestOptions:
    """The call of `POST /detokenize`."""
    body = request_body({"model": model, "tokens": list(tokens)}, None)
    return RequestOptions("POST", "/detokenize", json=body)
