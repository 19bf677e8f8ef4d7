"""A deterministic stand-in for the engine, for HTTP-contract tests.

It implements `EngineClient` without a model: each request "generates" the tokens of a
fixed reply (per adapter), one token per step, honouring max_tokens, stop strings and
logprobs the way the real engine reports them. Tests can make it slow, fail at admission
or mid-stream, and inspect what it was asked and which requests were aborted.
Structured-output specs compile with the real `GrammarCompiler` over the tiny tokenizer, so
their errors are the real engine's; the reply itself does not follow the grammar.
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from adapterhub_server.engine.outputs import FinishReason, RequestOutput, TokenLogprob
from adapterhub_server.engine.protocol import EngineStats, ServableAdapter
from adapterhub_server.engine.sampling_params import SamplingParams
from adapterhub_server.engine.structured import CompiledGrammar, GrammarCompiler, GrammarSpec
from adapterhub_server.errors import AdapterNotFoundError, ContextLengthError
from tests.tiny_models import build_tokenizer

BASE_ID = "tiny-base"
BASE_REPLY = "hello world"
ADAPTER_REPLIES = {"alpha": "the quick brown fox", "beta": "paris is the capital"}

_TOKENIZER = None
_COMPILER: GrammarCompiler | None = None


def shared_tokenizer() -> Any:
    """The tiny ChatML tokenizer, trained once per process (it takes a moment)."""
    global _TOKENIZER
    if _TOKENIZER is None:
        _TOKENIZER = build_tokenizer()
    return _TOKENIZER


def shared_grammar_compiler() -> GrammarCompiler:
    """A real grammar compiler over the tiny tokenizer, built once per process."""
    global _COMPILER
    if _COMPILER is None:
        tokenizer = shared_tokenizer()
        _COMPILER = GrammarCompiler(
            tokenizer, vocab_size=len(tokenizer), eos_token_ids=[tokenizer.eos_token_id]
        )
    return _COMPILER


@dataclass
class GenerateCall:
    """The arguments of one `generate` call."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    adapter: str | None
    follows: str | None = None


