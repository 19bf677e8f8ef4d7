"""AdapterHub on a local Ray Serve cluster (loopback): adapter-affinity routing, outputs
equal to PEFT per adapter, and a killed replica answering nothing wrong."""

from __future__ import annotations

import concurrent.futures
import importlib
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml

pytest.importorskip("ray.serve", reason="needs the [cluster] extra (ray[serve])")

from adapterhub_server.cluster.ray_app import (
    APP_NAME,
    ENGINE_DEPLOYMENT,
    REPLICA_HEADER,
    ROUTER_DEPLOYMENT,
    args_to_argv,
)
from adapterhub_server.cluster.routing import AdapterKeyResolver
from adapterhub_server.config import EngineConfig, ServerConfig
from adapterhub_server.lora.cache import StaticAdapterSource
from tests.engine.conftest import greedy_continuation

REPO = Path(__file__).resolve().parents[2]
BASE_ID = "tiny-base"
PROMPTS = [[5, 17, 42, 7], [9, 3, 250, 11, 64]]
NEW_TOKENS = 6


def test_config_file_names_real_import_path_arguments_and_deployments(tmp_path: Path) -> None:
    from adapterhub_server.cli import build_parser

    config = yaml.safe_load((REPO / "deploy/ray/adapterhub.yaml").read_text())
    (app,) = config["applications"]
    for name in ("api_key_file", "admin_key_file"):  # mounted secrets in a real cluster
        (tmp_path / name).write_text(f"{name.replace('_', '-')}-value\n")
        app["args"][name] = str(tmp_path / name)
    module, _, attr = app["import_path"].partition(":")
    builder = getattr(importlib.import_module(module), attr)
    parsed = build_parser().parse_args(["cluster", *args_to_argv(app["args"])])
    assert parsed.max_cpu_loras == app["args"]["max_cpu_loras"]
    assert {d["name"] for d in app["deployments"]} == {ENGINE_DEPLOYMENT, ROUTER_DEPLOYMENT}
    engine = next(d for d in app["deployments"] if d["name"] == ENGINE_DEPLOYMENT)
    assert (
        engine["autoscaling_config"]["max_replicas"] >= engine["autoscaling_config"]["min_replicas"]
    )
    # Binding builds the application graph without Ray running.
    assert builder(app["args"]) is not None


def test_routing_key_is_the_adapter_version_and_empty_for_the_base(tmp_path: Path) -> None:
    resolver = AdapterKeyResolver(StaticAdapterSource({"a": tmp_path / "a"}), base_model_id=BASE_ID)
    assert resolver.key_for("POST", "/v1/completions", b'{"model": "a"}') == "a"
    assert resolver.key_for("POST", "/v1/chat/completions", b'{"model": "a"}') == "a"
    assert resolver.key_for("POST", "/v1/completions", b'{"model": "tiny-base"}') == ""
    assert resolver.key_for("POST", "/v1/completions", b'{"model": "nope"}') == ""
    assert resolver.key_for("POST", "/v1/completions", b"not json") == ""
    assert resolver.key_for("POST", "/v1/completions", b"[1]") == ""
    assert resolver.key_for("GET", "/v1/models", b"") == ""


class _DeadEngine:
    """A deployment handle whose every replica has died."""

    def __init__(self) -> None:
        self.calls = 0
        self.serve_http = self

    def options(self, **_: object) -> _DeadEngine:
        return self

    def remote(self, _: object) -> _DeadEngine:
        self.calls += 1
        return self

    def __aiter__(self) -> _DeadEngine:
        return self

    async def __anext__(self) -> object:
        from ray.exceptions import ActorDiedError

        raise ActorDiedError()

    def cancel(self) -> None:
        pass


def test_a_request_no_replica_can_take_gets_503_with_retry_after() -> None:
    import asyncio

    from starlette.requests import Request

    from adapterhub_server.cluster.ray_app import PLACEMENT_ATTEMPTS, AdapterRouter

    router = object.__new__(AdapterRouter.func_or_class)
    router._engine = engine = _DeadEngine()
    router._resolver = AdapterKeyResolver(StaticAdapterSource({}), base_model_id=BASE_ID)
    router._max_body = 1024
    body = b'{"model": "tiny-base", "prompt": "x"}'

    async def receive() -> dict:
        return {"type": "http.request", "body": body, "more_body": False}

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/completions",
        "query_string": b"",
        "headers": [(b"content-type", b"application/json")],
    }
    response = asyncio.run(router(Request(scope, receive)))
    assert response.status_code == 503
    assert response.headers["retry-after"]
    assert b"replica_unavailable" in response.body
    assert engine.calls == PLACEMENT_ATTEMPTS


