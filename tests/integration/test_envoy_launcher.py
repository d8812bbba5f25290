"""`aiproxy envoy` as a process: start-up without a healthy proxy, SIGTERM, bad input."""

from __future__ import annotations

import signal
import socket
import subprocess
from collections.abc import Callable

import pytest
import yaml

from aiproxy.agent.textgen import count_tokens
from tests.support.edge import request
from tests.support.procs import ServiceProcess, aiproxy_argv

pytestmark = pytest.mark.envoy


def _closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_without_a_healthy_proxy_it_still_starts_answers_503_and_stops_on_sigterm(
    spawn: Callable[..., ServiceProcess],
) -> None:
    dead = f"127.0.0.1:{_closed_port()}"
    envoy = spawn(
        "envoy",
        "--listen",
        "127.0.0.1:0",
        "--proxy",
        dead,
        "--startup-wait-s",
        "0.5",
        "--concurrency",
        "1",
    )
    warned = envoy.log_events("envoy_no_healthy_proxy")
    assert warned and warned[0]["proxies"] == [dead]
    assert request(envoy.address, "GET", "/healthz").status == 503
    reply = request(envoy.address, "POST", "/api/v1/ai/generate", {"prompt": "x"})
    assert reply.status == 503 and reply.json()["code"] == 14
    assert request(envoy.address, "GET", "/").status == 200  # the page needs no proxy

    envoy.send_signal(signal.SIGTERM)
    assert envoy.wait(timeout=20) == 0
    assert envoy.log_events("envoy_exited")


def test_print_config_renders_the_replicas() -> None:
    out = subprocess.run(
        aiproxy_argv("envoy", "--print-config", "--listen", "127.0.0.1:9999", "--proxy", "127.0.0.1:1", "--proxy", "127.0.0.1:2"),
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    config = yaml.safe_load(out.stdout)
    endpoints = config["static_resources"]["clusters"][0]["load_assignment"]["endpoints"][0][
        "lb_endpoints"
    ]
    assert [e["endpoint"]["address"]["socket_address"]["port_value"] for e in endpoints] == [1, 2]


@pytest.mark.parametrize(
    "args",
    [["--proxy", "no-port"], ["--listen", "nowhere"], ["--descriptor", "/nonexistent/aiproxy.pb"]],
)
def test_bad_arguments_exit_2_with_a_message(args: list[str]) -> None:
    proc = subprocess.run(
        aiproxy_argv("envoy", "--listen", "127.0.0.1:0", *args),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("aiproxy envoy: ") and proc.stdout == ""


def test_sigterm_drains_open_streams_before_stopping(spawn: Callable[..., ServiceProcess]) -> None:
    from tests.conftest import agent_args, proxy_args
    from tests.support.edge import OpenStream

    agent = spawn(*agent_args(), name="agent")
    proxy = spawn(*proxy_args(agent.address), name="proxy")
    envoy = spawn(
        "envoy",
        "--listen",
        "127.0.0.1:0",
        "--proxy",
        proxy.address,
        "--concurrency",
        "1",
        "--drain-s",
        "20",
    )
    stream = OpenStream(
        envoy.address, "/api/v1/ai/generate/stream", {"prompt": "drain me", "options": {"maxTokens": 20}},
        headers={"x-fault-slow-ms": "50"},
    )  # fmt: skip
    try:
        events = stream.events()
        first = next(events)
        envoy.send_signal(signal.SIGTERM)
        envoy.wait_for_log(lambda e: e.get("event") == "envoy_draining", timeout=10)
        assert request(envoy.address, "GET", "/healthz").status == 503  # balancers in front stop
        rest = list(events)
    finally:
        stream.close()
    chunks = [first, *rest]
    final = chunks[-1]
    assert final["isFinal"] and "error" not in final and final["usage"]["completionTokens"] == 20
    assert count_tokens("".join(c["delta"] for c in chunks)) == 20  # every token arrived
    assert envoy.wait(timeout=30) == 0
    assert envoy.log_events("envoy_drained")[0]["open_requests"] == 0
