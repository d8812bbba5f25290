"""`aiproxy demo`: reference agent + proxy + Envoy on the default ports, until Ctrl-C.

Each part runs as its own process with the same command a user or container would use;
the demo waits until the proxy reports SERVING through grpc.health.v1, and until Envoy
answers /healthz (it has health-checked the proxy), before it tells the user what to try.
The agent honours x-fault-* headers here, so the page can show what errors look like.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import signal
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from aiproxy.server.process import devtoken

AGENT = "127.0.0.1:50052"
PROXY = "127.0.0.1:50051"
ENVOY_HTTP = "127.0.0.1:8080"


@dataclass
class Child:
    name: str
    proc: asyncio.subprocess.Process


async def _spawn(name: str, *args: str) -> Child:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "aiproxy.server.cli", *args, stdout=asyncio.subprocess.PIPE
    )
    assert proc.stdout is not None
    while True:  # the ready line; logs go to our stderr as they are
        line = await asyncio.wait_for(proc.stdout.readline(), timeout=60)
        if not line:
            raise RuntimeError(f"{name} exited before it was ready (code {await proc.wait()})")
        try:
            if json.loads(line).get("event") == "listening":
                return Child(name, proc)
        except json.JSONDecodeError:
            continue


async def _wait_serving(address: str, timeout: float = 30.0) -> None:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=2)  # type: ignore[attr-defined]  # stubs: HealthStub has no methods
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            if loop.time() > deadline:
                raise TimeoutError(f"{address} not SERVING after {timeout}s")
            await asyncio.sleep(0.1)


async def _wait_http_ok(url: str, timeout: float = 30.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout

    def probe() -> bool:
        try:
            with urllib.request.urlopen(url, timeout=2) as reply:  # noqa: S310 (loopback)
                return bool(reply.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    while not await asyncio.to_thread(probe):
        if loop.time() > deadline:
            raise TimeoutError(f"{url} not OK after {timeout}s")
        await asyncio.sleep(0.1)


def _banner() -> str:
    http = f"http://{ENVOY_HTTP}"
    return f"""
aiproxy demo is up.
  browser page     {http}/   (through Envoy: type a prompt, watch it stream)
  Envoy (HTTP)     {ENVOY_HTTP}    (JSON + SSE under /api/v1/ai/..., gRPC too; /healthz)
  proxy (gRPC)     {PROXY}   (health, reflection: grpcurl works)
  agent (gRPC)     {AGENT}   (the reference upstream; x-fault-* headers enabled)

HTTP (JSON and server-sent events):
  curl -s {http}/api/v1/ai/generate -d '{{"prompt":"Explain circuit breakers"}}'
  curl -N {http}/api/v1/ai/generate/stream -d '{{"prompt":"Stream me a haiku"}}'
  curl -N '{http}/api/v1/ai/chat/stream?session_id=s1&user_message=Hello'
  curl -i {http}/api/v1/ai/generate -H 'x-fault-code: UNAVAILABLE' -d '{{"prompt":"fail"}}'

Try:
  grpcurl -plaintext {PROXY} list
  grpcurl -plaintext -d '{{"prompt":"Explain circuit breakers"}}' {PROXY} ai.agent.v1.AgentService/Generate
  grpcurl -plaintext -d '{{"prompt":"Stream me a haiku"}}' {PROXY} ai.agent.v1.AgentService/StreamGenerate
  grpcurl -plaintext {PROXY} grpc.health.v1.Health/Check

Ctrl-C stops everything.
"""


async def _demo() -> int:
    children: list[Child] = []
    # One secret for this run, inherited by the proxy and Envoy: the proxy believes the
    # caller address Envoy sends only with it, never from a direct gRPC caller.
    os.environ.setdefault("AIPROXY_LIMITS__EDGE_SECRET", secrets.token_urlsafe(32))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        children.append(await _spawn("agent", "agent", "--listen", AGENT, "--enable-faults"))
        children.append(await _spawn("proxy", "serve", "--listen", PROXY, "--upstream", AGENT))
        await _wait_serving(PROXY)
        children.append(await _spawn("envoy", "envoy", "--listen", ENVOY_HTTP, "--proxy", PROXY))
        await _wait_http_ok(f"http://{ENVOY_HTTP}/healthz")
        print(_banner() + devtoken.demo_hint(), flush=True)
        waiters = [asyncio.ensure_future(c.proc.wait()) for c in children]
        stopper = asyncio.ensure_future(stop.wait())
        done, _ = await asyncio.wait([stopper, *waiters], return_when=asyncio.FIRST_COMPLETED)
        for fut in [stopper, *waiters]:
            fut.cancel()
        return 0 if stopper in done else 1
    finally:
        for child in reversed(children):
            if child.proc.returncode is None:
                child.proc.send_signal(signal.SIGTERM)
        for child in reversed(children):
            try:
                await asyncio.wait_for(child.proc.wait(), timeout=35)
            except TimeoutError:
                child.proc.kill()
                await child.proc.wait()


def run_demo(_args: argparse.Namespace) -> int:
    return asyncio.run(_demo())
