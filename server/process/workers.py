"""`aiproxy serve --workers N`: N proxy processes on one port, so every core is used.

A grpc.aio proxy is bound by the GIL (one core per process). The supervisor starts N
ordinary `aiproxy serve` processes that listen on the same HOST:PORT with SO_REUSEPORT;
the kernel spreads incoming connections over them. Each worker is a complete proxy
(its own upstream pool, breakers and health), so nothing is shared between them --
except, with `limits.backend: redis`, the limits. With the default `memory` backend each
worker has its own buckets, so a caller gets N times its configured limits: the
supervisor says so at start-up (one WARNING line, `limits_per_worker`) rather than
refusing, since many workers on one box without Redis is a sound way to use its cores
when N x the limits is acceptable (docs/limits.md).

Each worker's HTTP listener (Prometheus /metrics) needs a port of its own: worker i gets
PORT+i, or with port 0 a free port each; the supervisor's ready line lists every worker's
pid and metrics address (`worker_ready`), taken from the workers' own ready lines.

The supervisor prints the usual ready line once every worker listens, forwards
SIGTERM/SIGINT to the workers (each drains as usual) and exits when they have; if a
worker dies, the others are stopped and the supervisor exits 1 — a half-capacity proxy
should be restarted by whatever runs it, not limp on.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any

from aiproxy.core.logs import log_event, print_ready
from aiproxy.core.settings import Settings, parse_hostport

log = logging.getLogger("aiproxy.workers")

# Set in each worker's environment: run one proxy, do not supervise again.
WORKER_ENV = "_AIPROXY_WORKER_INDEX"
READY_TIMEOUT_S = 60.0


def is_worker() -> bool:
    return WORKER_ENV in os.environ


def _reserve_port(host: str) -> tuple[socket.socket, int]:
    """Pick a free port for HOST:0 and hold it (bound, not listening, SO_REUSEPORT) so the
    workers can all bind it; a bound socket that never listens receives no connections."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, 0))
    return sock, int(sock.getsockname()[1])


def _replace_flag(argv: list[str], flag: str, value: str | None) -> list[str]:
    """argv without `flag VALUE` / `flag=VALUE`, plus `flag value` when value is given."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == flag:
            skip = True
            continue
        if arg.startswith(flag + "="):
            continue
        out.append(arg)
    return out + ([flag, value] if value is not None else [])


def _worker_argv(listen: str, argv: list[str] | None = None) -> list[str]:
    """The supervisor's own command line (every flag, so TLS, config and the rest carry
    over), with the reserved HOST:PORT as --listen."""
    args = list(sys.argv[1:] if argv is None else argv)
    return [sys.executable, "-m", "aiproxy.server.cli", *_replace_flag(args, "--listen", listen)]


def _worker_env(settings: Settings, index: int) -> dict[str, str]:
    env = {**os.environ, WORKER_ENV: str(index)}
    # A per-process HTTP listener (Prometheus /metrics) cannot share a port: worker i
    # gets PORT+i, and port 0 stays 0 (each picks a free one). Always passed on: the
    # supervisor drops --metrics-listen from the workers' command line, so without it
    # a worker would fall back to the config file's or the default port.
    metrics = getattr(settings, "metrics", None)
    listen = getattr(metrics, "listen", None)
    if isinstance(listen, str):
        host, port = parse_hostport(listen)
        host = f"[{host}]" if ":" in host else host
        env["AIPROXY_METRICS__LISTEN"] = f"{host}:{port + index if port else 0}"
    return env


def limits_warnings(settings: Settings) -> list[tuple[str, dict[str, Any]]]:
    """What N workers do to the configured limits, as (event, fields) log lines."""
    limits = settings.limits
    n = settings.server.workers
    if not limits.enabled or n < 2:
        return []
    if limits.backend == "memory":
        return [
            (
                "limits_per_worker",
                {
                    "detail": (
                        f"limits.backend is memory: each of the {n} workers keeps its own "
                        f"limits, so a caller may get up to {n} x the configured rate, burst "
                        "and streams; set limits.backend: redis (and redis.url) to share them"
                    ),
                    "workers": n,
                    "rate_per_s_per_caller": limits.rate_per_s * n,
                    "burst_per_caller": limits.burst * n,
                },
            )
        ]
    if limits.failure_policy == "fail_open" and limits.expected_processes < n:
        return [
            (
                "limits_expected_processes_low",
                {
                    "detail": (
                        f"limits.expected_processes is {limits.expected_processes} but this "
                        f"supervisor alone runs {n} workers: while Redis is away, fail_open "
                        f"lets callers through at up to {n / limits.expected_processes:g} x "
                        "the limit; set it to workers x replicas"
                    ),
                    "workers": n,
                    "expected_processes": limits.expected_processes,
                },
            )
        ]
    return []


def _wait_ready(proc: subprocess.Popen[bytes], deadline: float) -> dict[str, Any]:
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {proc.pid} exited with {proc.wait()} before it was ready")
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(event, dict) and event.get("event") == "listening":
            return event
    raise TimeoutError(f"worker {proc.pid} not ready after {READY_TIMEOUT_S:g}s")


def _die_with_parent() -> None:
    """In the worker, before exec: SIGTERM if the supervisor dies (even by SIGKILL), so
    workers never outlive it. Linux only; elsewhere a no-op."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _drain_stdout(proc: subprocess.Popen[bytes]) -> None:
    assert proc.stdout is not None
    for _ in proc.stdout:  # keep the pipe from filling; workers print only the ready line
        pass


