"""The OpenAI-compatible inference API on top of an `EngineClient`.

Routes hand a validated request schema to `InferenceService` and get back either a response
schema or an `EventStream` of server-sent-event frames. Everything between (model
resolution, tokenization, the chat template, context checks, sampling parameters, running
the engine, logprob formatting) happens without any HTTP types, so that the rules are
tested once and shared by every route. One module per endpoint maps its request:

- `completions_service.py`: `/v1/completions`;
- `chat_service.py`: `/v1/chat/completions`;
- `service_core.py`: what both share (model resolution, limits, starting and reading the
  engine's streams, sampling parameters, logprob tokens).

Lifetimes: every engine stream opened here is closed (`aclose`) on every path, including
cancellation, because closing it is what aborts the request and frees its batch slot.
"""

from __future__ import annotations

from adapterhub_server.api.chat_service import ChatEndpoint, message_bytes
from adapterhub_server.api.completions_service import CompletionsEndpoint
from adapterhub_server.api.service_core import (
    DONE_FRAME,
    TOKENIZER_THREADS,
    choice_params,
    max_token_bytes,
    utf8_length,
)

__all__ = [
    "DONE_FRAME",
    "TOKENIZER_THREADS",
    "InferenceService",
    "choice_params",
    "max_token_bytes",
    "message_bytes",
    "utf8_length",
]


class InferenceService(CompletionsEndpoint, ChatEndpoint):
    """The whole inference API: `/v1/models`, `/v1/completions`, `/v1/chat/completions`."""
