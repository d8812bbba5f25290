"""The caller's deadline through a real Envoy (issue 13, item 6).

An HTTP caller's `grpc-timeout` header becomes the proxy's deadline. The proxy ends the
call just before it (interceptors/deadline.py's end margin), so a browser reading SSE
gets a final in-band error event and a unary caller a 504 whose google.rpc.Status
carries ErrorInfo, instead of a body that just stops or a bare 504 from grpc-core.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from tests.conftest import GENEROUS_LIMITS, agent_args, proxy_args
from tests.support.edge import request, sse_events, wait_until
from tests.support.procs import ServiceProcess, aiproxy_argv

pytestmark = pytest.mark.envoy

ERROR_INFO = "type.googleapis.com/google.rpc.ErrorInfo"
# Wide enough that a loaded CI box still answers before the caller's deadline.
MARGIN_S = 0.2


@pytest.fixture(scope="module")
def stack() -> Iterator[dict[str, ServiceProcess]]:
    started: list[ServiceProcess] = []

    def start(argv: list[str], name: str, env: dict[str, str] | None = None) -> ServiceProcess:
        proc = ServiceProcess(aiproxy_argv(*argv), env=env, name=name)
        started.append(proc)
        return proc.start(timeout=60)

    try:
        agent = start(agent_args(), "agent")
        proxy = start(
            proxy_args(agent.address),
            "proxy",
            env={
                **GENEROUS_LIMITS,
                "AIPROXY_BREAKER__ENABLED": "false",
                "AIPROXY_DEADLINES__END_MARGIN_MIN_S": str(MARGIN_S),
            },
        )
        envoy = start(
            [
                "envoy",
                "--listen",
                "127.0.0.1:0",
                "--proxy",
                proxy.address,
                "--concurrency",
                "1",
                "--log-flush-ms",
                "50",
            ],
            "envoy",
        )
        yield {"agent": agent, "proxy": proxy, "envoy": envoy}
    finally:
        for proc in reversed(started):
            proc.cleanup()


def _error_info(status: dict) -> dict:
    infos = [d for d in status.get("details", []) if d["@type"] == ERROR_INFO]
    assert infos, f"no ErrorInfo in {status}"
    return infos[0]


def _access(proxy: ServiceProcess, rid: str) -> dict:
    return wait_until(
        lambda: next((e for e in proxy.log_events("access") if e.get("request_id") == rid), None),
        10,
        f"access log of {rid}",
    )


def test_slow_sse_stream_ends_with_a_final_deadline_event(stack: dict[str, ServiceProcess]) -> None:
    rid = f"edge-deadline-stream-{time.monotonic_ns()}"
    started = time.monotonic()
    reply = request(
        stack["envoy"].address, "POST", "/api/v1/ai/generate/stream", {"prompt": "slow", "options": {"maxTokens": 50}},
        headers={"grpc-timeout": "800m", "x-fault-hang": "1", "x-fault-after": "1", "x-request-id": rid},
    )  # fmt: skip
    elapsed = time.monotonic() - started
    assert reply.status == 200  # the status line left with the first event
    events = sse_events(reply.body)
    assert len(events) == 2 and not events[0]["isFinal"], events
    final = events[-1]
    assert final["isFinal"] and final["finishReason"] == "FINISH_REASON_ERROR"
    assert final["error"]["code"] == 4
    assert _error_info(final["error"])["reason"] == "DEADLINE_EXCEEDED"
    assert elapsed < 5
    access = _access(stack["proxy"], rid)
    assert (access["code"], access["reason"]) == ("DEADLINE_EXCEEDED", "DEADLINE_EXCEEDED")
    finished = stack["agent"].wait_for_log(
        lambda e: e.get("event") == "call_finished" and e.get("request_id") == rid
    )
    assert finished["cancelled"] is True


def test_slow_unary_call_is_a_504_with_error_info(stack: dict[str, ServiceProcess]) -> None:
    rid = f"edge-deadline-unary-{time.monotonic_ns()}"
    reply = request(
        stack["envoy"].address, "POST", "/api/v1/ai/generate", {"prompt": "slow"},
        headers={"grpc-timeout": "800m", "x-fault-hang": "1", "x-request-id": rid},
    )  # fmt: skip
    assert reply.status == 504
    status = reply.json()
    assert status["code"] == 4 and status["message"]
    assert _error_info(status)["reason"] == "DEADLINE_EXCEEDED"
    access = _access(stack["proxy"], rid)
    assert (access["code"], access["reason"]) == ("DEADLINE_EXCEEDED", "DEADLINE_EXCEEDED")
