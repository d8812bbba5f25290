"""Shared fixtures: real agent and proxy processes on port 0, gRPC channels to them."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator

import grpc
import pytest

from tests.support.procs import ServiceProcess, aiproxy_argv

# Every test client calls from 127.0.0.1, one caller key: tests that are not about
# rate limits get a bucket they cannot empty (the limiter stays in the chain). Tests of
# the limits pass their own AIPROXY_LIMITS__* values, which win.
GENEROUS_LIMITS = {
    "AIPROXY_LIMITS__RATE_PER_S": "1000000",
    "AIPROXY_LIMITS__BURST": "1000000",
    "AIPROXY_LIMITS__MAX_STREAMS_PER_CALLER": "100000",
}


@pytest.fixture
def spawn() -> Iterator[Callable[..., ServiceProcess]]:
    """Start `aiproxy ARGS...` and stop it (SIGTERM, by PID) when the test ends."""
    started: list[ServiceProcess] = []

    def _spawn(*args: str, env: dict[str, str] | None = None, name: str = "") -> ServiceProcess:
        if args and args[0] == "serve":
            env = {**GENEROUS_LIMITS, **(env or {})}
        proc = ServiceProcess(aiproxy_argv(*args), env=env, name=name or args[0])
        started.append(proc)
        return proc.start()

    yield _spawn
    for proc in reversed(started):
        proc.cleanup()


def agent_args(*extra: str, token_delay_ms: int = 1, first_token_delay_ms: int = 0) -> list[str]:
    return [
        "agent",
        "--listen",
        "127.0.0.1:0",
        "--enable-faults",
        "--first-token-delay-ms",
        str(first_token_delay_ms),
        "--token-delay-ms",
        str(token_delay_ms),
        *extra,
    ]


def proxy_args(*upstreams: str, extra: tuple[str, ...] = ()) -> list[str]:
    # Metrics on a free port too: tests (and other suites on this machine) run in parallel.
    args = ["serve", "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"]
    for upstream in upstreams:
        args += ["--upstream", upstream]
    return [*args, *extra]


@pytest.fixture
def agent(spawn: Callable[..., ServiceProcess]) -> ServiceProcess:
    return spawn(*agent_args(), name="agent")


@pytest.fixture
def proxy(spawn: Callable[..., ServiceProcess], agent: ServiceProcess) -> ServiceProcess:
    return spawn(*proxy_args(agent.address), name="proxy")


@pytest.fixture
async def proxy_channel(proxy: ServiceProcess) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(proxy.address) as channel:
        yield channel


@pytest.fixture
async def agent_channel(agent: ServiceProcess) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(agent.address) as channel:
        yield channel
