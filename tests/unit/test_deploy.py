"""Deployment artefacts: no Docker engine or cluster here, so check what can be checked.

- the Dockerfile: hadolint clean, multi-stage, non-root, exec-form entrypoint, a
  HEALTHCHECK that runs the gRPC health probe against the port the proxy listens on;
- compose and Kubernetes: every container command parses with the real `aiproxy` CLI,
  every AIPROXY_* variable and config file is accepted by the real config schema, ports,
  probe service names, selectors and DNS names agree with each other;
- the agent's model backend (docs/agent.md: A real model behind it): every AIPROXY_AGENT_* /
  OPENAI_* variable the files set is one the agent reads, the reference backend is the
  default, the openai backend is one environment (compose) or ConfigMap (k8s) away, and the
  API key comes from the environment or a Secret, never from the files;
- the Kubernetes manifests validate against the Kubernetes 1.37 OpenAPI schemas that the
  kubernetes-validate package ships (offline, --strict: unknown fields are errors).

The same commands run for real in tests/integration/test_container_commands.py.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import subprocess
import urllib.parse
from collections.abc import Iterator
from typing import Any

import kubernetes_validate
import pytest
import yaml
from dockerfile_parse import DockerfileParser

from aiproxy.agent import cli as agent_cli
from aiproxy.agent.server import LIVENESS_SERVICE as AGENT_LIVENESS_SERVICE
from aiproxy.agent.settings import DEFAULT_MODEL, AgentSettings
from aiproxy.core.service import SERVICE_NAME
from aiproxy.core.settings import load_settings, parse_hostport
from aiproxy.server.cli import build_parser
from aiproxy.server.request.health import LIVENESS_SERVICE

ROOT = pathlib.Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S_VERSION = "1.37"
PROXY_HEALTH_SERVICES = {"", SERVICE_NAME, LIVENESS_SERVICE}
AGENT_HEALTH_SERVICES = {"", SERVICE_NAME, AGENT_LIVENESS_SERVICE}


def k8s_docs() -> list[dict[str, Any]]:
    docs = []
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def by_kind(kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in k8s_docs() if d["kind"] == kind}


def compose() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def settings_from(
    env: dict[str, str], config_text: str | None = None, tmp: pathlib.Path | None = None
):
    """The real schema's verdict on a container's AIPROXY_* environment (and config file)."""
    assert all(k.startswith("AIPROXY_") for k in env), env
    config = None
    if config_text is not None:
        assert tmp is not None
        config = tmp / "config.yaml"
        config.write_text(config_text)
    saved = {k: v for k, v in os.environ.items() if k.startswith("AIPROXY_")}
    for k in saved:
        del os.environ[k]
    os.environ.update(env)
    try:
        return load_settings(config)
    finally:
        for k in env:
            del os.environ[k]
        os.environ.update(saved)


def parse_command(args: list[str]):
    return build_parser().parse_args(args)


# ---- Dockerfile ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def dockerfile() -> DockerfileParser:
    parser = DockerfileParser(path=str(ROOT / "Dockerfile"))
    return parser


def final_stage(df: DockerfileParser) -> list[dict[str, Any]]:
    stages: list[list[dict[str, Any]]] = []
    for instruction in df.structure:
        if instruction["instruction"] == "FROM":
            stages.append([])
        if stages:
            stages[-1].append(instruction)
    assert len(stages) >= 2, "the Dockerfile must be multi-stage"
    return stages[-1]


def test_hadolint_is_clean() -> None:
    hadolint = shutil.which("hadolint") or str(pathlib.Path(os.sys.executable).parent / "hadolint")
    result = subprocess.run(
        [hadolint, "--no-color", str(ROOT / "Dockerfile")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_runtime_stage_is_small_non_root_and_execs_aiproxy(dockerfile: DockerfileParser) -> None:
    stage = final_stage(dockerfile)
    values = {i["instruction"]: i["value"] for i in stage}
    # Non-root, numeric (Kubernetes' runAsNonRoot can only check a number).
    user = values["USER"].split(":")[0]
    assert user.isdigit() and int(user) != 0
    # No compilers or package managers' build tools in the runtime stage.
    runs = " ".join(i["value"] for i in stage if i["instruction"] == "RUN")
    for tool in ("gcc", "build-essential", "apt-get install", "grpcio-tools"):
        assert tool not in runs
    # Only built wheels come from the build stage.
    copies = [i["value"] for i in stage if i["instruction"] == "COPY"]
    assert copies == ["--from=build /wheels /tmp/wheels"]
    # Exec form, so SIGTERM reaches aiproxy; the proxy is the default.
    assert yaml.safe_load(values["ENTRYPOINT"]) == ["aiproxy"]
    assert yaml.safe_load(values["CMD"]) == ["serve"]
    parse_command(["serve"])


def test_healthcheck_probes_grpc_health_on_the_listen_port(dockerfile: DockerfileParser) -> None:
    stage = final_stage(dockerfile)
    health = next(i["value"] for i in stage if i["instruction"] == "HEALTHCHECK")
    command = yaml.safe_load(health.split("CMD", 1)[1].strip())
    assert command[0] == "aiproxy" and command[1] == "health"
    args = parse_command(command[1:])
    assert args.service in PROXY_HEALTH_SERVICES
    listen = dockerfile.envs["AIPROXY_SERVER__LISTEN"]
    assert parse_hostport(args.address)[1] == parse_hostport(listen)[1]
    exposed = " ".join(i["value"] for i in stage if i["instruction"] == "EXPOSE").split()
    assert str(parse_hostport(listen)[1]) in exposed
    assert settings_from({"AIPROXY_SERVER__LISTEN": listen}).server.listen == listen


def test_build_stage_copies_what_exists(dockerfile: DockerfileParser) -> None:
    for instruction in dockerfile.structure:
        if instruction["instruction"] == "COPY" and not instruction["value"].startswith("--from"):
            for source in instruction["value"].split()[:-1]:
                assert (ROOT / source).exists(), f"COPY {source}: not in the repository"


# ---- compose ---------------------------------------------------------------------------


def compose_services() -> Iterator[tuple[str, dict[str, Any]]]:
    yield from compose()["services"].items()


def test_compose_commands_and_environment_are_real() -> None:
    services = dict(compose_services())
    for service in services.values():
        if service.get("image", "").startswith("aiproxy"):
            args = parse_command(service["command"])
            env = {k: str(v) for k, v in (service.get("environment") or {}).items()}
            if args.command == "serve":
                settings = settings_from(env)
                for endpoint in settings.upstream.endpoints:
                    host, port = parse_hostport(endpoint)
                    agent = parse_command(services[host]["command"])
                    assert parse_hostport(agent.listen)[1] == port
            test = service.get("healthcheck", {}).get("test")
            if test:
                probe = parse_command(test[2:]) if test[0] == "CMD" else None
                assert probe is not None and probe.command == "health"
                expected = (
                    AGENT_HEALTH_SERVICES if args.command == "agent" else PROXY_HEALTH_SERVICES
                )
                assert probe.service in expected
    envoy = parse_command(services["envoy"]["command"])
    assert [parse_hostport(p)[0] for p in envoy.proxy] == ["proxy-1", "proxy-2"]


def test_prometheus_scrapes_the_proxies_metrics_port() -> None:
    services = dict(compose_services())
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    targets = [
        t for job in config["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]
    ]
    for target in targets:
        host, port = parse_hostport(target)
        env = {k: str(v) for k, v in services[host]["environment"].items()}
        assert parse_hostport(settings_from(env).metrics.listen)[1] == port


def test_compose_mounts_what_exists_where_the_configs_expect_it() -> None:
    services = dict(compose_services())
    mounted: dict[str, pathlib.Path] = {}
    for service in services.values():
        for volume in service.get("volumes", []):
            source, target = volume.split(":")[:2]
            local = (DEPLOY / source).resolve()
            assert local.exists(), volume
            mounted[target] = local
    # Prometheus loads the alert rules it is told to; Grafana provisions the dashboard.
    config = yaml.safe_load(mounted["/etc/prometheus/prometheus.yml"].read_text())
    for rule_file in config["rule_files"]:
        assert yaml.safe_load(mounted[rule_file].read_text())["groups"]
    provider = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "dashboards" / "aiproxy.yaml").read_text()
    )
    folder = provider["providers"][0]["options"]["path"]
    dashboards = [t for t in mounted if t.startswith(folder + "/") and t.endswith(".json")]
    assert dashboards and all(json.loads(mounted[d].read_text())["panels"] for d in dashboards)


# ---- Kubernetes -------------------------------------------------------------------------


@pytest.mark.parametrize("doc", k8s_docs(), ids=lambda d: f"{d['kind']}/{d['metadata']['name']}")
def test_manifest_matches_the_kubernetes_schema(doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def containers(deployment: dict[str, Any]) -> list[dict[str, Any]]:
    return deployment["spec"]["template"]["spec"]["containers"]


def test_deployments_run_real_commands_with_matching_probes(tmp_path: pathlib.Path) -> None:
    config_maps = by_kind("ConfigMap")
    for name, deployment in by_kind("Deployment").items():
        spec = deployment["spec"]["template"]["spec"]
        assert (
            deployment["spec"]["selector"]["matchLabels"].items()
            <= deployment["spec"]["template"]["metadata"]["labels"].items()
        )
        for container in containers(deployment):
            if not container["image"].startswith("aiproxy"):
                continue  # Redis: checked by test_k8s_proxies_share_limits_in_the_redis_service
            args = parse_command(container["args"])
            ports = {p["containerPort"] for p in container["ports"]}
            for probe_name in ("readinessProbe", "livenessProbe", "startupProbe"):
                probe = container.get(probe_name)
                if probe and "grpc" in probe:
                    assert probe["grpc"]["port"] in ports, (name, probe_name)
                    allowed = (
                        AGENT_HEALTH_SERVICES if args.command == "agent" else PROXY_HEALTH_SERVICES
                    )
                    assert probe["grpc"].get("service", "") in allowed, (name, probe_name)
            if args.command == "agent":
                assert parse_hostport(args.listen)[1] in ports
            if args.command == "serve":
                env = {e["name"]: e["value"] for e in container.get("env", [])}
                mount = next(
                    m for m in container["volumeMounts"] if args.config.startswith(m["mountPath"])
                )
                volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
                config_text = config_maps[volume["configMap"]["name"]]["data"][
                    pathlib.Path(args.config).name
                ]
                settings = settings_from(env, config_text, tmp_path)
                assert parse_hostport(settings.server.listen)[1] in ports
                assert parse_hostport(settings.metrics.listen)[1] in ports
                # preStop, then drain delay and grace must fit in the termination grace.
                pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
                assert pre_stop[0] == "sleep"
                budget = (
                    float(pre_stop[1])
                    + settings.server.drain_delay_s
                    + settings.server.grace_period_s
                )
                assert spec["terminationGracePeriodSeconds"] > budget
                assert settings.server.grace_period_s >= settings.deadlines.agent_max_s, (
                    "agent runs must be able to drain"
                )


def test_services_select_pods_and_dns_names_resolve_to_them(tmp_path: pathlib.Path) -> None:
    deployments = by_kind("Deployment")
    services = by_kind("Service")
    pod_labels = {n: d["spec"]["template"]["metadata"]["labels"] for n, d in deployments.items()}
    for name, service in services.items():
        assert any(
            service["spec"]["selector"].items() <= labels.items() for labels in pod_labels.values()
        ), name
    for name, pdb in by_kind("PodDisruptionBudget").items():
        assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels[name].items()
        assert deployments[name]["spec"]["replicas"] > pdb["spec"]["minAvailable"]

    def headless_target(address: str) -> tuple[dict[str, Any], int]:
        host, port = parse_hostport(address)
        service_name, namespace = host.split(".")[:2]
        service = services[service_name]
        assert (
            service["metadata"]["namespace"] == namespace and service["spec"]["clusterIP"] == "None"
        )
        assert port in {p["port"] for p in service["spec"]["ports"]}
        return service, port

    proxy_config = yaml.safe_load(by_kind("ConfigMap")["aiproxy-config"]["data"]["config.yaml"])
    for endpoint in proxy_config["upstream"]["endpoints"]:
        service, _ = headless_target(endpoint)
        assert service["spec"]["selector"].items() <= pod_labels["aiproxy-agent"].items()
    envoy = parse_command(containers(deployments["aiproxy-envoy"])[0]["args"])
    for address in envoy.proxy:
        service, _ = headless_target(address)
        assert service["spec"]["selector"].items() <= pod_labels["aiproxy"].items()


# ---- Shared limits (Redis) --------------------------------------------------------------


def redis_port(args: list[str]) -> int:
    """The port a redis-server command line listens on (6379 unless --port says)."""
    assert args[0] == "redis-server", args
    return int(args[args.index("--port") + 1]) if "--port" in args else 6379


def assert_redis_is_ephemeral_and_bounded(args: list[str]) -> None:
    joined = " ".join(args)
    assert "--appendonly no" in joined and "--maxmemory " in joined, args
    # Every key the store writes has a TTL: only volatile-* policies may evict them.
    assert args[args.index("--maxmemory-policy") + 1].startswith("volatile-"), args


def test_compose_proxies_share_limits_in_the_redis_service() -> None:
    services = dict(compose_services())
    proxies = {
        n: s
        for n, s in services.items()
        if s.get("image", "").startswith("aiproxy")
        and parse_command(s["command"]).command == "serve"
    }
    assert len(proxies) >= 2
    for name, service in proxies.items():
        settings = settings_from({k: str(v) for k, v in service["environment"].items()})
        assert settings.limits.backend == "redis", name
        assert settings.limits.expected_processes == len(proxies) * settings.server.workers
        url = urllib.parse.urlsplit(settings.redis.url)
        redis = services[url.hostname]
        assert redis["image"].startswith("redis:"), redis["image"]
        assert url.port == redis_port(redis["command"])
        assert_redis_is_ephemeral_and_bounded(redis["command"])
        # The proxies wait for a Redis that answers (its health check is a real PING).
        assert service["depends_on"][url.hostname] == {"condition": "service_healthy"}
        assert redis["healthcheck"]["test"][1:3] == ["redis-cli", "-p"]
        assert int(redis["healthcheck"]["test"][3]) == url.port


def test_k8s_proxies_share_limits_in_the_redis_service(tmp_path: pathlib.Path) -> None:
    deployments = by_kind("Deployment")
    services = by_kind("Service")
    proxy = deployments["aiproxy"]
    config_text = by_kind("ConfigMap")["aiproxy-config"]["data"]["config.yaml"]
    env = {e["name"]: e["value"] for e in containers(proxy)[0].get("env", [])}
    settings = settings_from(env, config_text, tmp_path)
    assert settings.limits.backend == "redis"
    # fail_open's local share is limit/expected_processes: one share per replica.
    assert settings.limits.expected_processes == proxy["spec"]["replicas"] * settings.server.workers
    url = urllib.parse.urlsplit(settings.redis.url)
    service_name, namespace = url.hostname.split(".")[:2]
    service = services[service_name]
    assert namespace == service["metadata"]["namespace"] == proxy["metadata"]["namespace"]
    (port,) = [p for p in service["spec"]["ports"] if p["port"] == url.port]
    # The Service selects the Redis pods, and its target port is the one Redis listens on.
    (redis,) = [
        d
        for d in deployments.values()
        if service["spec"]["selector"].items()
        <= d["spec"]["template"]["metadata"]["labels"].items()
    ]
    assert (
        redis["spec"]["replicas"] == 1
    )  # one Redis, not a Cluster (server/stores/redis_limits.py)
    (container,) = containers(redis)
    assert container["image"].startswith("redis:")
    named = {p["name"]: p["containerPort"] for p in container["ports"]}
    target = port["targetPort"]
    assert (named[target] if isinstance(target, str) else target) == redis_port(container["args"])
    assert_redis_is_ephemeral_and_bounded(container["args"])
    assert container["readinessProbe"]["exec"]["command"][:2] == ["redis-cli", "-p"]
    # Applied with the rest.
    kustomization = yaml.safe_load((DEPLOY / "k8s" / "kustomization.yaml").read_text())
    assert "redis.yaml" in kustomization["resources"]


# ---- The agent's model backend (docs/agent.md: A real model behind it) ----------------------

# Each setting the deploy files expose, a value an operator might give it, and where it lands.
MODEL_SETTINGS: dict[str, tuple[str, str, object]] = {
    "AIPROXY_AGENT_BACKEND": ("openai", "backend", "openai"),
    "AIPROXY_AGENT_BASE_URL": ("http://models:8000/v1", "base_url", "http://models:8000/v1"),
    "AIPROXY_AGENT_MODEL": ("llama3.2", "model", "llama3.2"),
    "AIPROXY_AGENT_MODEL_TIMEOUT_S": ("60", "model_timeout_s", 60.0),
    "AIPROXY_AGENT_HEALTH_INTERVAL_S": ("2", "health_interval_s", 2.0),
    "AIPROXY_AGENT_BATCH_CONCURRENCY": ("8", "batch_concurrency", 8),
}
API_KEY = "sk-deploy-test-0123456789"
_INTERPOLATION = re.compile(r"\$\{(\w+)(?:(:?-)([^}]*))?\}")


def interpolate(value: str, shell: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default} and ${VAR-default}, against `shell`."""

    def one(match: re.Match[str]) -> str:
        name, op, default = match.groups()
        if op == ":-":
            return shell.get(name) or default
        if op == "-":
            return shell.get(name, default)
        return shell.get(name, "")

    return _INTERPOLATION.sub(one, value)


