"""Bench row: OpenAI-API streaming through the edge vs the native SSE route, same run.

    python -m bench.openai_edge [--streams 100] [--chunks 30] [--interval-ms 20] [--reps 2]
                                [--litellm]

One agent, one proxy, one `aiproxy envoy`; the same chat answer streamed by K concurrent
HTTP/1.1 callers, path after path, repetitions interleaved:

  native   POST /api/v1/ai/chat/stream      transcoder JSON, SSE framing by Envoy (+ ids)
  openai   POST /v1/chat/completions         HttpBody passthrough, the proxy writes OpenAI's
           (stream: true, include_usage)     chunk events itself

Every stream is checked (bench/streamload.py: the text equals the agent's answer, a final
chunk came). Reported per path: delivered chunks/s, the CPU of proxy + Envoy per chunk
(their /proc times over the load), first-chunk p50. With --litellm PYTHON (a
Python with `litellm[proxy]`), LiteLLM's proxy in front of the OpenAI route is a third path (LiteLLM cannot
speak gRPC to the agent; behind it sits aiproxy's own OpenAI route, so its CPU per chunk
is LiteLLM's plus ours). Prints one JSON line and a table; writes nothing else.
"""

from __future__ import annotations

import argparse
import http.client
import json
import subprocess
import sys
import time
from typing import Any

from bench.procs import ROOT, Procs, aiproxy_argv
from bench.sampling import Sampler
from bench.stack import PROXY_ENV
from bench.stats import merge_stream_results

LITELLM_KEY = "sk-bench-litellm-0123456789abcdef"  # LiteLLM refuses to start without one
PROMPT = "Explain backpressure in streaming systems in detail, step by step"


def _post(address: str, path: str, body: dict[str, Any]) -> bytes:
    host, port = address.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        conn.request("POST", path, json.dumps(body), {"content-type": "application/json"})
        return conn.getresponse().read()
    finally:
        conn.close()


def _native_pieces(edge: str, n: int) -> list[str]:
    """The answer's pieces, one per chunk, as the native route streams them."""
    raw = _post(edge, "/api/v1/ai/chat/stream", _native_body(n))
    pieces = []
    for line in raw.split(b"\n"):
        if line.startswith(b"data: "):
            delta = json.loads(line[6:]).get("delta", "")
            if delta:
                pieces.append(delta)
    return pieces


def _native_body(n: int) -> dict[str, Any]:
    return {
        "messages": [{"role": "CHAT_ROLE_USER", "content": PROMPT}],
        "model": "ref-model-1",
        "options": {"maxTokens": n},
    }


