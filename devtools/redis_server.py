"""A real redis-server (Debian's package, `make system-deps`) for tests and benchmarks,
on a free port.

redis-server cannot listen on port 0 and report the port, so a free port is picked by
binding a socket to port 0, closing it and starting redis-server there; if another process
takes the port in between, redis-server exits and another port is tried. Persistence is
off (`--save '' --appendonly no`), the data lives in a temporary directory, the server
listens on loopback only, and it is stopped by PID (never by name).
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import tempfile
import time

from devtools.procs import stop_child

_ATTEMPTS = 5


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _ping(port: int, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """One redis-server child. `pause`/`resume` (SIGSTOP/SIGCONT) make it hang like a
    stuck host; `stop` then `start` (same port) make it go away and come back."""

    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed: run `make system-deps`")
        self.binary = binary
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self._dir = tempfile.TemporaryDirectory(prefix="aiproxy-redis-")
        self._paused = False

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def _spawn(self, port: int) -> subprocess.Popen[bytes]:
        argv = [
            self.binary,
            "--port", str(port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", self._dir.name,
            "--daemonize", "no",
            "--loglevel", "warning",
        ]  # fmt: skip
        log = open(f"{self._dir.name}/redis.log", "ab")  # noqa: SIM115 - the child owns it
        try:
            return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        finally:
            log.close()

    def _wait_ready(self, proc: subprocess.Popen[bytes], port: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                return False  # most likely the port was taken meanwhile
            if _ping(port):
                return True
            time.sleep(0.02)
        stop_child(proc, 5)
        raise TimeoutError(f"redis-server on port {port} did not answer PING in {timeout}s")

    def start(self, timeout: float = 20.0) -> RedisServer:
        """Start on a free port (first start) or on the same port again (a restart)."""
        assert self.proc is None or self.proc.poll() is not None, "already running"
        for _ in range(_ATTEMPTS):
            port = self.port or _free_port()
            proc = self._spawn(port)
            if self._wait_ready(proc, port, timeout):
                self.proc, self.port = proc, port
                self._paused = False
                return self
            if self.port:  # a restart must keep its port (clients have the URL): retry it
                time.sleep(0.2)
        raise RuntimeError(f"redis-server did not start after {_ATTEMPTS} attempts")

    def pause(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)
        self._paused = True

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)
        self._paused = False

    def stop(self) -> None:
        """SIGTERM by PID (after SIGCONT if paused: a stopped process ignores SIGTERM)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        if self._paused:
            self.resume()
        stop_child(self.proc, 10)

    def kill(self) -> None:
        """SIGKILL by PID: a crash, no goodbye to the clients."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=5)

    def cleanup(self) -> None:
        self.stop()
        self._dir.cleanup()
