"""The `trainer` command as users run it: config files, events, signals, torchrun."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.trainer.helpers import common_args, write_data
from trainer.checkpoint_paths import latest_checkpoint
from trainer.cli import main
from trainer.events import read_events

REPO = Path(__file__).resolve().parents[2]


def test_config_file_with_flag_overrides(tiny_base: Path, tmp_path: Path) -> None:
    from adapterhub_server.registry import Registry

    data = write_data(tmp_path / "train.jsonl")
    registry = tmp_path / "registry"
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        f"data: {data}\nbase_model: {tiny_base}\nname: from-file\nregistry: {registry}\n"
        "r: 4\nmax-steps: 3\nbatch_size: 2\nmax_seq_len: 64\nlr: 0.001\n"
    )
    assert main(["--log-level", "warning", "train", "--config", str(cfg), "--r", "2"]) == 0
    with Registry.open(registry) as reg:
        record = reg.resolve("from-file@1")
    hp = record.lineage.hyperparameters
    assert record.rank == 2 and hp["r"] == 2  # the flag won
    assert hp["max_steps"] == 3 and hp["batch_size"] == 2 and hp["lr"] == 0.001

    (tmp_path / "bad.json").write_text(json.dumps({"data": str(data), "rank": 4}))
    assert main(["train", "--config", str(tmp_path / "bad.json"), "--name", "x"]) == 2


def test_events_file_tells_the_whole_run(tiny_base: Path, tmp_path: Path) -> None:
    data = write_data(tmp_path / "train.jsonl")
    events = tmp_path / "events.jsonl"
    argv = [*common_args(tiny_base, data, 4), "--log-every", "2", "--eval-data", str(data)]
    argv += ["--eval-every", "2", "--name", "ev", "--registry", str(tmp_path / "r")]
    assert main([*argv, "--events", str(events)]) == 0
    seen, _ = read_events(events)
    kinds = [e["type"] for e in seen]
    assert kinds == [
        "started",
        "metrics",
        "eval",
        "metrics",
        "eval",
        "published",
        "succeeded",
    ]
    metrics = [e["data"] for e in seen if e["type"] == "metrics"]
    assert [m["step"] for m in metrics] == [2, 4]
    assert all(m["tokens_per_s"] > 0 and m["total_steps"] == 4 for m in metrics)
    assert seen[-2]["data"]["ref"] == "ev@1" and seen[-1]["data"]["ref"] == "ev@1"
    assert seen[0]["data"]["total_steps"] == 4 and seen[0]["data"]["resumed_from_step"] == 0


def test_bad_data_is_a_failed_event_and_exit_2(tiny_base: Path, tmp_path: Path) -> None:
    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": 3}\n')
    events = tmp_path / "events.jsonl"
    argv = [*common_args(tiny_base, data, 2), "--output-dir", str(tmp_path / "o")]
    assert main([*argv, "--events", str(events)]) == 2
    (event,) = read_events(events)[0]
    assert event["type"] == "failed" and f"{data}:2:" in event["data"]["error"]


def _wait_for(
    events: Path, kind: str, proc: subprocess.Popen[bytes], skip: int = 0, timeout: float = 120
):
    """The last `kind` event after the first `skip` events, waiting for the process to
    write one."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [e for e in read_events(events)[0][skip:] if e["type"] == kind]
        if found:
            return found[-1]
        if proc.poll() is not None:
            raise AssertionError(f"trainer exited {proc.returncode} before a {kind} event")
        time.sleep(0.05)
    raise AssertionError(f"no {kind} event within {timeout} s")


@pytest.mark.parametrize("first_signal", [signal.SIGINT, signal.SIGTERM])
def test_signal_saves_a_checkpoint_and_resume_continues(
    tiny_base: Path, tmp_path: Path, first_signal: signal.Signals
) -> None:
    data = write_data(tmp_path / "train.jsonl")
    out, events = tmp_path / "out", tmp_path / "events.jsonl"
    argv = [*common_args(tiny_base, data, 100_000), "--log-every", "1"]
    argv += ["--save-every", "0", "--output-dir", str(out), "--events", str(events)]
    cmd = [sys.executable, "-m", "trainer", *argv]
    env = os.environ | {"PYTHONPATH": str(REPO)}

    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stderr=subprocess.PIPE)
    _wait_for(events, "metrics", proc)
    proc.send_signal(first_signal)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err.decode()
    assert b"--resume" in err
    stopped = _wait_for(events, "interrupted", proc)
    checkpoint = latest_checkpoint(out / "checkpoints")
    assert checkpoint is not None and str(checkpoint) == stopped["data"]["checkpoint"]

    # The resumed run starts where the first stopped (and can itself be stopped again).
    before = len(read_events(events)[0])
    proc = subprocess.Popen([*cmd, "--resume"], cwd=REPO, env=env, stderr=subprocess.PIPE)
    _wait_for(events, "metrics", proc, skip=before)
    started = _wait_for(events, "started", proc, skip=before)
    assert started["data"]["resumed_from_step"] == stopped["data"]["step"]
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err.decode()
    later = latest_checkpoint(out / "checkpoints")
    assert later is not None and later.name > checkpoint.name


