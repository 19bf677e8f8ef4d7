"""`/v1/completions`: prompts (text or token ids) in, one choice per prompt and `n` out,
whole or streamed, with `echo` and prompt logprobs. Shared request handling is in
`service_core.ServiceCore`."""

from __future__ import annotations

import dataclasses
import logging
import time
import uuid
from collections.abc import (
    AsyncGenerator,
    Sequence,
)
from typing import Any

from adapterhub_server.api.service_core import (
    ServiceCore,
    log_caller,
    sampling_params,
    usage_of,
    utf8_length,
)
from adapterhub_server.api.streams import (
    Call,
    ChoiceResult,
    EventStream,
    PrimedStream,
    collect_all,
    finish_reason,
    sse_frame,
    sse_frames,
)
from adapterhub_server.engine.outputs import RequestOutput, TokenLogprob
from adapterhub_server.engine.sampling_params import SamplingParams
from adapterhub_server.errors import (
    InvalidRequestError,
)
from client.types import (
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    PromptLogprob,
)

# One logger for the inference API whichever endpoint module logs: operators filter on it.
logger = logging.getLogger("adapterhub_server.api.service")

DEFAULT_COMPLETION_MAX_TOKENS = 16
"""OpenAI's default `max_tokens` for `/v1/completions`."""


