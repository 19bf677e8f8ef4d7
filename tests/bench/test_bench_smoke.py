"""Every benchmark script runs end to end at tiny sizes (its figures are not checked here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from adapterhub_server import cpu_gemm
from adapterhub_server.lora import cpu_kernel
from adapterhub_server.models import cpu_attention

REPO = Path(__file__).resolve().parents[2]


def _run(module: str, *args: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_lora_ops_bench(tmp_path: Path) -> None:
    out = tmp_path / "ops.json"
    _run("bench.lora_ops", "--tokens", "4", "--adapters", "2", "--repeats", "2", "--out", str(out))
    rows = json.loads(out.read_text())["rows"]
    assert rows and all(r["grouped_us"] > 0 for r in rows)


def test_lora_read_floor_bench(tmp_path: Path) -> None:
    if cpu_kernel.load() is None:
        pytest.skip("the CPU LoRA kernel cannot be built here")
    out = tmp_path / "floor.json"
    _run(
        "bench.lora_ops",
        "--read-floor",
        "--tokens",
        "2",
        "--adapters",
        "2",
        "--layers",
        "1",
        "--repeats",
        "1",
        "--out",
        str(out),
    )
    (row,) = json.loads(out.read_text())["rows"]
    assert row["base_ms"] > 0 and {"kernel_fp32_ms", "read_bf16_ms"} <= set(row)


def test_adapter_floor_bench(tmp_path: Path) -> None:
    if cpu_kernel.load() is None:
        pytest.skip("the CPU LoRA kernel cannot be built here")
    out = tmp_path / "floor.json"
    stdout = _run("bench.adapter_floor", "--smoke", "--out", str(out))
    result = json.loads(out.read_text())
    assert set(result["median_decode_step_ms"]) == {
        "none",
        "kernel-float32",
        "read-float32",
        "kernel-bfloat16",
        "read-bfloat16",
    }
    assert result["ratios"]["read-bfloat16/none"] > 0
    assert "read-float32" in stdout


def test_linear_bench(tmp_path: Path) -> None:
    out = tmp_path / "linear.json"
    if cpu_gemm.load() is None:
        pytest.skip("the C GEMM kernel cannot be built here")
    args = ["--rows", "2", "17", "--repeats", "1", "--layer-repeats", "1", "--layers", "1"]
    _run("bench.linear_cpu", *args, "--out", str(out))
    result = json.loads(out.read_text())
    assert {r["layer"] for r in result["layers"]} >= {"lm_head", "qkv_proj"}
    assert [r["rows"] for r in result["stack"]] == [2, 17]
    assert all(r["cpu_gemm_ms"] > 0 and r["onednn_ms"] > 0 for r in result["stack"])


def test_attention_bench(tmp_path: Path) -> None:
    if cpu_attention.load() is None:
        pytest.skip("the CPU attention kernel cannot be built here")
    out = tmp_path / "attention.json"
    args = ["--contexts", "20", "--prefill", "8:4", "--sequences", "2", "--repeats", "1"]
    _run("bench.attention_cpu", *args, "--out", str(out))
    rows = json.loads(out.read_text())["rows"]
    assert [(r["dtype"], r["kind"]) for r in rows] == [
        ("float32", "decode"),
        ("float32", "prefill"),
        ("bfloat16", "decode"),
        ("bfloat16", "prefill"),
    ]
    assert all(r["kernel_ms"] > 0 and r["torch_ms"] > 0 for r in rows)


def test_serve_throughput_bench(tmp_path: Path) -> None:
    out = tmp_path / "serve.json"
    stdout = _run("bench.serve_throughput", "--smoke", "--out", str(out))
    result = json.loads(out.read_text())
    assert set(result["summary"]) == {
        "engine",
        "engine-base",
        "engine-bf16",
        "engine-dora",
        "engine-merge-cat",
        "engine-merge-ties",
        "peft-mixed",
        "peft-swap",
        "http",
        "bf16-engine",
        "bf16-engine-base",
        "bf16-peft-mixed",
    }
    for config in (
        "engine",
        "engine-bf16",
        "engine-dora",
        "engine-merge-cat",
        "engine-merge-ties",
        "bf16-engine",
        "bf16-engine-base",
    ):
        assert result["summary"][config]["generated_tokens"] == 4 * 4, config
    assert "engine/peft-mixed" in stdout and "engine-dora/engine" in stdout
    assert "engine-bf16/engine-base decode step" in result["ratios"]
    assert "bf16-engine/bf16-engine-base decode step paired" in result["ratios"]
    assert "bf16-engine/bf16-peft-mixed" in result["ratios"]
    # One repeat in the smoke run: the paired ratio is that repeat's own ratio.
    ratios, runs = result["ratios"], result["runs"]
    assert ratios["engine/engine-base decode step paired"] == (
        runs["engine"][0]["median_decode_step_ms"] / runs["engine-base"][0]["median_decode_step_ms"]
    )
    assert out.with_suffix(".png").exists()


def test_shared_prefix_bench(tmp_path: Path) -> None:
    out = tmp_path / "shared_prefix.json"
    stdout = _run("bench.shared_prefix", "--smoke", "--out", str(out))
    result = json.loads(out.read_text())
    assert set(result["summary"]) == {"off", "on-cold", "on-warm"}
    assert result["summary"]["off"]["prefix_hit_rate"] == 0
    assert result["summary"]["on-warm"]["prefix_hit_rate"] > 0
    assert result["meta"]["shared_prefix_tokens"] >= 64
    assert "ttft_p50 off/on-cold" in stdout
    assert out.with_suffix(".png").exists()


def test_capacity_bench(tmp_path: Path) -> None:
    # The static baseline is the engine before paged KV, a git worktree the real run points
    # at; here the worker runs it from this tree, which exercises the same worker process.
    out = tmp_path / "capacity.json"
    stdout = _run("bench.capacity", "--smoke", "--old-tree", str(REPO), "--out", str(out))
    result = json.loads(out.read_text())
    assert set(result["summary"]) == {"paged", "static", "preempt"}
    assert all(result["checks"].values()), result["checks"]
    assert result["summary"]["static"]["peak_running"] <= result["meta"]["static_rows"]
    assert "checks:" in stdout
    assert out.with_suffix(".png").exists()


@pytest.mark.slow
def test_profile_bench(tmp_path: Path) -> None:
    out = tmp_path / "profile.json"
    _run(
        "bench.profile_step", "-n", "2", "-k", "1", "--steps", "1", "--top", "60", "--out", str(out)
    )
    ops = [row["op"] for row in json.loads(out.read_text())["top_ops"]]
    if cpu_gemm.load() is not None:  # the float32 base GEMMs
        assert "base.cpu_gemm" in ops
    else:
        assert "mkldnn::_linear_pointwise" in ops or "aten::linear" in ops
    if cpu_kernel.load() is not None:  # its ctypes calls are labelled, not the step's own time
        assert "lora.cpu_kernel" in ops
    if cpu_attention.load() is not None:
        assert "attention.cpu_kernel" in ops


def test_train_throughput_bench(tiny_base: Path, tmp_path: Path) -> None:
    out = tmp_path / "train.json"
    stdout = _run(
        "bench.train_throughput",
        "--base-model", str(tiny_base),
        "--examples", "16", "--min-words", "4", "--max-words", "16",
        "--steps", "2", "--warmup-steps", "1", "--batch-size", "4", "--max-seq-len", "256",
        "--repeats", "1", "--out", str(out),
    )  # fmt: skip
    result = json.loads(out.read_text())
    assert set(result["summary"]) == {"ours", "trl"}
    for figures in result["summary"].values():
        assert figures["tokens_per_s"] > 0 and figures["peak_rss_mib"] > 0
    assert result["ratios"]["ours/trl"]["tokens_per_s"] > 0
    assert all(result["checks"].values()), result["checks"]
    assert "ours/trl" in stdout


def test_load_test_bench(tmp_path: Path) -> None:
    # The CI variant of the load test: its own checks (no failure below the queue limit,
    # the exact 429 count of a burst, flat memory under overload) decide the exit code.
    out = tmp_path / "load.json"
    stdout = _run("bench.load_test", "--smoke", "--out", str(out))
    result = json.loads(out.read_text())
    assert all(result["checks"].values()), result["checks"]
    assert result["steady"]["ok"] > 0
    assert result["burst"]["rejected_429"] == 5
    assert "[ok] burst" in stdout


def test_gpu_lora_bench(tmp_path: Path) -> None:
    # On CPU: a tiny random model, and the Triton kernels in Triton's interpreter.
    out = tmp_path / "gpu_lora.json"
    stdout = _run("bench.gpu_lora", "--smoke", "--out", str(out))
    result = json.loads(out.read_text())
    assert {"decode", "cold_load", "kernels", "checks", "meta"} <= set(result)
    decode = result["decode"]["rows"]
    assert [(r["seqs"], r["adapters"]) for r in decode] == [(4, 1), (4, 4)]
    for row in decode:
        for config in ("engine", "engine-base", "peft"):
            assert row[config]["decode_tokens_per_s"] > 0 and row[config]["per_token_ms"] > 0
        assert row["ratios"]["engine/peft"] > 0
    cold = result["cold_load"]["rows"]
    assert [r["rank"] for r in cold] == [8, 16, 64]
    assert all(r["read_ms"] > 0 and r["write_ms"] > 0 for r in cold)
    kernels = result["kernels"]["rows"]
    methods = ["torch_grouped", "gather_bmm"] + (["triton"] if result["kernels"]["triton"] else [])
    assert kernels and all(r[f"{m}_us"] > 0 for r in kernels for m in methods)
    assert any(r.get("reference_us", 0) > 0 for r in kernels)
    # Float32 on CPU: engine greedy tokens equal PEFT's, every kernel matches the reference.
    assert "decode/n4/k4/engine==peft" in result["checks"]
    assert all(result["checks"].values()), [k for k, ok in result["checks"].items() if not ok]
    assert "checks:" in stdout
    assert out.with_suffix(".png").exists()


def test_structured_throughput_bench(tmp_path: Path) -> None:
    out = tmp_path / "structured.json"
    stdout = _run("bench.structured_throughput", "--smoke", "--out", str(out))
    result = json.loads(out.read_text())
    assert set(result["summary"]) == {"none", "half", "all"}
    assert set(result["ratios"]) == {"half/none", "all/none"}
    assert "half/none" in stdout