def test_torchrun_two_cpu_processes_publish_one_version(tiny_base: Path, tmp_path: Path):
    from adapterhub_server.registry import Registry

    data = write_data(tmp_path / "train.jsonl")
    registry = tmp_path / "registry"
    events = tmp_path / "events.jsonl"
    argv = [*common_args(tiny_base, data, 4), "--batch-size", "2", "--events", str(events)]
    argv[argv.index("--r")] = "--lora-r"  # `--r` is ambiguous to torchrun's own parser
    argv += ["--name", "ddp", "--registry", str(registry), "--device", "cpu", "--dropout", "0"]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "trainer",
        *argv,
    ]
    env = os.environ | {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    with Registry.open(registry) as reg:
        versions = reg.versions("ddp")
    assert [v.version for v in versions] == [1]
    lineage = versions[0].lineage
    assert lineage.extra["world_size"] == 2
    # Only rank 0 reported: one start, one success.
    kinds = [e["type"] for e in read_events(events)[0]]
    assert kinds.count("started") == 1 and kinds.count("succeeded") == 1

    # Two ranks of 2 examples each are one process accumulating two micro-batches of 2: the
    # same examples per step, the same token-weighted loss.
    single = [*argv, "--grad-accum", "2", "--name", "single"]
    single[single.index("--events") + 1] = str(tmp_path / "single.jsonl")
    assert main(single) == 0
    with Registry.open(registry) as reg:
        alone = reg.resolve("single@1").lineage.extra["train_loss_history"]
    together = lineage.extra["train_loss_history"]
    assert [s for s, _ in together] == [s for s, _ in alone]
    for (_, a), (_, b) in zip(together, alone, strict=True):
        assert a == pytest.approx(b, rel=1e-4)


def test_torchrun_full_sft_is_sharded_and_resumable(tiny_base: Path, tmp_path: Path):
    """Full SFT under torchrun runs FSDP: it matches a single process accumulating the same
    micro-batches, and its checkpoints (gathered from the shards) resume."""
    from adapterhub_server.registry import Registry

    data = write_data(tmp_path / "train.jsonl")
    registry = tmp_path / "registry"
    argv = [*common_args(tiny_base, data, 4), "--batch-size", "2", "--method", "full"]
    argv[argv.index("--r")] = "--lora-r"
    argv += ["--lr", "1e-3", "--extract-rank", "4", "--registry", str(registry)]
    argv += ["--device", "cpu", "--dropout", "0", "--log-every", "1", "--eval-data", str(data)]
    sharded = [*argv, "--name", "fsdp", "--output-dir", str(tmp_path / "fsdp")]
    sharded += ["--save-every", "2", "--keep-checkpoints"]
    env = os.environ | {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}

    def torchrun(args: list[str]) -> None:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        cmd += ["--nproc-per-node", "2", "-m", "trainer", *args]
        done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, timeout=300)
        assert done.returncode == 0, done.stderr.decode()[-3000:]

    torchrun(sharded)
    assert (
        main(
            [
                *argv,
                "--grad-accum",
                "2",
                "--name",
                "single",
                "--output-dir",
                str(tmp_path / "single"),
            ]
        )
        == 0
    )
    # Resume the sharded run from its step-2 checkpoint: the same last steps again.
    assert latest_checkpoint(tmp_path / "fsdp" / "checkpoints").name == "step-00000002"
    torchrun([*sharded, "--resume", "--name", "fsdp-resumed"])

    with Registry.open(registry) as reg:
        runs = {n: reg.resolve(f"{n}@1").lineage for n in ("fsdp", "single", "fsdp-resumed")}
    losses = {n: [v for _, v in lin.extra["train_loss_history"]] for n, lin in runs.items()}
    assert losses["fsdp"] == pytest.approx(losses["single"], rel=1e-4)
    assert losses["fsdp-resumed"] == pytest.approx(losses["fsdp"], rel=1e-4)  # history kept
    assert runs["fsdp-resumed"].extra["resumed_from_step"] == 2
    assert runs["fsdp"].extra["eval_loss"] == pytest.approx(
        runs["single"].extra["eval_loss"], rel=1e-4
    )
    assert runs["fsdp"].extra["world_size"] == 2
    assert 0 < runs["fsdp"].extra["extraction"]["energy"] <= 1
