"""Micro-batch plans and collation: determinism, rank sharding, no attention across examples."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from trainer.batching import BatchPlan, collate, pack_rows
from trainer.data import IGNORE_INDEX, Example


def make_examples(lengths: list[int], seed: int = 0) -> list[Example]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(3, 300, (n,), generator=g).tolist()
        labels = [IGNORE_INDEX] * (n // 2) + ids[n // 2 :]
        out.append(Example(ids, labels, len(out) + 1))
    return out


def plan(lengths: list[int], **kw: object) -> BatchPlan:
    args: dict[str, object] = {
        "batching": "padded",
        "batch_size": 3,
        "grad_accum": 1,
        "max_seq_len": 16,
        "seed": 0,
    }
    args.update(kw)
    return BatchPlan(lengths, **args)  # type: ignore[arg-type]


@pytest.mark.parametrize("batching", ["padded", "padding_free", "packed"])
def test_each_epoch_covers_every_example_once_in_a_seeded_order(batching: str) -> None:
    lengths = [3, 9, 4, 16, 2, 7, 5, 11, 6, 8]
    p = plan(lengths, batching=batching)
    for epoch in range(3):
        seen = [i for mb in p.micro_batches(epoch) for row in mb for i in row]
        assert sorted(seen) == list(range(len(lengths)))
        for mb in p.micro_batches(epoch):
            if batching == "packed":
                assert len(mb) <= 3
                assert all(sum(lengths[i] for i in row) <= 16 for row in mb)
            else:
                assert sum(len(row) for row in mb) <= 3
    assert p.order(0) != p.order(1)
    assert p.order(1) == plan(lengths, batching=batching).order(1)
    assert plan(lengths, seed=1).order(0) != p.order(0)


def test_packing_fills_rows_first_fit() -> None:
    rows = pack_rows([0, 1, 2, 3, 4], [10, 8, 6, 2, 4], capacity=12)
    assert rows == [[0, 3], [1, 4], [2]]


def test_ranks_split_each_step_and_pad_the_epoch() -> None:
    lengths = [4] * 7  # 7 micro-batches of one example
    ranks = [plan(lengths, batch_size=1, grad_accum=2, world_size=2, rank=r) for r in (0, 1)]
    # 7 padded to 8 micro-batches; 4 per step across 2 ranks -> 2 steps per epoch.
    assert [r.steps_in_epoch(0) for r in ranks] == [2, 2]
    steps = [list(zip(range(2), r.steps(), strict=False)) for r in ranks]
    covered = []
    for (_, mine), (_, theirs) in zip(steps[0], steps[1], strict=True):
        assert len(mine.micro_batches) == len(theirs.micro_batches) == 2
        covered += [row[0] for mb in mine.micro_batches + theirs.micro_batches for row in mb]
    assert sorted(set(covered)) == list(range(7)) and len(covered) == 8


def test_steps_resume_where_they_left_off() -> None:
    p = plan([5, 6, 7, 8, 9, 10, 11], batch_size=2, grad_accum=1)
    straight = [s.micro_batches for _, s in zip(range(9), p.steps(), strict=False)]
    resumed = [s.micro_batches for _, s in zip(range(4), p.steps(5), strict=False)]
    assert resumed == straight[5:9]


def test_collate_multi_example_rows_restart_positions_and_mask_first_labels() -> None:
    examples = make_examples([4, 3, 5])
    batch = collate([[0, 1], [2]], examples, pad_id=0)
    assert "attention_mask" not in batch.inputs
    assert batch.inputs["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2], [0, 1, 2, 3, 4, 0, 1]]
    assert batch.labels[0, 4].item() == IGNORE_INDEX  # first token of the second example
    assert batch.labels[1, 5:].tolist() == [IGNORE_INDEX] * 2  # padding
    assert batch.real_tokens == 12
    assert batch.trained_tokens == sum(e.trained_tokens for e in examples)


def test_no_attention_across_packed_examples(tiny_base: Path) -> None:
    """Each example's logits inside a packed row equal its logits alone, and the summed loss
    is the same in all three batching modes."""
    from transformers import AutoModelForCausalLM

    from trainer.modeling import CausalLMLoss

    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32).eval()
    examples = make_examples([5, 9, 3, 7], seed=3)
    lm = CausalLMLoss(model)
    with torch.no_grad():
        losses = []
        for layout in ([[0], [1], [2], [3]], [[0, 1, 2, 3]], [[0, 1], [2, 3]]):
            batch = collate(layout, examples, pad_id=0)
            losses.append(float(lm(batch.inputs, batch.labels)))
        packed = collate([[0, 1, 2, 3]], examples, pad_id=0)
        logits = model(**packed.inputs, use_cache=False).logits[0]
        at = 0
        for e in examples:
            alone = model(torch.tensor([e.input_ids]), use_cache=False).logits[0]
            torch.testing.assert_close(logits[at : at + len(e.input_ids)], alone)
            at += len(e.input_ids)
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    assert losses[0] == pytest.approx(losses[2], rel=1e-5)