def test_routing_key_names_the_registry_version_every_spelling_resolves_to(
    tiny_base: Path, adapters: dict[str, Path], tmp_path: Path
) -> None:
    from adapterhub_server.registry import BaseModelSpec, Registry

    config = ServerConfig(
        base_model=str(tiny_base), served_model_name=BASE_ID, registry=tmp_path / "registry"
    )
    spec = BaseModelSpec.from_directory(tiny_base, BASE_ID)
    with Registry.open(config.registry, base=spec) as registry:
        registry.push(adapters["a0"], "support")
        registry.push(adapters["a1"], "support", alias="prod")
        registry.push(adapters["a2"], "support")
    resolver = AdapterKeyResolver.from_config(config)
    assert resolver.key_for_model("support") == "support@3"
    assert resolver.key_for_model("support@prod") == "support@2"
    assert resolver.key_for_model("support@1") == "support@1"
    assert resolver.key_for_model("support@9") == ""
    assert resolver.key_for_model("../etc") == ""
    assert resolver.key_for_model(BASE_ID) == ""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _peft_greedy(base_dir: Path, adapter_dir: Path, ids: list[int], n: int) -> list[int]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    return greedy_continuation(PeftModel.from_pretrained(model, adapter_dir).eval(), ids, n)


@pytest.fixture(scope="module")
def adapters(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from tests.tiny_models import make_peft_adapter

    root = tmp_path_factory.mktemp("cluster-adapters")
    return {
        f"a{i}": make_peft_adapter(tiny_base, root / f"a{i}", seed=100 + i, r=4, alpha=8)
        for i in range(8)
    }


@pytest.fixture(scope="module")
def expected(tiny_base: Path, adapters: dict[str, Path]) -> dict[tuple[str, int], str]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_base)
    return {
        (name, p): tok.decode(_peft_greedy(tiny_base, path, PROMPTS[p], NEW_TOKENS))
        for name, path in adapters.items()
        for p in range(len(PROMPTS))
    }


