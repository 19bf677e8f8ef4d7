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
import hashlib
import logging
import time
from collections.abc import (
    AsyncIterator,
    Callable,
    Sequence,
)
from typing import Any, TypeVar

import anyio
from pydantic import BaseModel

from adapterhub_server.api.metrics import ApiMetrics, adapter_label, note_adapter
from adapterhub_server.api.streams import (
    ADMISSION_CODES,
    ChoiceResult,
    PrimedStream,
    close_all,
    first_output,
    gather,
    raise_if_failed,
)
from adapterhub_server.api.structured_request import requested_grammar
from adapterhub_server.config import DEFAULT_MAX_PROMPTS_PER_REQUEST
from adapterhub_server.engine.outputs import RequestOutput
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
    ChatCompletionRequest,
    CompletionRequest,
    CompletionUsage,
    HealthStatus,
    Model,
    ModelList,
    TopLogprob,
)

# One logger for the inference API whichever endpoint module logs: operators filter on it.
logger = logging.getLogger("adapterhub_server.api.service")

T = TypeVar("T")

OWNER = "adapterhub"
DONE_FRAME = "data: [DONE]\n\n"
TOKENIZER_THREADS = 4
"""Worker threads that tokenize and render chat templates at once; more requests wait."""


class ServiceCore:
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

    def _top_logprob(self, token_id: int, logprob: float) -> TopLogprob:
        token = self._token(token_id)
        return TopLogprob(token=token, logprob=logprob, bytes=list(token.encode("utf-8")))

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


def log_caller(request: CompletionRequest | ChatCompletionRequest) -> None:
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


def sampling_params(
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


def wire(value: BaseModel | str | None) -> Any:
    """A request sub-object as the wire dict the tool helpers read (None stays None)."""
    if isinstance(value, BaseModel):
        return value.model_dump(exclude_none=True, by_alias=True)
    return value


def wire_list(values: Sequence[BaseModel] | None) -> list[dict[str, Any]] | None:
    return None if values is None else [wire(v) for v in values]


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


def usage_of(results: Sequence[ChoiceResult]) -> CompletionUsage:
    prompt = sum(r.prompt_tokens for r in results)
    completion = sum(r.completion_tokens for r in results)
    return CompletionUsage(
        prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
    )
