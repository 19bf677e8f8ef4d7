"""Checkpoints the engine cannot serve are refused at start with a message naming the model
type and what is missing, instead of being served wrongly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from adapterhub_server.base_model import ResolvedBaseModel
from adapterhub_server.config import EngineConfig
from adapterhub_server.engine.build import build_engine
from adapterhub_server.errors import BaseModelError
from tests.tiny_families import PHI3_ORIGINAL_MAX_POSITIONS, make_tiny_family

SMALL = EngineConfig(max_num_seqs=2, max_num_batched_tokens=16)


def _start(path: Path, config: EngineConfig = SMALL) -> None:
    build_engine(ResolvedBaseModel(path, path.name, "local"), config)


def _config_only(path: Path, config: dict) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config))
    return path


def test_quantized_checkpoints_are_refused(tmp_path: Path) -> None:
    base = make_tiny_family("qwen3", tmp_path / "qwen3")
    config = json.loads((base / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (base / "config.json").write_text(json.dumps(config))
    with pytest.raises(BaseModelError, match=r"'qwen3'.*quantized"):
        _start(base)


def test_multimodal_wrappers_are_refused(tmp_path: Path) -> None:
    from transformers import Gemma3Config

    path = _config_only(tmp_path / "gemma3", Gemma3Config().to_dict())
    with pytest.raises(BaseModelError, match=r"'gemma3' is a multimodal wrapper.*text model"):
        _start(path)


def test_encoder_decoders_are_refused(tmp_path: Path) -> None:
    from transformers import T5Config

    path = _config_only(tmp_path / "t5", T5Config().to_dict())
    with pytest.raises(BaseModelError, match=r"'t5' is not a decoder-only causal LM"):
        _start(path)


def test_models_without_attention_layers_are_refused(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, MambaConfig

    from tests.tiny_models import build_tokenizer

    tokenizer = build_tokenizer()
    config = MambaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "mamba")
    tokenizer.save_pretrained(tmp_path / "mamba")
    with pytest.raises(BaseModelError, match=r"'mamba' is not servable"):
        _start(tmp_path / "mamba")


def test_batch_wide_rope_scaling_caps_the_context(tmp_path: Path) -> None:
    """Phi-3's longrope picks its factors from the largest position in the forward pass:
    in a mixed batch one long sequence would re-rotate all others, so the context stops
    where the factors would switch."""
    base = make_tiny_family("phi3", tmp_path / "phi3")
    engine = build_engine(ResolvedBaseModel(base, "phi3", "local"), SMALL)
    assert engine.max_model_len == PHI3_ORIGINAL_MAX_POSITIONS
    longer = EngineConfig(
        max_num_seqs=2, max_num_batched_tokens=16, max_model_len=PHI3_ORIGINAL_MAX_POSITIONS + 1
    )
    with pytest.raises(BaseModelError, match=r"'phi3'.*--max-model-len 64 or less"):
        _start(base, longer)