@pytest.fixture(scope="module")
def cluster(tiny_base: Path, adapters: dict[str, Path]) -> Iterator[str]:
    import ray
    from ray import serve

    from adapterhub_server.cluster.ray_app import build_application

    port = _free_port()
    ray.init(
        address="local",
        _node_ip_address="127.0.0.1",
        include_dashboard=False,
        num_cpus=4,
        object_store_memory=200 * 1024**2,
        log_to_driver=False,
    )
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        config = ServerConfig(
            base_model=str(tiny_base),
            served_model_name=BASE_ID,
            lora_modules=adapters,
            registry=None,
            fine_tuning=False,
            engine=EngineConfig(
                max_loras=2,
                max_cpu_loras=4,
                max_num_seqs=8,
                max_num_batched_tokens=64,
                kv_cache_memory=16 * 1024**2,
                device="cpu",
                num_threads=1,
                lora_kernel="torch",
            ),
        )
        app = build_application(config, replicas=2, engine_actor_options={"num_cpus": 0})
        serve.run(app, name=APP_NAME, route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def _complete(client, url: str, model: str, prompt: int):  # type: ignore[no-untyped-def]
    return client.post(
        f"{url}/v1/completions",
        json={
            "model": model,
            "prompt": PROMPTS[prompt],
            "max_tokens": NEW_TOKENS,
            "temperature": 0,
            "ignore_eos": True,
            "skip_special_tokens": False,
        },
        timeout=60,
    )


def test_affinity_and_outputs_per_adapter(
    cluster: str, adapters: dict[str, Path], expected: dict[tuple[str, int], str]
) -> None:
    import httpx

    names = sorted(adapters)
    jobs = [(names[i % len(names)], (i // len(names)) % len(PROMPTS)) for i in range(200)]
    # Uniform over the adapters, in an order that does not repeat in lockstep.
    jobs = [jobs[(i * 37) % len(jobs)] for i in range(len(jobs))]
    held: dict[str, set[str]] = {}
    hits = counted = 0
    with httpx.Client() as client, concurrent.futures.ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(_complete, client, cluster, m, p) for m, p in jobs]
        for (model, prompt), future in zip(jobs, futures):
            response = future.result()
            assert response.status_code == 200, response.text
            assert response.json()["choices"][0]["text"] == expected[(model, prompt)], model
            replica = response.headers[REPLICA_HEADER]
            if model in held:
                counted += 1
                hits += replica in held[model]
            held.setdefault(model, set()).add(replica)
    replicas = set().union(*held.values())
    assert len(replicas) == 2, "both replicas should serve"
    assert hits / counted >= 0.8, f"affinity {hits / counted:.2f}"


def test_streaming_chat_models_and_base_go_through_the_router(cluster: str) -> None:
    import httpx

    with httpx.Client(timeout=60) as client:
        models = client.get(f"{cluster}/v1/models")
        assert models.status_code == 200 and REPLICA_HEADER in models.headers
        ids = {m["id"] for m in models.json()["data"]}
        assert BASE_ID in ids and "a0" in ids
        base = _complete(client, cluster, BASE_ID, 0)
        assert base.status_code == 200 and base.json()["usage"]["completion_tokens"] == NEW_TOKENS
        body = {
            "model": "a3",
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 5,
            "temperature": 0,
        }
        whole = client.post(f"{cluster}/v1/chat/completions", json=body)
        assert whole.status_code == 200, whole.text
        with client.stream(
            "POST", f"{cluster}/v1/chat/completions", json={**body, "stream": True}
        ) as stream:
            assert stream.status_code == 200
            assert stream.headers["content-type"].startswith("text/event-stream")
            assert REPLICA_HEADER in stream.headers
            lines = [line for line in stream.iter_lines() if line.startswith("data: ")]
        assert lines[-1] == "data: [DONE]"
        missing = client.post(
            f"{cluster}/v1/completions", json={"model": "nope", "prompt": "x", "max_tokens": 1}
        )
        assert missing.status_code == 404


def test_a_killed_replica_gives_no_wrong_answer(
    cluster: str, adapters: dict[str, Path], expected: dict[tuple[str, int], str]
) -> None:
    import httpx
    import ray

    names = sorted(adapters)
    jobs = [(names[i % len(names)], i % len(PROMPTS)) for i in range(120)]

    def engine_replicas() -> list[str]:
        return [
            a["name"]
            for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith("SERVE_REPLICA::") and f"#{ENGINE_DEPLOYMENT}#" in a["name"]
        ]

    victim = engine_replicas()[0]
    statuses: list[int] = []
    with httpx.Client() as client, concurrent.futures.ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(_complete, client, cluster, m, p) for m, p in jobs]
        # Killed while requests run on it (the pool keeps 8 in flight).
        concurrent.futures.wait(futures[:16])
        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
        for (model, prompt), future in zip(jobs, futures):
            response = future.result()
            statuses.append(response.status_code)
            if response.status_code == 503:
                assert "retry-after" in response.headers
                continue
            assert response.status_code == 200, response.text
            assert response.json()["choices"][0]["text"] == expected[(model, prompt)], model
    assert statuses.count(200) > 0
    # Ray replaces the dead replica; the cluster serves every adapter correctly again.
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        current = engine_replicas()
        if len(current) == 2 and victim not in current:
            break
        time.sleep(1)
    else:
        pytest.fail("the killed replica was not replaced")
    with httpx.Client() as client:
        for name in names:
            response = _complete(client, cluster, name, 0)
            assert response.status_code in (200, 503)
            if response.status_code == 200:
                assert response.json()["choices"][0]["text"] == expected[(name, 0)]


def test_cluster_command_serves_until_interrupted(
    tiny_base: Path, adapters: dict[str, Path], tmp_path: Path
) -> None:
    """`adapterhub-server cluster` starts its own Ray on loopback, serves the HTTP API
    through Ray's proxy, and stops cleanly on SIGINT."""
    import os
    import signal
    import subprocess
    import sys

    import httpx

    port = _free_port()
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    argv = (
        f"cluster --replicas 1 --port {port} --base-model {tiny_base} "
        f"--served-model-name {BASE_ID} --no-registry --no-fine-tuning --device cpu "
        "--max-loras 2 --max-cpu-loras 4 --max-num-seqs 4 --max-num-batched-tokens 64 "
        f"--kv-cache-memory 16MiB --lora-modules a0={adapters['a0']}"
    ).split()
    proc = subprocess.Popen(
        [sys.executable, "-m", "adapterhub_server", *argv],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "stderr").open("w"),
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, (tmp_path / "stderr").read_text()[-3000:]
            try:
                response = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=5)
                if response.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the cluster did not come up"
            time.sleep(1)
        assert {m["id"] for m in response.json()["data"]} == {BASE_ID, "a0"}
        assert REPLICA_HEADER in response.headers
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
