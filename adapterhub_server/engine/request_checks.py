"""The checks a request must pass to run, each with the one message clients see.

The engine applies them to every request it queues; the HTTP service calls the same
functions earlier, before it queues several choices, naming the request's own fields
(`messages`, `max_completion_tokens`). One function per check keeps both places saying the
same thing.
"""

from __future__ import annotations

from collections.abc import Iterable

from adapterhub_server.errors import ContextLengthError, InvalidRequestError


def check_context(
    prompt_tokens: int,
    max_tokens: int,
    max_model_len: int,
    *,
    prompt_param: str = "prompt",
    max_param: str = "max_tokens",
) -> None:
    """`ContextLengthError` unless the prompt and the completion fit in the context."""
    if prompt_tokens >= max_model_len:
        raise ContextLengthError(
            f"This model's maximum context length is {max_model_len} tokens. However, the "
            f"{prompt_param} has {prompt_tokens} tokens, leaving no room for a completion.",
            param=prompt_param,
        )
    if prompt_tokens + max_tokens > max_model_len:
        raise ContextLengthError(
            f"This model's maximum context length is {max_model_len} tokens. However, you "
            f"requested {prompt_tokens + max_tokens} tokens ({prompt_tokens} in the "
            f"{prompt_param}, {max_tokens} for the completion); lower {max_param} or shorten "
            f"the {prompt_param}.",
            param=max_param,
        )


def check_token_ids(ids: Iterable[int], vocab_size: int, *, param: str) -> None:
    """`InvalidRequestError` unless every id names a token of the vocabulary."""
    if any(not 0 <= t < vocab_size for t in ids):
        raise InvalidRequestError(
            f"{param}: token ids must be in [0, {vocab_size}) (this model's vocabulary)",
            param=param,
        )
