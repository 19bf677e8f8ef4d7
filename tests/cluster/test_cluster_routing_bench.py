"""The Ray Serve routing benchmark runs end to end at tiny sizes (figures not checked)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("ray.serve", reason="needs the [cluster] extra (ray[serve])")

REPO = Path(__file__).resolve().parents[2]


def test_cluster_routing_bench_smoke(tmp_path: Path) -> None:
    out = tmp_path / "cluster.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.cluster_routing", "--smoke", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert set(result["summary"]) == {"multiplexed", "default"}
    assert all(row["adapter_loads"] > 0 for row in result["summary"].values())
