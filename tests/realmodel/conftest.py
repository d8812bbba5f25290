"""The real-model suite's processes: `aiproxy model-server` (SmolLM2-135M through llama.cpp),
`aiproxy agent --backend openai` in front of it, `aiproxy serve` in front of the agent, and
`aiproxy envoy` in front of the proxy; all on port 0, stopped by PID.

The model server starts once per session (loading is the slow part, and the model answers
the same to everyone); the agent, proxy and Envoy once per session too. Tests that kill a
model server start their own stack (`fresh_stack`).

Without the model (`make model` not run) the suite is skipped, except in CI (CI=true),
where `make test` has run `make model` first: there a missing model is a failure.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from aiproxy.server.process import localmodel
from tests.conftest import GENEROUS_LIMITS, proxy_args
from tests.support.procs import ServiceProcess, aiproxy_argv

MODEL = localmodel.MODEL_ALIAS
# Loading the 93 MB model is a second or two; a CI box busy with other work gets more.
MODEL_START_TIMEOUT_S = 120.0


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # In CI `make test` ran `make model` first: there the suite runs whatever, and a missing
    # model fails it (the model server's start says why) instead of skipping it quietly.
    if localmodel.installed() or os.environ.get("CI"):
        return
    skip = pytest.mark.skip(reason="the local model is not installed (`make model`)")
    for item in items:
        if item.get_closest_marker("realmodel"):
            item.add_marker(skip)


@dataclass
class Stack:
    model: ServiceProcess
    agent: ServiceProcess
    proxy: ServiceProcess

    @property
    def base_url(self) -> str:
        return str(self.model.ready["base_url"])


class Starter:
    """Starts processes and stops every one it started (by PID), newest first."""

    def __init__(self) -> None:
        self.started: list[ServiceProcess] = []

    def __call__(
        self, argv: list[str], name: str, env: dict[str, str] | None = None, timeout: float = 60
    ) -> ServiceProcess:
        proc = ServiceProcess(aiproxy_argv(*argv), env=env, name=name)
        self.started.append(proc)
        return proc.start(timeout=timeout)

    def model_server(self) -> ServiceProcess:
        return self(
            ["model-server", "--listen", "127.0.0.1:0", "--grace-s", "1"],
            "model-server",
            timeout=MODEL_START_TIMEOUT_S,
        )

    def agent(self, base_url: str) -> ServiceProcess:
        return self(
            ["agent", "--listen", "127.0.0.1:0", "--backend", "openai", "--base-url", base_url,
             "--model", MODEL, "--health-interval-s", "0.5"],
            "agent",
        )  # fmt: skip

    def proxy(self, agent: ServiceProcess) -> ServiceProcess:
        # Breaker off: the kill test's failures must not open it for the next test.
        # Heartbeats only after a minute: a busy CI box can take longer than the default 15 s
        # for a first token, and these tests are about the model's chunks, not keep-alives.
        env = {
            **GENEROUS_LIMITS,
            "AIPROXY_BREAKER__ENABLED": "false",
            "AIPROXY_STREAM__HEARTBEAT_INTERVAL_S": "60",
            # The OpenAI-compatible API through the edge names the model the server serves.
            "AIPROXY_OPENAI__MODELS": json.dumps([{"id": MODEL}]),
        }
        return self(proxy_args(agent.address), "proxy", env=env)

    def stack(self) -> Stack:
        model = self.model_server()
        agent = self.agent(str(model.ready["base_url"]))
        return Stack(model=model, agent=agent, proxy=self.proxy(agent))

    def cleanup(self) -> None:
        for proc in reversed(self.started):
            proc.cleanup()
        self.started.clear()


@pytest.fixture(scope="session")
def stack() -> Iterator[Stack]:
    starter = Starter()
    try:
        yield starter.stack()
    finally:
        starter.cleanup()


@pytest.fixture(scope="session")
def envoy(stack: Stack) -> Iterator[ServiceProcess]:
    starter = Starter()
    try:
        yield starter(
            ["envoy", "--listen", "127.0.0.1:0", "--proxy", stack.proxy.address,
             "--concurrency", "1", "--health-interval-s", "0.5"],
            "envoy",
        )  # fmt: skip
    finally:
        starter.cleanup()


@pytest.fixture
def fresh_stack() -> Iterator[Callable[[], Stack]]:
    """A stack of its own, for a test that kills a part of it."""
    starter = Starter()
    try:
        yield starter.stack
    finally:
        starter.cleanup()
