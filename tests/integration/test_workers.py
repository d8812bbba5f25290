"""`aiproxy serve --workers N`: N processes on one port, one ready line, one clean stop."""

from __future__ import annotations

import pathlib
import signal
import urllib.request

import grpc

from aiproxy.ai.agent.v1 import agent_service_pb2 as pb
from tests.conftest import agent_args


def _children(pid: int) -> list[int]:
    return [int(p) for p in pathlib.Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def test_two_workers_share_the_port_and_stop_together(spawn) -> None:
    agent = spawn(*agent_args())
    proxy = spawn(
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        agent.address,
        "--workers",
        "2",
        "--metrics-listen",
        "127.0.0.1:0",
        name="proxy",
    )
    assert proxy.ready["workers"] == 2
    workers = _children(proxy.pid)
    assert len(workers) == 2
    # Port 0 with workers: each worker found its own free port and reported it.
    ready = proxy.ready["worker_ready"]
    assert sorted(w["pid"] for w in ready) == sorted(workers)
    addresses = [w["metrics_address"] for w in ready]
    assert len(set(addresses)) == 2 and all(not a.endswith(":0") for a in addresses)
    for address in addresses:
        with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as reply:
            assert b"ai_proxy_requests_total" in reply.read()
    # The default memory backend: the supervisor says the limits are per worker.
    (warning,) = proxy.log_events("limits_per_worker")
    assert warning["level"] == "warning" and warning["workers"] == 2

    # Separate connections (the kernel spreads connections, not calls): all answered.
    for _ in range(6):
        with grpc.insecure_channel(
            proxy.address, options=[("grpc.use_local_subchannel_pool", 1)]
        ) as channel:
            call = channel.unary_unary(
                "/ai.agent.v1.AgentService/Generate",
                request_serializer=pb.GenerateRequest.SerializeToString,
                response_deserializer=pb.GenerateResponse.FromString,
            )
            assert call(pb.GenerateRequest(prompt="hello"), timeout=10).text

    proxy.send_signal(signal.SIGTERM)
    assert proxy.wait(timeout=40) == 0
    for pid in workers:
        assert (
            not pathlib.Path(f"/proc/{pid}").exists()
            or "zombie" in pathlib.Path(f"/proc/{pid}/status").read_text()
        )


def test_one_worker_is_the_plain_proxy(spawn) -> None:
    agent = spawn(*agent_args())
    proxy = spawn(
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        agent.address,
        "--workers",
        "1",
        # A free port: the default (9091) may be taken by anything else on the machine.
        "--metrics-listen",
        "127.0.0.1:0",
        name="proxy",
    )
    assert "workers" not in proxy.ready
    assert _children(proxy.pid) == []


def test_worker_command_line_keeps_every_flag_but_the_listener() -> None:
    from aiproxy.server.process.workers import _replace_flag, _worker_argv

    argv = _worker_argv(
        "127.0.0.1:4000",
        ["serve", "--listen", "127.0.0.1:0", "--config", "x.yaml", "--workers", "2"],
    )
    assert argv[1:3] == ["-m", "aiproxy.server.cli"]
    assert argv[3:] == [
        "serve",
        "--config",
        "x.yaml",
        "--workers",
        "2",
        "--listen",
        "127.0.0.1:4000",
    ]
    assert _replace_flag(["serve", "--listen=a:1", "--x", "1"], "--listen", None) == [
        "serve",
        "--x",
        "1",
    ]


def test_each_worker_gets_its_own_metrics_port(monkeypatch) -> None:
    monkeypatch.delenv("AIPROXY_METRICS__LISTEN", raising=False)
    from types import SimpleNamespace

    from aiproxy.server.process.workers import WORKER_ENV, _worker_env

    settings = SimpleNamespace(metrics=SimpleNamespace(listen="127.0.0.1:9091"))
    envs = [_worker_env(settings, i) for i in range(3)]  # type: ignore[arg-type]
    assert [e["AIPROXY_METRICS__LISTEN"] for e in envs] == [
        "127.0.0.1:9091",
        "127.0.0.1:9092",
        "127.0.0.1:9093",
    ]
    assert [e[WORKER_ENV] for e in envs] == ["0", "1", "2"]
    # Port 0 is passed on as 0 (each worker picks a free port), never dropped: a worker
    # without it would fall back to the default port, and the second would fail to bind.
    zero = SimpleNamespace(metrics=SimpleNamespace(listen="127.0.0.1:0"))
    assert [_worker_env(zero, i)["AIPROXY_METRICS__LISTEN"] for i in range(2)] == [  # type: ignore[arg-type]
        "127.0.0.1:0",
        "127.0.0.1:0",
    ]
    v6 = SimpleNamespace(metrics=SimpleNamespace(listen="[::1]:9091"))
    assert _worker_env(v6, 1)["AIPROXY_METRICS__LISTEN"] == "[::1]:9092"  # type: ignore[arg-type]
    # No metrics settings at all: nothing to spread.
    assert "AIPROXY_METRICS__LISTEN" not in _worker_env(SimpleNamespace(), 1)  # type: ignore[arg-type]


def test_memory_limits_with_workers_are_announced_as_per_worker() -> None:
    from aiproxy.core.settings import load_settings
    from aiproxy.server.process.workers import limits_warnings

    (event, fields), *rest = limits_warnings(load_settings(server={"workers": 3}))
    assert not rest and event == "limits_per_worker"
    assert fields["workers"] == 3 and fields["rate_per_s_per_caller"] == 300
    assert "3 x the configured" in fields["detail"] and "limits.backend: redis" in fields["detail"]
    # One process, limits off, or a shared backend sized for the workers: nothing to say.
    assert limits_warnings(load_settings()) == []
    assert limits_warnings(load_settings(server={"workers": 3}, limits={"enabled": False})) == []
    redis = {"url": "redis://127.0.0.1:6379/0"}
    shared = {"backend": "redis", "expected_processes": 4}
    assert limits_warnings(load_settings(server={"workers": 3}, limits=shared, redis=redis)) == []
    # ... but a fail_open fallback sized for fewer processes than this box runs is named.
    low = {"backend": "redis", "expected_processes": 1}
    ((event, fields),) = limits_warnings(
        load_settings(server={"workers": 2}, limits=low, redis=redis)
    )
    assert event == "limits_expected_processes_low" and fields["expected_processes"] == 1
    closed = {**low, "failure_policy": "fail_closed"}
    assert limits_warnings(load_settings(server={"workers": 2}, limits=closed, redis=redis)) == []
