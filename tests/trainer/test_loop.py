"""The training loop through `run_train`: resume, interrupt, eval, batching modes, events."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from tests.trainer.helpers import write_data
from trainer.checkpoint_paths import latest_checkpoint
from trainer.config import TrainConfig, TrainConfigError
from trainer.events import read_events
from trainer.loop import StopRequest, TrainingInterrupted
from trainer.run import run_train


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return write_data(tmp_path / "train.jsonl")


def config(tiny_base: Path, data: Path, out: Path, **kw: Any) -> TrainConfig:
    args: dict[str, Any] = {
        "data": data,
        "base_model": str(tiny_base),
        "r": 4,
        "alpha": 8.0,
        "lr": 5e-3,
        "max_steps": 6,
        "batch_size": 4,
        "max_seq_len": 64,
        "seed": 3,
        "output_dir": out,
        "log_every": 2,
    }
    args.update(kw)
    return TrainConfig(**args)


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "adapter_model.safetensors")


def stop_at(step: int) -> tuple[StopRequest, Any]:
    stop = StopRequest()

    def on_step(done: int) -> None:
        if done == step:
            stop.requested = True

    return stop, on_step


def test_interrupted_run_resumes_to_the_same_weights(tiny_base: Path, data: Path, tmp_path: Path):
    straight = tmp_path / "straight"
    run_train(config(tiny_base, data, straight))

    out = tmp_path / "resumed"
    events = tmp_path / "events.jsonl"
    stop, on_step = stop_at(2)
    with pytest.raises(TrainingInterrupted) as info:
        run_train(config(tiny_base, data, out), events_path=events, stop=stop, on_step=on_step)
    assert info.value.step == 2
    checkpoint = latest_checkpoint(out / "checkpoints")
    assert checkpoint is not None and checkpoint == info.value.checkpoint
    assert not (out / "adapter_model.safetensors").exists()

    # A resume that would compute something else is refused.
    with pytest.raises(TrainConfigError, match="lr"):
        run_train(config(tiny_base, data, out, resume=True, lr=1e-3))

    outcome = run_train(config(tiny_base, data, out, resume=True), events_path=events)
    assert outcome.result.resumed_from_step == 2 and outcome.result.steps == 6
    a, b = weights(straight), weights(out)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)
    assert not (out / "checkpoints").exists()  # removed after success

    kinds = [e["type"] for e in read_events(events)[0]]
    assert kinds[:2] == ["started", "metrics"] and "interrupted" in kinds
    assert kinds[-1] == "succeeded" and kinds.count("started") == 2


def test_periodic_checkpoints_keep_only_the_latest(tiny_base: Path, data: Path, tmp_path: Path):
    out = tmp_path / "out"
    stop, on_step = stop_at(5)
    with pytest.raises(TrainingInterrupted):
        run_train(
            config(tiny_base, data, out, save_every=2, max_steps=8), stop=stop, on_step=on_step
        )
    saved = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert saved == ["step-00000005"]
    state = json.loads((out / "checkpoints" / saved[0] / "trainer_state.json").read_text())
    assert state["progress"]["step"] == 5
    assert not list((out / "checkpoints").rglob("*.pt")) and not list(
        (out / "checkpoints").rglob("*.bin")
    )


def test_resume_without_checkpoint_is_an_error(tiny_base: Path, data: Path, tmp_path: Path):
    with pytest.raises(TrainConfigError, match="no complete checkpoint"):
        run_train(config(tiny_base, data, tmp_path / "o", resume=True))


def test_eval_loss_is_reported_and_recorded(tiny_base: Path, data: Path, tmp_path: Path):
    from adapterhub_server.registry import Registry

    registry = tmp_path / "registry"
    outcome = run_train(
        config(
            tiny_base,
            data,
            tmp_path / "o",
            eval_data=data,
            eval_every=3,
            name="evald",
            registry=registry,
        )
    )
    evals = outcome.result.eval_losses
    assert [s for s, _ in evals] == [3, 6]
    assert evals[1][1] < evals[0][1]  # same data: the eval loss falls as training fits it
    with Registry.open(registry) as reg:
        lineage = reg.resolve("evald@1").lineage
    assert lineage is not None
    assert lineage.extra["eval_loss"] == pytest.approx(evals[-1][1])
    assert "checkpoint_dir" not in lineage.hyperparameters  # runtime settings are not lineage


@pytest.mark.parametrize("batching", ["padding_free", "packed"])
def test_batching_modes_compute_the_padded_loss(
    tiny_base: Path, data: Path, tmp_path: Path, batching: str
):
    """Padding-free batches are the padded batches without the padding: the first step (same
    weights, same examples) has the same loss. Packing regroups examples but still learns."""
    runs = {}
    for mode in ("padded", batching):
        cfg = config(tiny_base, data, tmp_path / mode, batching=mode, dropout=0.0, log_every=1)
        runs[mode] = run_train(cfg).result.losses
    assert [s for s, _ in runs[batching]] == list(range(1, 7))
    if batching == "padding_free":
        assert runs[batching][0][1] == pytest.approx(runs["padded"][0][1], rel=1e-5)
    assert runs[batching][-1][1] < runs[batching][0][1]


def test_gradient_checkpointing_changes_memory_not_results(
    tiny_base: Path, data: Path, tmp_path: Path
):
    runs = []
    for flag in (False, True):
        out = tmp_path / str(flag)
        run_train(
            config(tiny_base, data, out, gradient_checkpointing=flag, dropout=0.0, max_steps=2)
        )
        runs.append(weights(out))
    for key in runs[0]:
        torch.testing.assert_close(runs[0][key], runs[1][key], rtol=1e-4, atol=1e-6)
