"""What the trainer writes for each adapter kind is served here: DoRA, modules_to_save and
trainable-token adapters trained by `trainer`, published to a registry, then decoded in one
batch with plain-LoRA and base rows, give PEFT's greedy tokens."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from adapterhub_server.base_model import ResolvedBaseModel
from adapterhub_server.config import EngineConfig
from adapterhub_server.engine.build import build_engine
from adapterhub_server.engine.sampling_params import SamplingParams
from adapterhub_server.registry import BaseModelSpec, Registry, RegistryLimits
from adapterhub_server.registry.source import RegistryAdapterSource
from tests.engine.conftest import greedy_continuation
from tests.trainer.helpers import write_data
from tests.trainer.test_adapter_kinds import KINDS, train

pytestmark = pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`")


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return write_data(tmp_path / "train.jsonl")


def test_trained_kinds_serve_like_peft_in_one_batch(
    tiny_base: Path,
    tiny_adapters: dict[str, Path],
    data: Path,
    tmp_path: Path,
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    registry = Registry.open(
        tmp_path / "registry",
        base=BaseModelSpec.from_directory(tiny_base, "tiny"),
        limits=RegistryLimits(max_lora_rank=64),
    )
    kinds = ("dora", "lm_head+embed_tokens", "dora+lm_head+tokens")
    for kind in kinds:
        train(tiny_base, data, tmp_path / kind, **KINDS[kind])
        registry.push(tmp_path / kind, kind.replace("+", "-"))
    registry.push(tiny_adapters["r8"], "plain")
    engine = build_engine(
        ResolvedBaseModel(tiny_base, "tiny", "local"),
        EngineConfig(max_num_seqs=8, max_loras=4, kv_cache_memory=64 * 2**20),
        source=RegistryAdapterSource(registry),
    )
    prompt = engine.tokenizer.encode("the code for zorblat is")
    names = [k.replace("+", "-") for k in kinds] + ["plain", None]
    for i, name in enumerate(names):
        engine.add_request(
            f"r{i}", prompt, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True), name
        )
    got: dict[str, list[int]] = {}
    while engine.has_work():
        for out in engine.step():
            got.setdefault(out.request_id, []).extend(out.token_ids)
    for i, name in enumerate(names):
        base = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32).eval()
        model = (
            base
            if name is None
            else PeftModel.from_pretrained(base, registry.version_path(name, 1)).eval()
        )
        assert got[f"r{i}"] == greedy_continuation(model, prompt, 8), name
    registry.close()