class CompletionsEndpoint(ServiceCore):
    """What `/v1/completions` calls (`create_completion`)."""

    async def create_completion(self, request: CompletionRequest) -> Completion | EventStream:
        """Run `/v1/completions`: one choice per prompt, streamed or whole."""
        log_caller(request)
        adapter = self._resolve_request(request)
        prompts = await self._completion_prompts(request.prompt, request.n or 1)
        max_tokens = request.max_tokens or DEFAULT_COMPLETION_MAX_TOKENS
        for prompt in prompts:
            self._check_context(len(prompt), max_tokens, "prompt", "max_tokens")
        grammar = await self._requested_grammar(request)
        params = sampling_params(
            request, max_tokens=max_tokens, logprobs=request.logprobs, grammar=grammar
        )
        # Echoed logprobs cover the prompt too: the engine computes them with the rest.
        echo_k = request.logprobs if request.echo else None
        if echo_k is not None or request.prompt_logprobs is not None:
            k = max(echo_k or 0, request.prompt_logprobs or 0)
            params = dataclasses.replace(params, prompt_logprobs=k)
        call = Call(
            id=f"cmpl-{uuid.uuid4().hex}",
            created=int(time.time()),
            model=request.model or self._base_name,
            include_usage=bool(request.stream_options and request.stream_options.include_usage),
        )
        n = request.n or 1
        streams = await self._start(call.id, prompts, params, adapter, n)
        # Choice i continues prompt i // n; with `echo` its text (and logprobs) start with it.
        echoes = [
            _Echo(prompts[i // n], self._echo_text(request.prompt, prompts, i // n))
            if request.echo
            else None
            for i in range(len(streams))
        ]
        if request.stream:
            frames = self._completion_frames(call, streams, params, echoes, request.prompt_logprobs)
            return EventStream(frames, streams)
        results = await collect_all(streams)
        choices = [
            self._completion_choice(
                i, result, params, echoes[i], first=True, prompt_k=request.prompt_logprobs
            )
            for i, result in enumerate(results)
        ]
        return Completion(
            id=call.id,
            created=call.created,
            model=call.model,
            choices=choices,
            usage=usage_of(results),
        )

    def _completion_choice(
        self,
        index: int,
        out: RequestOutput | ChoiceResult,
        params: SamplingParams,
        echo: _Echo | None,
        *,
        first: bool,
        offset: int = 0,
        prompt_k: int | None = None,
    ) -> CompletionChoice:
        """One choice, whole or the part a stream chunk adds (`first`: the choice's first
        chunk, which carries the echoed prompt and the prompt logprobs)."""
        prompt_entries = out.prompt_logprobs if first else None
        text = out.text
        entries: list[tuple[int, TokenLogprob | None]] = []
        if echo is not None and first:
            text = echo.text + text
            if prompt_entries is not None:
                entries = list(zip(echo.token_ids, prompt_entries, strict=True))
        entries += [(e.token_id, e) for e in out.logprobs]
        return CompletionChoice(
            index=index,
            text=text,
            logprobs=self._completion_logprobs(entries, params, offset=offset),
            finish_reason=out.finish_reason
            if isinstance(out, ChoiceResult)
            else finish_reason(out),
            prompt_logprobs=self._prompt_logprobs(prompt_entries, prompt_k)
            if first and prompt_k is not None
            else None,
        )

    def _echo_text(self, prompt: str | list[Any], prompts: list[list[int]], index: int) -> str:
        """The prompt as text: as sent, or decoded when it was sent as token ids."""
        if isinstance(prompt, str):
            return prompt
        if isinstance(prompt, list) and isinstance(prompt[index], str):
            return prompt[index]
        return self.engine.tokenizer.decode(prompts[index])

    def _completion_frames(
        self,
        call: Call,
        streams: list[PrimedStream],
        params: SamplingParams,
        echoes: list[_Echo | None],
        prompt_k: int | None,
    ) -> AsyncGenerator[str, None]:
        offsets = [0] * len(streams)
        started = [False] * len(streams)
        totals = [ChoiceResult() for _ in streams]

        def frame(index: int, out: RequestOutput) -> str:
            first, started[index] = not started[index], True
            choice = self._completion_choice(
                index,
                out,
                params,
                echoes[index],
                first=first,
                offset=offsets[index],
                prompt_k=prompt_k,
            )
            offsets[index] += len(choice.text)
            return sse_frame(
                Completion(id=call.id, created=call.created, model=call.model, choices=[choice])
            )

        def usage_frame() -> str:
            return sse_frame(
                Completion(
                    id=call.id,
                    created=call.created,
                    model=call.model,
                    choices=[],
                    usage=usage_of(totals),
                )
            )

        return sse_frames(streams, totals, frame, usage_frame if call.include_usage else None)

    def _completion_logprobs(
        self,
        entries: Sequence[tuple[int, TokenLogprob | None]],
        params: SamplingParams,
        *,
        offset: int,
    ) -> CompletionLogprobs | None:
        """Legacy logprobs of (token id, its logprob) pairs; an echoed prompt's first token
        has no logprob (None), as OpenAI reports it."""
        if params.logprobs is None:
            return None
        tokens: list[str] = []
        text_offset: list[int] = []
        token_logprobs: list[float | None] = []
        top: list[dict[str, float] | None] = []
        for token_id, entry in entries:
            token = self._token(token_id)
            tokens.append(token)
            text_offset.append(offset)
            offset += len(token)
            if entry is None:
                token_logprobs.append(None)
                top.append(None)
                continue
            token_logprobs.append(entry.logprob)
            alternatives = {self._token(i): lp for i, lp in entry.top[: params.logprobs]}
            # OpenAI always lists the sampled token among the alternatives.
            alternatives.setdefault(token, entry.logprob)
            top.append(alternatives)
        return CompletionLogprobs(
            tokens=tokens,
            token_logprobs=token_logprobs,
            top_logprobs=top,
            text_offset=text_offset,
        )

    def _prompt_logprobs(
        self, entries: Sequence[TokenLogprob | None] | None, k: int
    ) -> list[dict[str, PromptLogprob] | None] | None:
        """vLLM's `prompt_logprobs`: per prompt token, the token itself and the most likely
        alternatives, keyed by token id."""
        if entries is None:
            return None
        out: list[dict[str, PromptLogprob] | None] = []
        for entry in entries:
            if entry is None:
                out.append(None)
                continue
            ranked = {
                str(i): PromptLogprob(logprob=lp, rank=r + 1, decoded_token=self._token(i))
                for r, (i, lp) in enumerate(entry.top[:k])
            }
            ranked.setdefault(
                str(entry.token_id),
                PromptLogprob(
                    logprob=entry.logprob,
                    rank=entry.rank,
                    decoded_token=self._token(entry.token_id),
                ),
            )
            out.append(ranked)
        return out

    async def _completion_prompts(self, prompt: str | list[Any], n: int) -> list[list[int]]:
        """Normalize the four OpenAI prompt forms to a list of token-id lists.

        Whatever can be refused without tokenizing is refused first (too many prompts, text
        longer in bytes than the context could hold); tokenizing runs in a worker thread.
        """
        if isinstance(prompt, str):
            prompts: list[str | list[int]] = [prompt]
        elif prompt and all(isinstance(t, int) for t in prompt):
            prompts = [list(prompt)]
        else:
            prompts = list(prompt)
        if not prompts:
            raise InvalidRequestError("prompt must not be empty", param="prompt")
        self._check_prompt_count(len(prompts) * n)
        texts = [p for p in prompts if isinstance(p, str)]
        for text in texts:
            await self.check_text_size(utf8_length(text), "prompt")
        encoded = iter(await self.in_worker(self._encode_all, texts) if texts else [])
        vocab = len(self.engine.tokenizer)
        token_lists = []
        for p in prompts:
            ids = next(encoded) if isinstance(p, str) else list(p)
            if not ids:
                raise InvalidRequestError("prompt must not be empty", param="prompt")
            if any(not 0 <= t < vocab for t in ids):
                raise InvalidRequestError(
                    f"prompt token ids must be in [0, {vocab})", param="prompt"
                )
            token_lists.append(ids)
        return token_lists


@dataclasses.dataclass(frozen=True)
class _Echo:
    """An echoed prompt: its token ids (for the logprobs) and its text."""

    token_ids: list[int]
    text: str
