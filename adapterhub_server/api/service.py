"""The OpenAI-compatible inference API on top of an `EngineClient`.

Routes hand a validated request schema to `InferenceService` and get back either a response
schema or an `EventStream` of server-sent-event frames. Everything between (model
resolution, tokenization, the chat template, context checks, sampling parameters, running
the engine, logprob formatting) happens here, without any HTTP types, so that the rules are
tested once and shared by every route.

Lifetimes: every engine stream opened here is closed (`aclose`) on every path, including
cancellation, because closing it is what aborts the request and frees its batch slot.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import time
import uuid
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Callable,
    Sequence,
)
from typing import Any, TypeVar

import anyio
from pydantic import BaseModel

from adapterhub_server.api.metrics import ApiMetrics, adapter_label, note_adapter
from adapterhub_server.api.reasoning import ReasoningParser
from adapterhub_server.api.streams import (
    ADMISSION_CODES,
    Call,
    ChoiceResult,
    EventStream,
    PrimedStream,
    close_all,
    collect_all,
    finish_reason,
    first_output,
    gather,
    raise_if_failed,
    sse_frame,
    sse_frames,
)
from adapterhub_server.api.structured_request import requested_grammar
from adapterhub_server.api.tools import (
    ChatOutput,
    ChatOutputParser,
    ContentDelta,
    ForcedCallParser,
    OutputDelta,
    ReasoningDelta,
    RenderedChat,
    ToolCallDelta,
    forced_call_schema,
    make_tool_parser,
    render_conversation,
    validate_tools,
)
from adapterhub_server.config import DEFAULT_MAX_PROMPTS_PER_REQUEST
from adapterhub_server.engine.outputs import RequestOutput, TokenLogprob
from adapterhub_server.engine.protocol import EngineClient
from adapterhub_server.engine.request_checks import check_context
from adapterhub_server.engine.sampling_params import SamplingParams
from adapterhub_server.engine.structured import CompiledGrammar, GrammarError, GrammarSpec
from adapterhub_server.errors import (
    AdapterNotFoundError,
    ContextLengthError,
    InvalidRequestError,
)
from adapterhub_server.lora.merge import MergeSpec
from client.types import (
    ChatCompletion,
    ChatCompletionChoice,
    ChatCompletionChunk,
    ChatCompletionChunkChoice,
    ChatCompletionMessage,
    ChatCompletionMessageToolCall,
    ChatCompletionRequest,
    ChatCompletionTokenLogprob,
    ChatLogprobs,
    ChatMessage,
    ChoiceDelta,
    ChoiceDeltaToolCall,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionUsage,
    FinishReason,
    HealthStatus,
    Model,
    ModelList,
    PromptLogprob,
    TopLogprob,
)

logger = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_COMPLETION_MAX_TOKENS = 16
"""OpenAI's default `max_tokens` for `/v1/completions`."""
OWNER = "adapterhub"
DONE_FRAME = "data: [DONE]\n\n"
TOKENIZER_THREADS = 4
"""Worker threads that tokenize and render chat templates at once; more requests wait."""


