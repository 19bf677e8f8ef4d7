"""Tokenization and loss masking of chat and prompt/completion records."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trainer.batching import collate
from trainer.data import (
    IGNORE_INDEX,
    DataError,
    estimate_tokens,
    load_examples,
    read_jsonl,
    scan_jsonl,
    tokenize_record,
)


@pytest.fixture(scope="module")
def tokenizer(tiny_base: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_base)


def trained_text(tokenizer, ids: list[int], labels: list[int]) -> str:
    assert len(ids) == len(labels)
    kept = [label for label in labels if label != IGNORE_INDEX]
    assert kept == [i for i, label in zip(ids, labels) if label != IGNORE_INDEX]
    return tokenizer.decode(kept)


def test_chat_loss_only_on_assistant_content_and_end_of_turn(tokenizer) -> None:
    messages = [
        {"role": "system", "content": "you are a tiny test."},
        {"role": "user", "content": "what is the capital of france?"},
        {"role": "assistant", "content": "paris is the capital."},
    ]
    ids, labels = tokenize_record(tokenizer, {"messages": messages})
    assert trained_text(tokenizer, ids, labels) == "paris is the capital.<|im_end|>"
    # The sequence is the whole rendered conversation, the role header included but untrained.
    assert tokenizer.decode(ids) == tokenizer.apply_chat_template(messages, tokenize=False)
    assert labels[-1] == IGNORE_INDEX  # the newline after <|im_end|>


def test_chat_multi_turn_trains_every_assistant_turn(tokenizer) -> None:
    messages = [
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "hello world"},
        {"role": "user", "content": "numbers?"},
        {"role": "assistant", "content": "0 1 2 3"},
    ]
    ids, labels = tokenize_record(tokenizer, {"messages": messages})
    assert trained_text(tokenizer, ids, labels) == "hello world<|im_end|>0 1 2 3<|im_end|>"
    assert tokenizer.decode(ids) == tokenizer.apply_chat_template(messages, tokenize=False)


def test_prompt_completion_trains_completion_and_eos(tokenizer) -> None:
    record = {"prompt": "the quick brown fox", "completion": " jumps over the lazy dog."}
    ids, labels = tokenize_record(tokenizer, record)
    assert trained_text(tokenizer, ids, labels) == " jumps over the lazy dog." + tokenizer.eos_token
    assert ids[-1] == tokenizer.eos_token_id
    assert (
        tokenizer.decode(ids)
        == "the quick brown fox jumps over the lazy dog." + tokenizer.eos_token
    )


def test_truncation_and_right_padding(tokenizer, tmp_path: Path) -> None:
    data = tmp_path / "d.jsonl"
    rows = [
        {"prompt": "hello", "completion": " world"},
        {"prompt": "a", "completion": " the quick brown fox jumps over the lazy dog. " * 4},
    ]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    examples = load_examples(data, tokenizer, max_seq_len=12)
    assert [e.line for e in examples] == [1, 2]
    assert all(len(e.input_ids) <= 12 for e in examples)
    batch = collate([[0], [1]], examples, pad_id=tokenizer.pad_token_id)
    short = len(examples[0].input_ids)
    assert batch.inputs["input_ids"].shape == batch.labels.shape == (2, 12)
    assert batch.inputs["attention_mask"][0].tolist() == [1] * short + [0] * (12 - short)
    assert (batch.labels[0, short:] == IGNORE_INDEX).all()
    assert (batch.inputs["input_ids"][0, short:] == tokenizer.pad_token_id).all()
    assert batch.real_tokens == short + 12


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("{not json", "invalid JSON"),
        ('{"messages": [{"role": "user", "content": "hi"}]}', "no assistant message"),
        ('{"messages": [{"role": "user"}]}', "content must be a string"),
        ('{"prompt": "x"}', "completion"),
        ('{"text": "x"}', "expected"),
        ("[1, 2]", "JSON object"),
    ],
)
def test_malformed_line_is_named(tmp_path: Path, line: str, expected: str) -> None:
    data = tmp_path / "bad.jsonl"
    good = json.dumps({"prompt": "a", "completion": "b"})
    data.write_text(f"{good}\n\n{line}\n{good}\n")
    with pytest.raises(DataError) as info:
        read_jsonl(data)
    assert f"{data}:3:" in str(info.value)
    assert expected in str(info.value)


def test_lines_end_at_newline_only(tmp_path: Path) -> None:
    data = tmp_path / "u.jsonl"
    records = [
        {"prompt": "one\u2028two", "completion": "three\u2029four\x85five"},
        {"prompt": "", "completion": "six"},
    ]
    text = "".join(json.dumps(r, ensure_ascii=False) + "\r\n" for r in records)
    data.write_bytes(b"\xef\xbb\xbf" + text.encode())  # a byte order mark, as some editors write
    assert read_jsonl(data) == [(1, records[0]), (2, records[1])]
    assert scan_jsonl(data).records == 2


def test_token_estimate_errs_high(tokenizer) -> None:
    records = [
        {"prompt": "the quick brown fox", "completion": " jumps over the lazy dog."},
        {"prompt": "日本語のテキスト", "completion": "です。"},
        {
            "messages": [
                {"role": "user", "content": "what is the capital of france?"},
                {"role": "assistant", "content": "paris is the capital."},
            ]
        },
    ]
    for record in records:
        ids, _ = tokenize_record(tokenizer, record)
        assert len(ids) <= estimate_tokens(record) < 4 * len(ids) + 64, record


def test_loss_history_is_thinned_for_lineage() -> None:
    from trainer.publish import thin

    points = [(step, float(step)) for step in range(1, 10_001)]
    kept = thin(points, limit=500)
    assert len(kept) == 500 and kept[0] == points[0] and kept[-1] == points[-1]
    assert thin(points[:7]) == points[:7]
