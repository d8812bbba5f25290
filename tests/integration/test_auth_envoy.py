"""Auth failures reach HTTP callers as 401/403 through the project's Envoy edge.

`aiproxy envoy` renders envoy/envoy.yaml.tmpl (gRPC-JSON transcoder with
convert_grpc_status) in front of a proxy with auth on: an HTTP caller gets the status
and the google.rpc.Status body that the proxy's error shape promises.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from typing import Any

import jwt
import pytest

from tests.conftest import proxy_args
from tests.integration.test_auth import AUDIENCE, AUTH_ENV, SECRET

pytestmark = pytest.mark.envoy


@pytest.fixture
def envoy_url(spawn, agent) -> str:
    proxy = spawn(*proxy_args(agent.address), env=AUTH_ENV, name="proxy")
    envoy = spawn(
        "envoy",
        "--listen",
        "127.0.0.1:0",
        "--proxy",
        proxy.address,
        "--concurrency",
        "1",
        name="envoy",
    )
    return f"http://{envoy.address}"


def post(
    url: str, body: dict[str, Any], headers: dict[str, str] | None = None
) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        headers={"content-type": "application/json", **(headers or {})},
        method="POST",
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
    return jwt.encode(
        {"sub": "alice", "aud": AUDIENCE, "exp": now + 300, **extra}, SECRET, algorithm="HS256"
    )


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
    status, body = post(
        execute,
        {"agentType": "AGENT_TYPE_ANALYSIS", "task": "2+2"},
        {"authorization": f"Bearer {token(scope='read')}"},
    )
    assert status == 403 and error_info(body)["metadata"] == {
        "cause": "missing_scope",
        "scope": "agent:execute",
    }
