"""The exact container commands of deploy/ run for real: same arguments, same environment.

Only what cannot be the same on a test machine is replaced: listen addresses become
127.0.0.1:0, cluster DNS names become the addresses of the processes started here, and a
ConfigMap's mount path becomes a temporary file with the ConfigMap's content. The agent's
environment is its ConfigMap (k8s) or its compose environment with nothing set in the
shell; the real-model variant edits the ConfigMap as docs/agent.md says and points it at
tests.support.fake_openai.
"""

from __future__ import annotations

import asyncio
import json
import pathlib
import urllib.request

import grpc
import pytest

from aiproxy.ai.agent.v1 import agent_service_pb2 as pb
from aiproxy.server.cli import build_parser
from tests.integration.test_health_probe import probe
from tests.support.fake_openai import FakeOpenAI
from tests.support.grpc_helpers import stub
from tests.support.redis_server import RedisServer, redis_server  # noqa: F401 - the fixture
from tests.support.waiting import eventually
from tests.unit.test_deploy import by_kind, compose, containers, interpolate_all

LOCAL = "127.0.0.1:0"


def with_listen(args: list[str], value: str = LOCAL) -> list[str]:
    out = list(args)
    out[out.index("--listen") + 1] = value
    return out


async def assert_serves(proxy) -> None:
    async with grpc.aio.insecure_channel(proxy.address) as channel:
        reply = await stub(channel).Generate(
            pb.GenerateRequest(prompt="from a container command"), timeout=10
        )
    assert reply.text


async def test_kubernetes_agent_and_proxy_commands(
    spawn,
    tmp_path: pathlib.Path,
    redis_server: RedisServer,  # noqa: F811
) -> None:
    deployments = by_kind("Deployment")
    agent_container = containers(deployments["aiproxy-agent"])[0]
    agent = spawn(
        *with_listen(agent_container["args"]),
        env=agent_config_map(agent_container),
        name="k8s-agent",
    )

    proxy_container = containers(deployments["aiproxy"])[0]
    args = list(proxy_container["args"])
    config_path = args[args.index("--config") + 1]
    config = tmp_path / pathlib.Path(config_path).name
    config.write_text(by_kind("ConfigMap")["aiproxy-config"]["data"][config.name])
    args[args.index("--config") + 1] = str(config)
    env = {e["name"]: e["value"] for e in proxy_container.get("env", [])}
    env |= {
        "AIPROXY_SERVER__LISTEN": LOCAL,
        "AIPROXY_METRICS__LISTEN": LOCAL,
        # The headless Service's DNS name, here: the agent started above.
        "AIPROXY_UPSTREAM__ENDPOINTS": json.dumps([agent.address]),
        # The aiproxy-redis Service's DNS name, here: a real redis-server.
        "AIPROXY_REDIS__URL": redis_server.url,
    }
    proxy = spawn(*args, env=env, name="k8s-proxy")
    await assert_serves(proxy)

    for kind in ("readinessProbe", "livenessProbe", "startupProbe"):
        service = proxy_container[kind]["grpc"].get("service", "")
        result = await probe("--address", proxy.address, "--service", service)
        assert result.returncode == 0, (kind, result.stdout)
    for kind in ("readinessProbe", "livenessProbe"):
        service = agent_container[kind]["grpc"].get("service", "")
        result = await probe("--address", agent.address, "--service", service)
        assert result.returncode == 0, (kind, result.stdout)


def agent_config_map(container: dict) -> dict[str, str]:
    """The environment the agent's envFrom ConfigMap gives it."""
    (source,) = container["envFrom"]
    data = by_kind("ConfigMap")[source["configMapRef"]["name"]]["data"]
    return {k: str(v) for k, v in data.items()}


