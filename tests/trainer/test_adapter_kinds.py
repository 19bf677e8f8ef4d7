"""The trainer's DoRA, modules_to_save and trainable-token adapters: PEFT loads them and
computes what the trainer computed, their files are laid out as PEFT lays them out, DoRA
trains its magnitude with PEFT's math, and bad options are refused before anything runs."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from tests.tiny_models import make_tiny_llama
from tests.trainer.helpers import common_args, write_data
from trainer.cli import EXIT_BAD_INPUT, main
from trainer.config import TrainConfig, TrainConfigError
from trainer.kinds import EmbeddingFacts, check_against_base
from trainer.loop import StopRequest, TrainingInterrupted, TrainResult
from trainer.publish import build_lineage, describe
from trainer.run import run_train

# PEFT's own warning when the reference adapters and the loads below touch a tied head.
pytestmark = pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`")

TARGETS = ("q_proj", "v_proj")
KIND_KEYS = ("use_dora", "modules_to_save", "trainable_token_indices")

KINDS: dict[str, dict[str, Any]] = {
    "dora": {"dora": True},
    "lm_head": {"modules_to_save": ("lm_head",)},
    "lm_head+embed_tokens": {"modules_to_save": ("lm_head", "embed_tokens")},
    "tokens": {"trainable_token_indices": (5, 17, 200)},
    "dora+lm_head+tokens": {
        "dora": True,
        "modules_to_save": ("lm_head",),
        "trainable_token_indices": (5, 17),
    },
}


@pytest.fixture(scope="module")
def tied_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny base whose head shares the input embeddings' weight (as SmolLM2's does)."""
    return make_tiny_llama(tmp_path_factory.mktemp("tied") / "base", tie_word_embeddings=True)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_data(tmp_path_factory.mktemp("data") / "train.jsonl")


def train(base: Path, data: Path, out: Path, **kw: Any) -> TrainResult:
    args: dict[str, Any] = {
        "data": data,
        "base_model": str(base),
        "r": 4,
        "alpha": 8.0,
        "lr": 1e-2,
        "max_steps": 3,
        "batch_size": 4,
        "max_seq_len": 64,
        "seed": 5,
        "target_modules": TARGETS,
        "output_dir": out,
        "log_every": 1,
    }
    args.update(kw)
    return run_train(TrainConfig(**args)).result


