"""Two real `adapterhub-server serve` processes sharing one PostgreSQL + S3 registry, and
`registry copy` between backends."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest

from adapterhub_server.registry import BaseModelSpec
from adapterhub_server.registry.factory import open_registry
from tests.registry import cluster_services as services

REPO = Path(__file__).resolve().parents[2]
FILES = ("adapter_config.json", "adapter_model.safetensors")

pytestmark = pytest.mark.skipif(
    services.pg_bin() is None,
    reason="PostgreSQL binaries (initdb, pg_ctl) are not installed; scripts/test.sh installs "
    "them when run as root",
)


@pytest.fixture(scope="module")
def replicas(
    pg_url: str,
    s3_env: dict[str, str],
    tiny_base: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[httpx.Client, httpx.Client]]:
    db = services.create_database(pg_url)
    blobs = f"s3://{services.create_bucket(s3_env)}/shared"
    tmp = tmp_path_factory.mktemp("replicas")
    with ExitStack() as stack:
        urls = [
            stack.enter_context(
                services.serve_replica(tiny_base, db, blobs, tmp / f"cache{i}", "--no-fine-tuning")
            ).url
            for i in (1, 2)
        ]
        clients = [stack.enter_context(httpx.Client(base_url=u, timeout=60)) for u in urls]
        yield clients[0], clients[1]


def _files(adapter_dir: Path) -> list[tuple[str, tuple[str, bytes]]]:
    return [("files", (f, (adapter_dir / f).read_bytes())) for f in FILES]


def _greedy(http: httpx.Client, model: str) -> httpx.Response:
    return http.post(
        "/v1/completions",
        json={"model": model, "prompt": "hello world", "max_tokens": 8, "temperature": 0},
    )


def _text(http: httpx.Client, model: str) -> str:
    r = _greedy(http, model)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def _peft_text(tiny_base: Path, adapter_dir: Path) -> str:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_base)
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32), adapter_dir
    ).eval()
    ids = tok.encode("hello world")
    out = model.generate(
        torch.tensor([ids]),
        attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        max_new_tokens=8,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
    )
    return tok.decode(out[0, len(ids) :], skip_special_tokens=True)


def test_upload_alias_and_delete_reach_the_other_replica(
    replicas: tuple[httpx.Client, httpx.Client], tiny_base: Path, tiny_adapters: dict[str, Path]
) -> None:
    a, b = replicas
    v1, v2 = tiny_adapters["r4"], tiny_adapters["r16-rslora"]
    r = a.post("/v1/adapters", data={"name": "bot", "alias": "prod"}, files=_files(v1))
    assert r.status_code == 201, r.text
    out_v1 = _peft_text(tiny_base, v1)
    assert _text(b, "bot@prod") == out_v1  # uploaded on A, served by B, equal to PEFT
    assert b.post("/v1/adapters", data={"name": "bot"}, files=_files(v2)).status_code == 201
    out_v2 = _peft_text(tiny_base, v2)
    assert _text(a, "bot") == out_v2

    assert a.put("/v1/adapters/bot/aliases/prod", json={"version": 2}).status_code == 200
    assert _text(b, "bot@prod") == out_v2  # moved on A, seen by B's next request

    assert _text(b, "bot@1") == out_v1  # B has v1 loaded
    assert a.delete("/v1/adapters/bot/versions/1").status_code == 200
    deadline = time.monotonic() + 2
    while _greedy(b, "bot@1").status_code != 404:
        assert time.monotonic() < deadline, "B still serves a version deleted on A"
        time.sleep(0.05)
    assert _text(b, "bot") == out_v2
    # B also dropped v1's weights and downloaded copy, pushed by A's NOTIFY.
    log = services.LOGS[str(b.base_url).rstrip("/")]
    deadline = time.monotonic() + 5
    while "evicted bot@1: deleted on another replica" not in log.read_text():
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.1)


def test_concurrent_uploads_on_both_replicas_get_distinct_numbers(
    replicas: tuple[httpx.Client, httpx.Client], tiny_adapters: dict[str, Path]
) -> None:
    a, b = replicas
    files = _files(tiny_adapters["r4"])

    def upload(client: httpx.Client) -> int:
        r = client.post("/v1/adapters", data={"name": "race"}, files=files)
        assert r.status_code == 201, r.text
        return r.json()["version"]

    with ThreadPoolExecutor(6) as pool:
        versions = list(pool.map(upload, [a, b] * 3))
    assert sorted(versions) == [1, 2, 3, 4, 5, 6]
    assert b.get("/v1/adapters/race").json()["versions"] == [1, 2, 3, 4, 5, 6]


def test_registry_copy_round_trip(
    pg_url: str,
    s3_env: dict[str, str],
    tmp_path: Path,
    base_spec: BaseModelSpec,
    tiny_adapters: dict[str, Path],
) -> None:
    src_db = services.create_database(pg_url)
    src_blobs = f"s3://{services.create_bucket(s3_env)}/src"
    env = {**os.environ, "ADAPTERHUB_REGISTRY_CACHE": str(tmp_path / "cache")}
    os.environ["ADAPTERHUB_REGISTRY_CACHE"] = env["ADAPTERHUB_REGISTRY_CACHE"]
    try:
        with open_registry(src_db, src_blobs, base=base_spec) as src:
            src.push(tiny_adapters["r4"], "a", alias="prod", lineage={"base_model_id": "x"})
            src.push(tiny_adapters["r8"], "a")
            src.push(tiny_adapters["r8"], "b")
            src.delete_version("b", 1)
            src.push(tiny_adapters["r4"], "b", alias="live")
            before = [r.to_dict() for r in src.index.all_versions()]

        def copy(*args: str) -> dict:
            out = subprocess.run(
                [sys.executable, "-m", "adapterhub_server", "registry", "copy", *args, "--json"],
                cwd=REPO,
                env=env,
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert out.returncode == 0, out.stderr
            return json.loads(out.stdout)

        directory = tmp_path / "dir"
        dst_db = services.create_database(pg_url)
        first = copy(src_db, str(directory), "--src-blobs", src_blobs)
        assert first["copied"] == ["a@1", "a@2", "b@1", "b@2"] and first["aliases"] == 2
        dst_blobs = f"file://{tmp_path / 'blobs'}"
        copy(str(directory), dst_db, "--dst-blobs", dst_blobs)
        again = copy(str(directory), dst_db, "--dst-blobs", dst_blobs)
        assert again["copied"] == [] and again["aliases"] == 0  # idempotent

        with open_registry(dst_db, dst_blobs, base=base_spec) as dst:
            assert [r.to_dict() for r in dst.index.all_versions()] == before
            assert dst.aliases("a") == {"prod": 1} and dst.aliases("b") == {"live": 2}
            assert dst.verify().ok and dst.verify().checked == 3
            assert dst.push(tiny_adapters["r4"], "b").version == 3  # numbers stay used
    finally:
        os.environ.pop("ADAPTERHUB_REGISTRY_CACHE", None)


def _raw_post(url: str, request: httpx.Request, body_bytes: int) -> socket.socket:
    """Send `request`'s head and its first `body_bytes` body bytes on a bare socket (left
    open: the server sees an upload in progress, or a complete one awaiting its answer)."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    head = f"{request.method} {request.url.raw_path.decode()} HTTP/1.1\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in request.headers.items()) + "\r\n"
    sock.sendall(head.encode() + request.content[:body_bytes])
    return sock