class InferenceService:
    """Answers completions, chat completions and model listings from one engine."""

    def __init__(
        self,
        engine: EngineClient,
        *,
        served_model_name: str | None = None,
        metrics: ApiMetrics | None = None,
        max_prompts_per_request: int = DEFAULT_MAX_PROMPTS_PER_REQUEST,
        tool_call_parser: str = "auto",
    ) -> None:
        """`served_model_name` is the id clients use for the base model (default: its id);
        `metrics` gets time to first token and token counts per adapter; a request with
        more than `max_prompts_per_request` prompts (times `n`) is a 400;
        `tool_call_parser` is `--tool-call-parser` (`tools.render_conversation`)."""
        self.engine = engine
        self._tool_call_parser = tool_call_parser
        self._metrics = metrics
        self._max_prompts = max_prompts_per_request
        # Created on first use: a limiter belongs to the event loop that runs the app.
        self._tokenizer_limiter: anyio.CapacityLimiter | None = None
        self._max_token_bytes: int | None = None
        self._base_name = served_model_name or engine.base_model_id
        self._started = int(time.time())
        # Logprob formatting decodes the same few thousand ids over and over.
        self._token_text: dict[int, str] = {}

    # --- simple endpoints -------------------------------------------------------------------

    def health(self) -> HealthStatus:
        """Liveness: the process is up and serving HTTP."""
        return HealthStatus()

    def list_models(self) -> ModelList:
        """The base model first, then every adapter the engine can serve."""
        root = self.engine.base_model_id
        data = [Model(id=self._base_name, created=self._started, owned_by=OWNER, root=root)]
        data += [
            Model(
                id=adapter.name,
                created=adapter.created,
                owned_by=OWNER,
                parent=self._base_name,
                root=root,
            )
            for adapter in self.engine.list_adapters()
        ]
        return ModelList(data=data)

    # --- completions ------------------------------------------------------------------------

    async def create_completion(self, request: CompletionRequest) -> Completion | EventStream:
        """Run `/v1/completions`: one choice per prompt, streamed or whole."""
        _log_caller(request)
        adapter = self._resolve_request(request)
        prompts = await self._completion_prompts(request.prompt, request.n or 1)
        max_tokens = request.max_tokens or DEFAULT_COMPLETION_MAX_TOKENS
        for prompt in prompts:
            self._check_context(len(prompt), max_tokens, "prompt", "max_tokens")
        grammar = await self._requested_grammar(request)
        params = _sampling_params(
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
            usage=_usage(results),
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
                    usage=_usage(totals),
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

    def _encode_all(self, texts: Sequence[str]) -> list[list[int]]:
        tokenizer = self.engine.tokenizer
        return [list(tokenizer(text).input_ids) if text else [] for text in texts]

    def _check_prompt_count(self, count: int) -> None:
        if count > self._max_prompts:
            raise InvalidRequestError(
                f"the request asks for {count} completions (prompts x n); this server "
                f"accepts at most {self._max_prompts} per request",
                param="prompt",
            )

    async def check_text_size(self, num_bytes: int, param: str) -> None:
        """Refuse text that cannot fit in the context whatever it tokenizes to.

        No token covers more than `max_token_bytes` bytes of text, so a text of more than
        max_model_len x that many bytes has more tokens than the context holds: it is
        refused before the tokenizer spends time on it.
        """
        if self._max_token_bytes is None:
            self._max_token_bytes = await self.in_worker(max_token_bytes, self.engine.tokenizer)
        limit = self.engine.max_model_len * self._max_token_bytes
        if num_bytes > limit:
            raise ContextLengthError(
                f"{param}: {num_bytes} bytes of text, more than this model's context of "
                f"{self.engine.max_model_len} tokens can hold (at most {limit} bytes)",
                param=param,
            )

    async def in_worker(self, fn: Callable[..., T], *args: Any) -> T:
        """Run CPU-bound request preparation in a bounded pool of worker threads."""
        if self._tokenizer_limiter is None:
            self._tokenizer_limiter = anyio.CapacityLimiter(TOKENIZER_THREADS)
        return await anyio.to_thread.run_sync(fn, *args, limiter=self._tokenizer_limiter)

    # --- chat completions -------------------------------------------------------------------

    async def create_chat_completion(
        self, request: ChatCompletionRequest
    ) -> ChatCompletion | EventStream:
        """Run `/v1/chat/completions` on the base model's chat template: tools rendered
        and calls parsed (or forced), reasoning split off, output constrained when asked."""
        _log_caller(request)
        if request.top_logprobs is not None and not request.logprobs:
            raise InvalidRequestError(
                "top_logprobs requires logprobs to be true", param="top_logprobs"
            )
        tools = _wire_list(request.tools)
        tool_choice = _wire(request.tool_choice)
        choice = validate_tools(tools, tool_choice, request.parallel_tool_calls)
        parallel = request.parallel_tool_calls is not False
        adapter = self._resolve_request(request)
        self._check_prompt_count(request.n or 1)
        rendered = await self._chat_prompt(request, tools, tool_choice)
        prompt = rendered.token_ids
        if request.max_completion_tokens is not None:
            max_tokens, max_param = request.max_completion_tokens, "max_completion_tokens"
        elif request.max_tokens is not None:
            max_tokens, max_param = request.max_tokens, "max_tokens"
        else:
            # OpenAI's default is "until the context is full".
            max_tokens, max_param = self.engine.max_model_len - len(prompt), "messages"
        self._check_context(len(prompt), max_tokens, "messages", max_param)
        reader: OutputReader | None
        if choice.forced:
            assert tools is not None and tool_choice is not None
            schema = forced_call_schema(tools, tool_choice, parallel)
            grammar = await self._compile(GrammarSpec("json_schema", json.dumps(schema)), "tools")
            reader = ForcedCallParser(tools, tool_choice)
        else:
            grammar = await self._requested_grammar(request)
            reader = _output_reader(rendered, tools, parallel)
        logprobs = (request.top_logprobs or 0) if request.logprobs else None
        params = _sampling_params(
            request, max_tokens=max_tokens, logprobs=logprobs, grammar=grammar
        )
        call = Call(
            id=f"chatcmpl-{uuid.uuid4().hex}",
            created=int(time.time()),
            model=request.model or self._base_name,
            include_usage=bool(request.stream_options and request.stream_options.include_usage),
        )
        streams = await self._start(call.id, [prompt], params, adapter, request.n or 1)
        if request.stream:
            return EventStream(self._chat_frames(call, streams, params, reader), streams)
        results = await collect_all(streams)
        choices = []
        for i, result in enumerate(results):
            output = reader.parse(result.text) if reader else ChatOutput(None, result.text)
            choices.append(
                ChatCompletionChoice(
                    index=i,
                    message=_message(output),
                    logprobs=self._chat_logprobs(result.logprobs, params),
                    finish_reason=_chat_finish(result.finish_reason, bool(output.tool_calls)),
                )
            )
        return ChatCompletion(
            id=call.id,
            created=call.created,
            model=call.model,
            choices=choices,
            usage=_usage(results),
        )

    def _chat_frames(
        self,
        call: Call,
        streams: list[PrimedStream],
        params: SamplingParams,
        reader: OutputReader | None,
    ) -> AsyncGenerator[str, None]:
        totals = [ChoiceResult() for _ in streams]
        parsers = [reader.stream() if reader else None for _ in streams]
        called = [False] * len(streams)

        def chunk(
            choices: list[ChatCompletionChunkChoice], usage: CompletionUsage | None = None
        ) -> str:
            return sse_frame(
                ChatCompletionChunk(
                    id=call.id,
                    created=call.created,
                    model=call.model,
                    choices=choices,
                    usage=usage,
                )
            )

        def frame(index: int, out: RequestOutput) -> str | None:
            parser = parsers[index]
            if parser is None:
                delta = ChoiceDelta(content=out.text or None)
            else:
                deltas = parser.feed(out.text) if out.text else []
                if out.finished:
                    deltas += parser.finish()
                delta = _choice_delta(deltas)
                called[index] = called[index] or bool(delta.tool_calls)
            if not out.finished and delta == ChoiceDelta() and not out.logprobs:
                return None  # the parser holds this text back (a possible call marker)
            reason = finish_reason(out)
            choice = ChatCompletionChunkChoice(
                index=index,
                delta=delta,
                logprobs=self._chat_logprobs(out.logprobs, params),
                finish_reason=None if reason is None else _chat_finish(reason, called[index]),
            )
            return chunk([choice])

        def usage_frame() -> str:
            return chunk([], usage=_usage(totals))

        # OpenAI opens each choice with the role and empty content.
        opening = [
            chunk(
                [
                    ChatCompletionChunkChoice(
                        index=i, delta=ChoiceDelta(role="assistant", content="")
                    )
                ]
            )
            for i in range(len(streams))
        ]
        return sse_frames(
            streams, totals, frame, usage_frame if call.include_usage else None, opening=opening
        )

    def _chat_logprobs(
        self, logprobs: Sequence[TokenLogprob], params: SamplingParams
    ) -> ChatLogprobs | None:
        if params.logprobs is None:
            return None
        content = []
        for entry in logprobs:
            token = self._token(entry.token_id)
            top = [self._top_logprob(i, lp) for i, lp in entry.top[: params.logprobs]]
            content.append(
                ChatCompletionTokenLogprob(
                    token=token,
                    logprob=entry.logprob,
                    bytes=list(token.encode("utf-8")),
                    top_logprobs=top,
                )
            )
        return ChatLogprobs(content=content)

    def _top_logprob(self, token_id: int, logprob: float) -> TopLogprob:
        token = self._token(token_id)
        return TopLogprob(token=token, logprob=logprob, bytes=list(token.encode("utf-8")))

    async def _chat_prompt(
        self,
        request: ChatCompletionRequest,
        tools: list[dict[str, Any]] | None,
        tool_choice: str | dict[str, Any] | None,
    ) -> RenderedChat:
        """Render the conversation (and tools) with the chat template and tokenize it, in
        a worker thread (`tools.render_conversation`: the one renderer chat and /tokenize
        share)."""
        messages = [m.model_dump(exclude_none=True, by_alias=True) for m in request.messages]
        size = sum(message_bytes(m) for m in request.messages)
        await self.check_text_size(size, "messages")
        return await self.in_worker(
            functools.partial(
                render_conversation,
                self.engine.tokenizer,
                messages,
                tools=tools,
                tool_choice=tool_choice,
                tool_call_parser=self._tool_call_parser,
                chat_template_kwargs=request.chat_template_kwargs,
            )
        )

    async def _requested_grammar(
        self, request: CompletionRequest | ChatCompletionRequest
    ) -> CompiledGrammar | None:
        """The compiled `response_format` / `structured_outputs` constraint, if any."""
        found = requested_grammar(request)
        return None if found is None else await self._compile(*found)

    async def _compile(self, spec: GrammarSpec, param: str) -> CompiledGrammar:
        try:
            return await self.engine.compile_grammar(spec)
        except GrammarError as exc:
            exc.param = param
            raise

    # --- shared -----------------------------------------------------------------------------

    def _resolve_request(
        self, request: CompletionRequest | ChatCompletionRequest
    ) -> str | MergeSpec | None:
        """The adapter reference, the merge (`merged_adapters`), or None for the base."""
        merged = request.merged_adapters
        if merged is None:
            return self.resolve_model(request.model)
        if request.model and request.model != self._base_name:
            raise InvalidRequestError(
                f"merged_adapters needs `model` to name the base model "
                f"({self._base_name!r}), not {request.model[:80]!r}",
                param="model",
            )
        spec = MergeSpec(
            ids=tuple(merged.ids),
            weights=tuple(
                merged.weights if merged.weights is not None else [1.0] * len(merged.ids)
            ),
            strategy=merged.merge_strategy,
            density=merged.density,
            majority_sign_method=merged.majority_sign_method,
        )
        for ref in spec.ids:
            try:
                self.engine.resolve_adapter(ref)
            except AdapterNotFoundError as exc:
                raise AdapterNotFoundError(
                    f"merged_adapters: {exc.message}", param="merged_adapters.ids"
                ) from None
        note_adapter(adapter_label(spec))
        return spec

    def resolve_model(self, model: str) -> str | None:
        """The adapter name `model` selects, or None for the base model."""
        adapter = (
            None if not model or model == self._base_name else self.engine.resolve_adapter(model)
        )
        # Only now is the label known to name a servable adapter (bounded cardinality).
        note_adapter(adapter_label(adapter))
        return adapter

    def _check_context(
        self, prompt_tokens: int, max_tokens: int, prompt_param: str, max_param: str
    ) -> None:
        """Refuse before queueing what the engine would refuse anyway."""
        check_context(
            prompt_tokens,
            max_tokens,
            self.engine.max_model_len,
            prompt_param=prompt_param,
            max_param=max_param,
        )

    async def _start(
        self,
        call_id: str,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams,
        adapter: str | MergeSpec | None,
        n: int = 1,
    ) -> list[PrimedStream]:
        """Submit `n` choices of every prompt and wait for each one's first output.

        Streams come back prompt-major (choice index = prompt index x n + i, OpenAI's
        order). Choice i > 0 of a prompt is seeded from (seed, i) and follows choice 0 in
        the engine, so it reads the prompt's keys and values from choice 0's cached blocks.

        Waiting for the first output lets errors the engine raises on admission (unknown or
        invalid adapter, full queue, context) answer with their own HTTP status, even for a
        stream, instead of a 200 followed by an error event.
        """
        iterators: list[AsyncIterator[RequestOutput]] = []
        label = adapter_label(adapter)
        submitted = time.perf_counter()

        async def first(iterator: AsyncIterator[RequestOutput]) -> RequestOutput:
            out = await first_output(iterator)
            if self._metrics is not None and out.token_ids:  # not an admission failure
                self._metrics.observe_first_token(label, time.perf_counter() - submitted)
            return out

        try:
            single = len(prompts) * n == 1
            for p, prompt in enumerate(prompts):
                leader: str | None = None
                for i in range(n):
                    request_id = call_id if single else f"{call_id}-{p * n + i}"
                    iterators.append(
                        self.engine.generate(
                            request_id=request_id,
                            prompt_token_ids=prompt,
                            params=choice_params(params, i),
                            adapter=adapter,
                            follows=leader,
                        )
                    )
                    leader = leader or request_id
            if len(iterators) == 1:
                firsts = [await first(iterators[0])]
            else:
                firsts = await gather([first(it) for it in iterators])
            for out in firsts:
                # An adapter (or merge) that failed to load ends the request before its
                # first token: answer with its own status, streamed or not.
                if out.finished and not out.token_ids and out.error_code in ADMISSION_CODES:
                    raise_if_failed(out)
        except BaseException:
            await close_all(iterators)
            raise
        return [
            PrimedStream(it, out, on_close=self._token_counter(label))
            for it, out in zip(iterators, firsts, strict=True)
        ]

    def _token_counter(self, label: str) -> Callable[[RequestOutput], None] | None:
        """What a stream reports its token counts to when it closes, however it ends."""
        metrics = self._metrics
        if metrics is None:
            return None

        def count(last: RequestOutput) -> None:
            metrics.observe_tokens(
                label, prompt=last.prompt_tokens, generated=last.completion_tokens
            )

        return count

    def _token(self, token_id: int) -> str:
        text = self._token_text.get(token_id)
        if text is None:
            text = self.engine.tokenizer.decode([token_id])
            self._token_text[token_id] = text
        return text


# --- small helpers ----------------------------------------------------------------------------


_LOGGED_LABELS = ("user", "metadata", "safety_identifier", "prompt_cache_key", "service_tier")
"""Request fields that only label the caller: they change nothing in the answer, but
operators trace requests by them."""
_LOGGED_CHARS = 200
"""A label longer than this is cut in the log (nothing bounds `user` on the wire)."""


def _log_caller(request: CompletionRequest | ChatCompletionRequest) -> None:
    """Record the caller's labels against the request id (every log line carries it)."""
    labels = {
        name: value
        for name in _LOGGED_LABELS
        if (value := getattr(request, name, None)) not in (None, "", {})
    }
    if labels:
        text = {k: (v[:_LOGGED_CHARS] if isinstance(v, str) else v) for k, v in labels.items()}
        logger.info("request labels %s", text)


def choice_params(params: SamplingParams, index: int) -> SamplingParams:
    """The settings of choice `index` of an `n > 1` request: choice 0 keeps the request's
    seed (so n=1 and choice 0 of n>1 agree), choice i draws from a seed derived from
    (seed, i), so every choice is reproducible and differs from the others."""
    if index == 0 or params.seed is None:
        return params
    digest = hashlib.sha256(f"{params.seed}:{index}".encode()).digest()
    return dataclasses.replace(params, seed=int.from_bytes(digest[:8], "big") >> 1)


def _sampling_params(
    request: CompletionRequest | ChatCompletionRequest,
    *,
    max_tokens: int,
    logprobs: int | None,
    grammar: CompiledGrammar | None = None,
) -> SamplingParams:
    """Map the request to engine settings; `SamplingParams` validates the values."""
    stop = (
        request.stop if isinstance(request.stop, list) else [request.stop] if request.stop else []
    )
    extra: dict[str, object] = {"user": request.user} if request.user else {}
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if request.temperature is None else request.temperature,
        top_p=1.0 if request.top_p is None else request.top_p,
        top_k=-1 if request.top_k is None else request.top_k,
        seed=request.seed,
        stop=tuple(stop),
        stop_token_ids=tuple(request.stop_token_ids or ()),
        ignore_eos=request.ignore_eos,
        logprobs=logprobs,
        skip_special_tokens=request.skip_special_tokens,
        presence_penalty=request.presence_penalty or 0.0,
        frequency_penalty=request.frequency_penalty or 0.0,
        repetition_penalty=1.0
        if request.repetition_penalty is None
        else request.repetition_penalty,
        logit_bias=_logit_bias(request.logit_bias),
        min_p=request.min_p or 0.0,
        min_tokens=request.min_tokens or 0,
        grammar=grammar,
        extra=extra,
    )


