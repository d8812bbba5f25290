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
    proxy = spawn("serve", "--listen", "127.0.0.1:0", "--upstream", agent.address, "--workers", "2", name="proxy")
    assert proxy.ready["workers"] == 2
    workers = _children(proxy.pid)
    assert len(workers) == 2

    # Separate connections (the kernel spreads connections, not calls): all answered.
    for _ in range(6):
        with grpc.insecure_channel(proxy.address, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
            call = channel.unary_unary(
                "/ai.agent.v1.AgentService/Generate",
                request_serializer=pb.GenerateRequest.SerializeToString,
                response_deserializer=pb.GenerateResponse.FromString,
            )
            assert call(pb.GenerateRequest(prompt="hello"), timeout=10).text

    proxy.send_signal(signal.SIGTERM)
    assert proxy.wait(timeout=40) == 0
    for pid in workers:
        assert not pathlib.Path(f"/proc/{pid}").exists() or "zombie" in pathlib.Path(f"/proc/{pid}/status").read_text()


def test_one_worker_is_the_plain_proxy(spawn) -> None:
    agent = spawn(*agent_args())
    proxy = spawn("serve", "--listen", "127.0.0.1:0", "--upstream", agent.address, "--workers", "1", name="proxy")
    assert "workers" not in proxy.ready
    assert _children(proxy.pid) == []
