"""Tests for incremental detokenization and stop-string detection."""

from __future__ import annotations

import random
from typing import Any

import pytest

from adapterhub_server.engine.detokenizer import IncrementalDetokenizer, StopChecker
from tests.tiny_models import build_tokenizer

REAL_TEXTS = [
    "Hello 👋 world! Café, naïve façade — déjà vu.",
    "日本語のテキストと中文文本，한국어도 있어요。",
    "emoji soup: 🇫🇷 👨‍👩‍👧 🏳️‍🌈 👍🏽 🤖🤖🤖",
    "  leading spaces,\ttabs\nand newlines  \n\n end ",
    "the quick brown fox jumps over the lazy dog. paris is the capital.",
    "spaced punctuation . , ! ? it 's , do n't",  # must survive: no tokenization cleanup
    "mixed Ωμέγα Привет мир ∑∫√ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ok",
]


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return build_tokenizer()


def _stream(
    tokenizer: Any, prompt: list[int], ids: list[int], skip_special_tokens: bool
) -> tuple[list[str], str]:
    """Feed `ids` one at a time; return the per-token deltas and the final flush."""
    detok = IncrementalDetokenizer(tokenizer, prompt, skip_special_tokens=skip_special_tokens)
    deltas = [detok.append(t) for t in ids]
    tail = detok.flush()
    assert detok.text == "".join(deltas) + tail
    return deltas, tail


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_random_token_sequences_match_full_decode(
    tokenizer: Any, skip_special_tokens: bool
) -> None:
    rng = random.Random(0)
    vocab = len(tokenizer)
    for _ in range(300):
        prompt = [rng.randrange(vocab) for _ in range(rng.randrange(0, 8))]
        ids = [rng.randrange(vocab) for _ in range(rng.randrange(1, 40))]
        deltas, tail = _stream(tokenizer, prompt, ids, skip_special_tokens)
        expected = tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
        assert "".join(deltas) + tail == expected, (prompt, ids)


@pytest.mark.parametrize("text", REAL_TEXTS)
@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_real_text_with_multibyte_characters(
    tokenizer: Any, text: str, skip_special_tokens: bool
) -> None:
    prompt = tokenizer.encode("what is the capital of france?")
    ids = tokenizer.encode(text)
    deltas, tail = _stream(tokenizer, prompt, ids, skip_special_tokens)
    assert "".join(deltas) == text
    assert tail == ""
    # No half characters ever leak into the stream.
    assert all("\ufffd" not in d for d in deltas)
    if any(ord(c) > 0x7F for c in text):
        # Multi-byte characters span tokens here, so some tokens must have been held back.
        assert "" in deltas


def test_stream_prefixes_never_retract(tokenizer: Any) -> None:
    text = REAL_TEXTS[0] + " " + REAL_TEXTS[2]
    ids = tokenizer.encode(text)
    detok = IncrementalDetokenizer(tokenizer, [])
    for t in ids:
        detok.append(t)
        assert text.startswith(detok.text)
    assert detok.text == text


def test_leading_space_of_first_token_is_kept(tokenizer: Any) -> None:
    prompt = tokenizer.encode("hello")
    ids = tokenizer.encode(" world, this is")
    deltas, _ = _stream(tokenizer, prompt, ids, True)
    assert deltas[0].startswith(" ")
    assert "".join(deltas) == " world, this is"


def test_prompt_ending_inside_a_character(tokenizer: Any) -> None:
    ids = tokenizer.encode("x 世界")
    # Split the prompt inside the bytes of 世: generation starts with continuation bytes,
    # which decode on their own (as tokenizer.decode renders them) to U+FFFD.
    for cut in range(1, len(ids)):
        prompt, gen = ids[:cut], ids[cut:]
        deltas, tail = _stream(tokenizer, prompt, gen, True)
        assert "".join(deltas) + tail == tokenizer.decode(gen)


