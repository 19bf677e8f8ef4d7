"""`adapterhub-server registry ...` through `run_registry_command`, checking real output."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from adapterhub_server.registry import Registry
from adapterhub_server.registry.cli import build_parser, format_table, run_registry_command
from tests.registry.test_hub import COMMIT, FakeHfApi, make_hf_cache


class Cli:
    def __init__(self, root: Path, base: Path, capsys: pytest.CaptureFixture[str]) -> None:
        self.root = root
        self.base = base
        self.capsys = capsys

    def __call__(self, *argv: str, registry: bool = True) -> tuple[int, str, str]:
        args = ["registry", *argv]
        if registry:
            args += ["--registry", str(self.root)]
        if argv[0] in ("push", "pull"):
            args += ["--base-model", str(self.base)]
        parsed = build_parser().parse_args(args)
        rc = run_registry_command(parsed)
        out, err = self.capsys.readouterr()
        return rc, out, err


@pytest.fixture
def cli(registry_root: Path, tiny_base: Path, capsys: pytest.CaptureFixture[str]) -> Cli:
    return Cli(registry_root, tiny_base, capsys)


def test_push_list_show_alias_export_delete(
    cli: Cli, tiny_adapters: dict[str, Path], tmp_path: Path
) -> None:
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({"team": "data"}))
    lineage = json.dumps(
        {"train_loss": 0.5, "dataset_sha256": "ef" * 32, "hyperparameters": {"lr": 0.0002}}
    )
    rc, out, err = cli(
        "push",
        str(tiny_adapters["r4"]),
        "--name",
        "sql",
        "--alias",
        "prod",
        "--description",
        "SQL helper",
        "--metadata",
        f"@{meta}",
        "--lineage",
        lineage,
    )
    assert rc == 0, err
    assert out.startswith("pushed sql@1 (aliases: prod): rank 4, ")
    assert "base tiny-base" not in out and "base base" in out  # recorded base id: the dir name

    rc, out, _ = cli("push", str(tiny_adapters["r8"]), "--name", "sql", "--json")
    assert rc == 0
    pushed = json.loads(out)
    assert pushed["ref"] == "sql@2" and pushed["rank"] == 8 and pushed["status"] == "ready"
    assert len(pushed["files"]["adapter_model.safetensors"]["sha256"]) == 64
    assert cli("push", str(tiny_adapters["r4"]), "--name", "chat")[0] == 0

    rc, out, _ = cli("list")
    assert rc == 0
    lines = out.splitlines()
    assert lines[0].split() == [
        "NAME",
        "LATEST",
        "VERSIONS",
        "ALIASES",
        "RANK",
        "SIZE",
        "BASE",
        "MODEL",
        "CREATED",
    ]
    assert lines[1].split()[:5] == ["chat", "1", "1", "-", "4"]
    assert lines[2].split()[:5] == ["sql", "2", "2", "prod->1", "8"]
    # Columns are aligned: every row starts its second column at the same offset.
    assert len({line.index(line.split()[1], len(line.split()[0])) for line in lines[1:]}) == 1

    rc, out, _ = cli("list", "--json")
    listed = json.loads(out)
    assert [a["name"] for a in listed] == ["chat", "sql"]
    assert listed[1]["versions"] == [1, 2] and listed[1]["aliases"] == {"prod": 1}

    rc, out, _ = cli("show", "sql@prod")
    assert rc == 0
    assert "ref:             sql@1" in out
    assert "description:     SQL helper" in out
    assert 'metadata:        {"team": "data"}' in out
    assert "lineage:\n" in out and "train_loss: 0.5" in out and "ef" * 32 in out
    assert "adapter_model.safetensors" in out
    assert "versions of sql:" in out

    rc, out, _ = cli("show", "sql", "--json")
    shown = json.loads(out)
    assert shown["ref"] == "sql@2" and shown["versions"] == [1, 2] and shown["lineage"] is None

    rc, out, _ = cli("alias", "set", "sql", "prod", "2")
    assert (rc, out.strip()) == (0, "sql@prod -> 2 (was 1)")
    rc, out, _ = cli("alias", "list", "sql")
    assert out.split() == ["ALIAS", "VERSION", "prod", "2"]
    rc, out, _ = cli("alias", "delete", "sql", "prod")
    assert (rc, out.strip()) == (0, "deleted alias sql@prod (was -> 2)")
    rc, _, err = cli("alias", "delete", "sql", "prod")
    assert rc == 1 and "has no alias 'prod'" in err

    rc, out, _ = cli("export", "sql@1", str(tmp_path / "out"))
    assert (rc, out.strip()) == (0, f"exported sql@1 to {tmp_path / 'out'}")
    assert (tmp_path / "out" / "README.md").read_text().startswith("---\nbase_model:")

    rc, out, _ = cli("verify")
    assert (rc, out.strip()) == (0, "verified 3 version(s): all files match their sha256")

    rc, _, err = cli("delete", "sql")
    assert rc == 1 and "sql@N" in err
    rc, out, _ = cli("delete", "sql@1")
    assert (rc, out.strip()) == (0, "deleted sql@1")
    rc, out, _ = cli("delete", "sql", "--all", "--json")
    assert json.loads(out) == {"deleted": ["sql@2"]}
    rc, out, _ = cli("list")
    assert [line.split()[0] for line in out.splitlines()[1:]] == ["chat"]
    rc, out, _ = cli("gc")
    assert (rc, out.strip()) == (0, "nothing to collect")


def test_verify_and_gc_report_problems(cli: Cli, adapter_dir: Path) -> None:
    assert cli("push", str(adapter_dir), "--name", "sql")[0] == 0
    weights = cli.root / "adapters" / "sql" / "1" / "adapter_model.safetensors"
    os.chmod(weights, 0o644)
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x00")
    rc, out, _ = cli("verify")
    assert rc == 1
    assert out.splitlines()[0] == "verified 1 version(s): 1 problem(s)"
    assert out.splitlines()[1].split() == ["VERSION", "FILE", "PROBLEM"]
    assert out.splitlines()[2].startswith("sql@1    adapter_model.safetensors  sha256 mismatch")
    rc, out, _ = cli("verify", "--json")
    report = json.loads(out)
    assert (
        rc == 1
        and report["ok"] is False
        and report["problems"][0]["file"] == "adapter_model.safetensors"
    )

    (cli.root / "adapters" / "sql" / "9").mkdir()
    rc, out, _ = cli("gc", "--dry-run")
    assert out.strip() == f"would remove {cli.root / 'adapters' / 'sql' / '9'}"
    rc, out, _ = cli("gc")
    assert out.strip() == f"removed {cli.root / 'adapters' / 'sql' / '9'}"


def test_errors_are_reported_and_store_nothing(cli: Cli, adapter_dir: Path, tmp_path: Path) -> None:
    rc, out, err = cli("show", "nope")
    assert (rc, out) == (1, "")
    assert err.strip() == "adapterhub-server registry: error: adapter 'nope' does not exist"

    rc, out, err = cli("show", "a/b", "--json")
    assert rc == 1 and json.loads(out)["error"]["code"] == "invalid_reference"

    rc, _, err = cli("push", str(adapter_dir), "--name", "..")
    assert rc == 1 and "invalid adapter name '..'" in err

    rc, _, err = cli("push", str(adapter_dir), "--name", "big", "--max-lora-rank", "2")
    assert rc == 1 and "above this server's limit --max-lora-rank=2" in err

    rc, _, err = cli(
        "push",
        str(adapter_dir),
        "--name",
        "sql",
        "--sha256",
        f"adapter_model.safetensors={'0' * 64}",
    )
    assert rc == 1 and "sha256 mismatch" in err

    rc, _, err = cli("push", str(adapter_dir), "--name", "sql", "--metadata", "[1]")
    assert rc == 1 and "--metadata must be a JSON object" in err

    assert Registry.open(cli.root).list_adapters() == []


def test_default_registry_from_environment(
    cli: Cli, adapter_dir: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("ADAPTERHUB_REGISTRY", str(tmp_path / "env-registry"))
    rc, out, _ = cli("push", str(adapter_dir), "--name", "sql", registry=False)
    assert rc == 0 and out.startswith("pushed sql@1")
    assert (tmp_path / "env-registry" / "adapters" / "sql" / "1").is_dir()
    rc, out, _ = cli("list", registry=False)
    assert out.splitlines()[1].startswith("sql ")
    rc, out, _ = cli("list")  # the explicit --registry wins
    assert out.startswith("no adapters in")


def test_pull_and_push_hub(
    cli: Cli, adapter_dir: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    make_hf_cache(tmp_path / "hf", "someone/sql-lora", adapter_dir)
    rc, out, err = cli("pull", "hf://someone/sql-lora", "--alias", "prod")
    assert rc == 0, err
    assert out.startswith("pulled hf://someone/sql-lora as sql-lora@1 (aliases: prod)")
    rc, out, _ = cli("show", "sql-lora", "--json")
    assert json.loads(out)["metadata"] == {
        "source": "hf://someone/sql-lora",
        "source_commit": COMMIT,
    }

    rc, _, err = cli("pull", "hf://someone/absent")
    assert rc == 1 and "HF_HUB_OFFLINE" in err

    import huggingface_hub

    FakeHfApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    rc, out, _ = cli("push-hub", "sql-lora@prod", "me/sql", "--private")
    assert (rc, out.strip()) == (
        0,
        "pushed sql-lora@1 to me/sql: https://huggingface.co/me/sql/commit/abc",
    )
    assert FakeHfApi.calls[0] == (
        "create_repo",
        {"repo_id": "me/sql", "private": True, "exist_ok": True},
    )


def test_format_table() -> None:
    assert format_table(["A", "LONGER"], [["xyz", 1], ["w", 22]]) == "A    LONGER\nxyz  1\nw    22"
