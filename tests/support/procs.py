"""Real processes for integration tests: start on port 0, wait until ready, stop by PID.

Every aiproxy server command (`aiproxy agent|serve|envoy`) prints one JSON line on stdout
when it is ready, e.g. {"event": "listening", "service": "agent", "address": "127.0.0.1:41234"}.
Its logs are JSON lines on stderr; tests read them back with `log_events()`.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
from typing import Any

# One stop-by-PID path, shared with bench/ through devtools/ (neither imports the other).
from devtools.procs import stop_child
from tests.support.waiting import wait_until

_BIN = pathlib.Path(sys.executable).parent


def aiproxy_argv(*args: str) -> list[str]:
    """The `aiproxy` console script, exactly as users and containers run it."""
    script = _BIN / "aiproxy"
    if script.exists():
        return [str(script), *args]
    found = shutil.which("aiproxy")
    if found:
        return [found, *args]
    return [sys.executable, "-m", "aiproxy.server.cli", *args]


class ServiceProcess:
    """One child process whose readiness is a JSON line on stdout."""

    def __init__(
        self, argv: list[str], *, env: dict[str, str] | None = None, name: str = ""
    ) -> None:
        self.argv = argv
        self.name = name or pathlib.Path(argv[0]).name
        self._env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self._dir = tempfile.TemporaryDirectory(prefix=f"aiproxy-{self.name}-")
        self.stdout_path = pathlib.Path(self._dir.name) / "stdout"
        self.stderr_path = pathlib.Path(self._dir.name) / "stderr"
        self.proc: subprocess.Popen[bytes] | None = None
        self.ready: dict[str, Any] = {}

    @property
    def address(self) -> str:
        return str(self.ready["address"])

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 30.0) -> ServiceProcess:
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(self.argv, stdout=out, stderr=err, env=self._env)
        proc = self.proc

        def listening() -> dict[str, Any] | None:
            for line in self.stdout_lines():
                if line.get("event") == "listening":
                    return line
            if proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {proc.returncode} before it was ready:\n"
                    f"{self.stderr_text()[-4000:]}"
                )
            return None

        try:
            self.ready = wait_until(listening, timeout, f"{self.name} to be ready")
        except AssertionError:
            self.stop()
            raise TimeoutError(
                f"{self.name} not ready after {timeout}s:\n{self.stderr_text()[-4000:]}"
            ) from None
        return self

    def stdout_lines(self) -> list[dict[str, Any]]:
        return _json_lines(self.stdout_path)

    def stderr_text(self) -> str:
        return self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""

    def log_events(self, event: str | None = None) -> list[dict[str, Any]]:
        """Structured log lines from stderr, optionally only those with this `event`."""
        lines = _json_lines(self.stderr_path)
        return [line for line in lines if event is None or line.get("event") == event]

    def wait_for_log(self, predicate: Any, timeout: float = 5.0) -> dict[str, Any]:
        def matching() -> dict[str, Any] | None:
            return next((line for line in self.log_events() if predicate(line)), None)

        try:
            return wait_until(matching, timeout, f"a log line from {self.name}", interval=0.01)
        except AssertionError:
            raise TimeoutError(
                f"no matching log line from {self.name}:\n{self.stderr_text()[-4000:]}"
            ) from None

    def send_signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout)

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL if it does not exit in time. Only our own child."""
        return None if self.proc is None else stop_child(self.proc, timeout)

    def cleanup(self) -> None:
        self.stop()
        self._dir.cleanup()


def _json_lines(path: pathlib.Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    out = []
    for raw in path.read_text(errors="replace").splitlines():
        raw = raw.strip()
        if raw.startswith("{"):
            try:
                out.append(json.loads(raw))
            except json.JSONDecodeError:
                continue  # a line still being written
    return out


def recorded_metadata(path: pathlib.Path | str) -> list[dict[str, Any]]:
    """The calls an agent started with `--record-metadata FILE` has seen (TEST ONLY tool):
    [{"method": "/ai.agent.v1.AgentService/Generate", "metadata": {name: [values...]}}]."""
    calls = []
    for line in _json_lines(pathlib.Path(path)):
        values: dict[str, list[Any]] = {}
        for name, value in line["metadata"]:
            values.setdefault(name, []).append(value)
        calls.append({"method": line["method"], "metadata": values})
    return calls


# Request metadata the proxy must never forward upstream (upstream.drop_metadata default).
CREDENTIAL_HEADERS = ("authorization", "proxy-authorization", "cookie", "x-api-key")
