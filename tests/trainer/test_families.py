"""`trainer train --base-model DIR` on other families than Llama: default targets (`all-linear`)
resolved per family, LoRA and full fine-tuning end to end, and PEFT loading the result."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from adapterhub_server.finetune.limits import BaseModelInfo
from adapterhub_server.registry.targets import meta_model_from_dir
from tests.tiny_families import ATTENTION_PROJECTIONS, make_tiny_family
from tests.tiny_models import ALL_PROJECTIONS
from tests.trainer.helpers import common_args, write_data
from trainer.cli import build_parser, config_from_args, main
from trainer.config import ALL_LINEAR, TrainConfig, TrainConfigError
from trainer.modeling import resolve_target_modules
from trainer.run import run_train

PHI3_TARGETS = ("o_proj", "qkv_proj", "gate_up_proj", "down_proj")
"""In model order: Phi3Attention defines o_proj before qkv_proj."""
EXPECTED_TARGETS = {
    "qwen3": ALL_PROJECTIONS,
    "phi3": PHI3_TARGETS,
    # PEFT would put gate_proj/up_proj/down_proj on the fused experts, which are not served.
    "qwen3_moe": ATTENTION_PROJECTIONS,
}
IDS = torch.tensor([[5, 17, 42, 99, 3, 8, 11, 60]])


@pytest.fixture(scope="module")
def family_base(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    root = tmp_path_factory.mktemp("families")
    made: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in made:
            made[family] = make_tiny_family(family, root / family)
        return made[family]

    return get


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def _base(path: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.mark.parametrize("family", sorted(EXPECTED_TARGETS))
def test_default_targets_are_the_family_linears(
    family: str, family_base: Callable[[str], Path], tmp_path: Path
) -> None:
    base = family_base(family)
    expected = EXPECTED_TARGETS[family]
    assert resolve_target_modules((ALL_LINEAR,), meta_model_from_dir(base)) == expected
    # The loaded model resolves the same way, and resolved names resolve to themselves.
    assert resolve_target_modules((ALL_LINEAR,), _base(base)) == expected
    assert resolve_target_modules(expected, meta_model_from_dir(base)) == expected
    assert TrainConfig.__dataclass_fields__["target_modules"].default == (ALL_LINEAR,)


def test_names_the_base_lacks_are_refused_before_training(
    family_base: Callable[[str], Path],
) -> None:
    phi3 = meta_model_from_dir(family_base("phi3"))
    with pytest.raises(TrainConfigError, match=r"'q_proj'.*qkv_proj") as info:
        resolve_target_modules(("q_proj", "v_proj"), phi3)
    assert info.value.param == "target_modules"
    with pytest.raises(TrainConfigError, match="lm_head"):
        resolve_target_modules(("lm_head",), phi3)
    moe = meta_model_from_dir(family_base("qwen3_moe"))
    with pytest.raises(TrainConfigError, match="expert weights, which are not served"):
        resolve_target_modules(("q_proj", "gate_proj"), moe)


def test_all_linear_stands_alone(tmp_path: Path) -> None:
    data = write_data(tmp_path / "train.jsonl")
    with pytest.raises(TrainConfigError, match="give it alone"):
        TrainConfig(data=data, name="x", target_modules="all-linear,q_proj")


@pytest.mark.parametrize("family", sorted(EXPECTED_TARGETS))
def test_fine_tuning_jobs_accept_what_the_trainer_adapts(
    family: str, family_base: Callable[[str], Path], tmp_path: Path
) -> None:
    """Job creation checks `lora_target_modules` against the same names the trainer will
    adapt: Phi-3's fused modules; on Qwen3-MoE, not the names PEFT puts on the experts."""
    from adapterhub_server.errors import InvalidRequestError
    from adapterhub_server.finetune.hyperparameters import _check_limits
    from adapterhub_server.finetune.limits import FineTuningLimits

    info = BaseModelInfo.from_directory(family_base(family), f"tiny-{family}")
    assert info.target_modules == frozenset(EXPECTED_TARGETS[family])
    if family == "qwen3_moe":
        data = write_data(tmp_path / "train.jsonl")
        config = TrainConfig(data=data, name="x", target_modules="q_proj,gate_proj", max_seq_len=64)
        with pytest.raises(InvalidRequestError, match="'gate_proj' not among") as err:
            _check_limits(config, info, FineTuningLimits(), "hyperparameters")
        assert "q_proj" in str(err.value)


@pytest.mark.parametrize("family", sorted(EXPECTED_TARGETS))
def test_lora_run_publishes_an_adapter_peft_loads(
    family: str, family_base: Callable[[str], Path], tmp_path: Path
) -> None:
    from peft import PeftModel

    from adapterhub_server.registry import Registry

    base = family_base(family)
    data = write_data(tmp_path / "train.jsonl")
    out, registry = tmp_path / "peft", tmp_path / "registry"
    argv = [*common_args(base, data, 4), "--output-dir", str(out)]
    argv += ["--name", "fam", "--registry", str(registry)]
    # What `trainer train` runs (`main`), keeping the in-memory model to compare with.
    outcome = run_train(config_from_args(build_parser().parse_args(argv)))
    assert outcome.ref == "fam@1" and outcome.result.steps == 4
    expected = EXPECTED_TARGETS[family]

    with Registry.open(registry) as reg:
        record = reg.resolve("fam@1")
    assert record.target_modules == tuple(sorted(expected))
    assert record.lineage is not None
    assert record.lineage.hyperparameters["target_modules"] == list(expected)

    trained = outcome.result.model.eval()
    want = _logits(trained)
    base_logits = _logits(_base(base))
    assert not torch.allclose(want, base_logits, atol=1e-4)
    for adapter_dir in (out, registry / "adapters" / "fam" / "1"):
        loaded = PeftModel.from_pretrained(_base(base), adapter_dir).eval()
        adapted = {
            n.partition(".lora_A.")[0].rpartition(".")[2]
            for n, _ in loaded.named_parameters()
            if ".lora_A." in n
        }
        assert adapted == set(expected)
        torch.testing.assert_close(_logits(loaded), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["qwen3", "phi3"])
def test_full_run_publishes_the_extracted_lora(
    family: str,
    family_base: Callable[[str], Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from adapterhub_server.registry import Registry

    base = family_base(family)
    data = write_data(tmp_path / "train.jsonl")
    out, registry = tmp_path / "full", tmp_path / "registry"
    argv = [*common_args(base, data, 3), "--method", "full", "--lr", "1e-3"]
    argv += ["--extract-rank", "8", "--output-dir", str(out)]
    argv += ["--name", "fam-full", "--registry", str(registry)]
    assert main(argv) == 0
    assert "published fam-full@1" in capsys.readouterr().out

    with Registry.open(registry) as reg:
        record = reg.resolve("fam-full@1")
    expected = EXPECTED_TARGETS[family]
    assert record.target_modules == tuple(sorted(expected))
    assert record.lineage is not None
    layers = 2
    assert len(record.lineage.extra["extraction"]["energy_by_module"]) == len(expected) * layers

    tuned = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    base_logits = _logits(_base(base))
    assert not torch.allclose(_logits(tuned), base_logits, atol=1e-4)
    lora = PeftModel.from_pretrained(_base(base), out / "extracted-lora").eval()
    assert not torch.allclose(_logits(lora), base_logits, atol=1e-5)
