"""TLS with certificates generated for the test (tests/support/certs.py): the proxy's
listener with TLS and with mutual TLS, and mutual TLS from the proxy to the agent.
"""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from aiproxy.ai.agent.v1 import agent_service_pb2 as pb
from tests.conftest import agent_args, proxy_args
from tests.support.certs import Pki, make_pki
from tests.support.grpc_helpers import SERVING, stub

GENERATE = pb.GenerateRequest(prompt="Explain TLS", options=pb.GenerationOptions(max_tokens=6))
# Handshake failures surface as UNAVAILABLE; the deadline bounds each attempt.
REFUSED = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


@pytest.fixture
def pki(tmp_path) -> Pki:
    return make_pki(tmp_path / "pki")


@pytest.fixture
def named_pki(tmp_path) -> Pki:
    """The agent's certificate names only aiproxy.test and localhost, not 127.0.0.1, so
    a proxy dialling 127.0.0.1 must check it against a name to accept it."""
    return make_pki(tmp_path / "named-pki", ip_san=False)


def listener_env(pki: Pki, *, mutual: bool) -> dict[str, str]:
    env = {
        "AIPROXY_TLS__SERVER__CERT_FILE": str(pki.server_cert),
        "AIPROXY_TLS__SERVER__KEY_FILE": str(pki.server_key),
    }
    if mutual:
        env["AIPROXY_TLS__SERVER__CLIENT_CA_FILE"] = str(pki.ca)
    return env


def client_credentials(pki: Pki, *, cert: str | None = "client") -> grpc.ChannelCredentials:
    """Trusting the test CA; presenting the "client" certificate, the "rogue" one, or none."""
    if cert is None:
        return grpc.ssl_channel_credentials(root_certificates=pki.read("ca"))
    prefix = "rogue_client" if cert == "rogue" else "client"
    return grpc.ssl_channel_credentials(
        root_certificates=pki.read("ca"),
        private_key=pki.read(f"{prefix}_key"),
        certificate_chain=pki.read(f"{prefix}_cert"),
    )


async def generate(
    address: str, credentials: grpc.ChannelCredentials | None
) -> pb.GenerateResponse:
    channel = (
        grpc.aio.insecure_channel(address)
        if credentials is None
        else grpc.aio.secure_channel(address, credentials)
    )
    async with channel:
        return await stub(channel).Generate(GENERATE, timeout=5)


async def assert_refused(address: str, credentials: grpc.ChannelCredentials | None) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await generate(address, credentials)
    assert exc.value.code() in REFUSED


async def test_tls_listener(spawn, agent, pki) -> None:
    proxy = spawn(*proxy_args(agent.address), env=listener_env(pki, mutual=False), name="proxy")
    assert (await generate(proxy.address, client_credentials(pki, cert=None))).text
    assert proxy.log_events("proxy_started")[0]["tls"] == "tls"
    await assert_refused(proxy.address, None)  # plaintext against a TLS port


async def test_mutual_tls_listener_requires_a_trusted_client_certificate(spawn, agent, pki) -> None:
    proxy = spawn(*proxy_args(agent.address), env=listener_env(pki, mutual=True), name="proxy")
    assert (await generate(proxy.address, client_credentials(pki))).text
    assert proxy.log_events("proxy_started")[0]["tls"] == "mtls"
    await assert_refused(proxy.address, client_credentials(pki, cert=None))  # no client certificate
    await assert_refused(
        proxy.address, client_credentials(pki, cert="rogue")
    )  # from an untrusted CA
    # Refused handshakes do not disturb the listener.
    assert (await generate(proxy.address, client_credentials(pki))).text


def tls_agent_args(pki: Pki) -> list[str]:
    return agent_args(
        "--tls-cert",
        str(pki.server_cert),
        "--tls-key",
        str(pki.server_key),
        "--tls-client-ca",
        str(pki.ca),
    )


