"""The synchronous engine: add requests, run steps, get per-request output deltas.

One `step()` schedules (scheduler), lays the step out as one flat batch (attention metadata
and LoRA routing, built once for all layers), runs one forward pass over every sequence and
adapter, samples, and turns new tokens into text. On CUDA, decode-only steps replay a
captured CUDA graph instead (`engine/decode_graphs.py`). It is driven by one thread
(`AsyncLLMEngine`); nothing here is thread-safe on purpose.

Failures stay with the sequences that cause them: a step whose forward or sampling raises
(including an accelerator out-of-memory) is retried in halves until the failing sequences
run alone, and only those fail; the rest of the batch advances as if nothing had happened.

Structured outputs (`engine/structured/`): a sequence whose params carry a grammar gets its
own matcher. Each step fills the constrained rows' token masks on a worker thread while the
forward runs, the sampler applies them, and each matcher accepts its token only once the
step is committed, so a failed attempt leaves it where it was. Steps with no constrained
sequence alive do none of this.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from collections.abc import Sequence as Seq

import torch

from adapterhub_server.engine.decode_graphs import DecodeGraphs
from adapterhub_server.engine.detokenizer import IncrementalDetokenizer, StopChecker
from adapterhub_server.engine.kv_cache_manager import KVCacheManager
from adapterhub_server.engine.logits_processors import SamplingContext
from adapterhub_server.engine.outputs import FinishReason, RequestOutput, TokenLogprob
from adapterhub_server.engine.protocol import EngineStats, ServableAdapter
from adapterhub_server.engine.request_checks import check_context, check_token_ids
from adapterhub_server.engine.sampler import NON_FINITE, Sampler, make_generator
from adapterhub_server.engine.sampling_params import SamplingParams
from adapterhub_server.engine.scheduler import Scheduler, SchedulerOutput
from adapterhub_server.engine.sequence import Sequence
from adapterhub_server.engine.structured import (
    DEFAULT_COMPILE_TIMEOUT,
    GrammarCompiler,
    MaskFiller,
    PendingMasks,
)
from adapterhub_server.errors import AdapterHubError, ContextLengthError, InvalidRequestError
from adapterhub_server.lora.cache import AdapterCache, AdapterLocation, display_name
from adapterhub_server.lora.full_module_batch import FullModuleBatch, Span, build_full_module_batch
from adapterhub_server.lora.full_module_store import ResidentFullModules
from adapterhub_server.lora.merge import MergeSpec
from adapterhub_server.lora.ops import TORCH_OPS, LoRABackend, Route, Segment, build_lora_batch
from adapterhub_server.models.attention import KVCache, build_attention_metadata
from adapterhub_server.models.causal_lm import BatchedCausalLM
from adapterhub_server.models.transfer import to_device

logger = logging.getLogger(__name__)

INTERNAL_ERROR = "internal_error"
OUT_OF_MEMORY = "out_of_memory"
NON_FINITE_LOGITS = "non_finite_logits"
GRAMMAR_FAILED = "grammar_failed"


class LLMEngine:
    def __init__(
        self,
        *,
        model: BatchedCausalLM,
        tokenizer: object,
        kv_cache: KVCache,
        kv_manager: KVCacheManager,
        adapters: AdapterCache,
        base_identity: str,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_model_len: int,
        eos_token_ids: set[int],
        device: torch.device,
        lora_backend: LoRABackend = TORCH_OPS,
        decode_graphs: DecodeGraphs | None = None,
        grammar_compiler: GrammarCompiler | None = None,
        grammar_compile_timeout: float = DEFAULT_COMPILE_TIMEOUT,
    ) -> None:
        self.model = model
        self.vocab_size = model.shape.vocab_size
        self.tokenizer = tokenizer
        self.kv_cache = kv_cache
        self.kv = kv_manager
        self.adapters = adapters
        self.base_identity = base_identity
        """Content identity of the base weights: what base rows' cached KV is keyed by."""
        self.max_model_len = max_model_len
        self.eos_token_ids = eos_token_ids
        self.device = device
        self.lora_backend: LoRABackend = lora_backend
        """Which batched-LoRA ops serve every step (`lora.ops.lora_backend`)."""
        self.decode_graphs = decode_graphs
        """Runs decode-only steps from CUDA graphs (`engine/decode_graphs.py`); None: eager."""
        self.grammar_compiler = grammar_compiler
        """Compiles structured-output specs for this model's tokenizer (the API calls it
        off the engine thread); None where the tokenizer cannot drive one."""
        self.grammar_compile_timeout = grammar_compile_timeout
        """Seconds a compile may take before the request gets a 400."""
        self._mask_filler: MaskFiller | None = None
        self._num_constrained = 0
        """Live requests with a grammar: 0 keeps steps free of any grammar work."""
        self.sampler = Sampler()
        self.scheduler = Scheduler(
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            kv=kv_manager,
            acquire_adapter=self._acquire,
            release_adapter=self._release,
            identity=self._identity,
        )
        self._requests: dict[str, Sequence] = {}
        self.num_steps = 0
        self.idle = False
        self.step_observer: Callable[[int, int], None] | None = None
        """Called after every forward step with (sequences, tokens) in it: metrics."""

    # -- requests ------------------------------------------------------------------------

    def add_request(
        self,
        request_id: str,
        prompt_ids: Seq[int],
        params: SamplingParams,
        adapter: str | MergeSpec | None = None,
        *,
        follows: str | None = None,
    ) -> None:
        """Queue a request. Raises a client error (nothing is queued) if it cannot run.

        `adapter` is a reference, or a `MergeSpec` whose merged adapter the cache computes
        once and then serves like any other (its own slot, its own prefix-cache identity).
        `follows` is a live request with the same prompt and adapter (choice 0 of `n > 1`):
        this one is admitted once that one's prompt blocks are cached, and shares them."""
        if request_id in self._requests:
            raise InvalidRequestError(f"duplicate request id {request_id!r}")
        if not prompt_ids:
            raise InvalidRequestError("the prompt is empty", param="prompt")
        check_context(len(prompt_ids), params.max_tokens, self.max_model_len)
        total = len(prompt_ids) + params.max_tokens
        needed = self.kv.blocks_needed(total, self.scheduler.max_num_batched_tokens)
        if needed > self.kv.usable_blocks:
            raise ContextLengthError(
                f"This request needs {total} tokens of KV cache ({len(prompt_ids)} in the "
                f"prompt, {params.max_tokens} for the completion), more than the whole cache "
                f"holds ({self.kv.usable_blocks * self.kv.block_size} tokens); "
                "lower max_tokens or shorten the prompt",
                param="max_tokens",
            )
        vocab = self.vocab_size
        check_token_ids(prompt_ids, vocab, param="prompt")
        if any(t >= vocab for t, _ in params.logit_bias):
            raise InvalidRequestError(
                f"logit_bias names a token id outside the vocabulary (0 to {vocab - 1})",
                param="logit_bias",
            )
        grammar = params.grammar
        if grammar is not None and grammar.vocab_size < vocab:
            raise InvalidRequestError(
                f"the grammar was compiled for {grammar.vocab_size} tokens, not this model's "
                f"{vocab}",
                param="response_format",
            )
        location = self.adapters.locate(adapter) if adapter else None
        seq = Sequence(
            request_id=request_id,
            prompt_ids=list(prompt_ids),
            params=params,
            adapter=location,
            detokenizer=IncrementalDetokenizer(
                self.tokenizer, prompt_ids, skip_special_tokens=params.skip_special_tokens
            ),
            stop_checker=StopChecker(params.stop),
            generator=make_generator(params.seed, device=self.device),
            matcher=grammar.matcher() if grammar is not None else None,
            prompt_logprobs=[None] if params.prompt_logprobs is not None else None,
        )
        self._num_constrained += seq.matcher is not None
        self._requests[request_id] = seq
        self.scheduler.add(seq, follows=self._requests.get(follows) if follows else None)

    def abort(self, request_id: str, error_code: str | None = None) -> RequestOutput | None:
        """Stop a request now and free its slot; returns its final output if it was live.

        `error_code` says why the server aborted it (e.g. "shutting_down"); the output
        carries it so the API can answer with a fitting status.
        """
        seq = self._requests.get(request_id)
        if seq is None:
            return None
        seq.error_code = error_code
        self._finish(seq, "abort")
        return self._emit(seq)

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def warm_up(self) -> None:
        """Run one short request through prefill, decode and sampling, so the first real
        request does not pay for lazy initialisation (allocator, kernels, thread pools)."""
        request_id = "__warmup__"
        self.add_request(request_id, [0, 0], SamplingParams(max_tokens=2, ignore_eos=True))
        while request_id in self._requests:
            self.step()

    def locate_adapter(self, ref: str) -> AdapterLocation:
        """Where adapter `ref` is; `AdapterNotFoundError` if no source knows it."""
        return self.adapters.locate(ref)

    def servable_adapters(self) -> list[ServableAdapter]:
        """Every adapter the sources list, with its rank once it has been read."""
        return [
            ServableAdapter(
                name=display_name(loc.key),
                rank=self.adapters.rank_of(loc.key),
                created=loc.created,
                source=str(loc.path),
            )
            for loc in self.adapters.list_locations()
        ]

    def load_adapter_now(self, loc: AdapterLocation) -> None:
        """Read and validate an adapter's files into host memory (any thread)."""
        self.adapters.load_now(loc)

    def evict_adapter(self, key: str) -> bool:
        """Forget an adapter unless a running request pins it (engine thread)."""
        return self.adapters.evict(key)

    def close(self) -> None:
        """Stop the adapter loader (the engine thread has stopped)."""
        self.adapters.close()

    @property
    def max_num_seqs(self) -> int:
        return self.scheduler.max_num_seqs

    def stats(self) -> EngineStats:
        """Counters and gauges for `/metrics`. Plain reads of ints and list lengths: safe
        from any thread, at worst one step old."""
        cache = self.adapters.stats()
        prefix = self.kv.stats
        return EngineStats(
            running=self.num_running,
            waiting=self.num_waiting,
            max_num_seqs=self.scheduler.max_num_seqs,
            adapter_slots_used=cache.device_resident,
            adapter_slots_total=self.adapters.max_slots,
            adapters_in_host_memory=cache.host_resident,
            adapter_loads=cache.loads,
            adapter_evictions=cache.evictions,
            adapter_cache_hits=cache.hits,
            adapter_cache_misses=cache.misses,
            kv_cache_usage=self.kv.usage(),
            prefix_cache_queried_tokens=prefix.queried_tokens,
            prefix_cache_hit_tokens=prefix.hit_tokens,
            preemptions=self.scheduler.num_preemptions,
        )

    def adapter_requests(self) -> tuple[list[str], list[str]]:
        """Adapter names (as clients send them) of the running and of the waiting requests,
        sorted and without repeats; merges and the base model are left out. For the
        inference gateway's endpoint picker (`adapterhub_lora_requests_info`). Any thread:
        a snapshot at most one step old."""
        for _ in range(3):
            try:
                running, waiting = list(self.scheduler.running), list(self.scheduler.waiting)
            except RuntimeError:  # the engine thread changed a deque mid-copy: again
                continue
            return _adapter_names(running), _adapter_names(waiting)
        return [], []

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    # -- the step ------------------------------------------------------------------------

    def _contexts(self, seqs: list[Sequence]) -> list[SamplingContext] | None:
        """What the logits processors read, when any row asks for them (else None)."""
        if not any(s.params.processes_logits for s in seqs):
            return None
        return [
            SamplingContext(
                s.prompt_ids,
                s.output_ids,
                frozenset(s.params.stop_token_ids)
                | (frozenset() if s.params.ignore_eos else frozenset(self.eos_token_ids)),
            )
            for s in seqs
        ]

    def step(self) -> list[RequestOutput]:
        plan = self.scheduler.schedule()
        outputs = [self._fail(seq, str(exc), _error_code(exc)) for seq, exc in plan.failed]
        # Nothing runnable (requests wait for adapter files): the driver should back off.
        self.idle = plan.empty
        if plan.empty:
            return outputs
        self.num_steps += 1
        if self.step_observer is not None:
            tokens = len(plan.decodes) + sum(c.num_tokens for c in plan.prefills)
            self.step_observer(len(plan.decodes) + len(plan.prefills), tokens)
        outputs.extend(self._run_isolated(plan))
        return outputs

    def _run_isolated(self, plan: SchedulerOutput) -> list[RequestOutput]:
        """Run `plan`; if it raises, retry it in halves until the failing sequences are alone.

        `_run` commits nothing (num_computed, sampled tokens, generator states) unless its
        forward and sampling succeed, so a retry rewrites the same KV cache positions and
        the survivors come out exactly as from an undisturbed step. k failing sequences
        among n cost about 2k*log2(n) extra forwards. An out-of-memory is handled the same
        way, after freeing cached memory, since a smaller batch may fit.
        """
        try:
            return self._run(plan)
        except Exception as exc:
            oom = _is_out_of_memory(exc)
            code = OUT_OF_MEMORY if oom else INTERNAL_ERROR
            if oom:
                message = "the accelerator ran out of memory for this request; retry later"
            else:
                message = f"internal error: {type(exc).__name__}: {exc}"
            if plan.num_seqs > 1:
                logger.warning(
                    "a step of %d sequences failed (%s: %s); retrying in halves",
                    plan.num_seqs,
                    type(exc).__name__,
                    exc,
                )
            elif oom:
                logger.warning("request failed alone: out of memory")
            else:
                logger.exception("request failed alone in the forward or sampling")
        # Past the except block the failed attempt's traceback, and with it every
        # activation its frames still reference, is released before the retry.
        if oom:
            self._release_cached_memory()
        if plan.num_seqs == 1:
            seq = plan.decodes[0] if plan.decodes else plan.prefills[0].seq
            return [] if seq.finished else [self._fail(seq, message, code)]
        first, second = plan.split()
        return self._run_isolated(first) + self._run_isolated(second)

    def _release_cached_memory(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _run(self, plan: SchedulerOutput) -> list[RequestOutput]:
        """One forward and sampling over `plan`; raises with nothing committed, or commits
        every sequence (post-processing failures then fail their own sequence only)."""
        ids: list[int] = []
        positions: list[int] = []
        dense_routes: list[Route | None] = []
        decode_tables: list[list[int]] = []
        for seq in plan.decodes:
            p = seq.num_computed
            ids.append(seq.token_at(p))
            positions.append(p)
            decode_tables.append(self.kv.block_ids(seq))
            dense_routes.append(seq.route)
        logits_index = list(range(len(plan.decodes)))
        samplers: list[Sequence] = list(plan.decodes)
        chunks: list[tuple[list[int], int, int]] = []
        segments: list[Segment] = []
        prompt_rows: list[tuple[Sequence, int]] = []
        """(sequence, prompt position) of each logits row after the samplers' rows."""
        prompt_index: list[int] = []
        t = len(ids)
        for chunk in plan.prefills:
            seq, n, start = chunk.seq, chunk.num_tokens, chunk.seq.num_computed
            ids.extend(seq.tokens(start, start + n))
            positions.extend(range(start, start + n))
            chunks.append((self.kv.block_ids(seq), start, n))
            if seq.route is not None:
                segments.append(Segment(t, t + n, seq.route[0], seq.route[1]))
            if start + n == seq.num_tokens:
                logits_index.append(t + n - 1)
                samplers.append(seq)
            if seq.needs_prompt_logprobs:
                # Position q's logits give the logprob of prompt token q + 1 (the last
                # prompt position's are the sampler's); a recompute skips those known.
                first = max(start, len(seq.prompt_logprobs or ()) - 1)
                for q in range(first, min(start + n, len(seq.prompt_ids) - 1)):
                    prompt_rows.append((seq, q))
                    prompt_index.append(t + q - start)
            t += n
        logits_index += prompt_index

        full = self._full_module_batch(plan, ids, len(samplers), prompt_rows)
        # Started before the forward, joined before sampling: the fill runs beside it.
        pending = self._start_masks(samplers) if self._num_constrained else None
        grammar_failed: dict[int, str] = {}
        try:
            logits = None
            # Steps with adapters' full modules or token rows run eagerly: the graphs'
            # static buffers hold no per-adapter embedding or head tables.
            if self.decode_graphs is not None and not plan.prefills and full is None:
                logits = self.decode_graphs.run(ids, positions, dense_routes, decode_tables)
            if logits is None:
                logits = self._forward(
                    ids,
                    positions,
                    decode_tables,
                    chunks,
                    dense_routes,
                    segments,
                    logits_index,
                    full,
                )
            prompt_entries = (
                _prompt_logprobs(logits[len(samplers) :], prompt_rows) if prompt_rows else []
            )
            logits = logits[: len(samplers)]
            if samplers:
                masks = None
                if pending is not None:
                    masks, grammar_failed = pending.wait()
                generators = [s.generator for s in samplers]
                # A retry must draw the same random numbers the failed attempt drew.
                saved = [(g, g.get_state()) for g in generators if g is not None]
                try:
                    args = (logits, [s.params for s in samplers], generators)
                    contexts = self._contexts(samplers)
                    # Masks only where a row is constrained: other steps make the plain call.
                    if masks is None:
                        sampled = self.sampler(*args, contexts)
                    else:
                        sampled = self.sampler(*args, contexts, masks)
                    token_ids = sampled.token_ids.tolist()
                    lps = _to_list(sampled.logprobs)
                    top_ids = _to_list(sampled.top_ids)
                    top_lps = _to_list(sampled.top_logprobs)
                except BaseException:
                    for g, state in saved:
                        g.set_state(state)
                    raise
        except BaseException:
            if pending is not None:
                # The retry refills these matchers: this fill must have stopped first.
                pending.discard()
            raise
        for seq in plan.decodes:
            seq.num_computed += 1
            self.kv.commit(seq, seq.num_computed)
        for chunk in plan.prefills:
            chunk.seq.num_computed += chunk.num_tokens
            self.kv.commit(chunk.seq, chunk.seq.num_computed)
        for (seq, _), entry in zip(prompt_rows, prompt_entries, strict=True):
            assert seq.prompt_logprobs is not None
            seq.prompt_logprobs.append(entry)
        outputs: list[RequestOutput] = []
        for i, seq in enumerate(samplers):
            if seq.finished:  # aborted while the step ran
                continue
            if grammar_failed and i in grammar_failed:
                # Its mask is meaningless: answering from it could break the grammar.
                outputs.append(
                    self._fail(
                        seq, f"structured output failed: {grammar_failed[i]}", GRAMMAR_FAILED
                    )
                )
                continue
            if token_ids[i] == NON_FINITE:
                # An empty or garbage answer would look like success; the numbers are the
                # adapter's (weights that overflow) or the model's, never the client's.
                outputs.append(
                    self._fail(
                        seq,
                        "the model's output for this request overflowed (NaN or infinite "
                        "logits); its adapter's weights may be too large for the serving dtype",
                        NON_FINITE_LOGITS,
                    )
                )
                continue
            logprob = None
            if seq.params.logprobs is not None and lps is not None:
                k = seq.params.logprobs
                top = tuple(zip(top_ids[i][:k], top_lps[i][:k])) if top_ids else ()
                logprob = TokenLogprob(token_ids[i], lps[i], top)
            try:
                outputs.append(self._append_token(seq, token_ids[i], logprob))
            except Exception as exc:
                logger.exception("post-processing request %s failed", seq.request_id)
                outputs.append(self._fail(seq, f"internal error: {type(exc).__name__}: {exc}"))
        return outputs

    def _forward(
        self,
        ids: list[int],
        positions: list[int],
        decode_tables: list[list[int]],
        chunks: list[tuple[list[int], int, int]],
        dense_routes: list[Route | None],
        segments: list[Segment],
        logits_index: list[int],
        full: FullModuleBatch | None = None,
    ) -> torch.Tensor:
        """The eager forward of any step: decode tokens first, then prefill chunks."""
        dev = self.device
        attn = build_attention_metadata(
            decode_tables, positions[: len(decode_tables)], chunks, self.kv.block_size, dev
        )
        lora = build_lora_batch(
            dense_routes,
            segments,
            device=dev,
            dtype=self.kv_cache.dtype,
            backend=self.lora_backend,
            dora_rows=self.adapters.dora_rows,
        )
        return self.model(
            to_device(ids, torch.long, dev),
            to_device(positions, torch.long, dev),
            attn,
            self.kv_cache,
            lora if lora.active else None,
            to_device(logits_index, torch.long, dev),
            full,
        )

    def _full_module_batch(
        self,
        plan: SchedulerOutput,
        ids: list[int],
        num_samplers: int,
        prompt_rows: list[tuple[Sequence, int]],
    ) -> FullModuleBatch | None:
        """Which of the step's tokens and logits rows use adapters' full modules or token
        rows (the layout `_run` gives them: decodes, then prefill chunks; logits rows of the
        samplers, then of prompt positions)."""
        if not self.adapters.serves_full_modules:
            return None
        spans: list[Span] = []
        for i, seq in enumerate(plan.decodes):
            spans.append(Span(self._resident_full(seq), i, i + 1, i))
        t, row = len(plan.decodes), len(plan.decodes)
        for chunk in plan.prefills:
            seq, n = chunk.seq, chunk.num_tokens
            samples = seq.num_computed + n == seq.num_tokens
            spans.append(Span(self._resident_full(seq), t, t + n, row if samples else None))
            t, row = t + n, row + samples
        for j, (seq, _) in enumerate(prompt_rows):
            # A logits row alone (its token is in the chunk's span above).
            spans.append(Span(self._resident_full(seq), 0, 0, num_samplers + j))
        return build_full_module_batch(spans, ids, self.device)

    def _resident_full(self, seq: Sequence) -> ResidentFullModules | None:
        if seq.route is None or seq.adapter is None:
            return None
        return self.adapters.full_module_weights(seq.adapter.key)

    def _start_masks(self, samplers: list[Sequence]) -> PendingMasks | None:
        """Start filling the grammar masks of the constrained rows among `samplers`."""
        rows = [i for i, s in enumerate(samplers) if s.matcher is not None]
        if not rows:
            return None
        if self._mask_filler is None:
            self._mask_filler = MaskFiller(self.vocab_size, self.device)
        return self._mask_filler.start(rows, [samplers[i].matcher for i in rows])

    def _append_token(
        self, seq: Sequence, token: int, logprob: TokenLogprob | None
    ) -> RequestOutput:
        matcher = seq.matcher
        if matcher is not None and not matcher.accept(token):
            # The mask should have made this impossible; never emit what the grammar
            # refuses, and fail this sequence alone.
            return self._fail(
                seq,
                f"internal error: the grammar refused sampled token {token}: {matcher.error}",
                GRAMMAR_FAILED,
            )
        seq.output_ids.append(token)
        if logprob is not None:
            seq.pending_logprobs.append(logprob)
        new_text = seq.detokenizer.append(token)
        params = seq.params
        reason: FinishReason | None = None
        if (
            not params.ignore_eos and token in self.eos_token_ids
        ) or token in params.stop_token_ids:
            reason = "stop"
        else:
            if params.stop:
                stop_at = seq.stop_checker.check(seq.detokenizer.text, len(new_text))
                if stop_at is not None:
                    seq.stop_at = stop_at
                    reason = "stop"
            if reason is None and matcher is not None and matcher.terminated:
                reason = "stop"  # the output is complete: nothing may follow
            if reason is None and (
                len(seq.output_ids) >= params.max_tokens or seq.num_tokens >= self.max_model_len
            ):
                reason = "length"
        if reason is not None:
            self._finish(seq, reason)
        return self._emit(seq)

    # -- outputs and teardown --------------------------------------------------------------

    def _emit(self, seq: Sequence) -> RequestOutput:
        text = seq.detokenizer.text
        if seq.stop_at is not None:
            end = seq.stop_at
        elif seq.finished:
            end = len(text)
        else:
            # Hold back a possible stop-string prefix until it is decided.
            end = len(text) - seq.stop_checker.holdback() if seq.params.stop else len(text)
        new_text = text[seq.text_emitted : end] if end > seq.text_emitted else ""
        seq.text_emitted = max(seq.text_emitted, end)
        new_ids = seq.output_ids[seq.tokens_emitted :]
        seq.tokens_emitted = len(seq.output_ids)
        logprobs, seq.pending_logprobs = seq.pending_logprobs, []
        prompt_logprobs = None
        if seq.prompt_logprobs is not None and not seq.needs_prompt_logprobs:
            prompt_logprobs, seq.prompt_logprobs = seq.prompt_logprobs, None
        return RequestOutput(
            request_id=seq.request_id,
            text=new_text,
            token_ids=new_ids,
            prompt_tokens=len(seq.prompt_ids),
            completion_tokens=len(seq.output_ids),
            finished=seq.finished,
            finish_reason=seq.finish_reason,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            error=seq.error,
            error_code=seq.error_code,
        )

    def _fail(self, seq: Sequence, message: str, code: str = INTERNAL_ERROR) -> RequestOutput:
        """End `seq` alone with finish_reason "error", even if it had already finished."""
        self._finish(seq, "error")
        seq.finish_reason = "error"
        seq.error, seq.error_code = message, code
        return self._emit(seq)

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        """Take `seq` out of the engine and unpin its adapter. The bookkeeping comes first
        and a failing detokenizer only turns the finish into an error, so a broken request
        cannot leave its row or adapter pin behind."""
        if seq.finished:
            return
        was_running = seq in self.scheduler.running
        self.scheduler.finish(seq)
        if seq.matcher is not None:
            self._num_constrained -= 1
            seq.matcher = None
        seq.finish_reason = reason
        self._requests.pop(seq.request_id, None)
        if was_running and seq.route is not None and seq.adapter is not None:
            self.adapters.release(seq.adapter.key)
        try:
            # Bytes held back as an incomplete character are released at the end.
            seq.detokenizer.flush()
        except Exception as exc:
            logger.exception("detokenizing the end of request %s failed", seq.request_id)
            seq.finish_reason = "error"
            seq.error = f"internal error: {type(exc).__name__}: {exc}"
            seq.error_code = INTERNAL_ERROR

    def _acquire(self, seq: Sequence) -> Route | None:
        assert seq.adapter is not None
        return self.adapters.acquire(seq.adapter)

    def _release(self, seq: Sequence) -> None:
        assert seq.adapter is not None
        self.adapters.release(seq.adapter.key)

    def _identity(self, seq: Sequence) -> str:
        if seq.adapter is None:
            return "base:" + self.base_identity
        return "adapter:" + self.adapters.content_identity(seq.adapter.key)


def _error_code(exc: Exception) -> str:
    """The API error code of a request that failed admission: a domain error keeps its own
    (`model_not_found` for an adapter deleted meanwhile, `invalid_adapter`), so the client
    gets the same status as if it had failed before queueing; anything else is internal."""
    return exc.code if isinstance(exc, AdapterHubError) else INTERNAL_ERROR


def _is_out_of_memory(exc: BaseException) -> bool:
    """An accelerator allocation failure (CUDA raises either form, depending on where)."""
    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc)
    )


