"""`aiproxy health`, the probe the container HEALTHCHECK runs, against a real proxy."""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess

import grpc

from aiproxy.core.service import SERVICE_NAME
from tests.support.grpc_helpers import NOT_SERVING, wait_health
from tests.support.procs import aiproxy_argv


async def probe(*args: str) -> subprocess.CompletedProcess[str]:
    proc = await asyncio.create_subprocess_exec(
        *aiproxy_argv("health", *args),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=30)
    return subprocess.CompletedProcess(args, proc.returncode, out.decode(), err.decode())


async def test_probe_readiness_and_liveness(agent, proxy) -> None:
    ready = await probe("--address", proxy.address, "--service", SERVICE_NAME)
    assert (ready.returncode, ready.stdout.strip()) == (
        0,
        f"{proxy.address} {SERVICE_NAME}: SERVING",
    )

    agent.send_signal(signal.SIGUSR1)  # the only upstream reports NOT_SERVING
    async with grpc.aio.insecure_channel(proxy.address) as channel:
        await wait_health(channel, NOT_SERVING, SERVICE_NAME)
    not_ready = await probe("--address", proxy.address, "--service", SERVICE_NAME)
    assert (not_ready.returncode, not_ready.stdout.strip()) == (
        1,
        f"{proxy.address} {SERVICE_NAME}: NOT_SERVING",
    )
    # The process itself is fine: liveness must not get it restarted.
    alive = await probe("--address", proxy.address, "--service", "liveness")
    assert alive.returncode == 0


async def test_probe_of_nothing_listening_fails_distinctly() -> None:
    with socket.socket() as sock:  # a port that was free a moment ago
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = await probe("--address", f"127.0.0.1:{port}", "--timeout", "0.5")
    assert result.returncode == 2
    assert "DEADLINE_EXCEEDED" in result.stdout or "UNAVAILABLE" in result.stdout