def _openai_body(n: int) -> dict[str, Any]:
    return {
        "model": "ref-model-1",
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": n,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def _load(
    procs: Procs, mode: str, target: str, path: str, body: Any, pieces: list[str], k: int,
    watch: list[Any],
) -> dict[str, Any]:  # fmt: skip
    litellm = watch[0].name.startswith("litellm")
    spec = {
        "headers": {"authorization": f"Bearer {LITELLM_KEY}"} if litellm else {},
        "mode": mode,
        "target": target,
        "path": path,
        "request": body,
        "expected": pieces,
        "streams": k,
        "ramp_s": 0.5,
        "timeout_s": 120,
        "duration_s": 0,
        "max_rounds": 1,
    }
    spec_path = procs.workdir / f"openai-{mode}-{time.monotonic_ns()}.json"
    spec_path.write_text(json.dumps(spec))
    samplers = [Sampler(p) for p in watch]
    done = subprocess.run(
        [sys.executable, "-m", "bench.streamload", "--spec", str(spec_path)],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )  # fmt: skip
    watched = [s.stop() for s in samplers]
    line = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    if not line.startswith("{"):
        raise RuntimeError(f"stream generator failed:\n{done.stderr[-3000:]}")
    cpu = {
        "rss_before": 0,
        "rss_peak": 0,
        "cpu_s": sum(w["cpu_s"] for w in watched),
        "window_s": max(w["window_s"] for w in watched),
    }
    return merge_stream_results([json.loads(line)], cpu, k)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--streams", type=int, default=100)
    parser.add_argument("--chunks", type=int, default=30)
    parser.add_argument("--interval-ms", type=float, default=20.0)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument(
        "--litellm",
        metavar="PYTHON",
        help="a Python with `litellm[proxy]` installed (its own venv: it pulls ~100 packages); "
        "adds LiteLLM's proxy as a third path",
    )
    args = parser.parse_args(argv)
    procs = Procs()
    try:
        agent = procs.start(
            "agent",
            aiproxy_argv("agent", "--listen", "127.0.0.1:0", "--first-token-delay-ms", "0",
                         "--token-delay-ms", f"{args.interval_ms:g}", "--log-level", "WARNING"),
        )  # fmt: skip
        proxy = procs.start(
            "proxy",
            aiproxy_argv("serve", "--listen", "127.0.0.1:0", "--upstream", agent.address),
            env={**PROXY_ENV, "AIPROXY_LOG__ACCESS": "false"},
        )
        edge = procs.start(
            "edge",
            aiproxy_argv("envoy", "--listen", "127.0.0.1:0", "--proxy", proxy.address,
                         "--concurrency", "1"),
        )  # fmt: skip
        pieces = _native_pieces(edge.address, args.chunks)
        if not pieces:
            raise RuntimeError("the agent's answer has no text")
        paths: dict[str, tuple[str, str, str, Any, list[Any]]] = {
            "native": ("sse", edge.address, "/api/v1/ai/chat/stream", _native_body(args.chunks), [proxy, edge]),
            "openai": ("openai", edge.address, "/v1/chat/completions", _openai_body(args.chunks), [proxy, edge]),
        }  # fmt: skip
        if args.litellm:
            litellm = _litellm(procs, edge.address, args.litellm)
            if litellm is not None:
                paths["litellm"] = (
                    "openai", litellm[1], "/v1/chat/completions",
                    _openai_body(args.chunks), [litellm[0], proxy, edge],
                )  # fmt: skip
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in paths}
        for mode, target, path, body, watch in paths.values():  # warm-up
            _load(procs, mode, target, path, body, pieces, min(20, args.streams), watch)
        for _ in range(args.reps):
            for name, (mode, target, path, body, watch) in paths.items():
                runs[name].append(
                    _load(procs, mode, target, path, body, pieces, args.streams, watch)
                )
        row: dict[str, Any] = {
            "shape": {"streams": args.streams, "chunks": len(pieces), "interval_ms": args.interval_ms},
        }  # fmt: skip
        for name, rs in runs.items():
            best = sorted(rs, key=lambda r: r["server_cpu_us_per_chunk"] or 0)[len(rs) // 2]
            row[name] = {
                key: best[key]
                for key in ("chunks_per_s", "server_cpu_us_per_chunk", "ttfc_p50_ms", "failed",
                            "text_mismatch", "no_final", "zero_loss")
            }  # fmt: skip
        for name in runs:
            r = row[name]
            print(
                f"  {name:<8} {r['chunks_per_s']:8.0f} chunks/s  "
                f"{r['server_cpu_us_per_chunk']:7.0f} us CPU per chunk (proxy + Envoy"
                f"{' + LiteLLM' if name == 'litellm' else ''})  first chunk p50 "
                f"{r['ttfc_p50_ms']:.0f} ms  zero loss {r['zero_loss']}",
                file=sys.stderr,
            )
        print(json.dumps(row))
        return 0
    finally:
        procs.cleanup()


def _litellm(procs: Procs, edge: str, python: str) -> Any:
    """LiteLLM's proxy (1 worker) with one model routed to aiproxy's OpenAI route."""
    from bench.procs import free_port

    port = free_port()
    config = procs.workdir / "litellm.yaml"
    config.write_text(
        "model_list:\n"
        "  - model_name: ref-model-1\n"
        "    litellm_params:\n"
        "      model: openai/ref-model-1\n"
        f"      api_base: http://{edge}/v1\n"
        "      api_key: none\n"
        "general_settings:\n"
        f"  master_key: {LITELLM_KEY}\n"
    )

    def ready(_proc: Any) -> dict[str, str] | None:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            conn.request("GET", "/health/liveliness")
            if conn.getresponse().status == 200:
                return {"address": f"127.0.0.1:{port}"}
        except OSError:
            pass
        return None

    proc = procs.start(
        "litellm",
        [python, "-m", "litellm.proxy.proxy_cli", "--config", str(config),
         "--port", str(port), "--host", "127.0.0.1", "--num_workers", "1"],
        ready=ready, timeout=120,
    )  # fmt: skip
    return proc, f"127.0.0.1:{port}"


if __name__ == "__main__":
    sys.exit(main())
