"""Structured outputs: grammar-constrained decoding (JSON schema, JSON object, regex,
choice, context-free grammar) with llguidance.

* `spec`: what a request asks for (`GrammarSpec`) and `GrammarError` (HTTP 400);
* `compiler`: `GrammarCompiler` (cached, time-bounded compiles) -> `CompiledGrammar`
  (what `SamplingParams.grammar` holds) -> one `GrammarMatcher` per sequence;
* `bitmask`: a step's masks, filled on a worker thread while the forward runs
  (`MaskFiller`) and applied to the constrained rows of the logits (`mask_logits`).

How the engine uses them: `LLMEngine._run` starts the fill before the forward and joins it
before sampling; a sequence's matcher accepts each token once its step is committed, and a
terminated matcher finishes the sequence with finish_reason "stop".
"""

from adapterhub_server.engine.structured.bitmask import (
    MaskFiller,
    PendingMasks,
    TokenMasks,
    mask_logits,
)
from adapterhub_server.engine.structured.compiler import (
    DEFAULT_CACHE_SIZE,
    DEFAULT_COMPILE_TIMEOUT,
    CompiledGrammar,
    GrammarCompiler,
    GrammarMatcher,
)
from adapterhub_server.engine.structured.spec import (
    GRAMMAR_KINDS,
    GrammarError,
    GrammarKind,
    GrammarSpec,
)

__all__ = [
    "DEFAULT_CACHE_SIZE",
    "DEFAULT_COMPILE_TIMEOUT",
    "GRAMMAR_KINDS",
    "CompiledGrammar",
    "GrammarCompiler",
    "GrammarError",
    "GrammarKind",
    "GrammarMatcher",
    "GrammarSpec",
    "MaskFiller",
    "PendingMasks",
    "TokenMasks",
    "mask_logits",
]
