"""SIGKILL in the middle of writes: the registry CLI mid-upload, and a whole server mid-job.

tests/registry/test_concurrency.py already kills a writer at each of the push's hook points
(staged, allocated, published). This adds what those do not: the real CLI killed while a
file is half copied into staging, and while pushing in a loop wherever the kill lands; each
time the registry verifies clean through the CLI, no half version is visible and the next
push works. tests/finetune/test_restart.py simulates a crashed server in-process; here a
real server process running a job is SIGKILLed, and a new one over the same jobs directory
stops the orphaned trainer, resumes the job from its checkpoint, and leaves no trainer
behind.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from adapterhub_server.finetune.process import is_alive
from adapterhub_server.registry import BaseModelSpec, Registry
from tests.finetune.conftest import jsonl, wait_for

REPO = Path(__file__).resolve().parents[2]


def start(*args: str) -> subprocess.Popen:
    """A worker in its own process group, so the whole group can be killed at once."""
    return subprocess.Popen(
        [sys.executable, "-m", "tests.reliability.crash_workers", *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def kill_group(process: subprocess.Popen) -> None:
    os.killpg(process.pid, signal.SIGKILL)
    assert process.wait(timeout=30) == -signal.SIGKILL


def registry_cli(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "adapterhub_server.registry.cli", "registry", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "ADAPTERHUB_REGISTRY": str(root)},
    )


def assert_verifies_clean(root: Path) -> dict[str, Any]:
    """`registry verify --json` in a fresh process: exit 0, no problems."""
    result = registry_cli(root, "verify", "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["problems"] == [], report
    return report


@pytest.mark.parametrize(
    ("point", "number_used"),
    [("staged", False), ("allocated", True), ("published", True)],
)
def test_server_killed_during_an_http_upload_leaves_no_trace(
    tmp_path: Path,
    tiny_base: Path,
    tiny_adapters: dict[str, Path],
    spec: BaseModelSpec,
    point: str,
    number_used: bool,
) -> None:
    root, adapter = tmp_path / "registry", tiny_adapters["r8"]
    with Registry.open(root, base=spec) as registry:
        registry.push(tiny_adapters["r4"], "bystander")
    marker, port = tmp_path / "stalled", _free_port()
    server = start("serve-stalling", str(root), str(tiny_base), str(port), point, str(marker))
    url = f"http://127.0.0.1:{port}"
    upload_error: list[BaseException] = []

    def upload() -> None:
        files = [
            ("files", (f.name, f.read_bytes()))
            for f in (adapter / "adapter_config.json", adapter / "adapter_model.safetensors")
        ]
        try:
            httpx.post(f"{url}/v1/adapters", data={"name": "crashy"}, files=files, timeout=120)
        except httpx.TransportError as exc:  # the server dies under the request
            upload_error.append(exc)

    try:
        wait_for(lambda: _answers(url, server), what="the server to answer")
        uploader = threading.Thread(target=upload)
        uploader.start()
        wait_for(lambda: marker.exists() or server.poll() is not None, what=f"step {point}")
        assert server.poll() is None, server.communicate()[0]
    finally:
        kill_group(server)
    uploader.join(timeout=60)
    assert upload_error, "the upload must not have been answered"

    report = assert_verifies_clean(root)  # opening (in the CLI) also recovers
    assert report["checked"] == 1
    with Registry.open(root, base=spec) as registry:
        assert [a.name for a in registry.list_adapters()] == ["bystander"]
        assert registry.index.pending() == []
        assert not (root / "adapters" / "crashy" / "1").exists()
        assert list((root / ".staging").iterdir()) == []
        # A number taken by the killed upload is never handed out again.
        assert registry.push(adapter, "crashy").version == (2 if number_used else 1)


def _answers(url: str, server: subprocess.Popen) -> bool:
    if server.poll() is not None:
        raise AssertionError(server.communicate()[0].decode())
    try:
        return httpx.get(f"{url}/v1/models", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


@pytest.fixture
def spec(tiny_base: Path) -> BaseModelSpec:
    return BaseModelSpec.from_directory(tiny_base, "tiny-base")


def test_cli_killed_while_copying_a_file_leaves_no_trace(
    tmp_path: Path, tiny_base: Path, tiny_adapters: dict[str, Path], spec: BaseModelSpec
) -> None:
    root, adapter = tmp_path / "registry", tiny_adapters["r8"]
    with Registry.open(root, base=spec) as registry:
        registry.push(tiny_adapters["r4"], "bystander")  # committed work must survive
    marker = tmp_path / "stalled"
    writer = start("push-stalled", str(root), str(tiny_base), str(adapter), "crashy", str(marker))
    try:
        wait_for(lambda: marker.exists() or writer.poll() is not None, what="the stalled copy")
        assert writer.poll() is None, writer.communicate()[0]
        # Killed mid-copy: half a weights file sits in the writer's staging area.
        partial = list((root / ".staging").glob("*.d/adapter_model.safetensors"))
        assert len(partial) == 1
        full = (adapter / "adapter_model.safetensors").stat().st_size
        assert 0 < partial[0].stat().st_size < full
    finally:
        kill_group(writer)

    report = assert_verifies_clean(root)  # opening (in the CLI) also recovers
    assert report["checked"] == 1
    with Registry.open(root, base=spec) as registry:
        assert [a.name for a in registry.list_adapters()] == ["bystander"]
        assert not registry.index.known_name("crashy")  # killed before a number was taken
        assert registry.index.pending() == []
        assert list((root / ".staging").iterdir()) == []
        assert not (root / "adapters" / "crashy").exists()
    pushed = registry_cli(
        root, "push", str(adapter), "--name", "crashy", "--base-model", str(tiny_base),
        "--base-model-id", "tiny-base", "--json",
    )  # fmt: skip
    assert pushed.returncode == 0, pushed.stderr
    assert json.loads(pushed.stdout)["version"] == 1
    assert assert_verifies_clean(root)["checked"] == 2


def test_cli_killed_anywhere_in_a_push_loop_leaves_whole_versions(
    tmp_path: Path, tiny_base: Path, tiny_adapters: dict[str, Path], spec: BaseModelSpec
) -> None:
    """No hook: the kill lands wherever the loop is (copying, hashing, renaming, committing).
    Whatever it interrupted is gone; every listed version is whole; numbers are never
    reused."""
    root, adapter = tmp_path / "registry", tiny_adapters["r4"]
    Registry.open(root).close()
    observer = Registry.open(root, recover=False)  # a reader must not clean a live writer

    def ready_versions() -> int:
        return len(observer.index.versions("looped"))

    writer = start("push-loop", str(root), str(tiny_base), str(adapter), "looped")
    try:
        wait_for(lambda: ready_versions() >= 3 or writer.poll() is not None, what="three versions")
        assert writer.poll() is None, writer.communicate()[0]
    finally:
        kill_group(writer)
    observer.close()

    report = assert_verifies_clean(root)
    with Registry.open(root, base=spec) as registry:
        versions = [r.version for r in registry.versions("looped")]
        assert versions == sorted(set(versions)) and len(versions) >= 3
        assert registry.index.pending() == []
        assert list((root / ".staging").iterdir()) == []
        on_disk = sorted(int(p.name) for p in (root / "adapters" / "looped").iterdir())
        assert on_disk == versions  # no directory without a ready row, and vice versa
        assert report["checked"] == len(versions)
        for version in versions:
            with registry.open_file("looped", version, "adapter_model.safetensors") as handle:
                assert handle.read() == (adapter / "adapter_model.safetensors").read_bytes()
        record = registry.push(adapter, "looped")
        assert record.version > max(versions)  # a number a dead writer took is not reused
        assert registry.gc().removed == ()


# -- the fine-tuning server ----------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class JobServer:
    """A `serve-jobs` worker and a client for it."""

    def __init__(self, tmp_path: Path, tiny_base: Path) -> None:
        port = _free_port()
        self.process = start(
            "serve-jobs",
            str(tmp_path / "jobs"),
            str(tmp_path / "registry"),
            str(tiny_base),
            str(port),
        )
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)
        wait_for(self._up, what="the server to answer")

    def _up(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(self.process.communicate()[0].decode())
        try:
            return self.http.get("/v1/fine_tuning/jobs").status_code == 200
        except httpx.TransportError:
            return False

    def job(self, job_id: str) -> dict[str, Any]:
        r = self.http.get(f"/v1/fine_tuning/jobs/{job_id}")
        assert r.status_code == 200, r.text
        return dict(r.json())

    def events(self, job_id: str) -> list[dict[str, Any]]:
        r = self.http.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"limit": 100})
        return list(r.json()["data"])

    def close(self) -> None:
        self.http.close()
        if self.process.poll() is None:
            kill_group(self.process)


@pytest.fixture
def servers(tmp_path: Path, tiny_base: Path) -> Iterator[Callable[[], JobServer]]:
    opened: list[JobServer] = []

    def open_server() -> JobServer:
        opened.append(JobServer(tmp_path, tiny_base))
        return opened[-1]

    yield open_server
    for server in opened:
        server.close()


def _trainers_of(jobs_dir: Path) -> list[int]:
    """Pids of live fake trainers working in `jobs_dir` (their cwd is a job directory)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            cwd = os.readlink(proc / "cwd")
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        trainer = any(b"fake_trainer.py" in part for part in cmdline)
        if state != "Z" and trainer and cwd.startswith(str(jobs_dir)):
            pids.append(int(proc.name))
    return pids


