"""Processes the benchmark starts: wait for their ready line, sample them, stop them by PID.

Every process the harness starts is registered in one `Procs` set and stopped (SIGTERM,
then SIGKILL) by its own PID when the run ends, whatever happened. Nothing is ever
stopped by name.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any

# Shared with the tests through devtools/: one stop-by-PID path, one /proc reader.
from devtools.procs import cpu_seconds, json_lines, rss_bytes, stop_child

__all__ = ["Proc", "Procs", "aiproxy_argv", "cpu_seconds", "free_port", "rss_bytes", "tool"]

BIN = pathlib.Path(sys.executable).parent


def tool(name: str) -> str | None:
    """A binary from the venv first (envoy, aiproxy), then PATH."""
    here = BIN / name
    if here.exists():
        return str(here)
    return shutil.which(name)


ROOT = pathlib.Path(__file__).resolve().parent.parent


def aiproxy_argv(*args: str) -> list[str]:
    """`aiproxy ARGS` from this checkout (children run with cwd=ROOT), whatever is installed."""
    return [sys.executable, "-m", "aiproxy.server.cli", *args]


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class Proc:
    """One child process; ready when a JSON line with event=listening is on its stdout
    (aiproxy's convention), or when `ready` (a callable) says so."""

    def __init__(
        self, name: str, argv: list[str], workdir: pathlib.Path, env: dict[str, str] | None = None
    ) -> None:
        self.name = name
        self.argv = argv
        self.stdout_path = workdir / f"{name}.stdout"
        self.stderr_path = workdir / f"{name}.stderr"
        self._env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self.ready: dict[str, Any] = {}

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def address(self) -> str:
        return str(self.ready["address"])

    def start(self, timeout: float = 60.0, ready: Any = None) -> "Proc":
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                self.argv, stdout=out, stderr=err, env=self._env, cwd=ROOT, start_new_session=True
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ready is not None:
                got = ready(self)
                if got:
                    self.ready = got
                    return self
            else:
                for line in self.stdout_lines():
                    if line.get("event") == "listening":
                        self.ready = line
                        return self
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.proc.returncode}:\n{self.stderr_tail()}"
                )
            time.sleep(0.02)
        self.stop()
        raise TimeoutError(f"{self.name} not ready after {timeout}s:\n{self.stderr_tail()}")

    def stdout_lines(self) -> list[dict[str, Any]]:
        return json_lines(self.stdout_path)

    def stderr_tail(self, n: int = 3000) -> str:
        return (
            self.stderr_path.read_text(errors="replace")[-n:] if self.stderr_path.exists() else ""
        )

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def cpu(self) -> float:
        return cpu_seconds(self.pid)

    def rss(self) -> int:
        return rss_bytes(self.pid)

    def children_pids(self) -> list[int]:
        """Direct children (for `aiproxy serve --workers N`, whose workers do the work)."""
        try:
            with open(f"/proc/{self.pid}/task/{self.pid}/children") as f:
                return [int(p) for p in f.read().split()]
        except OSError:
            return []

    def tree_pids(self) -> list[int]:
        return [self.pid, *self.children_pids()]

    def tree_cpu(self) -> float:
        total = 0.0
        for pid in self.tree_pids():
            try:
                total += cpu_seconds(pid)
            except OSError:
                pass
        return total

    def tree_rss(self) -> int:
        total = 0
        for pid in self.tree_pids():
            try:
                total += rss_bytes(pid)
            except OSError:
                pass
        return total

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM to our own child's PID, SIGKILL if it lingers."""
        return None if self.proc is None else stop_child(self.proc, timeout)


class Procs:
    """All processes of one run; `stop_all` in a finally block."""

    def __init__(self) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="aiproxy-bench-")
        self.workdir = pathlib.Path(self._dir.name)
        self._procs: list[Proc] = []

    def start(
        self,
        name: str,
        argv: list[str],
        *,
        timeout: float = 60.0,
        ready: Any = None,
        env: dict[str, str] | None = None,
    ) -> Proc:
        n = sum(1 for p in self._procs if p.name.startswith(name))
        proc = Proc(f"{name}-{n}" if n else name, argv, self.workdir, env=env)
        self._procs.append(proc)
        return proc.start(timeout=timeout, ready=ready)

    def stop(self, proc: Proc) -> None:
        proc.stop()

    def stop_all(self) -> None:
        for proc in reversed(self._procs):
            try:
                proc.stop(timeout=15.0)
            except Exception as exc:  # keep stopping the others
                print(
                    f"bench: could not stop {proc.name} (pid {proc.proc.pid if proc.proc else '?'}): {exc}",
                    file=sys.stderr,
                )
        self._procs.clear()

    def cleanup(self) -> None:
        self.stop_all()
        self._dir.cleanup()
