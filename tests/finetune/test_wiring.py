"""Server wiring: CLI flags, the default jobs directory, routes only with a registry."""

from __future__ import annotations

from pathlib import Path

import pytest

from adapterhub_server.api import create_app
from adapterhub_server.cli import build_parser, config_from_args
from adapterhub_server.config import EngineConfig, ServerConfig
from adapterhub_server.finetune import JOBS_DIR_ENV, default_jobs_dir
from adapterhub_server.server import build_server
from tests.api.fake_engine import FakeEngine
from tests.tiny_models import ALL_PROJECTIONS


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
    assert config.max_fine_tuning_tokens == 100_000_000
    args = build_parser().parse_args(["serve", "--no-fine-tuning"])
    assert config_from_args(args).fine_tuning is False
    args = build_parser().parse_args(["serve", "--max-fine-tuning-tokens", "5000"])
    assert config_from_args(args).max_fine_tuning_tokens == 5000
    with pytest.raises(ValueError):
        ServerConfig(max_concurrent_jobs=0)
    with pytest.raises(ValueError):
        ServerConfig(max_fine_tuning_tokens=0)


def test_the_server_passes_its_limits_and_base_model_to_fine_tuning(
    tiny_base: Path, tmp_path: Path
) -> None:
    config = ServerConfig(
        base_model=str(tiny_base),
        served_model_name="tiny-base",
        registry=tmp_path / "registry",
        jobs_dir=tmp_path / "jobs",
        max_fine_tuning_tokens=12_345,
        engine=EngineConfig(max_num_seqs=2, max_loras=1, max_lora_rank=8),
    )
    server = build_server(config)
    try:
        service = server.fine_tuning
        assert service is not None
        assert service.limits.max_fine_tuning_tokens == 12_345
        assert service.limits.max_lora_rank == 8
        assert service.base.model_id == "tiny-base"
        assert service.base.context_length == 256  # the tiny model's max_position_embeddings
        assert service.base.target_modules == frozenset(ALL_PROJECTIONS)
    finally:
        server.engine.shutdown()
        if server.fine_tuning is not None:
            server.fine_tuning.stop()


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
