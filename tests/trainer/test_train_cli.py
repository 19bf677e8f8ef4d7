"""End to end: `trainer.cli.main` trains a LoRA on a tiny model and publishes it."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.trainer.helpers import common_args, write_data
from trainer.cli import main
from trainer.config import TrainConfig, TrainConfigError


def test_train_publishes_a_working_adapter(
    tiny_base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from adapterhub_server.registry import Registry

    data = write_data(tmp_path / "train.jsonl")
    registry_dir = tmp_path / "registry"
    out_dir = tmp_path / "peft"
    argv = common_args(tiny_base, data, 30)
    argv += ["--name", "tiny-sft", "--alias", "prod", "--registry", str(registry_dir)]
    argv += ["--output-dir", str(out_dir)]
    assert main(argv) == 0
    assert "published tiny-sft@1 (alias prod)" in capsys.readouterr().out

    with Registry.open(registry_dir) as registry:
        record = registry.resolve("tiny-sft@prod")
    assert record.version == 1
    assert record.rank == 8
    lineage = record.lineage
    assert lineage is not None
    assert lineage.dataset_sha256 == hashlib.sha256(data.read_bytes()).hexdigest()
    hp = lineage.hyperparameters
    assert hp["r"] == 8 and hp["lr"] == 5e-3 and hp["max_steps"] == 30 and hp["seed"] == 7
    assert hp["target_modules"] == [
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    ]
    history = lineage.extra["train_loss_history"]
    assert [step for step, _ in history] == [5, 10, 15, 20, 25, 30]
    assert history[-1][1] < history[0][1]
    assert lineage.train_loss == history[-1][1]
    assert {"torch", "transformers", "peft", "adapterhub"} <= set(lineage.package_versions)
    assert lineage.hardware["device"] == "cpu" and lineage.wall_time_s > 0

    # The adapter directory loads in PEFT and changes the model's output.
    assert (out_dir / "adapter_model.safetensors").is_file()
    ids = torch.tensor([[5, 17, 42, 99, 3, 8]])
    base = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32).eval()
    with torch.no_grad():
        base_logits = base(ids).logits
    tuned = PeftModel.from_pretrained(base, registry_dir / "adapters" / "tiny-sft" / "1").eval()
    with torch.no_grad():
        tuned_logits = tuned(ids).logits
    assert not torch.allclose(base_logits, tuned_logits, atol=1e-4)


def test_same_seed_gives_identical_weights(tiny_base: Path, tmp_path: Path) -> None:
    data = write_data(tmp_path / "train.jsonl")
    weights = []
    for run in ("a", "b"):
        out = tmp_path / run
        assert main([*common_args(tiny_base, data, 4), "--output-dir", str(out)]) == 0
        weights.append(load_file(out / "adapter_model.safetensors"))
    assert weights[0].keys() == weights[1].keys() and weights[0]
    for key in weights[0]:
        assert torch.equal(weights[0][key], weights[1][key]), key
    assert any(w.abs().sum() > 0 for k, w in weights[0].items() if "lora_B" in k)


def test_malformed_data_publishes_nothing(
    tiny_base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = write_data(tmp_path / "train.jsonl")
    lines = data.read_text().splitlines()
    lines[4] = '{"messages": "not a list"}'
    data.write_text("\n".join(lines) + "\n")
    registry_dir, out_dir = tmp_path / "registry", tmp_path / "out"
    argv = common_args(tiny_base, data, 2)
    argv += ["--name", "broken", "--registry", str(registry_dir), "--output-dir", str(out_dir)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"{data}:5:" in err and "messages" in err
    assert not registry_dir.exists() and not out_dir.exists()


def test_config_validation(tmp_path: Path) -> None:
    data = write_data(tmp_path / "d.jsonl")
    config = TrainConfig(data=data, name="ok", target_modules="q_proj, v_proj")
    assert config.target_modules == ("q_proj", "v_proj")
    for bad in ({"r": 0}, {"dropout": 1.0}, {"lr": -1.0}, {"warmup_ratio": 1.0}, {"max_steps": 0}):
        with pytest.raises(TrainConfigError):
            TrainConfig(data=data, name="ok", **bad)
    with pytest.raises(TrainConfigError, match="does not exist"):
        TrainConfig(data=tmp_path / "missing.jsonl", name="ok")
    with pytest.raises(TrainConfigError, match="--name"):
        TrainConfig(data=data)
    with pytest.raises(Exception, match="invalid adapter name"):
        TrainConfig(data=data, name="Bad/Name")
