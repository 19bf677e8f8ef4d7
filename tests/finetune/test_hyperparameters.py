"""OpenAI hyperparameters -> `TrainConfig`: defaults, renames, and the trainer's own checks."""

from __future__ import annotations

from pathlib import Path

import pytest

from adapterhub_server.errors import InvalidRequestError
from adapterhub_server.finetune import hyperparameters
from adapterhub_server.finetune.hyperparameters import plan_training
from adapterhub_server.finetune.limits import BaseModelInfo, FineTuningLimits
from client.types import FineTuningJobCreateRequest
from tests.tiny_models import ALL_PROJECTIONS
from trainer.config import TrainConfig, auto_epochs
from trainer.data import JsonlStats


def plan(
    tmp_path: Path,
    *,
    limits: FineTuningLimits | None = None,
    stats: JsonlStats = JsonlStats(records=1, estimated_tokens=40),
    context: int | None = 2048,
    request: dict | None = None,
    **hp: object,
):
    data = tmp_path / "train.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n')
    request = FineTuningJobCreateRequest.model_validate(
        {
            "model": "m",
            "training_file": "file-x",
            "suffix": "my-adapter",
            "method": {"type": "supervised", "supervised": {"hyperparameters": hp}},
            **(request or {}),
        }
    )
    return plan_training(
        request,
        name="my-adapter",
        data=data,
        train_stats=stats,
        eval_data=None,
        eval_stats=None,
        base=BaseModelInfo(
            model_id="served-base",
            path=Path("/models/base"),
            context_length=context,
            target_modules=frozenset(ALL_PROJECTIONS),
        ),
        limits=limits or FineTuningLimits(),
        registry=tmp_path / "registry",
        seed=11,
        description="job",
        output_dir=tmp_path / "out",
    )


def test_auto_means_the_trainers_defaults(tmp_path: Path) -> None:
    result = plan(tmp_path)
    defaults = TrainConfig(data=tmp_path / "train.jsonl", name="x")
    # "auto" epochs are resolved from the file: one record in batches of 4 -> the maximum.
    assert defaults.epochs is None
    assert result.config["epochs"] == auto_epochs(1, defaults.batch_size) == 25
    assert result.config["batch_size"] == defaults.batch_size
    assert result.config["lr"] == defaults.lr
    assert result.config["name"] == "my-adapter"
    assert result.config["seed"] == 11
    assert result.config["base_model"] == "/models/base"
    assert result.config["base_model_id"] == "served-base"
    assert result.config["output_dir"] is None  # LoRA jobs only publish
    hp = result.hyperparameters
    assert (hp.n_epochs, hp.batch_size, hp.learning_rate_multiplier) == (25, 4, 1.0)
    assert hp.learning_rate == 1e-3
    assert hp.lora_r == defaults.r
    assert hp.lora_target_modules == ["all-linear"]  # resolved against the base by the trainer
    assert hp.packing is False
    assert hp.extract_rank is None


def test_extensions_map_onto_trainer_fields(tmp_path: Path) -> None:
    result = plan(
        tmp_path,
        learning_rate_multiplier=0.5,
        lora_r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        lora_target_modules=["q_proj", "v_proj"],
        use_rslora=True,
        max_steps=7,
        warmup_ratio=0.2,
        max_seq_len=128,
        grad_accum=2,
        packing=True,
    )
    config = result.config
    assert config["lr"] == pytest.approx(5e-4)  # 0.5 x the LoRA default 1e-3
    assert (config["r"], config["alpha"], config["dropout"]) == (4, 8, 0.0)
    assert config["target_modules"] == ["q_proj", "v_proj"]
    assert config["rslora"] is True
    assert (config["max_steps"], config["warmup_ratio"]) == (7, 0.2)
    assert (config["max_seq_len"], config["grad_accum"]) == (128, 2)
    assert config["batching"] == "packed"
    assert result.hyperparameters.packing is True


def test_full_training_gets_an_output_directory(tmp_path: Path) -> None:
    result = plan(tmp_path, training_method="full", extract_rank=8)
    assert result.config["method"] == "full"
    assert result.config["extract_rank"] == 8
    assert result.config["output_dir"] == str(tmp_path / "out")
    assert result.hyperparameters.extract_rank == 8
    assert result.hyperparameters.lora_r is None


def test_trainer_errors_name_the_request_field(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequestError) as info:
        plan(tmp_path, lora_target_modules=[""])
    assert info.value.param == "method.supervised.hyperparameters.lora_target_modules"
    assert info.value.message.startswith("method.supervised.hyperparameters.lora_target_modules:")


def test_an_extension_the_installed_trainer_lacks_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(hyperparameters.EXTENSIONS, "packing", "no_such_field")
    with pytest.raises(InvalidRequestError) as info:
        plan(tmp_path, packing=True)
    assert info.value.param == "method.supervised.hyperparameters.packing"
    assert "not supported by the installed trainer" in info.value.message