def _logit_bias(bias: dict[str, float] | None) -> tuple[tuple[int, float], ...]:
    """OpenAI's string-keyed map as (token id, bias) pairs; keys must be token ids."""
    pairs = []
    for key, value in (bias or {}).items():
        if not key.isdecimal():
            raise InvalidRequestError(
                f"logit_bias keys must be token ids, got {key!r}", param="logit_bias"
            )
        pairs.append((int(key), float(value)))
    return tuple(pairs)


def message_bytes(message: ChatMessage) -> int:
    """UTF-8 bytes of the text a message puts into the rendered prompt whatever the
    template adds around it: its content, reasoning and call names and arguments."""
    if message.content is None or isinstance(message.content, str):
        texts = [message.content or ""]
    else:
        texts = [part.text for part in message.content]
    texts.append(message.reasoning_content or "")
    texts += [c.function.name + c.function.arguments for c in message.tool_calls or ()]
    return sum(utf8_length(t) for t in texts)


def _wire(value: BaseModel | str | None) -> Any:
    """A request sub-object as the wire dict the tool helpers read (None stays None)."""
    if isinstance(value, BaseModel):
        return value.model_dump(exclude_none=True, by_alias=True)
    return value


def _wire_list(values: Sequence[BaseModel] | None) -> list[dict[str, Any]] | None:
    return None if values is None else [_wire(v) for v in values]


