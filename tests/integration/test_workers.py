"""`aiproxy serve --workers N`: N processes on one port, one ready line, one clean stop."""

from __future__ import annotations

import pathlib
import signal

import grpc

from ai.agent.v1 import agent_service_pb2 as pb
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
        name="proxy",
    )
    assert proxy.ready["workers"] == 2
    workers = _children(proxy.pid)
    assert len(workers) == 2

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
        name="proxy",
    )
    assert "workers" not in proxy.ready
    assert _children(proxy.pid) == []


def test_worker_command_line_keeps_every_flag_but_the_listener() -> None:
    from server.workers import _replace_flag, _worker_argv

    argv = _worker_argv(
        "127.0.0.1:4000",
        ["serve", "--listen", "127.0.0.1:0", "--config", "x.yaml", "--workers", "2"],
    )
    assert argv[1:3] == ["-m", "server.cli"]
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

    from server.workers import WORKER_ENV, _worker_env

    settings = SimpleNamespace(metrics=SimpleNamespace(listen="127.0.0.1:9091"))
    envs = [_worker_env(settings, i) for i in range(3)]  # type: ignore[arg-type]
    assert [e["AIPROXY_METRICS__LISTEN"] for e in envs] == [
        "127.0.0.1:9091",
        "127.0.0.1:9092",
        "127.0.0.1:9093",
    ]
    assert [e[WORKER_ENV] for e in envs] == ["0", "1", "2"]
    # Port 0 (any free port) and no metrics settings at all: nothing to spread.
    assert "AIPROXY_METRICS__LISTEN" not in _worker_env(
        SimpleNamespace(metrics=SimpleNamespace(listen="127.0.0.1:0")), 1
    )  # type: ignore[arg-type]
    assert "AIPROXY_METRICS__LISTEN" not in _worker_env(SimpleNamespace(), 1)  # type: ignore[arg-type]
