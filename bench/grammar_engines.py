"""xgrammar vs llguidance on this CPU, with the default model's real tokenizer.

Measures, side by side in one run (medians over `--repeats`):

  (a) compile time of four grammars: a JSON schema (enums, nested objects, an array,
      ``additionalProperties: false``), generic ``json_object``, a regex, a choice list;
      both engines' own caches off, so every repeat compiles from scratch;
  (b) per-step bitmask fill time for a batch of 8 constrained sequences while they advance
      through valid outputs (each row accepts its own tokenized answer, then EOS), plus the
      cost of accepting the step's tokens; the batch also runs mixed (two rows per grammar);
  (c) what each engine does with JSON-schema keywords it may not implement: a clear error,
      or silently ignoring the keyword (then outputs can violate the schema);
  (d) whether compiling releases the GIL (the server compiles on a worker thread while the
      event loop and the engine thread must keep running).

Decision: llguidance. Measured here (SmolLM2 tokenizer, 49152 tokens, 2 shared cores;
``bench/results/grammar_engines_cpu.json``):

* compile: llguidance 0.5-1.2 ms for every grammar; xgrammar 4-16 ms (it precomputes
  per-state token masks), except a choice list (0.3 ms vs 1.2 ms);
* mask fill, batch of 8, per step: the same order for both, 0.06-0.4 ms (noisy on this
  shared machine); either is far below a decode step (~70 ms for 16 sequences);
* both release the GIL while compiling;
* what decides it, unsupported keywords: of 11 probed JSON-schema keywords xgrammar 0.2.9
  silently ignores 7 (``not``, ``if``/``then``/``else``, ``dependentSchemas``,
  ``dependentRequired``, ``uniqueItems``, ``contains``, ``unevaluatedProperties``: a
  "strict" request could get JSON that does not validate) and refuses valid instances of
  an 8th (``patternProperties``); llguidance refuses each keyword it does not implement
  with a message naming it ("Unimplemented keys: [\"not\"]"), which becomes a 400, and
  enforces the rest.

xgrammar's remaining edge, its mask-apply kernels, is replaced by a ``[R, V]`` unpack and
add (``engine/structured/bitmask.py``) that costs well under 1 ms a step.

    .venv/bin/python -m bench.grammar_engines            # default model's tokenizer
    .venv/bin/python -m bench.grammar_engines --smoke    # fewer repeats, seconds
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bench.timing import machine_info

RESULTS = Path(__file__).parent / "results"
BATCH = 8

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "kind": {"enum": ["cat", "dog", "bird"]},
        "age": {"type": "integer", "minimum": 0, "maximum": 200},
        "owner": {
            "type": "object",
            "properties": {"id": {"type": "integer"}, "email": {"type": "string"}},
            "required": ["id", "email"],
            "additionalProperties": False,
        },
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
        "vaccinated": {"type": "boolean"},
    },
    "required": ["name", "kind", "owner", "tags"],
    "additionalProperties": False,
}
REGEX = r"[A-Z][a-z]{2,10} (Street|Road|Avenue) [0-9]{1,4}"
CHOICES = ["positive", "negative", "neutral", "mixed feelings"]

VALID: dict[str, list[str]] = {
    "json_schema": [
        '{"name": "Rex", "kind": "dog", "owner": {"id": 7, "email": "a@b.c"}, "tags": []}',
        '{"name":"Tweety","kind":"bird","age":3,"owner":{"id":1,"email":"x@y.z"},'
        '"tags":["small","yellow"],"vaccinated":true}',
        '{"name": "Garfield", "kind": "cat", "age": 45, "owner": {"id": 12345, "email": '
        '"jon@arbuckle.com"}, "tags": ["lazy", "lasagna", "orange"]}',
    ],
    "json_object": [
        '{"a": 1}',
        '{"answer": [1, 2.5, "three", null, true], "nested": {"k": {"v": []}}}',
        '{"text": "hello, world", "count": 42}',
    ],
    "regex": ["Main Street 12", "Abbey Road 3", "Penny Avenue 2024"],
    "choice": CHOICES,
}

# Keywords either engine might not implement, each with an instance that satisfies the
# schema and one that breaks the keyword (None: the schema itself is invalid). A schema
# that compiles is "enforced" when the grammar takes the first and refuses the second.
KEYWORD_PROBES: dict[str, tuple[dict[str, Any], tuple[str, str] | None]] = {
    "not": (
        {"type": "object", "properties": {"a": {"not": {"type": "string"}}}},
        ('{"a": 1}', '{"a": "x"}'),
    ),
    "if/then/else": (
        {
            "type": "object",
            "properties": {"a": {"type": "integer"}},
            "if": {"properties": {"a": {"const": 1}}},
            "then": {"required": ["b"]},
            "else": {"required": ["c"]},
        },
        ('{"a": 1, "b": 0}', '{"a": 1}'),
    ),
    "dependentSchemas": (
        {
            "type": "object",
            "properties": {"a": {"type": "integer"}},
            "dependentSchemas": {"a": {"required": ["b"]}},
        },
        ('{"a": 1, "b": 0}', '{"a": 1}'),
    ),
    "dependentRequired": (
        {"type": "object", "dependentRequired": {"a": ["b"]}},
        ('{"a": 1, "b": 2}', '{"a": 1}'),
    ),
    "uniqueItems": (
        {"type": "array", "items": {"type": "integer"}, "uniqueItems": True},
        ("[1, 2]", "[1, 1]"),
    ),
    "contains": ({"type": "array", "contains": {"type": "integer"}}, ('["x", 1]', '["x"]')),
    "multipleOf": ({"type": "integer", "multipleOf": 3}, ("6", "4")),
    "patternProperties": (
        {"type": "object", "patternProperties": {"^x": {"type": "integer"}}},
        ('{"x1": 5}', '{"x1": "s"}'),
    ),
    "propertyNames": (
        {"type": "object", "propertyNames": {"pattern": "^[a-z]+$"}},
        ('{"ab": 1}', '{"A1": 1}'),
    ),
    "unevaluatedProperties": (
        {
            "type": "object",
            "properties": {"a": {"type": "integer"}},
            "unevaluatedProperties": False,
        },
        ('{"a": 1}', '{"a": 1, "b": 2}'),
    ),
    "format: email": ({"type": "string", "format": "email"}, ('"a@b.co"', '"not an email"')),
    "dangling $ref": ({"$ref": "#/$defs/missing"}, None),
    "unknown type": ({"type": "tensor"}, None),
}


def _median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples) * 1e3


def _choice_lark(choices: list[str]) -> str:
    return "start: " + " | ".join(json.dumps(c) for c in choices)


def _choice_ebnf(choices: list[str]) -> str:
    return "root ::= " + " | ".join(json.dumps(c) for c in choices)


class XGrammar:
    name = "xgrammar"

    def __init__(self, tokenizer: Any, vocab: int, eos: list[int]) -> None:
        import xgrammar as xgr

        self.xgr = xgr
        t0 = time.perf_counter()
        self.info = xgr.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=vocab, stop_token_ids=eos
        )
        self.setup_ms = (time.perf_counter() - t0) * 1e3
        self.vocab = vocab

    def compiler(self) -> Any:
        # A fresh compiler without its cache: every call compiles from scratch.
        return self.xgr.GrammarCompiler(self.info, cache_enabled=False, max_threads=2)

    def compile(self, kind: str, value: Any) -> Any:
        c = self.compiler()
        if kind == "json_schema":
            # strict_mode off: JSON Schema's own defaults (extra properties allowed unless
            # the schema says otherwise), as llguidance and the validators read a schema.
            return c.compile_json_schema(json.dumps(value), strict_mode=False)
        if kind == "json_object":
            # As llguidance gets it (its builtin JSON grammar takes any JSON value).
            return c.compile_json_schema('{"type": "object"}', strict_mode=False)
        if kind == "regex":
            return c.compile_regex(value)
        return c.compile_grammar(_choice_ebnf(value))

    def matchers(self, compiled: list[Any]) -> list[Any]:
        return [self.xgr.GrammarMatcher(g) for g in compiled]

    def bitmask(self) -> np.ndarray:
        return np.full((BATCH, (self.vocab + 31) // 32), -1, dtype=np.int32)

    def fill(self, batch: Any, matchers: list[Any], rows: list[int], mask: np.ndarray) -> None:
        batch.batch_fill_next_token_bitmask([matchers[i] for i in rows], mask, indices=rows)

    def accept(self, matcher: Any, token: int) -> bool:
        return matcher.accept_token(token)

    def done(self, matcher: Any) -> bool:
        return matcher.is_terminated()

    def batch(self) -> Any:
        return self.xgr.BatchGrammarMatcher(max_threads=2)


class LLGuidance:
    name = "llguidance"

    def __init__(self, tokenizer: Any, vocab: int, eos: list[int]) -> None:
        import llguidance
        import llguidance.hf

        self.llg = llguidance
        t0 = time.perf_counter()
        self.tok = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab, eos_token=eos)
        self.setup_ms = (time.perf_counter() - t0) * 1e3
        self.vocab = vocab
        self.executor = llguidance.LLExecutor(num_threads=2)

    def grammar(self, kind: str, value: Any) -> str:
        m = self.llg.LLMatcher
        if kind == "json_schema":
            return m.grammar_from_json_schema(json.dumps(value))
        if kind == "json_object":
            return m.grammar_from_json_schema('{"type": "object"}')
        if kind == "regex":
            return m.grammar_from_regex(value)
        return m.grammar_from_lark(_choice_lark(value))

    def compile(self, kind: str, value: Any) -> Any:
        # The compiled form is a matcher at its start state; sequences deep-copy it.
        matcher = self.llg.LLMatcher(self.tok, self.grammar(kind, value), log_level=0)
        if matcher.is_error():
            raise ValueError(matcher.get_error())
        return matcher

    def matchers(self, compiled: list[Any]) -> list[Any]:
        return [g.deep_copy() for g in compiled]

    def bitmask(self) -> np.ndarray:
        return np.full((BATCH, (self.vocab + 31) // 32), -1, dtype=np.int32)

    def fill(self, batch: Any, matchers: list[Any], rows: list[int], mask: np.ndarray) -> None:
        self.executor.unsafe_compute_mask_ptr(
            [(matchers[i], i) for i in rows], mask.ctypes.data, mask.shape[1] * 4, BATCH
        )

    def accept(self, matcher: Any, token: int) -> bool:
        return matcher.consume_token(token)

    def done(self, matcher: Any) -> bool:
        return matcher.is_stopped()

    def batch(self) -> None:
        return None


def _probe(
    engine: XGrammar | LLGuidance,
    schema: dict[str, Any],
    instances: tuple[list[int], list[int]] | None,
) -> str:
    """How `engine` treats `schema`: its error, or what it does with a (valid, violating)
    pair of instances (tokens, EOS last)."""
    try:
        compiled = engine.compile("json_schema", schema)
    except Exception as exc:  # what the engine reports is the finding
        lines = str(exc).strip().splitlines() or [type(exc).__name__]
        return "error: " + lines[-1][:160]
    if instances is None:
        return "compiled an invalid schema"

    def takes(tokens: list[int]) -> bool:
        matcher = engine.matchers([compiled])[0]
        return all(engine.accept(matcher, t) for t in tokens) and engine.done(matcher)

    valid, violating = instances
    if not takes(valid):
        return "WRONG: refuses a valid instance"
    if takes(violating):
        return "IGNORED: compiles, and lets a violating instance through"
    return "enforced"


def _gil_free_share(compile_once: Callable[[], object]) -> float:
    """Fraction of its usual speed a pure-Python loop on the main thread keeps while
    `compile_once` runs (repeatedly, for about 0.3 s) on another thread: ~1 when compiling
    releases the GIL, ~0 when it holds it."""

    def spin(seconds: float) -> float:
        n, end = 0, time.perf_counter() + seconds
        while time.perf_counter() < end:
            n += 1
        return n / seconds

    alone = spin(0.2)
    stop = threading.Event()

    def work() -> None:
        while not stop.is_set():
            compile_once()

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    time.sleep(0.01)
    beside = spin(0.3)
    stop.set()
    thread.join()
    return round(beside / alone, 2)


def _mask_steps(
    engine: XGrammar | LLGuidance, compiled: list[Any], tokens: list[list[int]], repeats: int
) -> dict[str, float]:
    """Advance BATCH matchers through `tokens` (one list per row); time each step's batched
    mask fill and the step's accepts."""
    fill_us: list[float] = []
    accept_us: list[float] = []
    rejected = 0
    batch = engine.batch()
    mask = engine.bitmask()
    for _ in range(repeats):
        matchers = engine.matchers(compiled)
        step = 0
        while True:
            rows = [i for i in range(BATCH) if step < len(tokens[i])]
            if not rows:
                break
            t0 = time.perf_counter()
            engine.fill(batch, matchers, rows, mask)
            t1 = time.perf_counter()
            for i in rows:
                token = tokens[i][step]
                allowed = (mask[i, token // 32] >> (token % 32)) & 1
                ok = engine.accept(matchers[i], token)
                rejected += int(not (ok and allowed))
            t2 = time.perf_counter()
            fill_us.append((t1 - t0) * 1e6)
            accept_us.append((t2 - t1) * 1e6)
            step += 1
        if any(not engine.done(m) for m in matchers):
            rejected += 1
    return {
        "fill_us_median": round(statistics.median(fill_us), 1),
        "fill_us_p90": round(sorted(fill_us)[int(0.9 * len(fill_us))], 1),
        "accept_us_median": round(statistics.median(accept_us), 1),
        "steps": max(len(t) for t in tokens),
        "rejected_or_unfinished": rejected,
    }


CASES: dict[str, Any] = {
    "json_schema": SCHEMA,
    "json_object": None,
    "regex": REGEX,
    "choice": CHOICES,
}


def _measure(
    engine: XGrammar | LLGuidance,
    answers: dict[str, list[list[int]]],
    encode: Callable[[str], list[int]],
    repeats: int,
    *,
    gil: bool,
) -> dict[str, Any]:
    r: dict[str, Any] = {"tokenizer_setup_ms": round(engine.setup_ms, 1)}
    r["compile_ms"] = {
        kind: round(_median_ms(lambda k=kind, v=value: engine.compile(k, v), repeats), 2)
        for kind, value in CASES.items()
    }
    compiled = {kind: engine.compile(kind, value) for kind, value in CASES.items()}
    r["mask_batch8"] = {}
    for kind in CASES:
        rows = [answers[kind][i % len(answers[kind])] for i in range(BATCH)]
        r["mask_batch8"][kind] = _mask_steps(engine, [compiled[kind]] * BATCH, rows, repeats)
    kinds = list(CASES)
    mixed = [kinds[i % len(kinds)] for i in range(BATCH)]
    r["mask_batch8"]["mixed"] = _mask_steps(
        engine,
        [compiled[k] for k in mixed],
        [answers[k][i % len(answers[k])] for i, k in enumerate(mixed)],
        repeats,
    )
    r["unsupported_keywords"] = {
        k: _probe(engine, schema, None if pair is None else (encode(pair[0]), encode(pair[1])))
        for k, (schema, pair) in KEYWORD_PROBES.items()
    }
    if gil:
        r["gil_free_share_while_compiling_schema"] = _gil_free_share(
            lambda: engine.compile("json_schema", SCHEMA)
        )
    return r


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--smoke", action="store_true", help="2 repeats, no GIL probe")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.smoke:
        args.repeats = 2

    import torch
    from transformers import AutoConfig, AutoTokenizer

    from adapterhub_server.base_model import resolve_base_model

    torch.set_num_threads(2)
    base = resolve_base_model(None)
    tokenizer = AutoTokenizer.from_pretrained(base.path)
    vocab = AutoConfig.from_pretrained(base.path).vocab_size
    eos = [tokenizer.eos_token_id]
    engines = [XGrammar(tokenizer, vocab, eos), LLGuidance(tokenizer, vocab, eos)]

    def encode(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False) + eos

    answers = {kind: [encode(t) for t in texts] for kind, texts in VALID.items()}

    results = {
        e.name: _measure(e, answers, encode, args.repeats, gil=not args.smoke) for e in engines
    }

    print(f"{'':28s} {'xgrammar':>12s} {'llguidance':>12s}")
    x, g = results["xgrammar"], results["llguidance"]
    for kind in CASES:
        print(f"compile {kind:20s} {x['compile_ms'][kind]:10.2f}ms {g['compile_ms'][kind]:10.2f}ms")
    for kind in x["mask_batch8"]:
        a, b = x["mask_batch8"][kind], g["mask_batch8"][kind]
        print(
            f"fill b8 {kind:20s} {a['fill_us_median']:10.1f}us {b['fill_us_median']:10.1f}us"
            f"   accept {a['accept_us_median']:.1f} / {b['accept_us_median']:.1f} us"
        )
    for kw in KEYWORD_PROBES:
        print(
            f"{kw:22s} xgrammar: {x['unsupported_keywords'][kw][:50]:50s} "
            f"llguidance: {g['unsupported_keywords'][kw][:60]}"
        )
    if "gil_free_share_while_compiling_schema" in x:
        print(
            "GIL-free share while compiling:",
            x["gil_free_share_while_compiling_schema"],
            g["gil_free_share_while_compiling_schema"],
        )

    import llguidance
    import xgrammar

    meta = {
        **machine_info(),
        "tokenizer": base.model_id,
        "vocab": vocab,
        "batch": BATCH,
        "repeats": args.repeats,
        "xgrammar": getattr(xgrammar, "__version__", None) or _dist_version("xgrammar"),
        "llguidance": llguidance.__version__,
        "note": "medians; compile with caches off; fill = one batched call per step",
    }
    out = args.out or RESULTS / (
        "grammar_engines_smoke.json" if args.smoke else "grammar_engines_cpu.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    print(f"wrote {out}")


def _dist_version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


if __name__ == "__main__":
    main()