def test_sigkill_during_an_http_upload_leaves_nothing_half_visible(
    pg_url: str,
    s3_env: dict[str, str],
    tiny_base: Path,
    tiny_adapters: dict[str, Path],
    base_spec: BaseModelSpec,
    tmp_path: Path,
) -> None:
    """A replica killed mid-body, or just after the body while it stages, hashes and
    publishes, never leaves a version another replica lists without serving it."""
    db = services.create_database(pg_url)
    blobs = f"s3://{services.create_bucket(s3_env)}/shared"
    with ExitStack() as stack:
        peer_url = stack.enter_context(
            services.serve_replica(tiny_base, db, blobs, tmp_path / "peer", "--no-fine-tuning")
        ).url
        peer = stack.enter_context(httpx.Client(base_url=peer_url, timeout=60))
        for attempt, (fraction, delay) in enumerate([(0.5, 0.0), (1.0, 0.0), (1.0, 0.15)]):
            with services.serve_replica(
                tiny_base, db, blobs, tmp_path / f"victim{attempt}", "--no-fine-tuning"
            ) as victim:
                request = httpx.Request(
                    "POST",
                    f"{victim.url}/v1/adapters",
                    data={"name": "crash"},
                    files=_files(tiny_adapters["r32"]),
                )
                request.read()
                sock = _raw_post(victim.url, request, int(len(request.content) * fraction))
                time.sleep(delay)
                victim.proc.kill()
                victim.proc.wait()
                sock.close()
            # Whatever the kill interrupted: listed means servable, else not there at all.
            listed = peer.get("/v1/adapters/crash")
            if listed.status_code == 200:
                for version in listed.json()["versions"]:
                    assert _greedy(peer, f"crash@{version}").status_code == 200
            else:
                assert listed.status_code == 404, listed.text
                assert _greedy(peer, "crash").status_code == 404
            with open_registry(db, blobs, base=base_spec) as registry:
                assert registry.verify().ok
        # The numbers a dead writer took stay used; the next upload is whole and served.
        made = peer.post("/v1/adapters", data={"name": "crash"}, files=_files(tiny_adapters["r4"]))
        assert made.status_code == 201, made.text
        assert _greedy(peer, f"crash@{made.json()['version']}").status_code == 200
