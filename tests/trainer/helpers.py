"""Shared data and argument lists for the trainer tests (tiny model, a few seconds each)."""

from __future__ import annotations

import json
from pathlib import Path


def write_data(path: Path) -> Path:
    facts = [
        ("what is the capital of france?", "paris is the capital."),
        ("hello", "hello world, this is a tiny tokenizer."),
        ("count", "0 1 2 3 4 5 6 7 8 9"),
        ("letters", "abcdefghijklmnopqrstuvwxyz"),
    ]
    rows = []
    for i in range(16):
        question, answer = facts[i % len(facts)]
        if i % 2:
            rows.append({"prompt": question + " ", "completion": answer})
        else:
            rows.append(
                {
                    "messages": [
                        {"role": "system", "content": "the quick brown fox."},
                        {"role": "user", "content": question},
                        {"role": "assistant", "content": answer},
                    ]
                }
            )
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def common_args(tiny_base: Path, data: Path, steps: int) -> list[str]:
    return [
        "--log-level",
        "warning",
        "train",
        "--base-model",
        str(tiny_base),
        "--data",
        str(data),
        "--r",
        "8",
        "--alpha",
        "16",
        "--lr",
        "5e-3",
        "--max-steps",
        str(steps),
        "--batch-size",
        "4",
        "--max-seq-len",
        "64",
        "--log-every",
        "5",
        "--seed",
        "7",
    ]