def _to_list(t: torch.Tensor | None) -> list | None:
    return t.tolist() if t is not None else None


def _prompt_logprobs(logits: torch.Tensor, rows: list[tuple[Sequence, int]]) -> list[TokenLogprob]:
    """Logprob, rank and top alternatives of each prompt token from its preceding position.

    Args:
        logits: ``[P, V]`` logits of prompt positions, row j for ``rows[j] = (seq, q)``,
            scoring token ``seq.prompt_ids[q + 1]``.
    """
    logp = torch.log_softmax(logits.float(), dim=-1)
    targets = to_device([s.prompt_ids[q + 1] for s, q in rows], torch.long, logp.device)
    chosen = logp.gather(1, targets.unsqueeze(1))
    ranks = ((logp > chosen).sum(dim=1) + 1).tolist()
    k = min(max(s.params.prompt_logprobs or 0 for s, _ in rows), logp.shape[1])
    top_lp, top_ids = logp.topk(k, dim=-1) if k else (None, None)
    top_lps = top_lp.tolist() if top_lp is not None else None
    top_idx = top_ids.tolist() if top_ids is not None else None
    out = []
    for j, ((seq, q), lp) in enumerate(zip(rows, chosen.squeeze(1).tolist(), strict=True)):
        kk = seq.params.prompt_logprobs or 0
        top = tuple(zip(top_idx[j][:kk], top_lps[j][:kk])) if top_idx and top_lps else ()
        out.append(TokenLogprob(seq.prompt_ids[q + 1], lp, top, rank=ranks[j]))
    return out


def _adapter_names(seqs: list[Sequence]) -> list[str]:
    keys = {s.adapter.key for s in seqs if s.adapter is not None and s.adapter.merge is None}
    return sorted({display_name(k) for k in keys})