def upstream_env(pki: Pki, *, client_cert: bool = True) -> dict[str, str]:
    env = {
        "AIPROXY_TLS__UPSTREAM__CA_FILE": str(pki.ca),
        # The agent's certificate names aiproxy.test (and localhost); the proxy dials an IP.
        "AIPROXY_TLS__UPSTREAM__SERVER_NAME": "aiproxy.test",
        "AIPROXY_UPSTREAM__STARTUP_WAIT_S": "10" if client_cert else "0.5",
    }
    if client_cert:
        env["AIPROXY_TLS__UPSTREAM__CERT_FILE"] = str(pki.client_cert)
        env["AIPROXY_TLS__UPSTREAM__KEY_FILE"] = str(pki.client_key)
    return env


async def test_mutual_tls_from_the_proxy_to_the_agent(spawn, named_pki) -> None:
    pki = named_pki
    agent = spawn(*tls_agent_args(pki), name="agent")
    await assert_refused(agent.address, None)  # the agent takes no plaintext
    await assert_refused(
        agent.address, client_credentials(pki, cert=None)
    )  # nor callers without a cert
    proxy = spawn(*proxy_args(agent.address), env=upstream_env(pki), name="proxy")
    assert proxy.log_events("proxy_started")[0]["upstream_tls"] is True
    async with grpc.aio.insecure_channel(proxy.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        reply = await health.Check(
            health_pb2.HealthCheckRequest(service="ai.agent.v1.AgentService"), timeout=10
        )
        assert reply.status == SERVING
        assert (await stub(channel).Generate(GENERATE, timeout=10)).text
        chunks = [
            c
            async for c in stub(channel).StreamGenerate(
                pb.StreamGenerateRequest(prompt="tls"), timeout=10
            )
        ]
        assert chunks[-1].is_final


async def test_upstream_name_mismatch_is_refused(spawn, named_pki) -> None:
    """The agent's certificate does not carry the name the proxy expects: refused."""
    pki = named_pki
    agent = spawn(*tls_agent_args(pki), name="agent")
    env = upstream_env(pki)
    env["AIPROXY_TLS__UPSTREAM__SERVER_NAME"] = "someone-else.test"
    env["AIPROXY_UPSTREAM__STARTUP_WAIT_S"] = "0.5"
    proxy = spawn(*proxy_args(agent.address), env=env, name="proxy")
    async with grpc.aio.insecure_channel(proxy.address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await stub(channel).Generate(GENERATE, timeout=5)
    assert exc.value.code() is grpc.StatusCode.UNAVAILABLE


async def test_proxy_without_its_client_certificate_cannot_use_the_agent(spawn, named_pki) -> None:
    pki = named_pki
    agent = spawn(*tls_agent_args(pki), name="agent")
    proxy = spawn(
        *proxy_args(agent.address), env=upstream_env(pki, client_cert=False), name="proxy"
    )
    async with grpc.aio.insecure_channel(proxy.address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await stub(channel).Generate(GENERATE, timeout=5)
    assert exc.value.code() is grpc.StatusCode.UNAVAILABLE
    assert proxy.log_events("no_usable_upstream_at_start")


async def test_tls_files_are_checked_at_start(spawn, agent, tmp_path) -> None:
    from tests.support.procs import ServiceProcess, aiproxy_argv

    proc = ServiceProcess(
        aiproxy_argv(*proxy_args(agent.address)),
        env={"AIPROXY_TLS__SERVER__CERT_FILE": str(tmp_path / "missing.pem")},
        name="proxy",
    )
    with pytest.raises(RuntimeError, match="exited with 2"):
        proc.start(timeout=60)
    assert "tls.server.cert_file" in proc.stderr_text()
    proc.cleanup()


def test_expected_server_name() -> None:
    """Discovery dials the IPs a name resolves to (only "localhost" is dialled by name), so
    the name to check defaults to the endpoints' one DNS name."""
    from aiproxy.core.settings import UpstreamTlsSettings
    from aiproxy.server.tls import expected_server_name

    on = UpstreamTlsSettings(enabled=True)
    assert expected_server_name(on, ["agents.internal:50052"]) == "agents.internal"
    assert expected_server_name(on, ["10.0.0.1:50052", "[::1]:50052"]) is None
    assert expected_server_name(on, ["a.internal:1", "b.internal:1"]) is None
    assert (
        expected_server_name(UpstreamTlsSettings(enabled=True, server_name="x"), ["a.internal:1"])
        == "x"
    )