@dataclass
class FakeEngine:
    """An `EngineClient` whose output is known in advance."""

    max_model_len: int = 128
    step_delay: float = 0.0
    """Seconds to sleep before each output, to keep a stream open while a test acts."""
    start_error: Exception | None = None
    """Raised on the first read of every request, as the engine does on admission failures."""
    fail_after: int | None = None
    """Raise RuntimeError after this many outputs of each request."""
    finish_with: FinishReason | None = None
    """Force the final output's finish_reason (e.g. "error")."""
    echo_prompt: bool = False
    """Reply with the decoded prompt instead of the fixed text (to tell prompts apart)."""
    reply: str | None = None
    """Reply with this text, whatever the adapter (a recorded model output)."""
    chat_template: str | None = None
    """Serve a tokenizer with this chat template instead of the tiny ChatML one."""
    adapters: dict[str, ServableAdapter] = field(
        default_factory=lambda: {
            name: ServableAdapter(name=name, rank=8, created=1_700_000_000 + i, source=name)
            for i, name in enumerate(ADAPTER_REPLIES)
        }
    )
    is_ready: bool = True
    """What `ready` reports (tests flip it to exercise `/ready`)."""
    calls: list[GenerateCall] = field(default_factory=list)
    """Every generate() call, in order."""
    aborted: list[str] = field(default_factory=list)
    """Request ids closed or aborted before they finished."""
    grammar_specs: list[GrammarSpec] = field(default_factory=list)
    """Every spec passed to compile_grammar(), in order."""
    grammar_compile_timeout: float = 10.0
    finished: list[str] = field(default_factory=list)
    """Request ids that ran to their end."""
    _templated: Any = field(default=None, repr=False)

    @property
    def base_model_id(self) -> str:
        return BASE_ID

    @property
    def tokenizer(self) -> Any:
        if self.chat_template is None:
            return shared_tokenizer()
        if self._templated is None:
            self._templated = copy.deepcopy(shared_tokenizer())
            self._templated.chat_template = self.chat_template
        return self._templated

    @property
    def ready(self) -> bool:
        return self.is_ready

    def stats(self) -> EngineStats:
        live = len(self.calls) - len(self.aborted) - len(self.finished)
        return EngineStats(
            running=max(live, 0),
            waiting=0,
            max_num_seqs=8,
            adapter_slots_used=0,
            adapter_slots_total=4,
            adapters_in_host_memory=0,
            adapter_loads=0,
            adapter_evictions=0,
            adapter_cache_hits=0,
            adapter_cache_misses=0,
        )

    def list_adapters(self) -> Sequence[ServableAdapter]:
        return list(self.adapters.values())

    def resolve_adapter(self, model: str) -> str | None:
        if not model or model == BASE_ID:
            return None
        if model not in self.adapters:
            raise AdapterNotFoundError(f"The model `{model}` does not exist.", param="model")
        return model

    def reply_for(self, prompt_token_ids: Sequence[int], adapter: str | None) -> str:
        """The text a request generates if nothing stops it early."""
        if self.echo_prompt:
            return self.tokenizer.decode(list(prompt_token_ids))
        if self.reply is not None:
            return self.reply
        return ADAPTER_REPLIES.get(adapter or "", BASE_REPLY)

    async def generate(
        self,
        *,
        request_id: str,
        prompt_token_ids: Sequence[int],
        params: SamplingParams,
        adapter: str | None,
        follows: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        self.calls.append(
            GenerateCall(request_id, list(prompt_token_ids), params, adapter, follows)
        )
        if self.start_error is not None:
            raise self.start_error
        if len(prompt_token_ids) + params.max_tokens > self.max_model_len:
            raise ContextLengthError("prompt + max_tokens exceed the context", param="max_tokens")
        tokenizer = self.tokenizer
        reply_ids = tokenizer(
            self.reply_for(prompt_token_ids, adapter), add_special_tokens=False
        ).input_ids
        done = False
        try:
            text = ""
            for step, token_id in enumerate(reply_ids[: params.max_tokens]):
                await asyncio.sleep(self.step_delay)
                if self.fail_after is not None and step >= self.fail_after:
                    raise RuntimeError("fake engine failure")
                new_text = tokenizer.decode(reply_ids[: step + 1])
                delta, text = new_text[len(text) :], new_text
                finish: FinishReason | None = None
                stop_at = min((i for s in params.stop if (i := text.find(s)) >= 0), default=-1)
                if stop_at >= 0:
                    delta = delta[: max(0, len(delta) - (len(text) - stop_at))]
                    finish = "stop"
                elif step + 1 == len(reply_ids):
                    finish = "stop"  # the reply's end stands for EOS
                elif step + 1 == params.max_tokens:
                    finish = "length"
                if finish is not None and self.finish_with is not None:
                    finish = self.finish_with
                done = finish is not None
                if done:
                    # Consumers stop reading at the final output, so record it before.
                    self.finished.append(request_id)
                yield RequestOutput(
                    request_id=request_id,
                    text=delta,
                    token_ids=[token_id],
                    prompt_tokens=len(prompt_token_ids),
                    completion_tokens=step + 1,
                    finished=done,
                    finish_reason=finish,
                    logprobs=_logprobs(token_id, step, params, len(tokenizer)),
                    error="fake engine error" if finish == "error" else None,
                )
                if done:
                    return
        finally:
            if not done:
                self.aborted.append(request_id)

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    async def compile_grammar(self, spec: GrammarSpec) -> CompiledGrammar:
        self.grammar_specs.append(spec)
        return await asyncio.to_thread(
            shared_grammar_compiler().compile, spec, self.grammar_compile_timeout
        )


def fake_logprob(step: int) -> float:
    """The logprob the fake engine reports for the token generated at `step`."""
    return -0.25 * (step % 4) - 0.125


def _logprobs(token_id: int, step: int, params: SamplingParams, vocab: int) -> list[TokenLogprob]:
    if params.logprobs is None:
        return []
    chosen = fake_logprob(step)
    top = [(token_id, chosen)] + [
        ((token_id + k) % vocab, chosen - k) for k in range(1, params.logprobs)
    ]
    return [TokenLogprob(token_id=token_id, logprob=chosen, top=tuple(top[: params.logprobs]))]
