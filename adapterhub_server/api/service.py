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

import logging
import time
import uuid
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Callable,
    Mapping,
    Sequence,
)
from typing import Any, TypeVar

import anyio
from jinja2.exceptions import TemplateError

from adapterhub_server.api.metrics import ApiMetrics, adapter_label, note_adapter
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
from adapterhub_server.config import DEFAULT_MAX_PROMPTS_PER_REQUEST
from adapterhub_server.engine.outputs import RequestOutput, TokenLogprob
from adapterhub_server.engine.protocol import EngineClient
from adapterhub_server.engine.sampling_params import SamplingParams
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
    ChatCompletionRequest,
    ChatCompletionTokenLogprob,
    ChatLogprobs,
    ChatMessage,
    ChoiceDelta,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionUsage,
    HealthStatus,
    Model,
    ModelList,
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
    ) -> None:
        """`served_model_name` is the id clients use for the base model (default: its id);
        `metrics` gets time to first token and token counts per adapter; a request with
        more than `max_prompts_per_request` prompts (times `n`) is a 400."""
        self._engine = engine
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
        root = self._engine.base_model_id
        data = [Model(id=self._base_name, created=self._started, owned_by=OWNER, root=root)]
        data += [
            Model(
                id=adapter.name,
                created=adapter.created,
                owned_by=OWNER,
                parent=self._base_name,
                root=root,
            )
            for adapter in self._engine.list_adapters()
        ]
        return ModelList(data=data)

    # --- completions ------------------------------------------------------------------------

    async def create_completion(self, request: CompletionRequest) -> Completion | EventStream:
        """Run `/v1/completions`: one choice per prompt, streamed or whole."""
        _reject_unsupported(request)
        if request.echo:
            raise InvalidRequestError("echo is not supported", param="echo")
        adapter = self._resolve_request(request)
        prompts = await self._completion_prompts(request.prompt, request.n or 1)
        max_tokens = request.max_tokens or DEFAULT_COMPLETION_MAX_TOKENS
        for prompt in prompts:
            self._check_context(len(prompt), max_tokens, "prompt", "max_tokens")
        params = _sampling_params(request, max_tokens=max_tokens, logprobs=request.logprobs)
        call = Call(
            id=f"cmpl-{uuid.uuid4().hex}",
            created=int(time.time()),
            model=request.model or self._base_name,
            include_usage=bool(request.stream_options and request.stream_options.include_usage),
        )
        streams = await self._start(call.id, prompts, params, adapter)
        if request.stream:
            return EventStream(self._completionsse_frames(call, streams, params), streams)
        results = await collect_all(streams)
        choices = [
            CompletionChoice(
                index=i,
                text=result.text,
                logprobs=self._completion_logprobs(result.logprobs, params, offset=0),
                finish_reason=result.finish_reason,
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

    def _completionsse_frames(
        self, call: Call, streams: list[PrimedStream], params: SamplingParams
    ) -> AsyncGenerator[str, None]:
        offsets = [0] * len(streams)
        totals = [ChoiceResult() for _ in streams]

        def frame(index: int, out: RequestOutput) -> str:
            logprobs = self._completion_logprobs(out.logprobs, params, offset=offsets[index])
            offsets[index] += len(out.text)
            choice = CompletionChoice(
                index=index, text=out.text, logprobs=logprobs, finish_reason=finish_reason(out)
            )
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
        self, logprobs: Sequence[TokenLogprob], params: SamplingParams, *, offset: int
    ) -> CompletionLogprobs | None:
        if params.logprobs is None:
            return None
        tokens: list[str] = []
        text_offset: list[int] = []
        top: list[dict[str, float] | None] = []
        for entry in logprobs:
            token = self._token(entry.token_id)
            tokens.append(token)
            text_offset.append(offset)
            offset += len(token)
            alternatives = {self._token(i): lp for i, lp in entry.top[: params.logprobs]}
            # OpenAI always lists the sampled token among the alternatives.
            alternatives.setdefault(token, entry.logprob)
            top.append(alternatives)
        return CompletionLogprobs(
            tokens=tokens,
            token_logprobs=[entry.logprob for entry in logprobs],
            top_logprobs=top,
            text_offset=text_offset,
        )

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
            await self._check_text_size(utf8_length(text), "prompt")
        encoded = iter(await self._in_worker(self._encode_all, texts) if texts else [])
        vocab = len(self._engine.tokenizer)
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
        tokenizer = self._engine.tokenizer
        return [list(tokenizer(text).input_ids) if text else [] for text in texts]

    def _check_prompt_count(self, count: int) -> None:
        if count > self._max_prompts:
            raise InvalidRequestError(
                f"the request asks for {count} completions (prompts x n); this server "
                f"accepts at most {self._max_prompts} per request",
                param="prompt",
            )

    async def _check_text_size(self, num_bytes: int, param: str) -> None:
        """Refuse text that cannot fit in the context whatever it tokenizes to.

        No token covers more than `max_token_bytes` bytes of text, so a text of more than
        max_model_len x that many bytes has more tokens than the context holds: it is
        refused before the tokenizer spends time on it.
        """
        if self._max_token_bytes is None:
            self._max_token_bytes = await self._in_worker(max_token_bytes, self._engine.tokenizer)
        limit = self._engine.max_model_len * self._max_token_bytes
        if num_bytes > limit:
            raise ContextLengthError(
                f"{param}: {num_bytes} bytes of text, more than this model's context of "
                f"{self._engine.max_model_len} tokens can hold (at most {limit} bytes)",
                param=param,
            )

    async def _in_worker(self, fn: Callable[..., T], *args: Any) -> T:
        """Run CPU-bound request preparation in a bounded pool of worker threads."""
        if self._tokenizer_limiter is None:
            self._tokenizer_limiter = anyio.CapacityLimiter(TOKENIZER_THREADS)
        return await anyio.to_thread.run_sync(fn, *args, limiter=self._tokenizer_limiter)

    # --- chat completions -------------------------------------------------------------------

    async def create_chat_completion(
        self, request: ChatCompletionRequest
    ) -> ChatCompletion | EventStream:
        """Run `/v1/chat/completions` on the base model's chat template."""
        _reject_unsupported(request)
        if request.top_logprobs is not None and not request.logprobs:
            raise InvalidRequestError(
                "top_logprobs requires logprobs to be true", param="top_logprobs"
            )
        adapter = self._resolve_request(request)
        self._check_prompt_count(request.n or 1)
        prompt = await self._chat_prompt(request.messages)
        if request.max_completion_tokens is not None:
            max_tokens, max_param = request.max_completion_tokens, "max_completion_tokens"
        elif request.max_tokens is not None:
            max_tokens, max_param = request.max_tokens, "max_tokens"
        else:
            # OpenAI's default is "until the context is full".
            max_tokens, max_param = self._engine.max_model_len - len(prompt), "messages"
        self._check_context(len(prompt), max_tokens, "messages", max_param)
        logprobs = (request.top_logprobs or 0) if request.logprobs else None
        params = _sampling_params(request, max_tokens=max_tokens, logprobs=logprobs)
        call = Call(
            id=f"chatcmpl-{uuid.uuid4().hex}",
            created=int(time.time()),
            model=request.model or self._base_name,
            include_usage=bool(request.stream_options and request.stream_options.include_usage),
        )
        streams = await self._start(call.id, [prompt], params, adapter)
        if request.stream:
            return EventStream(self._chatsse_frames(call, streams, params), streams)
        results = await collect_all(streams)
        choices = [
            ChatCompletionChoice(
                index=i,
                message=ChatCompletionMessage(content=result.text),
                logprobs=self._chat_logprobs(result.logprobs, params),
                finish_reason=result.finish_reason or "stop",
            )
            for i, result in enumerate(results)
        ]
        return ChatCompletion(
            id=call.id,
            created=call.created,
            model=call.model,
            choices=choices,
            usage=_usage(results),
        )

    def _chatsse_frames(
        self, call: Call, streams: list[PrimedStream], params: SamplingParams
    ) -> AsyncGenerator[str, None]:
        totals = [ChoiceResult() for _ in streams]

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

        def frame(index: int, out: RequestOutput) -> str:
            choice = ChatCompletionChunkChoice(
                index=index,
                delta=ChoiceDelta(content=out.text or None),
                logprobs=self._chat_logprobs(out.logprobs, params),
                finish_reason=finish_reason(out),
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

    async def _chat_prompt(self, messages: Sequence[ChatMessage]) -> list[int]:
        """Render the conversation with the chat template and tokenize it, in one step, in
        a worker thread.

        Tokenizing the rendered string again would add the BOS token a second time for
        templates that already write it, so the template's own tokenization is used.
        """
        conversation = [
            {"role": "system" if m.role == "developer" else m.role, "content": _text(m, i)}
            for i, m in enumerate(messages)
        ]
        tokenizer = self._engine.tokenizer
        if not getattr(tokenizer, "chat_template", None):
            raise InvalidRequestError(
                "the base model has no chat template; use /v1/completions", param="messages"
            )
        size = sum(utf8_length(m["content"]) for m in conversation)
        await self._check_text_size(size, "messages")
        return await self._in_worker(self._render_chat, conversation)

    def _render_chat(self, conversation: list[dict[str, str]]) -> list[int]:
        tokenizer = self._engine.tokenizer
        try:
            ids = tokenizer.apply_chat_template(
                conversation, add_generation_prompt=True, tokenize=True, return_dict=False
            )
        except (TemplateError, ValueError) as exc:
            # Templates reject conversations they cannot render (roles out of order, ...).
            raise InvalidRequestError(f"cannot render messages: {exc}", param="messages") from exc
        if isinstance(ids, Mapping):  # some tokenizer versions return a BatchEncoding anyway
            ids = ids["input_ids"]
        return list(ids)

    # --- shared -----------------------------------------------------------------------------

    def _resolve_request(
        self, request: CompletionRequest | ChatCompletionRequest
    ) -> str | MergeSpec | None:
        """The adapter reference, the merge (`merged_adapters`), or None for the base."""
        merged = request.merged_adapters
        if merged is None:
            return self._resolve(request.model)
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
                self._engine.resolve_adapter(ref)
            except AdapterNotFoundError as exc:
                raise AdapterNotFoundError(
                    f"merged_adapters: {exc.message}", param="merged_adapters.ids"
                ) from None
        note_adapter(adapter_label(spec))
        return spec

    def _resolve(self, model: str) -> str | None:
        """The adapter name `model` selects, or None for the base model."""
        adapter = (
            None if not model or model == self._base_name else self._engine.resolve_adapter(model)
        )
        # Only now is the label known to name a servable adapter (bounded cardinality).
        note_adapter(adapter_label(adapter))
        return adapter

    def _check_context(
        self, prompt_tokens: int, max_tokens: int, prompt_param: str, max_param: str
    ) -> None:
        """Refuse before queueing what the engine would refuse anyway."""
        limit = self._engine.max_model_len
        if prompt_tokens >= limit:
            raise ContextLengthError(
                f"the prompt has {prompt_tokens} tokens; this model's context is {limit} tokens",
                param=prompt_param,
            )
        if prompt_tokens + max_tokens > limit:
            raise ContextLengthError(
                f"the prompt ({prompt_tokens} tokens) plus {max_param} ({max_tokens}) exceeds "
                f"this model's context of {limit} tokens",
                param=max_param,
            )

    async def _start(
        self,
        call_id: str,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams,
        adapter: str | MergeSpec | None,
    ) -> list[PrimedStream]:
        """Submit every prompt and wait for each one's first output.

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
            for i, prompt in enumerate(prompts):
                request_id = call_id if len(prompts) == 1 else f"{call_id}-{i}"
                iterators.append(
                    self._engine.generate(
                        request_id=request_id,
                        prompt_token_ids=prompt,
                        params=params,
                        adapter=adapter,
                    )
                )
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
            text = self._engine.tokenizer.decode([token_id])
            self._token_text[token_id] = text
        return text


# --- small helpers ----------------------------------------------------------------------------


def _reject_unsupported(request: CompletionRequest | ChatCompletionRequest) -> None:
    if request.n is not None and request.n != 1:
        raise InvalidRequestError("only n=1 is supported", param="n")
    if request.model_extra:
        logger.debug("ignoring unsupported request fields: %s", sorted(request.model_extra))


def _sampling_params(
    request: CompletionRequest | ChatCompletionRequest, *, max_tokens: int, logprobs: int | None
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


def _text(message: ChatMessage, index: int) -> str:
    if message.content is None:
        if message.role == "assistant":
            return ""
        raise InvalidRequestError(
            f"a {message.role} message needs content", param=f"messages[{index}].content"
        )
    if isinstance(message.content, str):
        return message.content
    return "\n".join(part.text for part in message.content)


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