def test_server_killed_mid_job_resumes_it_and_leaves_no_orphan(
    tmp_path: Path, servers: Callable[[], JobServer]
) -> None:
    jobs_dir = tmp_path / "jobs"
    first = servers()
    r = first.http.post(
        "/v1/files", files={"file": ("t.jsonl", jsonl())}, data={"purpose": "fine-tune"}
    )
    assert r.status_code == 200, r.text
    body = {
        "model": "tiny-base",
        "training_file": r.json()["id"],
        "suffix": "slow-crash",
        "method": {"type": "supervised", "supervised": {"hyperparameters": {"max_steps": 100000}}},
    }
    r = first.http.post("/v1/fine_tuning/jobs", json=body)
    assert r.status_code == 200, r.text
    job_id = r.json()["id"]
    wait_for(
        lambda: any(
            e["data"] and e["data"].get("event") == "metrics" for e in first.events(job_id)
        ),
        what="the trainer's first steps",
    )
    (orphan,) = _trainers_of(jobs_dir)

    kill_group(first.process)  # the server, not the trainer: it has a session of its own
    assert _trainers_of(jobs_dir) == [orphan]  # the realistic crash: an orphaned trainer
    identity = (Path("/proc") / str(orphan) / "stat").read_text().rsplit(")", 1)[1].split()[19]

    second = servers()
    # The restart stopped the orphan (SIGTERM: it saved a checkpoint) before resuming.
    assert not is_alive(orphan, identity)
    (calls,) = jobs_dir.rglob(f"{job_id}/calls.jsonl")  # the fake trainer's argv log
    wait_for(lambda: len(calls.read_text().splitlines()) == 2, what="the resumed trainer")
    assert "--resume" in json.loads(calls.read_text().splitlines()[1])
    job = second.job(job_id)
    assert job["status"] == "running", job
    messages = [e["message"] for e in second.events(job_id)]
    assert any("restarted" in m and "checkpoint" in m for m in messages), messages

    r = second.http.post(f"/v1/fine_tuning/jobs/{job_id}/cancel")
    assert r.status_code == 200, r.text
    wait_for(lambda: not _trainers_of(jobs_dir), what="the cancelled trainer to exit")
    assert second.job(job_id)["status"] == "cancelled"
    second.process.send_signal(signal.SIGTERM)  # a clean stop of the second server
    # uvicorn re-raises the SIGTERM after its graceful shutdown.
    assert second.process.wait(timeout=60) in (0, -signal.SIGTERM)
    assert b"Traceback" not in second.process.communicate()[0]
    assert _trainers_of(jobs_dir) == []
