"""deploy/k8s/ refers to what the image really has: its port, probe routes, CLI flags,
environment variables and metric names."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from adapterhub_server.api import create_app
from adapterhub_server.api.auth import PUBLIC_PATHS
from adapterhub_server.cli import ADMIN_KEY_ENV, API_KEY_ENV, build_parser, config_from_args
from tests.api.fake_engine import FakeEngine

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"


def _objects() -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for path in sorted(K8S.glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def _one(kind: str, name: str) -> dict[str, Any]:
    [found] = [o for o in _objects() if o["kind"] == kind and o["metadata"]["name"] == name]
    return found


def _container(deployment: dict[str, Any], name: str) -> dict[str, Any]:
    spec = deployment["spec"]["template"]["spec"]
    [found] = [c for c in spec["containers"] if c["name"] == name]
    return found


def _flag(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1]


def _dockerfile() -> str:
    return (ROOT / "Dockerfile").read_text()


def _exposed_port() -> int:
    [port] = re.findall(r"^EXPOSE (\d+)$", _dockerfile(), flags=re.M)
    return int(port)


def test_every_document_parses_and_has_kind_and_name() -> None:
    objects = _objects()
    assert objects
    for o in objects:
        assert o["apiVersion"] and o["kind"] and o["metadata"]["name"]
    kinds = {o["kind"] for o in objects}
    assert {"Deployment", "Service", "InferencePool", "HTTPRoute"} <= kinds


def test_server_container_matches_the_image() -> None:
    deployment = _one("Deployment", "adapterhub")
    server = _container(deployment, "adapterhub")
    args = server["args"]
    cmd = re.search(r"^CMD (\[.*\])$", _dockerfile(), flags=re.M)
    assert cmd is not None
    assert args[:2] == yaml.safe_load(cmd.group(1))[:2]  # adapterhub-server serve
    # Every flag is one the CLI knows, and means what the manifest wants.
    config = config_from_args(build_parser().parse_args(args[1:]))
    port = _exposed_port()
    assert config.port == port
    assert config.host == "0.0.0.0"
    assert config.metrics_without_key and config.admin_loopback_without_key
    [http_port] = [p for p in server["ports"] if p["name"] == "http"]
    assert http_port["containerPort"] == port
    # The allowed adapter directory is a mounted volume.
    mounts = {m["mountPath"]: m["name"] for m in server["volumeMounts"]}
    for directory in config.allowed_local_adapter_dirs:
        assert str(directory) in mounts
    # Keys and registry come through the variables the CLI reads.
    env = {e["name"]: e for e in server["env"]}
    assert {API_KEY_ENV, ADMIN_KEY_ENV} <= set(env)
    assert env["ADAPTERHUB_REGISTRY"]["value"] in mounts
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    claim = volumes[mounts[env["ADAPTERHUB_REGISTRY"]["value"]]]["persistentVolumeClaim"]
    assert _one("PersistentVolumeClaim", claim["claimName"])
    # Longer than the drain, so SIGTERM lets requests finish.
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > config.shutdown_timeout


@pytest.mark.anyio
async def test_probes_hit_public_routes_that_exist(anyio_backend: str) -> None:
    server = _container(_one("Deployment", "adapterhub"), "adapterhub")
    port_names = {p["name"]: p["containerPort"] for p in server["ports"]}
    probes = {k: server[k]["httpGet"] for k in ("startupProbe", "livenessProbe", "readinessProbe")}
    assert probes["livenessProbe"]["path"] == "/health"
    assert probes["startupProbe"]["path"] == "/health"
    assert probes["readinessProbe"]["path"] == "/ready"
    app = create_app(FakeEngine())
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        for probe in probes.values():
            port = probe["port"]
            assert port_names.get(port, port) == _exposed_port()
            # Public even when keys are set: kubelet sends none.
            assert probe["path"] in PUBLIC_PATHS
            assert (await client.get(probe["path"])).status_code == 200


def test_service_and_pool_target_the_server_port() -> None:
    deployment = _one("Deployment", "adapterhub")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    port = _exposed_port()
    service = _one("Service", "adapterhub")
    assert service["spec"]["selector"].items() <= labels.items()
    [svc_port] = service["spec"]["ports"]
    assert svc_port["targetPort"] in ("http", port)

    pool = _one("InferencePool", "adapterhub")
    assert pool["apiVersion"] == "inference.networking.k8s.io/v1"
    assert pool["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert [p["number"] for p in pool["spec"]["targetPorts"]] == [port]

    picker = pool["spec"]["endpointPickerRef"]
    epp_service = _one("Service", picker["name"])
    assert picker["port"]["number"] in [p["port"] for p in epp_service["spec"]["ports"]]
    epp = _one("Deployment", picker["name"])
    assert (
        epp_service["spec"]["selector"].items()
        <= epp["spec"]["template"]["metadata"]["labels"].items()
    )
    container = _container(epp, "epp")
    assert _flag(container["args"], "--pool-name") == pool["metadata"]["name"]
    assert int(_flag(container["args"], "--grpc-port")) == picker["port"]["number"]

    route = _one("HTTPRoute", "adapterhub")
    refs = [b for rule in route["spec"]["rules"] for b in rule["backendRefs"]]
    assert {
        "group": "inference.networking.k8s.io",
        "kind": "InferencePool",
        "name": "adapterhub",
    } in refs


class _EngineWithAdapters(FakeEngine):
    def adapter_requests(self) -> tuple[list[str], list[str]]:
        return ["a"], ["b"]


@pytest.mark.anyio
async def test_picker_flags_name_metrics_the_server_exports(anyio_backend: str) -> None:
    args = _container(_one("Deployment", "adapterhub-epp"), "epp")["args"]
    wanted = {
        flag: _flag(args, flag)
        for flag in (
            "--total-queued-requests-metric",
            "--kv-cache-usage-percentage-metric",
            "--lora-info-metric",
        )
    }
    transport = httpx.ASGITransport(app=create_app(_EngineWithAdapters()))
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        body = (await client.get("/metrics")).text
    families = {f.name: f for f in text_string_to_metric_families(body)}
    for flag, name in wanted.items():
        assert name in families, (flag, name)
        assert families[name].type == "gauge"
    [sample] = families[wanted["--lora-info-metric"]].samples
    assert set(sample.labels) == {"running_lora_adapters", "waiting_lora_adapters", "max_lora"}


def test_adapter_syncer_targets_this_server() -> None:
    deployment = _one("Deployment", "adapterhub")
    spec = deployment["spec"]["template"]["spec"]
    [syncer] = [c for c in spec["initContainers"] if c["name"] == "lora-adapter-syncer"]
    assert syncer["restartPolicy"] == "Always"  # a sidecar, in the server's pod
    server_args = _container(deployment, "adapterhub")["args"]
    # It sends no key: the server must accept keyless admin calls from loopback.
    assert "--admin-loopback-without-key" in server_args
    config_map = _one("ConfigMap", "adapterhub-adapters")
    config = yaml.safe_load(config_map["data"]["configmap.yaml"])["vLLMLoRAConfig"]
    assert config["port"] == _exposed_port()
    assert config["defaultBaseModel"] == _flag(server_args, "--served-model-name")
    for model in config["ensureExist"]["models"]:
        assert re.fullmatch(r"[a-z0-9][a-z0-9._-]{0,63}", model["id"])
