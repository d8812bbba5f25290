"""The command line as users run it: check-config, and bad configuration refused clearly."""

from __future__ import annotations

import subprocess

import yaml

from tests.support.procs import aiproxy_argv


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    import os

    return subprocess.run(
        aiproxy_argv(*args),
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
        check=False,
    )


def test_check_config_prints_effective_settings(tmp_path) -> None:
    config = tmp_path / "aiproxy.yaml"
    config.write_text(
        "upstream:\n  endpoints: ['10.0.0.1:50052', '10.0.0.2:50052']\nstream:\n  heartbeat_interval_s: 5\n"
    )
    done = run("check-config", str(config), env={"AIPROXY_STREAM__BUFFER_CHUNKS": "42"})
    assert done.returncode == 0, done.stderr
    effective = yaml.safe_load(done.stdout)
    assert effective["upstream"]["endpoints"] == ["10.0.0.1:50052", "10.0.0.2:50052"]
    assert effective["stream"]["heartbeat_interval_s"] == 5
    assert effective["stream"]["buffer_chunks"] == 42  # the environment overrides the file
    assert effective["server"]["listen"] == "127.0.0.1:50051"  # defaults fill the rest


def test_bad_key_is_named(tmp_path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("upstream:\n  endpoints: ['nohostport']\nstream:\n  bufer_chunks: 3\n")
    done = run("check-config", str(config))
    assert done.returncode == 2
    assert "upstream.endpoints" in done.stderr and "nohostport" in done.stderr
    assert "stream.bufer_chunks" in done.stderr


def test_bad_environment_value_is_named() -> None:
    done = run("serve", "--listen", "127.0.0.1:0", env={"AIPROXY_SERVER__GRACE_PERIOD_S": "soon"})
    assert done.returncode == 2
    assert (
        "server.grace_period_s" in done.stderr and "AIPROXY_SERVER__GRACE_PERIOD_S" in done.stderr
    )


def test_missing_file() -> None:
    done = run("check-config", "/nonexistent/aiproxy.yaml")
    assert done.returncode == 2 and "not found" in done.stderr
