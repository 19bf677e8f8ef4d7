"""Shared fixtures: tiny random Llama models and adapters, and the real default model."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# One converted default model per checkout, reused across runs and test modules.
os.environ.setdefault("ADAPTERHUB_MODEL_CACHE", str(REPO / ".cache" / "models"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


if not _has_cuda():
    # Triton kernels then run in Triton's interpreter on CPU tensors: slow, but it checks
    # them without a GPU. Read when a kernel is defined, so it is set before any import.
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _has_cuda():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.tiny_models import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "base")


@pytest.fixture(scope="session")
def tiny_adapters(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Adapters of several ranks and scale rules over the tiny base model."""
    from tests.tiny_models import make_peft_adapter

    root = tmp_path_factory.mktemp("adapters")
    specs = {
        "r4": {"r": 4, "alpha": 8},
        "r8": {"r": 8, "alpha": 16},
        "r16-rslora": {"r": 16, "alpha": 16, "use_rslora": True},
        "patterns": {
            "r": 8,
            "alpha": 8,
            "rank_pattern": {"q_proj": 2, "down_proj": 12},
            "alpha_pattern": {"v_proj": 32},
        },
        "attn-only": {"r": 8, "alpha": 8, "target_modules": ("q_proj", "v_proj")},
        "r32": {"r": 32, "alpha": 64},
    }
    return {
        name: make_peft_adapter(tiny_base, root / name, seed=i + 1, **spec)
        for i, (name, spec) in enumerate(specs.items())
    }


@pytest.fixture(scope="session")
def default_model():
    """The embedded SmolLM2-135M-Instruct, converted once into the checkout's cache."""
    from adapterhub_server.base_model import resolve_base_model

    return resolve_base_model(None)


# -- shared-registry services: started only for the tests that ask for them ---------------


@pytest.fixture(scope="session")
def pg_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A throwaway PostgreSQL server for the session; its URL carries a password."""
    from tests.registry import cluster_services

    if cluster_services.pg_bin() is None:
        pytest.skip("PostgreSQL binaries (initdb, pg_ctl) are not installed")
    with cluster_services.postgres_server(tmp_path_factory.mktemp("pg")) as url:
        yield url


@pytest.fixture(scope="session")
def s3_env() -> Iterator[dict[str, str]]:
    """A moto S3 server for the session, exported in the AWS_* environment."""

    from tests.registry import cluster_services

    with cluster_services.moto_s3() as env:
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)  # boto3 in this process and in spawned children
        try:
            yield env
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
