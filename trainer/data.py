"""Training data: JSONL parsing, tokenization and loss masking.

Each non-blank line is one record, either

- chat: `{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", ...}, ...]}`,
  rendered with the tokenizer's chat template; the loss covers only what the assistant
  produces: each assistant turn's content and its end-of-turn token (`<|im_end|>` / EOS),
  never the role header the template puts before it nor what follows the end-of-turn token;
- prompt/completion: `{"prompt": "...", "completion": "..."}`; the loss covers the completion
  tokens and an EOS appended to them.

The text is tokenized segment by segment (prompt part, assistant part, ...) exactly as it is
at inference, where the prompt ends with the generation header and the model produces the
rest; the segments' token ids are concatenated. Labels are -100 where there is no loss.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from adapterhub_server.errors import InvalidRequestError
from adapterhub_server.file_hash import hash_file

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
"""Label of tokens that carry no loss (PyTorch cross-entropy's default ignore_index)."""


class DataError(InvalidRequestError):
    """The training data cannot be used; the message names the file and line."""

    code = "invalid_value"


@dataclass(frozen=True)
class Example:
    """One tokenized training sequence."""

    input_ids: list[int]
    """Token ids, length <= max_seq_len."""
    labels: list[int]
    """Same length; the token id where the loss applies, IGNORE_INDEX elsewhere."""
    line: int
    """1-based line number in the data file."""

    @property
    def trained_tokens(self) -> int:
        """Tokens the loss covers; the first token is never predicted, so it never counts."""
        return sum(1 for label in self.labels[1:] if label != IGNORE_INDEX)


def sha256_file(path: Path) -> str:
    """Lowercase hex sha256 of the file's bytes."""
    return hash_file(path)[0]


MAX_LINE_BYTES = 16 * 1024**2
"""Longest record line read, in bytes. Far above any context window (a 128k-token record is
about 0.5 MiB), and it bounds the memory one line takes while the file is checked."""
_AVERAGE_BYTES_PER_TOKEN = 4
"""ASCII text runs at about 4 bytes per token in the tokenizers of the supported families."""
_TEMPLATE_TOKENS_PER_RECORD = 32
"""What a chat template or BOS/EOS adds once per record (a default system prompt, say)."""
_TEMPLATE_TOKENS_PER_MESSAGE = 8
"""What a chat template adds around each message (role header, end-of-turn token)."""


@dataclass(frozen=True)
class JsonlStats:
    """What checking a JSONL file learned about it without keeping its records."""

    records: int
    """Non-blank lines, each one checked record."""
    estimated_tokens: int
    """Tokens the records should tokenize to, before truncation (`estimate_tokens`)."""


def iter_jsonl(path: Path, *, name: str | None = None) -> Iterator[tuple[int, dict[str, Any]]]:
    """Parse and check the records one line at a time: yields (line number, record).

    Lines end at `\\n` only (U+2028 and friends are ordinary characters inside a JSON
    string), blank lines are skipped, and each line is parsed with the limits of
    `adapterhub_server.json_limits`. Memory stays bounded by `MAX_LINE_BYTES`, whatever the
    file's size. Messages name the file as `name` (default: its path).

    Raises:
        DataError: naming the first malformed line, or when the file holds no record.
    """
    from adapterhub_server.json_limits import JsonLimitError, parse_json

    path = Path(path)
    label = str(path) if name is None else name
    found = False
    try:
        with open(path, "rb") as handle:
            for number, raw in _lines(handle, label):
                if not raw.strip():
                    continue
                try:
                    record = parse_json(raw)
                except JsonLimitError as exc:
                    raise DataError(
                        f"{label}:{number}: invalid JSON: {exc}", param="data"
                    ) from None
                problem = _check_record(record)
                if problem is not None:
                    raise DataError(f"{label}:{number}: {problem}", param="data")
                found = True
                yield number, record
    except OSError as exc:
        # `strerror` only: the exception's own text repeats the path.
        raise DataError(
            f"{label}: cannot read: {exc.strerror or type(exc).__name__}", param="data"
        ) from None
    if not found:
        raise DataError(f"{label}: no training records", param="data")


def _lines(handle: BinaryIO, label: str) -> Iterator[tuple[int, bytes]]:
    """(line number, line) with its `\\n`; a UTF-8 byte order mark before the first is dropped."""
    number = 0
    while raw := handle.readline(MAX_LINE_BYTES + 1):
        number += 1
        if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
            raise DataError(
                f"{label}:{number}: line longer than {MAX_LINE_BYTES} bytes", param="data"
            )
        yield number, raw.removeprefix(b"\xef\xbb\xbf") if number == 1 else raw


def read_jsonl(path: Path, *, name: str | None = None) -> list[tuple[int, dict[str, Any]]]:
    """Every record of `iter_jsonl`, as a list."""
    return list(iter_jsonl(path, name=name))


def scan_jsonl(path: Path, *, name: str | None = None) -> JsonlStats:
    """Check every record (see `iter_jsonl`) and count them, keeping none in memory."""
    records = tokens = 0
    for _, record in iter_jsonl(path, name=name):
        records += 1
        tokens += estimate_tokens(record)
    return JsonlStats(records=records, estimated_tokens=tokens)


def estimate_tokens(record: dict[str, Any]) -> int:
    """Tokens a checked record should tokenize to, without a tokenizer.

    Errs on the high side: ASCII text at `_AVERAGE_BYTES_PER_TOKEN` bytes a token, every
    other character a token of its own (tokenizers do better on most scripts), plus what a
    chat template adds per message and per record.
    """
    if "messages" in record:
        texts = [m[key] for m in record["messages"] for key in ("role", "content")]
        overhead = _TEMPLATE_TOKENS_PER_MESSAGE * len(record["messages"])
    else:
        texts = [record["prompt"], record["completion"]]
        overhead = 0
    return _TEMPLATE_TOKENS_PER_RECORD + overhead + sum(_text_tokens(text) for text in texts)


def _text_tokens(text: str) -> int:
    ascii_chars = len(text.encode("ascii", "ignore"))
    return -(-ascii_chars // _AVERAGE_BYTES_PER_TOKEN) + (len(text) - ascii_chars)


def _check_record(record: Any) -> str | None:
    """Why the record is malformed, or None."""
    if not isinstance(record, dict):
        return "each line must be a JSON object"
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            return '"messages" must be a non-empty list'
        for i, message in enumerate(messages):
            if not isinstance(message, dict):
                return f"messages[{i}] must be an object with role and content"
            role, content = message.get("role"), message.get("content")
            if not isinstance(role, str) or not role:
                return f"messages[{i}].role must be a non-empty string"
            if not isinstance(content, str):
                return f"messages[{i}].content must be a string"
        if not any(m["role"] == "assistant" for m in messages):
            return "no assistant message: nothing to train on"
        return None
    if "prompt" in record or "completion" in record:
        prompt, completion = record.get("prompt"), record.get("completion")
        if not isinstance(prompt, str):
            return '"prompt" must be a string'
        if not isinstance(completion, str) or not completion:
            return '"completion" must be a non-empty string'
        return None
    return 'expected {"messages": [...]} or {"prompt": ..., "completion": ...}'


# Cached per tokenizer object: `get_vocab()` builds a 49k-entry dict (about 20 ms), and this
# was called once per record, most of the data-loading time.
@functools.lru_cache(maxsize=8)
def end_of_turn_token(tokenizer: Any) -> str | None:
    """The text that closes an assistant turn: `<|im_end|>` when the vocabulary has it, else EOS."""
    vocab = tokenizer.get_vocab()
    if "<|im_end|>" in vocab:
        return "<|im_end|>"
    return tokenizer.eos_token


def chat_segments(tokenizer: Any, messages: Sequence[dict[str, str]]) -> list[tuple[str, bool]]:
    """Split the rendered conversation into (text, trained) segments, in order.

    The prompt is built incrementally: for assistant turn i, the conversation up to i with the
    generation header is the untrained context; what rendering turn i adds beyond it, up to and
    including the end-of-turn token, is trained; the rest (a newline, say) is not.

    Raises:
        ValueError: the chat template does not render conversations as prefixes of each other.
    """
    eot = end_of_turn_token(tokenizer)

    def render(msgs: Sequence[dict[str, str]], generation: bool) -> str:
        return tokenizer.apply_chat_template(
            list(msgs), tokenize=False, add_generation_prompt=generation
        )

    segments: list[tuple[str, bool]] = []
    done = ""  # text already assigned to segments
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = render(messages[:i], True)
        full = render(messages[: i + 1], False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise ValueError(
                "the chat template does not render the conversation incrementally "
                "(an earlier turn renders differently once later turns are added)"
            )
        turn = full[len(prompt) :]
        start = turn.find(message["content"])
        search_from = start + len(message["content"]) if start >= 0 else 0
        stop = turn.find(eot, search_from) if eot else -1
        end = stop + len(eot) if eot and stop >= 0 else len(turn)
        segments.append((prompt[len(done) :], False))
        segments.append((turn[:end], True))
        done = prompt + turn[:end]
    final = render(messages, False)
    if not final.startswith(done):
        raise ValueError("the chat template does not render the conversation incrementally")
    segments.append((final[len(done) :], False))
    return [(text, trained) for text, trained in segments if text]


def tokenize_record(tokenizer: Any, record: dict[str, Any]) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one checked record, untruncated."""
    ids: list[int] = []
    labels: list[int] = []
    if "messages" in record:
        for text, trained in chat_segments(tokenizer, record["messages"]):
            seg = tokenizer(text, add_special_tokens=False)["input_ids"]
            ids.extend(seg)
            labels.extend(seg if trained else [IGNORE_INDEX] * len(seg))
        return ids, labels
    prompt = (
        tokenizer(record["prompt"], add_special_tokens=True)["input_ids"]
        if record["prompt"]
        else []
    )
    completion = tokenizer(record["completion"], add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token to end completions with")
    completion = [*completion, tokenizer.eos_token_id]
    return [*prompt, *completion], [IGNORE_INDEX] * len(prompt) + completion


def load_examples(path: Path, tokenizer: Any, max_seq_len: int) -> list[Example]:
    """Read, check and tokenize the whole file; truncate each sequence to `max_seq_len`.

    Examples left with no trained token after truncation are dropped (with a warning).

    Raises:
        DataError: a malformed line (named), or no usable example.
    """
    examples: list[Example] = []
    dropped: list[int] = []
    for number, record in iter_jsonl(path):
        try:
            ids, labels = tokenize_record(tokenizer, record)
        except Exception as exc:  # template errors come as jinja / ValueError / KeyError
            raise DataError(f"{path}:{number}: cannot tokenize: {exc}", param="data") from None
        example = Example(ids[:max_seq_len], labels[:max_seq_len], number)
        if example.trained_tokens == 0:
            dropped.append(number)
            continue
        examples.append(example)
    if dropped:
        logger.warning(
            "dropped %d record(s) with no trained token within max_seq_len=%d (lines %s)",
            len(dropped),
            max_seq_len,
            ", ".join(map(str, dropped[:10])) + (", ..." if len(dropped) > 10 else ""),
        )
    if not examples:
        raise DataError(
            f"{path}: no record has a trained token within max_seq_len={max_seq_len}",
            param="data",
        )
    return examples
