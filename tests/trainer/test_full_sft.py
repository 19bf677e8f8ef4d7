"""Full-parameter SFT and the LoRA extracted from its weight delta by truncated SVD."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.trainer.helpers import common_args, write_data
from trainer.cli import main
from trainer.extract import extract_lora, extract_module


def test_full_rank_extraction_reproduces_the_delta() -> None:
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(8, 12, generator=g)
    full = extract_module(delta, rank=8)
    assert full.lora_a.shape == (8, 12) and full.lora_b.shape == (8, 8)
    torch.testing.assert_close(full.lora_b @ full.lora_a, delta, atol=1e-5, rtol=1e-5)
    assert full.energy == pytest.approx(1.0)

    low = extract_module(delta, rank=2)
    s = torch.linalg.svdvals(delta.double())
    assert low.energy == pytest.approx(float((s[:2] ** 2).sum() / (s**2).sum()))
    # Eckart-Young: the residual's squared norm is the energy left out.
    residual = delta - low.lora_b @ low.lora_a
    assert float(residual.norm() ** 2) == pytest.approx(float((s[2:] ** 2).sum()), rel=1e-4)


def test_extracted_adapter_reproduces_the_fine_tuned_model_in_peft(
    tiny_base: Path, tmp_path: Path
) -> None:
    """Only target modules changed, rank >= their dims: base + extracted LoRA == tuned model."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32).eval()
    tuned = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            if name.endswith(("q_proj.weight", "down_proj.weight")):
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    extraction = extract_lora(before, tuned, ("q_proj", "down_proj"), rank=512)
    assert extraction.energy == pytest.approx(1.0)
    assert extraction.untracked == {}
    extraction.save(tmp_path / "lora", "tiny")

    ids = torch.tensor([[5, 17, 42, 99, 3, 8, 11]])
    with torch.no_grad():
        want = tuned(ids).logits
        got = PeftModel.from_pretrained(base, tmp_path / "lora").eval()(ids).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_cli_full_sft_saves_the_model_and_publishes_the_extraction(
    tiny_base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from transformers import AutoModelForCausalLM

    from adapterhub_server.registry import Registry

    data = write_data(tmp_path / "train.jsonl")
    out, registry = tmp_path / "full", tmp_path / "registry"
    argv = [*common_args(tiny_base, data, 6), "--method", "full", "--lr", "1e-3"]
    argv += ["--extract-rank", "8", "--output-dir", str(out)]
    argv += ["--name", "full-sft", "--registry", str(registry)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "extracted LoRA keeps" in printed and "published full-sft@1" in printed

    tuned = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    changed = [
        n
        for (n, p), (_, q) in zip(tuned.named_parameters(), base.named_parameters(), strict=True)
        if not torch.equal(p, q)
    ]
    assert any("embed_tokens" in n for n in changed) and any("q_proj" in n for n in changed)
    assert (out / "extracted-lora" / "adapter_model.safetensors").is_file()

    with Registry.open(registry) as reg:
        record = reg.resolve("full-sft@1")
    assert record.rank == 8
    extraction = record.lineage.extra["extraction"]
    assert 0 < extraction["energy"] <= 1
    assert len(extraction["energy_by_module"]) == 7 * 2  # 7 projections x 2 layers
    # Embeddings and norms moved too; the lineage says the adapter does not carry them.
    assert any("embed_tokens" in k for k in extraction["untracked_relative_change"])
    assert record.lineage.hyperparameters["method"] == "full"


def test_full_sft_requires_an_output_dir(tiny_base: Path, tmp_path: Path, capsys) -> None:
    data = write_data(tmp_path / "train.jsonl")
    argv = [*common_args(tiny_base, data, 2), "--method", "full", "--name", "x"]
    assert main(argv) == 2
    assert "--output-dir" in capsys.readouterr().err