@dataclasses.dataclass(frozen=True)
class _Echo:
    """An echoed prompt: its token ids (for the logprobs) and its text."""

    token_ids: list[int]
    text: str


OutputReader = ChatOutputParser | ForcedCallParser
"""How a chat choice's text is read back into reasoning, content and tool calls."""


def _output_reader(
    rendered: RenderedChat, tools: list[dict[str, Any]] | None, parallel: bool
) -> ChatOutputParser | None:
    """The parser for a choice's output; None when the text is plain content."""
    if rendered.tool_parser is None and not rendered.reasoning:
        return None
    names = [t["function"]["name"] for t in tools or ()]
    tool_parser = (
        make_tool_parser(rendered.tool_parser, names, parallel_tool_calls=parallel)
        if rendered.tool_parser
        else None
    )
    reasoning = (
        ReasoningParser(starts_in_reasoning=rendered.starts_in_reasoning)
        if rendered.reasoning
        else None
    )
    return ChatOutputParser(tool_parser=tool_parser, reasoning=reasoning)


def _message(output: ChatOutput) -> ChatCompletionMessage:
    calls = [ChatCompletionMessageToolCall.model_validate(c.to_openai()) for c in output.tool_calls]
    return ChatCompletionMessage(
        # Without calls the content is text, even empty; with calls, null unless the model
        # also wrote text.
        content=output.content if calls else (output.content or ""),
        reasoning_content=output.reasoning,
        tool_calls=calls or None,
    )


