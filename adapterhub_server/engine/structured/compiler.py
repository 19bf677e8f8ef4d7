"""Grammars compiled once per distinct spec, and the per-sequence matchers made from them.

llguidance (chosen over xgrammar by `bench/grammar_engines.py`: it refuses the JSON-schema
keywords it does not implement instead of ignoring them, and compiles in about a
millisecond) builds a matcher from a grammar and the tokenizer; a compiled grammar is such
a matcher at its start state, and each sequence deep-copies it, which shares the compiled
lexer and parser tables and costs microseconds.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

import llguidance
import llguidance.hf

from adapterhub_server.config import EngineConfig
from adapterhub_server.engine.structured.spec import (
    MAX_ERROR_CHARS,
    GrammarError,
    GrammarSpec,
    grammar_text,
)

logger = logging.getLogger(__name__)

DEFAULT_CACHE_SIZE = EngineConfig.grammar_cache_size
DEFAULT_COMPILE_TIMEOUT = EngineConfig.grammar_compile_timeout


class GrammarMatcher:
    """Where one sequence stands in its grammar.

    The engine thread alone advances it (`accept`), and only with tokens of a step that
    has been committed, so a failed and retried step never moves it; the mask worker only
    reads it (`bitmask.MaskFiller`), and never while `accept` runs.
    """

    __slots__ = ("_matcher", "vocab_size")

    def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int) -> None:
        self._matcher = matcher
        self.vocab_size = vocab_size
        """Tokens the bitmask covers (>= the model's vocabulary)."""

    def accept(self, token: int) -> bool:
        """Advance past `token`; False (and the matcher is then in error) if the grammar
        does not allow it here."""
        return self._matcher.consume_token(token)

    @property
    def terminated(self) -> bool:
        """The output is complete and nothing may follow: the sequence is done."""
        return self._matcher.is_stopped() and not self._matcher.is_error()

    @property
    def error(self) -> str | None:
        """Why the matcher cannot go on (a rejected token, a parser limit), else None."""
        if not self._matcher.is_error():
            return None
        return self._matcher.get_error()[:MAX_ERROR_CHARS] or "the grammar matcher failed"


class CompiledGrammar:
    """A grammar compiled for one tokenizer: what `SamplingParams.grammar` holds."""

    __slots__ = ("_start", "spec", "vocab_size")

    def __init__(self, spec: GrammarSpec, start: llguidance.LLMatcher, vocab_size: int) -> None:
        self.spec = spec
        self._start = start
        self.vocab_size = vocab_size
        """Tokens its bitmasks cover: max(model vocabulary, tokenizer length)."""

    def matcher(self) -> GrammarMatcher:
        """A fresh matcher at the start of the grammar, for one sequence."""
        return GrammarMatcher(self._start.deep_copy(), self.vocab_size)

    def __repr__(self) -> str:
        return f"CompiledGrammar({self.spec.kind}, {len(self.spec.value)} chars)"


class GrammarCompiler:
    """Compiles `GrammarSpec`s for one model's tokenizer, with a bounded LRU cache.

    Thread-safe: the API compiles from worker threads while the engine runs. Compiles of
    one spec in flight at once are shared (the second caller waits on the first). A compile
    cannot be interrupted; past `timeout` its caller gets a `GrammarError` while it
    finishes on the compile pool (and is cached, so a retry is instant). llguidance's own
    fuel limits bound how long any compile can take.
    """

    def __init__(
        self,
        tokenizer: Any,
        *,
        vocab_size: int,
        eos_token_ids: Iterable[int],
        cache_size: int = DEFAULT_CACHE_SIZE,
        max_workers: int = 2,
    ) -> None:
        """
        Args:
            tokenizer: the model's Hugging Face fast tokenizer.
            vocab_size: the model's vocabulary (logits width), which may exceed the
                tokenizer's; masks cover max(vocab_size, len(tokenizer)) tokens, and the
                ids no tokenizer entry decodes to are never allowed.
            eos_token_ids: the tokens that end a sequence; the grammar allows them exactly
                where the output is complete.
            cache_size: compiled grammars kept (least recently used dropped); 0: none.
            max_workers: compiles that run at once.
        """
        if cache_size < 0:
            raise ValueError("cache_size must be >= 0")
        self.vocab_size = max(vocab_size, len(tokenizer))
        eos = sorted(set(eos_token_ids))
        if not eos:
            raise ValueError("structured outputs need the model's EOS token id")
        self._tokenizer = llguidance.hf.from_tokenizer(
            tokenizer, n_vocab=self.vocab_size, eos_token=eos
        )
        # Terse errors: the verbose ones dump parser state and the whole grammar.
        self._limits = llguidance.LLParserLimits(verbose_errors=False)
        self.cache_size = cache_size
        self._cache: OrderedDict[GrammarSpec, CompiledGrammar] = OrderedDict()
        self._inflight: dict[GrammarSpec, Future[CompiledGrammar]] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers, thread_name_prefix="grammar-compile")
        self.compiles = 0
        """Compiles started (cache misses), since start."""

    def __len__(self) -> int:
        return len(self._cache)

    def compile(self, spec: GrammarSpec, timeout: float) -> CompiledGrammar:
        """The compiled grammar of `spec`, from the cache or compiled now.

        Blocks the calling thread for at most about `timeout` seconds. Raises
        `GrammarError` for an invalid or unsupported spec (the message names what), or when
        compiling takes longer than `timeout`.
        """
        with self._lock:
            hit = self._cache.get(spec)
            if hit is not None:
                self._cache.move_to_end(spec)
                return hit
            future = self._inflight.get(spec)
            started = future is None
            if future is None:
                future = self._pool.submit(self._build, spec)
                self._inflight[spec] = future
                self.compiles += 1
        if started:
            # Outside the lock: the callback runs at once, here, if the compile is done.
            future.add_done_callback(lambda f, s=spec: self._settle(s, f))
        try:
            return future.result(timeout=timeout)
        except FutureTimeout:
            raise GrammarError(
                f"compiling the {spec.label} took longer than {timeout:g} s; simplify it"
            ) from None

    def _build(self, spec: GrammarSpec) -> CompiledGrammar:
        grammar = grammar_text(spec)
        # Builds the lexer and parser tables; llguidance drops the GIL meanwhile.
        start = llguidance.LLMatcher(self._tokenizer, grammar, log_level=0, limits=self._limits)
        if start.is_error():
            detail = start.get_error().strip()[:MAX_ERROR_CHARS]
            raise GrammarError(f"invalid or unsupported {spec.label}: {detail}")
        return CompiledGrammar(spec, start, self.vocab_size)

    def _settle(self, spec: GrammarSpec, future: Future[CompiledGrammar]) -> None:
        with self._lock:
            self._inflight.pop(spec, None)
            if future.cancelled() or future.exception() is not None or not self.cache_size:
                return
            self._cache[spec] = future.result()
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)

    def close(self) -> None:
        """Stop taking compiles; running ones finish in the background."""
        self._pool.shutdown(wait=False, cancel_futures=True)
