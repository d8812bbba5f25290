"""`aiproxy demo`: reference agent + proxy + Envoy on the default ports, until Ctrl-C.

Each part runs as its own process with the same command a user or container would use;
the demo waits until the proxy reports SERVING through grpc.health.v1, and until Envoy
answers /healthz (it has health-checked the proxy), before it tells the user what to try.
The agent honours x-fault-* headers here, so the page can show what errors look like.

`aiproxy demo --model-server local` (what `make demo-model` runs) puts a real model behind the
agent: it starts `aiproxy model-server` (SmolLM2-135M through llama.cpp, on a free loopback
port) and runs the agent with `--backend openai` against it; `--model-server URL --model NAME`
uses an OpenAI-compatible server that already runs (Ollama, vLLM, llama-server...). The proxy,
Envoy, the page and the banner are the same.
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
from typing import Any

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
    ready: dict[str, Any]


async def _spawn(name: str, *args: str, timeout: float = 60) -> Child:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "aiproxy.server.cli", *args, stdout=asyncio.subprocess.PIPE
    )
    assert proc.stdout is not None
    while True:  # the ready line; logs go to our stderr as they are
        line = await asyncio.wait_for(proc.stdout.readline(), timeout=timeout)
        if not line:
            raise RuntimeError(f"{name} exited before it was ready (code {await proc.wait()})")
        try:
            ready = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(ready, dict) and ready.get("event") == "listening":
            return Child(name, proc, ready)


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


@dataclass(frozen=True)
class ModelChoice:
    """What the agent talks to: None (the reference backend), or an OpenAI-compatible server."""

    base_url: str
    model: str
    what: str  # for the banner


def _banner(model: ModelChoice | None = None) -> str:
    http = f"http://{ENVOY_HTTP}"
    if model is None:
        agent = "(the reference upstream; x-fault-* headers enabled)"
        model_line = ""
    else:
        agent = f"(--backend openai, model {model.model}; x-fault-* headers enabled)"
        model_line = f"\n  model (HTTP)     {model.base_url}   ({model.what})"
    return f"""
aiproxy demo is up.
  browser page     {http}/   (through Envoy: type a prompt, watch it stream)
  live view        {http}/admin/   (endpoints, breakers, streams, calls/s; refreshes itself)
  Envoy (HTTP)     {ENVOY_HTTP}    (JSON + SSE under /api/v1/ai/..., gRPC too; /healthz)
  proxy (gRPC)     {PROXY}   (health, reflection: grpcurl works)
  agent (gRPC)     {AGENT}   {agent}{model_line}

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


async def _start_model(args: argparse.Namespace, children: list[Child]) -> ModelChoice | None:
    choice = args.model_server
    if not choice:
        return None
    if choice == "local":
        # Loading takes a second or two; the first use of `make demo-model` built it already.
        child = await _spawn("model-server", "model-server", "--listen", "127.0.0.1:0", timeout=180)
        children.append(child)
        return ModelChoice(
            base_url=str(child.ready["base_url"]),
            model=str(child.ready["model"]),
            what="SmolLM2-135M-Instruct Q4_1 through llama.cpp, on this machine",
        )
    if not choice.startswith(("http://", "https://")):
        raise SystemExit(f"aiproxy demo: --model-server is 'local' or a URL, not {choice!r}")
    return ModelChoice(
        base_url=choice.rstrip("/"),
        model=args.model or "local",
        what="your model server",
    )


def _agent_args(model: ModelChoice | None) -> list[str]:
    args = ["agent", "--listen", AGENT, "--enable-faults"]
    if model is not None:
        args += ["--backend", "openai", "--base-url", model.base_url, "--model", model.model]
    return args


async def _demo(args: argparse.Namespace) -> int:
    children: list[Child] = []
    # One secret for this run, inherited by the proxy and Envoy: the proxy believes the
    # caller address Envoy sends only with it, never from a direct gRPC caller.
    os.environ.setdefault("AIPROXY_LIMITS__EDGE_SECRET", secrets.token_urlsafe(32))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        model = await _start_model(args, children)
        children.append(await _spawn("agent", *_agent_args(model)))
        children.append(await _spawn("proxy", "serve", "--listen", PROXY, "--upstream", AGENT))
        await _wait_serving(PROXY)
        # The live view too: the demo's proxy has no auth and listens on loopback only.
        children.append(
            await _spawn("envoy", "envoy", "--listen", ENVOY_HTTP, "--proxy", PROXY, "--admin-view")
        )
        await _wait_http_ok(f"http://{ENVOY_HTTP}/healthz")
        print(_banner(model) + devtoken.demo_hint(), flush=True)
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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model-server",
        metavar="local|URL",
        help="put a real model behind the agent: 'local' starts SmolLM2-135M through llama.cpp "
        "(`make demo-model` installs it first), a URL uses an OpenAI-compatible server "
        "(e.g. http://127.0.0.1:11434/v1); default: the reference agent's stand-in text",
    )
    parser.add_argument(
        "--model",
        metavar="NAME",
        help="the model to ask with --model-server URL (default 'local')",
    )


def run_demo(args: argparse.Namespace) -> int:
    return asyncio.run(_demo(args))
