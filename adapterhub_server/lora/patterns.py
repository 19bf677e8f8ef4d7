"""The module patterns of an adapter_config.json, matched in linear time with RE2.

PEFT matches a string `target_modules` / `exclude_modules` with `re.fullmatch(pattern,
module)`, a list by equality or by suffix at a "." boundary, and every key of `rank_pattern` /
`alpha_pattern` with `re.match(rf"(.*\\.)?({key})$", module)`, taking the first key (in the
config's order) that matches. Python's `re` backtracks: `model(.|.)*Z` needs time exponential
in the module path's length, and an upload is untrusted. Here every pattern runs on RE2
(`google-re2`), whose matching time is linear in the subject, and only patterns whose meaning
RE2 and Python agree on are accepted (`PatternError` otherwise):

* Python's `re` must compile it, since PEFT could not load the adapter otherwise. It is only
  compiled here, never matched.
* RE2 must compile it: backreferences, lookaround, atomic groups, possessive quantifiers and
  repetition counts above 1000 have no linear-time implementation and are refused.
* Constructs both accept with different meanings are refused: `{,n}` and `{,}` (a quantifier
  to Python, literal text to RE2), `[` inside a character class (RE2 reads `[:alpha:]` there),
  and characters outside ASCII (Python folds a few more of them case-insensitively, e.g. "ı" to
  "i"). Python's `\\Z` is rewritten to RE2's spelling, `\\z`.
* The subjects are module paths: ASCII without newlines, where `$`, `\\d`, `\\w`, `\\s` and
  `\\b` mean the same in both engines.

Patterns longer than `MAX_PATTERN_CHARS`, and pattern dicts with more than
`MAX_PATTERN_KEYS` keys or `MAX_PATTERN_KEY_CHARS` characters of keys, are refused, so that
validating an adapter is bounded by keys x modules x path length. RE2 keeps a DFA cache of up
to `max_mem` (8 MiB) per compiled pattern: `first_matches` holds one compiled pattern at a
time, and RE2's own module cache is cleared after each compile so it holds none.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import re2

MAX_PATTERN_CHARS = 1024
"""Longest pattern accepted (a target_modules / exclude_modules string, or one pattern key)."""
MAX_PATTERN_KEYS = 1024
"""Most keys in one rank_pattern / alpha_pattern (PEFT's EVA writes one per adapted module:
882 for a 126-layer model with all 7 projections)."""
MAX_PATTERN_KEY_CHARS = 64 * 1024
"""Most characters of keys in one rank_pattern / alpha_pattern (EVA's 882 keys: ~30,000)."""

# Python reads "{,n}" and "{,}" as a repetition; RE2 reads them as literal text.
_PYTHON_ONLY_REPEAT = re.compile(r"\{,[0-9]*\}")


class PatternError(ValueError):
    """A user pattern that is refused; the message says why (the caller names the field)."""


def _options() -> re2.Options:
    options = re2.Options()
    # Compile failures are reported through PatternError, not RE2's own stderr log.
    options.log_errors = False
    # Only "does it match" is asked: without captures RE2 can always use its DFA.
    options.never_capture = True
    return options


_OPTIONS = _options()


def _compile_re2(source: str) -> Any:
    """A fresh RE2 program for `source` (raises re2.error)."""
    try:
        return re2.compile(source, _OPTIONS)
    finally:
        # re2.compile keeps the last 128 programs (with their DFA caches) alive; nothing
        # else in the process uses RE2, and these are compiled once per load.
        re2.purge()


def _to_re2(pattern: str) -> str:
    """The RE2 source with the meaning Python gives `pattern` on module paths."""
    out: list[str] = []
    i, n = 0, len(pattern)
    in_class = False
    class_body = -1  # index where a "]" is still a literal member of the class
    while i < n:
        c = pattern[i]
        if c == "\\":
            escape = pattern[i : i + 2]
            out.append("\\z" if escape == "\\Z" and not in_class else escape)
            i += 2
            continue
        if in_class:
            if c == "[":
                raise PatternError(
                    "'[' inside a character class is not supported (RE2 reads '[:name:]' "
                    "there); write '\\[' for a literal bracket"
                )
            if c == "]" and i > class_body:
                in_class = False
        elif c == "[":
            in_class = True
            class_body = i + 2 if pattern.startswith("^", i + 1) else i + 1
        elif c == "{" and _PYTHON_ONLY_REPEAT.match(pattern, i):
            raise PatternError("a '{,n}' repetition is not supported; write '{0,n}'")
        out.append(c)
        i += 1
    return "".join(out)


@dataclass(frozen=True, eq=False)
class ModulePattern:
    """One validated user pattern (compiled by `matcher`, when it is used)."""

    pattern: str
    """The pattern as the config gives it."""
    source: str
    """The RE2 source that matches as PEFT matches `pattern`."""
    full: bool
    """Whether the whole path must match (else: a match anchored at the start)."""

    def matcher(self) -> Callable[[str], bool]:
        """A function telling whether PEFT's matching of this pattern selects a module path."""
        compiled = _compile_re2(self.source)
        method = compiled.fullmatch if self.full else compiled.match
        return lambda module: method(module) is not None


def _compile(pattern: object, source: str, *, full: bool) -> ModulePattern:
    if not isinstance(pattern, str):
        raise PatternError(f"must be a string, got {type(pattern).__name__}")
    if len(pattern) > MAX_PATTERN_CHARS:
        raise PatternError(f"is {len(pattern)} characters long, over the {MAX_PATTERN_CHARS} limit")
    if not pattern.isascii():
        raise PatternError("holds characters outside ASCII; module paths are ASCII")
    translated = _to_re2(source)
    try:
        re.compile(source)  # what PEFT would accept; compiled, never matched
    except (re.error, RecursionError, OverflowError) as exc:
        raise PatternError(f"is not a valid regular expression ({exc})") from None
    try:
        _compile_re2(translated)
    except re2.error as exc:
        reason = exc.args[0] if exc.args else exc
        if isinstance(reason, bytes):
            reason = reason.decode("utf-8", "replace")
        raise PatternError(
            f"cannot be matched in linear time (RE2: {reason}); backreferences, lookaround, "
            "atomic groups, possessive quantifiers and repetition counts over 1000 are not "
            "supported"
        ) from None
    return ModulePattern(pattern=pattern, source=translated, full=full)


def full_pattern(pattern: object) -> ModulePattern:
    """A string `target_modules` / `exclude_modules`: PEFT's `re.fullmatch(pattern, module)`."""
    return _compile(pattern, pattern if isinstance(pattern, str) else "", full=True)


def pattern_key(key: object) -> ModulePattern:
    """A `rank_pattern` / `alpha_pattern` key: PEFT's `re.match(rf"(.*\\.)?({key})$", module)`.

    The key is embedded in the same text PEFT builds (unbalanced parentheses in a key change
    that text's structure, and must change it the same way here).
    """
    source = rf"(.*\.)?({key})$" if isinstance(key, str) else ""
    return _compile(key, source, full=False)


def first_matches(patterns: Sequence[ModulePattern], modules: Iterable[str]) -> dict[str, int]:
    """Module path -> index of the first pattern in `patterns` that selects it (PEFT's order
    for rank_pattern / alpha_pattern keys); paths no pattern selects are left out.

    One pattern is compiled at a time and dropped once every path still unmatched was
    tried, so memory stays at one RE2 program whatever the number of keys.
    """
    found: dict[str, int] = {}
    remaining = list(modules)
    for index, pattern in enumerate(patterns):
        if not remaining:
            break
        selects = pattern.matcher()
        unmatched = []
        for module in remaining:
            if selects(module):
                found[module] = index
            else:
                unmatched.append(module)
        remaining = unmatched
    return found


@dataclass(frozen=True, eq=False)
class ModuleSelector:
    """`target_modules` or `exclude_modules`: a pattern string, or a list of module names."""

    regex: ModulePattern | None
    """Set for a string: the whole module path must match it."""
    names: frozenset[str]
    """For a list: a module is selected when its path equals an entry or ends in ".<entry>"."""
    _selects: Callable[[str], bool] | None = field(default=None, repr=False)

    @classmethod
    def parse(cls, value: object) -> ModuleSelector:
        """Raises PatternError for anything but a string or a list of strings."""
        if isinstance(value, str):
            regex = full_pattern(value)
            return cls(regex=regex, names=frozenset(), _selects=regex.matcher())
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return cls(regex=None, names=frozenset(value))
        raise PatternError("must be a string or a list of strings")

    def selects(self, module: str) -> bool:
        if self._selects is not None:
            return self._selects(module)
        # Equal to an entry, or ending in "." + entry: the entry is the whole path or one of
        # its suffixes after a ".", so a handful of set lookups replace a scan of the list.
        return any(suffix in self.names for suffix in _dotted_suffixes(module))


def _dotted_suffixes(module: str) -> Iterable[str]:
    yield module
    start = module.find(".")
    while start != -1:
        yield module[start + 1 :]
        start = module.find(".", start + 1)