def interpolate_all(environment: dict[str, str], shell: dict[str, str]) -> dict[str, str]:
    return {k: interpolate(v, shell) for k, v in environment.items()}


def agent_settings(command: list[str], env: dict[str, str]) -> AgentSettings:
    """What the real agent CLI makes of a container's command and environment."""
    args = parse_command(command)
    assert args.command == "agent"
    return agent_cli.settings_from_args(args, environ=env)


def compose_agents() -> dict[str, dict[str, Any]]:
    return {
        name: service
        for name, service in compose_services()
        if service.get("image", "").startswith("aiproxy")
        and parse_command(service["command"]).command == "agent"
    }


def test_compose_agents_take_the_model_backend_from_the_environment() -> None:
    agents = compose_agents()
    assert len(agents) >= 2
    for name, service in agents.items():
        environment = {k: str(v) for k, v in service["environment"].items()}
        # Every value is its own variable from the shell (or deploy/.env), so nothing, the
        # key least of all, is written in the file.
        for key, value in environment.items():
            match = _INTERPOLATION.fullmatch(value)
            assert match is not None and match.group(1) == key, (name, key, value)
        assert set(MODEL_SETTINGS) | {"OPENAI_API_KEY"} <= set(environment), name

        # Nothing set: the reference backend, as before.
        settings = agent_settings(service["command"], interpolate_all(environment, {}))
        assert (settings.backend, settings.model, settings.api_key) == (
            "reference",
            DEFAULT_MODEL,
            None,
        )
        # Chat sessions shared through the stack's Redis (docs/sessions.md).
        assert (settings.sessions, settings.redis_url) == ("redis", "redis://redis:6379/1")
        # Every setting the file passes on is one the agent reads.
        shell = {k: v for k, (v, _, _) in MODEL_SETTINGS.items()} | {"OPENAI_API_KEY": API_KEY}
        settings = agent_settings(service["command"], interpolate_all(environment, shell))
        for _, field, expected in MODEL_SETTINGS.values():
            assert getattr(settings, field) == expected, (name, field)
        assert settings.api_key == API_KEY
        # OPENAI_BASE_URL / OPENAI_MODEL reach it too (the agent's own fallbacks).
        shell = {
            "AIPROXY_AGENT_BACKEND": "openai",
            "OPENAI_BASE_URL": "https://api.openai.com/v1",
            "OPENAI_MODEL": "gpt-4o-mini",
        }
        settings = agent_settings(service["command"], interpolate_all(environment, shell))
        assert (settings.base_url, settings.model) == ("https://api.openai.com/v1", "gpt-4o-mini")
        # A model server on the Docker host is reachable by name, on Linux too.
        assert "host.docker.internal:host-gateway" in service["extra_hosts"], name