async def test_kubernetes_agent_with_a_real_model_backend(spawn) -> None:
    """The ConfigMap edited for a real model and the key from the Secret, as docs/agent.md
    says: the agent answers from the model server with the key, and while the model server
    is away its readiness probe fails and its liveness probe does not (no restart loop)."""
    container = containers(by_kind("Deployment")["aiproxy-agent"])[0]
    key = "sk-from-the-secret-0123456789"
    with FakeOpenAI() as fake:
        env = agent_config_map(container) | {
            "AIPROXY_AGENT_BACKEND": "openai",
            "AIPROXY_AGENT_BASE_URL": fake.base_url,
            "AIPROXY_AGENT_MODEL": "fake-model",
            "AIPROXY_AGENT_HEALTH_INTERVAL_S": "0.2",
            "OPENAI_API_KEY": key,  # the secretKeyRef
        }
        agent = spawn(*with_listen(container["args"]), env=env, name="k8s-agent-openai")
        async with grpc.aio.insecure_channel(agent.address) as channel:
            reply = await stub(channel).Generate(pb.GenerateRequest(prompt="hi there"), timeout=10)
        assert reply.model == "fake-model" and reply.text
        (request,) = fake.chat_requests()
        assert request.headers["authorization"] == f"Bearer {key}"
        readiness = container["readinessProbe"]["grpc"]["service"]
        liveness = container["livenessProbe"]["grpc"]["service"]
        await asyncio.to_thread(fake.stop)

        async def not_ready_but_alive() -> bool:
            ready = await probe("--address", agent.address, "--service", readiness)
            assert ready.returncode != 0, "still ready"
            live = await probe("--address", agent.address, "--service", liveness)
            assert live.returncode == 0, live.stdout
            return True

        await eventually(not_ready_but_alive, 20, "readiness to fail while liveness holds")
    assert key not in agent.stderr_text() + "".join(map(str, agent.stdout_lines()))


async def test_compose_services_commands_and_healthchecks(
    spawn,
    redis_server: RedisServer,  # noqa: F811
) -> None:
    services = compose()["services"]
    agents = {}
    for name in ("agent-1", "agent-2"):
        # Its environment with nothing set in the shell: the reference backend.
        env = interpolate_all({k: str(v) for k, v in services[name]["environment"].items()}, {})
        agents[name] = spawn(*with_listen(services[name]["command"]), env=env, name=name)
        test = services[name]["healthcheck"]["test"]
        args = build_parser().parse_args(test[2:])
        assert (
            await probe("--address", agents[name].address, "--service", args.service)
        ).returncode == 0
    proxy_service = services["proxy-1"]
    env = {k: str(v) for k, v in proxy_service["environment"].items()}
    env |= {
        "AIPROXY_SERVER__LISTEN": LOCAL,
        "AIPROXY_METRICS__LISTEN": LOCAL,
        "AIPROXY_UPSTREAM__ENDPOINTS": json.dumps([a.address for a in agents.values()]),
        "AIPROXY_REDIS__URL": redis_server.url,  # the compose `redis` service
    }
    proxy = spawn(*proxy_service["command"], env=env, name="proxy-1")
    await assert_serves(proxy)
    # The image's HEALTHCHECK (the proxy's default) against it.
    assert (
        await probe("--address", proxy.address, "--service", "ai.agent.v1.AgentService")
    ).returncode == 0


@pytest.mark.envoy
@pytest.mark.parametrize("where", ["compose", "kubernetes"])
async def test_envoy_command_fronts_the_proxies(where, spawn, agent) -> None:
    if where == "compose":
        command = compose()["services"]["envoy"]["command"]
    else:
        command = containers(by_kind("Deployment")["aiproxy-envoy"])[0]["args"]
    proxies = [
        spawn(
            "serve",
            "--listen",
            LOCAL,
            "--upstream",
            agent.address,
            "--metrics-listen",
            LOCAL,
            name=f"proxy{i}",
        )
        for i in range(2)
    ]
    args = with_listen(command)
    # Each --proxy (a compose service or the headless Service's name) -> a real proxy.
    replaced = iter(p.address for p in proxies)
    args = [next(replaced) if i and args[i - 1] == "--proxy" else a for i, a in enumerate(args)]
    assert args.count("--proxy") == command.count("--proxy")
    envoy = spawn(*args, name="envoy")
    reply = await asyncio.to_thread(
        http_json, f"http://{envoy.address}/api/v1/ai/generate", {"prompt": "through the edge"}
    )
    assert reply["text"]


def http_json(url: str, body: dict) -> dict:
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        headers={"content-type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=20) as reply:
        return json.loads(reply.read())
