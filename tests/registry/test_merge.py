"""Publishing merges as registry versions (`publish_merge`, `registry merge`), and kinds."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from adapterhub_server.errors import AdapterNotFoundError
from adapterhub_server.lora.merge import MergeError, MergeSpec
from adapterhub_server.registry import Registry
from adapterhub_server.registry.cli import build_parser, run_registry_command
from adapterhub_server.registry.local import INDEX_FILE
from adapterhub_server.registry.merge import publish_merge
from adapterhub_server.registry.records import adapter_kind
from tests.registry.conftest import copy_adapter


@pytest.fixture
def pushed(registry: Registry, tiny_adapters: dict[str, Path]) -> Registry:
    registry.push(tiny_adapters["r8"], "alpha")
    registry.push(tiny_adapters["attn-only"], "beta", alias="prod")
    registry.push(tiny_adapters["r4"], "gamma")
    return registry


def test_published_merge_loads_in_peft_and_equals_add_weighted_adapter(
    pushed: Registry, tiny_base: Path, tiny_adapters: dict[str, Path]
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    spec = MergeSpec(ids=("alpha@1", "beta@prod"), weights=(0.6, 0.4), strategy="ties", density=0.5)
    record = publish_merge(pushed, "mix", spec, alias="prod", description="ties of two")
    assert record.key == "mix@1" and record.aliases == ("prod",)
    assert record.kind == "merge:ties"
    recipe = record.lineage.extra["merge"]
    assert recipe["adapters"] == ["alpha@1", "beta@1"]
    assert recipe["requested"] == ["alpha@1", "beta@prod"]
    assert recipe["weights"] == [0.6, 0.4] and recipe["density"] == 0.5
    assert recipe["merge_strategy"] == "ties" and recipe["majority_sign_method"] == "total"

    # PEFT loads the stored files, and they hold what add_weighted_adapter computes.
    path = pushed.version_path("mix", 1)
    base = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, tiny_adapters["r8"], adapter_name="alpha")
    model.load_adapter(tiny_adapters["attn-only"], adapter_name="beta")
    model.add_weighted_adapter(
        ["alpha", "beta"], [0.6, 0.4], "ref", combination_type="ties", density=0.5
    )
    model.load_adapter(path, adapter_name="stored")
    compared = 0
    for name, module in model.base_model.model.named_modules():
        if hasattr(module, "lora_A") and "ref" in module.lora_A:
            for part in ("lora_A", "lora_B"):
                ref = getattr(module, part)["ref"].weight
                stored = getattr(module, part)["stored"].weight
                assert torch.equal(ref, stored), (name, part)
            assert module.scaling["ref"] == module.scaling["stored"]
            compared += 1
    assert compared == len(load_file(path / "adapter_model.safetensors")) // 2 > 0


def test_cat_of_different_ranks_is_padded_as_peft_pads_it(pushed: Registry) -> None:
    spec = MergeSpec(ids=("alpha", "gamma", "beta"), weights=(1.0, -0.5, 2.0))
    record = publish_merge(pushed, "cat-mix", spec)
    assert record.kind == "merge:cat" and record.rank == 8 + 4 + 8
    config = json.loads((pushed.version_path("cat-mix", 1) / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == 20


@pytest.mark.parametrize(
    ("spec", "error", "match"),
    [
        (
            MergeSpec(ids=("alpha", "gamma"), weights=(1, 1), strategy="linear"),
            MergeError,
            "same rank",
        ),
        (MergeSpec(ids=("alpha", "nope"), weights=(1, 1)), AdapterNotFoundError, "nope"),
        (MergeSpec(ids=("alpha@7", "beta"), weights=(1, 1)), AdapterNotFoundError, "alpha@7"),
    ],
)
def test_refused_merges_store_nothing(pushed: Registry, spec, error, match) -> None:
    with pytest.raises(error, match=match):
        publish_merge(pushed, "mix", spec)
    assert not pushed.index.known_name("mix")


def test_merged_rank_over_the_registry_limit(registry_root: Path, base_spec, tiny_adapters) -> None:
    from adapterhub_server.registry import RegistryLimits

    with Registry.open(
        registry_root, base=base_spec, limits=RegistryLimits(max_lora_rank=12)
    ) as reg:
        reg.push(tiny_adapters["r8"], "alpha")
        reg.push(tiny_adapters["attn-only"], "beta")
        with pytest.raises(MergeError, match="max-lora-rank=12"):
            publish_merge(reg, "mix", MergeSpec(ids=("alpha", "beta"), weights=(1, 1)))
        assert not reg.index.known_name("mix")


def test_cli_merge(
    registry_root: Path, tiny_base: Path, pushed: Registry, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [
        "registry",
        "merge",
        "mix",
        "--from",
        "alpha@1",
        "--from",
        "beta",
        "--weights",
        "0.6,0.4",
        "--merge-strategy",
        "dare_ties",
        "--density",
        "0.5",
        "--majority-sign-method",
        "frequency",
        "--alias",
        "prod",
        "--registry",
        str(registry_root),
        "--base-model",
        str(tiny_base),
        "--json",
    ]
    assert run_registry_command(build_parser().parse_args(argv)) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ref"] == "mix@1" and out["kind"] == "merge:dare_ties"
    assert out["aliases"] == ["prod"]
    assert out["lineage"]["extra"]["merge"]["majority_sign_method"] == "frequency"

    # The same merge published twice draws the same DARE masks: identical files.
    assert run_registry_command(build_parser().parse_args(argv)) == 0
    capsys.readouterr()
    first, second = (
        pushed.resolve(f"mix@{v}").files["adapter_model.safetensors"].sha256 for v in (1, 2)
    )
    assert first == second

    bad = [a if a != "0.6,0.4" else "0.6" for a in argv]
    assert run_registry_command(build_parser().parse_args(bad)) == 1
    err = json.loads(capsys.readouterr().out)["error"]
    assert err["param"] == "merged_adapters.weights"
    assert [v.version for v in pushed.versions("mix")] == [1, 2]


def test_kinds() -> None:
    assert adapter_kind({"r": 8}) == "lora"
    assert adapter_kind({"use_dora": True}) == "dora"
    assert adapter_kind({"modules_to_save": ["lm_head"]}) == "lora+modules_to_save"
    assert adapter_kind({"use_dora": True, "trainable_token_indices": [3]}) == (
        "dora+trainable_tokens"
    )
    assert adapter_kind({"peft_type": "TRAINABLE_TOKENS"}) == "trainable_tokens"
    assert adapter_kind({"modules_to_save": None, "use_dora": False}) == "lora"


def test_versions_record_their_kind(
    registry: Registry, tiny_adapters: dict[str, Path], tmp_path: Path
) -> None:
    record = registry.push(tiny_adapters["r4"], "plain")
    assert record.kind == "lora"
    assert registry.resolve("plain").to_dict()["kind"] == "lora"
    assert registry.list_adapters()[0].to_dict()["latest"]["kind"] == "lora"


def test_an_index_from_schema_1_is_migrated(
    registry_root: Path, base_spec, tiny_adapters: dict[str, Path], tmp_path: Path
) -> None:
    with Registry.open(registry_root, base=base_spec) as reg:
        reg.push(tiny_adapters["r4"], "old")
    # Make it look like an index written before kinds existed.
    conn = sqlite3.connect(registry_root / INDEX_FILE)
    conn.execute("ALTER TABLE versions DROP COLUMN kind")
    conn.execute("PRAGMA user_version = 1")
    conn.commit()
    conn.close()
    with Registry.open(registry_root, base=base_spec) as reg:
        assert reg.resolve("old").kind == "lora"
        copy_adapter(tiny_adapters["r4"], tmp_path / "new")
        assert reg.push(tmp_path / "new", "new").kind == "lora"
    conn = sqlite3.connect(registry_root / INDEX_FILE)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 2
    conn.close()
