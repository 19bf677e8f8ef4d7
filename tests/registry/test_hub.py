"""Pull from a hand-made Hugging Face cache with the hub offline; export and push to the Hub."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from adapterhub_server.errors import AdapterValidationError
from adapterhub_server.registry import HubError, InvalidReferenceError, Registry
from adapterhub_server.registry.hub import (
    HubRef,
    export_version,
    model_card,
    parse_hub_ref,
    pull,
    push_to_hub,
)
from tests.registry.conftest import TINY_BASE_ID

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def make_hf_cache(hf_home: Path, repo_id: str, adapter_dir: Path, *, commit: str = COMMIT) -> Path:
    """The layout huggingface_hub writes: blobs by hash, snapshot files linking to them."""
    repo = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    files = {
        "adapter_config.json": (adapter_dir / "adapter_config.json").read_bytes(),
        "adapter_model.safetensors": (adapter_dir / "adapter_model.safetensors").read_bytes(),
        "README.md": b"---\nlibrary_name: peft\n---\n# a LoRA\n",
    }
    for filename, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / filename).symlink_to(Path("..") / ".." / "blobs" / blob.name)
    return snapshot


@pytest.fixture
def offline_hf(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    hf_home = tmp_path / "hf"
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return hf_home


def test_parse_hub_ref() -> None:
    assert parse_hub_ref("hf://owner/repo") == HubRef("owner/repo")
    assert parse_hub_ref("hf://owner/repo@v1.0") == HubRef("owner/repo", "v1.0")
    assert parse_hub_ref(f"hf://Owner/My_LoRA@{COMMIT}") == HubRef("Owner/My_LoRA", COMMIT)
    assert str(HubRef("owner/repo", "main")) == "hf://owner/repo@main"
    for bad in [
        "owner/repo",
        "hf://repo",
        "hf://a/b/c",
        "hf://../x",
        "hf://a/..",
        "hf://a/b@",
        "hf://a/b@../x",
    ]:
        with pytest.raises(InvalidReferenceError):
            parse_hub_ref(bad)


def test_pull_from_offline_cache(registry: Registry, adapter_dir: Path, offline_hf: Path) -> None:
    make_hf_cache(offline_hf, "someone/My-LoRA", adapter_dir)
    record = pull(registry, "hf://someone/My-LoRA", alias="prod")
    assert record.key == "my-lora@1"
    assert record.aliases == ("prod",)
    assert record.metadata == {"source": "hf://someone/My-LoRA", "source_commit": COMMIT}
    assert record.base_model_id == TINY_BASE_ID
    # Symlinked snapshot files were read through; the registry holds real files.
    stored = registry.root / "adapters" / "my-lora" / "1"
    assert sorted(p.name for p in stored.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    assert not any(p.is_symlink() for p in stored.iterdir())
    assert registry.verify().ok

    again = pull(registry, f"hf://someone/My-LoRA@{COMMIT}", name="renamed")
    assert again.key == "renamed@1"


def test_pull_missing_repo_offline(registry: Registry, offline_hf: Path) -> None:
    with pytest.raises(HubError, match="HF_HUB_OFFLINE"):
        pull(registry, "hf://nobody/nothing")
    assert registry.list_adapters() == []


def test_pull_refuses_pickle_only_repo(
    registry: Registry, adapter_dir: Path, offline_hf: Path, tmp_path: Path
) -> None:
    snapshot = make_hf_cache(offline_hf, "someone/pickled", adapter_dir)
    (snapshot / "adapter_model.safetensors").unlink()
    (snapshot / "adapter_model.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(AdapterValidationError, match="pickle-based weights are not accepted"):
        pull(registry, "hf://someone/pickled")
    assert registry.list_adapters() == []


def test_export_writes_a_peft_repo_with_model_card(
    registry: Registry, adapter_dir: Path, tiny_base: Path, tmp_path: Path
) -> None:
    registry.push(
        adapter_dir,
        "sql",
        description="Answers SQL questions.",
        lineage={"dataset_sha256": "cd" * 32, "train_loss": 0.5, "hyperparameters": {"lr": 1e-4}},
    )
    out = export_version(registry, "sql", tmp_path / "export")
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    for filename in ("adapter_config.json", "adapter_model.safetensors"):
        assert (out / filename).read_bytes() == (adapter_dir / filename).read_bytes()
    card = (out / "README.md").read_text()
    assert card.startswith(
        f'---\nbase_model: "{TINY_BASE_ID}"\nlibrary_name: peft\ntags:\n- lora\n- adapterhub\n---\n'
    )
    assert "# sql (version 1)" in card
    assert "Answers SQL questions." in card
    assert "## Lineage" in card and "**train_loss**: 0.5" in card and "cd" * 32 in card

    # The export is a PEFT repo PEFT itself loads.
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, out)
    assert model.peft_config["default"].r == 4

    with pytest.raises(Exception, match="not an empty directory"):
        export_version(registry, "sql", out)


def test_model_card_quotes_hostile_ids(registry: Registry, adapter_dir: Path) -> None:
    record = registry.push(adapter_dir, "sql")
    hostile = dataclasses.replace(record, base_model_id='x"\nlicense: evil')
    card = model_card(hostile)
    front = card.split("---")[1]
    assert "\nlicense:" not in front
    assert json.dumps('x"\nlicense: evil') in front


class FakeHfApi:
    calls: list[tuple[str, dict[str, Any]]] = []

    def __init__(self, token: str | None = None) -> None:
        self.token = token

    def create_repo(self, repo_id: str, **kwargs: Any) -> str:
        FakeHfApi.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, *, repo_id: str, folder_path: Path, **kwargs: Any) -> Any:
        folder = Path(folder_path)
        files = {p.name: p.read_bytes() for p in folder.iterdir()}
        FakeHfApi.calls.append(("upload_folder", {"repo_id": repo_id, "files": files, **kwargs}))

        class Info:
            commit_url = f"https://huggingface.co/{repo_id}/commit/abc"

        return Info()


def test_push_to_hub_with_fake_api(
    registry: Registry, adapter_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub

    FakeHfApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    registry.push(adapter_dir, "sql", alias="prod")
    url = push_to_hub(registry, "sql@prod", "me/sql-lora", token="hf_x", private=True)
    assert url == "https://huggingface.co/me/sql-lora/commit/abc"
    (create, upload) = FakeHfApi.calls
    assert create == ("create_repo", {"repo_id": "me/sql-lora", "private": True, "exist_ok": True})
    assert upload[1]["repo_id"] == "me/sql-lora"
    assert upload[1]["commit_message"] == "Upload sql@1 from AdapterHub"
    files = upload[1]["files"]
    assert sorted(files) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert (
        files["adapter_model.safetensors"]
        == (adapter_dir / "adapter_model.safetensors").read_bytes()
    )
    assert b"library_name: peft" in files["README.md"]

    with pytest.raises(InvalidReferenceError):
        push_to_hub(registry, "sql", "not a repo")


def test_push_to_hub_failure_is_a_hub_error(
    registry: Registry, adapter_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub

    class Broken(FakeHfApi):
        def create_repo(self, repo_id: str, **kwargs: Any) -> str:
            raise ConnectionError("hub unreachable")

    monkeypatch.setattr(huggingface_hub, "HfApi", Broken)
    registry.push(adapter_dir, "sql")
    with pytest.raises(HubError, match="hub unreachable"):
        push_to_hub(registry, "sql", "me/sql-lora")
    assert list((registry.root / ".staging").iterdir()) == []