def load_base(base: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()


def reference_peft_dir(base: Path, out: Path, **lora: Any) -> Path:
    """What PEFT itself writes for these options (untrained)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=list(TARGETS), **lora
    )
    get_peft_model(load_base(base), config).save_pretrained(out)
    return out


def layout(adapter_dir: Path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    tensors = load_file(adapter_dir / "adapter_model.safetensors")
    return {k: (tuple(t.shape), t.dtype) for k, t in tensors.items()}


def read_config(adapter_dir: Path) -> dict[str, Any]:
    return json.loads((adapter_dir / "adapter_config.json").read_text())


TIED_REFUSED = "dora+lm_head+tokens"
"""On a tied base the token rows already change the head: refused (see
`test_tied_head_copy_with_token_rows_is_refused`)."""


@pytest.mark.parametrize(
    ("kind", "tied"),
    [
        (kind, tied)
        for tied in (False, True)
        for kind in KINDS
        if not (tied and kind == TIED_REFUSED)
    ],
    ids=lambda v: ("tied" if v else "untied") if isinstance(v, bool) else v,
)
def test_trained_kind_loads_in_peft_with_the_trainers_logits(
    kind: str, tied: bool, tiny_base: Path, tied_base: Path, data: Path, tmp_path: Path
) -> None:
    from peft import PeftModel

    options = KINDS[kind]
    base = tied_base if tied else tiny_base
    out = tmp_path / "adapter"
    result = train(base, data, out, **options)

    ids = torch.tensor([[1, 5, 17, 40, 200, 7, 17, 99, 5, 3]])
    with torch.no_grad():
        trained = result.model(input_ids=ids).logits
        loaded = PeftModel.from_pretrained(load_base(base), out).eval()(input_ids=ids).logits
        untouched = load_base(base)(input_ids=ids).logits
    torch.testing.assert_close(loaded, trained, rtol=0, atol=1e-5)
    assert (trained - untouched).abs().max() > 1e-2  # the adapter does change the output

    # Config keys and tensor names, shapes and dtypes as PEFT writes them.
    peft_kwargs = {
        "use_dora": options.get("dora", False),
        "modules_to_save": list(options.get("modules_to_save", ())) or None,
        "trainable_token_indices": list(options.get("trainable_token_indices", ())) or None,
    }
    reference = reference_peft_dir(base, tmp_path / "reference", **peft_kwargs)
    assert layout(out) == layout(reference)
    ours, theirs = read_config(out), read_config(reference)
    for key in (*KIND_KEYS, "r", "lora_alpha", "peft_type", "task_type"):
        assert ours[key] == theirs[key], key
    assert sorted(ours["target_modules"]) == sorted(theirs["target_modules"])

    # What each kind trains has moved away from the base.
    base_sd = load_base(base).state_dict()
    saved = load_file(out / "adapter_model.safetensors")
    for module in options.get("modules_to_save", ()):
        key = "base_model.model.lm_head.weight"
        if module == "embed_tokens":
            key = "base_model.model.model.embed_tokens.weight"
        assert not torch.equal(saved[key], base_sd[key.removeprefix("base_model.model.")])
    if "trainable_token_indices" in options:
        delta = saved["base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"]
        assert delta.shape == (len(options["trainable_token_indices"]), 64)
        assert delta.abs().amax(dim=1).min() > 0  # every listed row was trained


def test_dora_follows_peft_math_trains_its_magnitude_and_fits(
    tiny_base: Path, tmp_path: Path
) -> None:
    from trainer.modeling import build_model

    data = tmp_path / "one.jsonl"
    data.write_text(
        json.dumps({"prompt": "what is the capital of france? ", "completion": "paris."}) + "\n"
    )
    config = TrainConfig(
        data=data,
        base_model=str(tiny_base),
        output_dir=tmp_path / "out",
        r=4,
        alpha=8.0,
        dropout=0.0,
        lr=2e-2,
        max_steps=25,
        warmup_ratio=0.0,
        batch_size=1,
        seed=1,
        target_modules=TARGETS,
        dora=True,
        log_every=1,
    )

    def q_proj(model: Any) -> Any:
        return model.base_model.model.model.layers[0].self_attn.q_proj

    # PEFT's initialisation: the magnitude is the norm of each output row of W (B = 0).
    fresh = q_proj(build_model(tiny_base, config, torch.device("cpu")))
    initial = fresh.lora_magnitude_vector["default"].weight.detach().clone()
    torch.testing.assert_close(initial, fresh.base_layer.weight.norm(dim=1))

    result = run_train(config).result
    losses = [loss for _, loss in result.losses]
    assert losses[-1] < 0.1 * losses[0], losses

    layer = q_proj(result.model)
    magnitude = layer.lora_magnitude_vector["default"].weight.detach()
    assert (magnitude - initial).abs().max() > 1e-3
    saved = load_file(tmp_path / "out" / "adapter_model.safetensors")[
        "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"
    ]
    torch.testing.assert_close(saved, magnitude)

    # The trained layer computes m / ||W + s B A||_row * (W x + s B A x), written out here
    # independently of PEFT's code.
    weight = layer.base_layer.weight.detach()
    a = layer.lora_A["default"].weight.detach()
    b = layer.lora_B["default"].weight.detach()
    s = layer.scaling["default"]
    x = torch.randn(5, weight.shape[1], generator=torch.Generator().manual_seed(0))
    expected = (magnitude / (weight + s * b @ a).norm(dim=1)) * (x @ weight.T + s * x @ a.T @ b.T)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_interrupted_kind_run_resumes_to_the_same_weights(
    tied_base: Path, data: Path, tmp_path: Path
) -> None:
    """The checkpoint holds the magnitudes and the token rows (shared with the tied head)."""
    options = {"dora": True, "trainable_token_indices": (5, 17), "dropout": 0.0, "max_steps": 5}
    train(tied_base, data, tmp_path / "straight", **options)
    stop = StopRequest()

    def on_step(done: int) -> None:
        stop.requested = done == 2

    config = TrainConfig(
        data=data,
        base_model=str(tied_base),
        r=4,
        alpha=8.0,
        lr=1e-2,
        batch_size=4,
        max_seq_len=64,
        seed=5,
        target_modules=TARGETS,
        output_dir=tmp_path / "resumed",
        log_every=1,
        **options,
    )
    with pytest.raises(TrainingInterrupted):
        run_train(config, stop=stop, on_step=on_step)
    run_train(dataclasses.replace(config, resume=True))
    straight = load_file(tmp_path / "straight" / "adapter_model.safetensors")
    resumed = load_file(tmp_path / "resumed" / "adapter_model.safetensors")
    assert straight.keys() == resumed.keys()
    for key, tensor in straight.items():
        torch.testing.assert_close(resumed[key], tensor, rtol=0, atol=0, msg=key)


def test_tied_head_copy_with_token_rows_is_refused(tied_base: Path, data: Path, tmp_path: Path):
    with pytest.raises(TrainConfigError, match="ties lm_head to embed_tokens") as info:
        train(
            tied_base,
            data,
            tmp_path / "out",
            modules_to_save=("lm_head",),
            trainable_token_indices=(5,),
        )
    assert info.value.param == "trainable_token_indices"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--modules-to-save", "lm_head,q_proj"], "'q_proj' is not supported; only lm_head"),
        (["--modules-to-save", "model.norm"], "'model.norm' is not supported"),
        (["--trainable-token-indices", "5,100000"], "100000 outside the vocabulary"),
        (["--trainable-token-indices", "5,x"], "'x' is not an integer token id"),
        (["--trainable-token-indices", "5,-3"], "non-negative integers, got -3"),
        (["--trainable-token-indices", "5,9,5"], "5 given twice"),
        (
            ["--modules-to-save", "embed_tokens", "--trainable-token-indices", "5"],
            "already trains every embedding row",
        ),
        (["--method", "full", "--dora"], "dora: applies to LoRA training only"),
        (
            ["--method", "full", "--modules-to-save", "lm_head"],
            "modules_to_save: applies to LoRA training only",
        ),
        (
            ["--method", "full", "--trainable-token-indices", "5"],
            "trainable_token_indices: applies to LoRA training only",
        ),
    ],
)
def test_cli_refuses_bad_kind_options(
    flags: list[str],
    message: str,
    tiny_base: Path,
    data: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "out"
    argv = [*common_args(tiny_base, data, 2), "--output-dir", str(out), *flags]
    assert main(argv) == EXIT_BAD_INPUT
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_cli_and_config_file_give_the_same_options(tmp_path: Path) -> None:
    from trainer.cli import build_parser, config_from_args

    data = write_data(tmp_path / "train.jsonl")
    config_file = tmp_path / "run.yaml"
    config_file.write_text(
        f"data: {data}\nname: x\nmodules_to_save: [lm_head]\ntrainable_token_indices: [5, 17]\n"
    )
    from_file = config_from_args(build_parser().parse_args(["train", "--config", str(config_file)]))
    argv = ["train", "--data", str(data), "--name", "x", "--dora"]
    argv += ["--modules-to-save", "lm_head", "--trainable-token-indices", "5,17"]
    from_flags = config_from_args(build_parser().parse_args(argv))
    assert from_file.modules_to_save == from_flags.modules_to_save == ("lm_head",)
    assert from_file.trainable_token_indices == from_flags.trainable_token_indices == (5, 17)
    assert (from_file.dora, from_flags.dora) == (False, True)


def test_base_checks_use_the_real_names_and_vocabulary(tiny_base: Path, tmp_path: Path) -> None:
    from adapterhub_server.registry.targets import meta_model_from_dir

    facts = EmbeddingFacts.of(meta_model_from_dir(tiny_base))
    assert (facts.input_name, facts.output_name, facts.tied) == (
        "model.embed_tokens",
        "lm_head",
        False,
    )
    data = write_data(tmp_path / "train.jsonl")
    last = TrainConfig(data=data, name="x", trainable_token_indices=(facts.vocab_size - 1,))
    check_against_base(last, facts)
    past = TrainConfig(data=data, name="x", trainable_token_indices=(facts.vocab_size,))
    with pytest.raises(TrainConfigError, match=f"indices 0 to {facts.vocab_size - 1}"):
        check_against_base(past, facts)
    # A head under another name cannot be saved as `lm_head`.
    renamed = EmbeddingFacts("model.embed_tokens", "output", facts.vocab_size, False)
    with pytest.raises(TrainConfigError, match="the module 'output', not 'lm_head'"):
        check_against_base(TrainConfig(data=data, name="x", modules_to_save="lm_head"), renamed)


def test_lineage_and_description_record_the_kind(tmp_path: Path) -> None:
    from adapterhub_server.base_model import ResolvedBaseModel

    data = write_data(tmp_path / "train.jsonl")
    config = TrainConfig(
        data=data,
        name="x",
        dora=True,
        modules_to_save="lm_head",
        trainable_token_indices=(5, 17),
    )
    result = TrainResult(model=None, steps=2, losses=[(2, 1.0)], wall_time_s=0.1)
    lineage = build_lineage(config, result, "0" * 64, torch.device("cpu"))
    hp = lineage.hyperparameters
    assert hp["dora"] is True
    assert hp["modules_to_save"] == ["lm_head"]
    assert hp["trainable_token_indices"] == [5, 17]
    json.dumps(hp)  # stored as JSON in the registry index
    base = ResolvedBaseModel(path=tmp_path, model_id="tiny", source="local")
    text = describe(config, base, 2, config.r)
    assert "(DoRA, modules_to_save lm_head, 2 trainable token rows)" in text
