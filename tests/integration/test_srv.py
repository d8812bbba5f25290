"""DNS SRV discovery (`srv://_service._proto.name?nameserver=HOST:PORT`) with real agent and
proxy processes against a small fake DNS server (tests/support/fake_dns.py)."""

from __future__ import annotations

import grpc
import pytest

from aiproxy.ai.agent.v1 import agent_service_pb2 as pb
from aiproxy.server.pool.srv import SrvTarget, build_query, parse_answer, resolve_srv
from tests.conftest import agent_args, proxy_args
from tests.integration.test_pool import endpoints
from tests.support.fake_dns import FakeDns
from tests.support.grpc_helpers import stub
from tests.support.waiting import eventually

NAME = "_agent._tcp.service.consul"


@pytest.fixture
def dns():
    server = FakeDns()
    yield server
    server.close()


def test_grammar_and_parsing(dns) -> None:
    t = SrvTarget.parse(f"srv://{NAME}?nameserver=127.0.0.1:8600")
    assert (t.name, t.nameserver) == (NAME, ("127.0.0.1", 8600))
    for bad in ("srv://agents.internal", "srv://_a._tcp.x?port=1", "srv://_a._tcp.x?nameserver=x"):
        with pytest.raises(ValueError):
            SrvTarget.parse(bad)
    dns.set(NAME, [("10.0.0.1", 7001), ("10.0.0.2", 7002)])
    records, extra = parse_answer(dns.answer(build_query(NAME, 77)), 77)
    assert sorted(r[2] for r in records) == [7001, 7002]
    assert sorted(ip for ips in extra.values() for ip in ips) == ["10.0.0.1", "10.0.0.2"]
    assert parse_answer(dns.answer(build_query("_x._tcp.nowhere", 5)), 5) == ([], {})


async def test_lowest_priority_only(dns) -> None:
    dns.set(NAME, [("10.0.0.1", 7001)], priority=1)
    dns.records[NAME] += [(5, 1, 7009, "backup.fake.internal")]
    dns.hosts["backup.fake.internal"] = ["10.0.0.9"]
    target = SrvTarget(NAME, ("127.0.0.1", dns.port))
    assert await resolve_srv(target) == [("10.0.0.1", 7001)]


async def test_proxy_follows_srv(spawn, dns) -> None:
    agents = [spawn(*agent_args(), name=f"agent{i}") for i in range(2)]
    address = [tuple(a.address.rsplit(":", 1)) for a in agents]
    dns.set(NAME, [(address[0][0], int(address[0][1]))])
    proxy = spawn(
        *proxy_args(f"srv://{NAME}?nameserver={dns.nameserver}"),
        env={"AIPROXY_UPSTREAM__DNS_REFRESH_S": "0.2"},
        name="proxy",
    )
    async with grpc.aio.insecure_channel(proxy.address) as channel:
        assert set(await endpoints(channel)) == {agents[0].address}
        assert (await stub(channel).Generate(pb.GenerateRequest(prompt="hi"), timeout=10)).text
        dns.set(NAME, [(h, int(p)) for h, p in address])

        async def both() -> bool:
            return set(await endpoints(channel)) == {a.address for a in agents}

        await eventually(both, 10, "the second instance from SRV")
        # The nameserver goes away: the last answer stays, and the proxy says so.
        dns.close()
        proxy.wait_for_log(lambda e: e.get("event") == "srv_resolve_failed", timeout=10)
        assert set(await endpoints(channel)) == {a.address for a in agents}