def _choice_delta(deltas: Sequence[OutputDelta]) -> ChoiceDelta:
    """One chunk's delta from the parser's deltas (all three kinds may share a chunk)."""
    content = "".join(d.text for d in deltas if isinstance(d, ContentDelta))
    reasoning = "".join(d.text for d in deltas if isinstance(d, ReasoningDelta))
    calls = [
        ChoiceDeltaToolCall.model_validate(d.to_openai())
        for d in deltas
        if isinstance(d, ToolCallDelta)
    ]
    return ChoiceDelta(
        content=content or None, reasoning_content=reasoning or None, tool_calls=calls or None
    )


def _chat_finish(reason: FinishReason | None, called: bool) -> FinishReason:
    """`tool_calls` when a choice that ended naturally made calls (OpenAI's rule)."""
    if reason in (None, "stop") and called:
        return "tool_calls"
    return reason or "stop"


def utf8_length(text: str) -> int:
    """Length of `text` in UTF-8 bytes, without encoding ASCII text."""
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def max_token_bytes(tokenizer: Any) -> int:
    """An upper bound on the bytes of text one token of `tokenizer` stands for.

    Token strings spell bytes (byte-level BPE) or characters (SentencePiece), and no
    character is more than 4 bytes of UTF-8, so 4 x the longest token string bounds both.
    """
    longest = max((len(token) for token in tokenizer.get_vocab()), default=1)
    return 4 * max(longest, 1)


def _usage(results: Sequence[ChoiceResult]) -> CompletionUsage:
    prompt = sum(r.prompt_tokens for r in results)
    completion = sum(r.completion_tokens for r in results)
    return CompletionUsage(
        prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
    )