def test_special_tokens_skipped_or_kept(tokenizer: Any) -> None:
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hello"}], add_generation_prompt=True, tokenize=False
    )
    prompt_ids = tokenizer.encode(prompt)
    answer = "paris is the capital 🗼"
    im_start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    gen = [*tokenizer.encode(answer), tokenizer.eos_token_id, im_start, tokenizer.eos_token_id]

    skipped, _ = _stream(tokenizer, prompt_ids, gen, True)
    assert "".join(skipped) == answer
    assert skipped[-3:] == ["", "", ""]

    kept, _ = _stream(tokenizer, prompt_ids, gen, False)
    assert "".join(kept) == answer + "<|im_end|><|im_start|><|im_end|>"
    assert kept[-1] == "<|im_end|>"


def test_work_per_token_is_bounded(tokenizer: Any) -> None:
    """Every decode call sees a short window, however long the output grows."""

    class CountingTokenizer:
        def __init__(self) -> None:
            self.longest = 0

        def decode(self, ids: list[int], **kwargs: Any) -> str:
            self.longest = max(self.longest, len(ids))
            return tokenizer.decode(ids, **kwargs)

    counting = CountingTokenizer()
    text = " ".join(REAL_TEXTS) * 20
    ids = tokenizer.encode(text)
    assert len(ids) > 2000
    detok = IncrementalDetokenizer(counting, tokenizer.encode("prompt text here"))
    for t in ids:
        detok.append(t)
    assert detok.text == text
    assert counting.longest <= 16


def test_accepts_non_int_token_ids(tokenizer: Any) -> None:
    import torch

    ids = tokenizer.encode("hello world")
    detok = IncrementalDetokenizer(tokenizer, torch.tensor([5, 6]).tolist())
    for t in torch.tensor(ids):
        detok.append(t)  # type: ignore[arg-type]
    assert detok.text == "hello world"


# StopChecker


def _feed(checker: StopChecker, pieces: list[str]) -> tuple[str, int | None]:
    """Stream text pieces, checking after each; return the text and the first match."""
    text = ""
    for piece in pieces:
        text += piece
        hit = checker.check(text, len(piece))
        if hit is not None:
            return text, hit
    return text, None


def test_stop_across_token_boundaries() -> None:
    text, hit = _feed(StopChecker(["STOP"]), ["abc S", "T", "", "OP and more"])
    assert hit == 4 and text[:hit] == "abc "


def test_earliest_of_several_stops_wins() -> None:
    checker = StopChecker(["world", "lo w", "xyz"])
    assert checker.check("hello world", len("hello world")) == 3
    text, hit = _feed(StopChecker(["cd", "bcde"]), ["ab", "cdef"])
    assert hit == 1 and text == "abcdef"


def test_stop_at_very_start() -> None:
    assert StopChecker(["\n\n"]).check("\n\nrest", 6) == 0
    assert _feed(StopChecker(["<"]), ["<", "end>"])[1] == 0


def test_no_false_positive() -> None:
    checker = StopChecker(["stop here", "END"])
    text, hit = _feed(checker, ["stop ", "her", "o? ", "no: stop her", "ENd end"])
    assert hit is None and text.endswith("end")
    assert checker.check("", 0) is None
    assert StopChecker([]).check("anything", 8) is None


def test_only_the_tail_is_searched() -> None:
    # An old match was already reported (or would have been): new text alone does not
    # re-find it, which is what keeps checking O(new text).
    checker = StopChecker(["ab"])
    assert checker.check("ab" + "x" * 10, 3) is None
    assert checker.check("x" * 10 + "a", 1) is None
    assert checker.check("x" * 10 + "ab", 1) == 10
    assert checker.check("x" * 10 + "ab", 0) is None


def test_holdback() -> None:
    assert StopChecker([]).holdback() == 0
    assert StopChecker(["a"]).holdback() == 0
    assert StopChecker(["ab", "abcde", "x"]).holdback() == 4
    with pytest.raises(ValueError):
        StopChecker(["ok", ""])


def test_stop_with_streamed_detokenizer(tokenizer: Any) -> None:
    answer = "paris is the capital 🗼 of france."
    checker = StopChecker(["🗼 of", "capital of"])
    detok = IncrementalDetokenizer(tokenizer, [])
    hit = None
    for t in tokenizer.encode(answer):
        delta = detok.append(t)
        hit = checker.check(detok.text, len(delta))
        if hit is not None:
            break
    assert hit is not None and detok.text[:hit] == "paris is the capital "
