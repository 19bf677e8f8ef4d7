"""Real services for shared-registry tests: a throwaway PostgreSQL server and a moto S3.

PostgreSQL refuses to run as root, so as root the server runs as the `postgres` user (or
`nobody`) through `runuser`. Both listen on loopback only.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[2]

PG_BIN_DIRS = sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)


def pg_bin() -> Path | None:
    for directory in PG_BIN_DIRS:
        if (directory / "initdb").exists() and (directory / "pg_ctl").exists():
            return directory
    found = shutil.which("initdb")
    return Path(found).parent if found else None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run_as(user: str | None, argv: list[str], **kwargs) -> subprocess.CompletedProcess:
    if user is not None:
        argv = ["runuser", "-u", user, "--", *argv]
    return subprocess.run(argv, check=True, capture_output=True, text=True, **kwargs)


@contextlib.contextmanager
def postgres_server(workdir: Path) -> Iterator[str]:
    """Start PostgreSQL in `workdir`; yields a URL with a password (to test redaction)."""
    bindir = pg_bin()
    assert bindir is not None
    user = None
    if os.geteuid() == 0:
        for candidate in ("postgres", "nobody"):
            try:
                pwd.getpwnam(candidate)
                user = candidate
                break
            except KeyError:
                continue
    workdir.mkdir(parents=True, exist_ok=True)
    data = workdir / "pgdata"
    password = "pw-" + secrets.token_hex(6)
    pwfile = workdir / "pwfile"
    pwfile.write_text(password + "\n")
    if user is not None:
        info = pwd.getpwnam(user)
        for path in (workdir, pwfile):
            os.chown(path, info.pw_uid, info.pw_gid)
        # Every parent must be traversable by that user.
        parent = workdir.parent
        while parent != parent.parent:
            with contextlib.suppress(OSError):
                os.chmod(parent, os.stat(parent).st_mode | 0o011)
            parent = parent.parent
    _run_as(
        user,
        [
            str(bindir / "initdb"),
            "-D",
            str(data),
            "-U",
            "hub",
            "--pwfile",
            str(pwfile),
            "-A",
            "scram-sha-256",
            "--no-sync",
            "-E",
            "UTF8",
        ],
    )
    port = free_port()
    log = workdir / "pg.log"
    _run_as(
        user,
        [
            str(bindir / "pg_ctl"),
            "-D",
            str(data),
            "-l",
            str(log),
            "-w",
            "-o",
            f"-h 127.0.0.1 -p {port} -k {workdir} -c fsync=off -c max_connections=200",
            "start",
        ],
    )
    try:
        yield f"postgresql://hub:{password}@127.0.0.1:{port}/postgres"
    finally:
        with contextlib.suppress(subprocess.CalledProcessError):
            _run_as(user, [str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"])


def create_database(url: str) -> str:
    """A fresh database on the server `url` points at; returns its URL."""
    import psycopg

    name = "t_" + secrets.token_hex(6)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return url.rsplit("/", 1)[0] + "/" + name


@contextlib.contextmanager
def moto_s3() -> Iterator[dict[str, str]]:
    """A moto S3 server on loopback; yields the AWS environment that points at it."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            break
        time.sleep(0.05)
    try:
        yield {
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
    finally:
        server.stop()


def create_bucket(env: dict[str, str]) -> str:
    import boto3

    name = "b-" + secrets.token_hex(6)
    boto3.client(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name=env["AWS_DEFAULT_REGION"],
    ).create_bucket(Bucket=name)
    return name


LOGS: dict[str, Path] = {}
"""Server URL -> its log file."""


@dataclass
class Replica:
    """A running `adapterhub-server serve` process."""

    url: str
    proc: subprocess.Popen
    log: Path


@contextlib.contextmanager
def serve_replica(
    base: Path, registry: str, blobs: str, cache: Path, *extra: str
) -> Iterator[Replica]:
    """`adapterhub-server serve` of the tiny base on a shared registry until the block ends
    (SIGTERM, then SIGKILL); its log must never show the database password."""
    port = free_port()
    log = cache.with_suffix(".log")
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "adapterhub_server",
                "serve",
                "--base-model",
                str(base),
                "--served-model-name",
                "tiny-base",
                "--port",
                str(port),
                "--registry",
                registry,
                "--registry-blobs",
                blobs,
                "--jobs-dir",
                str(cache.with_suffix(".jobs")),
                "--max-loras",
                "2",
                "--log-level",
                "info",
                *extra,
            ],
            cwd=REPO,
            env={**os.environ, "ADAPTERHUB_REGISTRY_CACHE": str(cache), "PYTHONUNBUFFERED": "1"},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    LOGS[url] = log
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, f"server exited early:\n{log.read_text()}"
            try:
                if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not become ready"
            time.sleep(0.2)
        yield Replica(url=url, proc=proc, log=log)
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        output = log.read_text()
        assert registry.split("@")[0].split(":")[-1] not in output  # no password in logs