def test_k8s_agent_takes_the_model_backend_from_a_config_map_and_the_key_from_a_secret() -> None:
    agent = by_kind("Deployment")["aiproxy-agent"]
    (container,) = containers(agent)
    (source,) = container["envFrom"]
    config_map = by_kind("ConfigMap")[source["configMapRef"]["name"]]
    assert config_map["metadata"]["namespace"] == agent["metadata"]["namespace"]
    data = {k: str(v) for k, v in config_map["data"].items()}
    assert set(MODEL_SETTINGS) <= set(data)
    # The key: only from a Secret, optional (the reference and local servers need none).
    env = {e["name"]: e for e in container.get("env", [])}
    key_ref = env["OPENAI_API_KEY"]["valueFrom"]["secretKeyRef"]
    assert "value" not in env["OPENAI_API_KEY"] and key_ref["optional"] is True
    assert key_ref["key"] == "OPENAI_API_KEY"
    assert not any(word in k for k in data for word in ("KEY", "SECRET", "TOKEN")), data
    assert all("value" not in e for e in env.values()), "settings go in the ConfigMap"

    # As shipped (no Secret): the reference backend.
    settings = agent_settings(container["args"], data)
    assert (settings.backend, settings.model, settings.api_key) == (
        "reference",
        DEFAULT_MODEL,
        None,
    )
    # Chat sessions in the Redis of redis.yaml, shared by the replicas (docs/sessions.md).
    redis = by_kind("Service")["aiproxy-redis"]["metadata"]
    assert settings.sessions == "redis" and settings.redis_url is not None
    assert f"//{redis['name']}.{redis['namespace']}.svc" in settings.redis_url
    # The ConfigMap edited for a real model, and the Secret created: every key is read.
    edited = {k: v for k, (v, _, _) in MODEL_SETTINGS.items()}
    settings = agent_settings(container["args"], {**data, **edited, "OPENAI_API_KEY": API_KEY})
    for _, field, expected in MODEL_SETTINGS.values():
        assert getattr(settings, field) == expected, field
    assert settings.api_key == API_KEY

    # Readiness follows the model server (no traffic while it is away); liveness does not
    # (a restart would not bring the model back).
    assert container["readinessProbe"]["grpc"]["service"] == SERVICE_NAME
    assert container["livenessProbe"]["grpc"]["service"] == AGENT_LIVENESS_SERVICE
