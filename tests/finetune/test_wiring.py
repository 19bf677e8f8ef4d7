"""Server wiring: CLI flags, the default jobs directory, routes only with a registry."""

from __future__ import annotations

from pathlib import Path

import pytest

from adapterhub_server.api import create_app
from adapterhub_server.cli import build_parser, config_from_args
from adapterhub_server.config import ServerConfig
from adapterhub_server.finetune import JOBS_DIR_ENV, default_jobs_dir
from tests.api.fake_engine import FakeEngine


def test_cli_flags(tmp_path: Path) -> None:
    args = build_parser().parse_args(
        [
            "serve",
            "--registry",
            str(tmp_path / "reg"),
            "--jobs-dir",
            str(tmp_path / "jobs"),
            "--max-concurrent-jobs",
            "2",
        ]
    )
    config = config_from_args(args)
    assert config.jobs_dir == tmp_path / "jobs"
    assert config.max_concurrent_jobs == 2
    assert config.fine_tuning is True
    args = build_parser().parse_args(["serve", "--no-fine-tuning"])
    assert config_from_args(args).fine_tuning is False
    with pytest.raises(ValueError):
        ServerConfig(max_concurrent_jobs=0)


def test_default_jobs_dir_sits_next_to_the_registry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(JOBS_DIR_ENV, raising=False)
    assert default_jobs_dir(tmp_path / "registry") == tmp_path / "finetune"
    monkeypatch.setenv(JOBS_DIR_ENV, str(tmp_path / "elsewhere"))
    assert default_jobs_dir(tmp_path / "registry") == tmp_path / "elsewhere"


def test_fine_tuning_routes_only_when_configured() -> None:
    paths = create_app(FakeEngine()).openapi()["paths"]
    assert "/v1/completions" in paths
    assert not any(p.startswith(("/v1/files", "/v1/fine_tuning")) for p in paths)