def supervise(settings: Settings, args: argparse.Namespace) -> int:
    n = settings.server.workers
    host, port = parse_hostport(settings.server.listen)
    reserved = None
    if port == 0:
        reserved, port = _reserve_port(host)
    listen = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    procs: list[subprocess.Popen[bytes]] = []
    stopping = threading.Event()

    def stop_all(_signum: int = 0, _frame: Any = None) -> None:
        stopping.set()
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop_all)
    signal.signal(signal.SIGINT, stop_all)
    for event, fields in limits_warnings(settings):
        log_event(log, event, level=logging.WARNING, **fields)
    ready: list[dict[str, Any]] = []
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        argv = _worker_argv(listen)
        if getattr(settings, "metrics", None) is not None:
            argv = _replace_flag(argv, "--metrics-listen", None)  # per worker, via the environment
        for index in range(n):
            procs.append(
                subprocess.Popen(
                    argv,
                    stdout=subprocess.PIPE,
                    env=_worker_env(settings, index),
                    preexec_fn=_die_with_parent,
                )
            )
        for proc in procs:
            listening = _wait_ready(proc, deadline)
            ready.append({"pid": proc.pid, "metrics_address": listening.get("metrics_address")})
            threading.Thread(target=_drain_stdout, args=(proc,), daemon=True).start()
    except (RuntimeError, TimeoutError) as exc:
        log_event(log, "workers_start_failed", level=logging.ERROR, error=str(exc))
        stop_all()
        for proc in procs:
            proc.wait()
        return 1
    finally:
        if reserved is not None:
            reserved.close()
    log_event(log, "workers_started", address=listen, workers=n, worker_ready=ready)
    print_ready("proxy", listen, workers=n, worker_ready=ready)
    # Wait for a signal or for any worker to exit.
    while not stopping.is_set():
        if any(proc.poll() is not None for proc in procs):
            dead = [p.pid for p in procs if p.poll() is not None]
            log_event(log, "worker_exited", level=logging.ERROR, pids=dead)
            stop_all()
            for proc in procs:
                proc.wait()
            return 1
        stopping.wait(0.2)
    codes = [proc.wait() for proc in procs]
    log_event(log, "workers_stopped", codes=codes)
    return max(codes, default=0)
