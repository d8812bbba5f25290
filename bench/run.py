"""The benchmark: what one aiproxy hop costs, against a direct call and against Envoy alone.

    python -m bench.run [--quick] [--only unary,latency,streams,sse,openai,workers,profile,idle]

Every scenario runs its baseline in the same run on the same machine, and every figure is
written next to it: bench/results/<date>-results.json, bench/results/REPORT.md and a PNG.
Each process the harness starts (agent, proxy, Envoy, h2load, stream generators, py-spy)
is stopped by its own PID when the run ends. All loads are bounded in time and count.

Paths measured:
  direct   caller -> agent
  bare     caller -> the bare grpc.aio hop (bench/barehop.py: raw bytes, no interceptors,
           one channel) -> agent: the floor of a Python hop, aiproxy's cost is stated as
           ratios to it (CPU per unary call, CPU per stream chunk, added latency)
  proxy    caller -> aiproxy (default configuration, default interceptor chain) -> agent
  envoy    caller -> Envoy as a plain gRPC proxy (bench/envoy_grpc.yaml) -> agent
  envoy_hpack0  the same Envoy with `hpack_table_size: 0` upstream, as the edge sends to
           the proxy (issue 20: no caller's header can reach another caller's call through
           a shared HPACK table): what that costs per call, in Envoy and (encoding and
           decoding every header literally) in the upstream's grpc-core
  sse      HTTP caller -> Envoy edge from envoy/ (transcoder, SSE) -> aiproxy -> agent,
           when `aiproxy envoy` exists (skipped with a note otherwise)
  openai   the OpenAI API's streams through the same edge vs its native SSE route (and
           LiteLLM's proxy with BENCH_LITELLM_PYTHON): bench/openai_edge.py

The harness: run.py holds the scenarios (one `scenario_*` method per row family) and the
command line; stack.py starts and stops the processes; stats.py turns measurements into
figures; sampling.py measures CPU, memory and profiles; machine.py records where a run
was measured; report.py writes REPORT.md and the plot.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime as dt
import json
import math
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time
from typing import Any

from bench import h2load
from bench.machine import machine, raise_nofile, versions
from bench.procs import Proc, Procs, aiproxy_argv, tool
from bench.sampling import (
    Sampler,
    categorize_collapsed,
    collapsed_to_speedscope,
    summarize_collapsed,
)
from bench.stack import PROMPT, PROXY_ENV, ROOT, SERVICE, Stack
from bench.stats import fmt_ms, fmt_x, median_run, merge_stream_results, print_stream, ratio, stamp

RESULTS = ROOT / "bench" / "results"
STREAM_CHUNKS_MAX = 20  # the reference agent's answers are at least this many tokens

# The stream throughput row compares per-message cost: the bare hop forwards every
# upstream message, so the proxy runs with coalescing off there, whatever its default.
NO_COALESCING = {"AIPROXY_STREAM__COALESCE_WINDOW_MS": "0"}
COALESCE_50MS = {"AIPROXY_STREAM__COALESCE_WINDOW_MS": "50"}

# Load shapes. quick: about 3 minutes; full: at most about 20 minutes.
MODES: dict[str, dict[str, Any]] = {
    # A few seconds: the test suite's check that the harness works end to end.
    "smoke": {
        "unary_levels": [8],
        "unary_reps": 1,
        "unary_duration_s": 1.0,
        "unary_warmup_s": 0.0,
        "latency_calls": 50,
        "streams": [
            {"name": "smoke", "k": 20, "n": 5, "interval_ms": 10, "first_ms": 10, "duration_s": 0}
        ],
        "hold": [],
        "hold_n": 2,
        "hold_ramp_s": 0.5,
        "workers_level": 8,
        "workers_duration_s": 1.0,
        "profile_s": 2,
    },
    "quick": {
        "unary_levels": [16, 64],
        "unary_reps": 1,
        "unary_duration_s": 3.0,
        "unary_warmup_s": 1.0,
        "latency_calls": 400,
        "streams": [
            # name, streams K, chunks N, token interval ms, first token ms, duration s (slots loop)
            {
                "name": "throughput",
                "k": 200,
                "n": 20,
                "interval_ms": 5,
                "first_ms": 5,
                "duration_s": 3,
                "proxy_env": NO_COALESCING,
            },
            {
                "name": "coalesce50ms",
                "k": 200,
                "n": 20,
                "interval_ms": 5,
                "first_ms": 5,
                "duration_s": 3,
                "proxy_env": COALESCE_50MS,
                "paths": ["direct", "proxy"],
            },
            {"name": "k100", "k": 100, "n": 20, "interval_ms": 20, "first_ms": 50, "duration_s": 3},
            # Steady state: starts spread over one stream's life, then each caller goes again.
            {
                "name": "k1000",
                "k": 1000,
                "n": 10,
                "interval_ms": 100,
                "first_ms": 50,
                "duration_s": 3,
                "ramp_s": 1.05,
            },
        ],
        "hold": [2000],
        "hold_n": 4,
        "hold_ramp_s": 2.0,
        "workers_level": 64,
        "workers_duration_s": 3.0,
        "profile_s": 5,
    },
    "full": {
        # 64 in flight is where issue 15 states the CPU-per-call target; 3 repetitions,
        # interleaved path by path, and the median one reported (all are kept).
        "unary_levels": [8, 64, 128],
        "unary_reps": 3,
        "unary_duration_s": 5.0,
        "unary_warmup_s": 1.5,
        "latency_calls": 2000,
        "streams": [
            # The target row of issue 15 (CPU per chunk against the bare hop): 3 repetitions.
            {
                "name": "throughput",
                "k": 200,
                "n": 20,
                "interval_ms": 5,
                "first_ms": 5,
                "duration_s": 8,
                "proxy_env": NO_COALESCING,
                "reps": 3,
            },
            # The same, with the proxy coalescing at most one push per 50 ms (the source
            # spec's window): fewer, larger messages; the chunk interval p99 says what
            # callers see.
            {
                "name": "coalesce50ms",
                "k": 200,
                "n": 20,
                "interval_ms": 5,
                "first_ms": 5,
                "duration_s": 8,
                "proxy_env": COALESCE_50MS,
                "paths": ["direct", "proxy"],
            },
            {"name": "k100", "k": 100, "n": 20, "interval_ms": 20, "first_ms": 50, "duration_s": 6},
            # Steady state: starts spread over one stream's life, then each caller goes again.
            {
                "name": "k1000",
                "k": 1000,
                "n": 20,
                "interval_ms": 100,
                "first_ms": 50,
                "duration_s": 6,
                "ramp_s": 2.05,
            },
        ],
        # Slow streams (1 chunk/s, 20 s each, opened over 10 s): escalate until one
        # loses anything or the list ends.
        "hold": [5000, 10000],
        "hold_n": 20,
        "hold_ramp_s": 10.0,
        # 10,000 slow streams: a chunk every 5 s for 80 s, opened at 250 a second (40 s).
        # At 1 chunk/s, 10,000 streams are 10,000 chunks/s, more than this 2-core box
        # serves through any Python hop (the bare hop loses calls there too).
        "hold_slow": [{"k": 10000, "n": 16, "interval_ms": 5000, "ramp_s": 40.0}],
        "workers_level": 128,
        "workers_duration_s": 6.0,
        "profile_s": 10,
        "profile_hold_k": 3000,
    },
}


ALL_SCENARIOS = (
    "unary",
    "latency",
    "streams",
    "sse",
    "openai",
    "workers",
    "profile",
    "burst",
    "affinity",
    "idle",
)
# Stream paths unless a shape names its own: the bare hop is in every row that compares
# per-message cost; the hold rows (capacity, memory) leave Envoy out.
STREAM_PATHS = ("direct", "bare", "proxy", "envoy")


class Bench(Stack):
    def __init__(
        self, mode: str, only: set[str], out: pathlib.Path, envoy_concurrency: int
    ) -> None:
        self.mode = mode
        self.cfg = MODES[mode]
        self.only = only
        self.out = out
        self.envoy_concurrency = envoy_concurrency
        self.procs = Procs()
        self.tmp = self.procs.workdir
        self.commands: list[str] = []
        self.notes: list[str] = []
        self.results: dict[str, Any] = {"mode": mode, "scenarios": {}}

    def scenario_unary(self) -> None:
        agent = self.agent()
        bare = self.barehop(agent.address)
        proxy = self.proxy(agent.address)
        envoy = self.envoy_plain([agent.address])
        envoy0 = self.envoy_plain([agent.address], hpack_table_size=0)
        paths = {
            "direct": (agent.address, [agent.pid]),
            "bare": (bare.address, [bare.pid]),
            "proxy": (proxy.address, [proxy.pid]),
            "envoy": (envoy.address, [envoy.pid]),
            "envoy_hpack0": (envoy0.address, [envoy0.pid]),
        }
        # The two Envoy rows also count the agent's CPU: without a dynamic table the cost
        # moves to the upstream's grpc-core, which parses every header of every call.
        with_upstream = {"envoy": agent.pid, "envoy_hpack0": agent.pid}
        reps = self.cfg["unary_reps"]
        rows = []
        try:
            for level in self.cfg["unary_levels"]:
                row: dict[str, Any] = {"level": level, "reps": reps}
                runs: dict[str, list[dict[str, Any]]] = {name: [] for name in paths}
                # Repetitions interleaved path by path, so drift in the machine's other
                # load hits every path alike; the repetition with the median CPU per call
                # stands for the path, every repetition is kept.
                for rep in range(reps):
                    for name, (target, pids) in paths.items():
                        warmup = self.cfg["unary_warmup_s"] if rep == 0 else 0.0
                        runs[name].append(
                            self.h2load_run(
                                target,
                                level,
                                self.cfg["unary_duration_s"],
                                warmup,
                                name,
                                cpu_pids=pids,
                                upstream_pid=with_upstream.get(name),
                            )
                        )
                for name, rs in runs.items():
                    r = row[name] = median_run(
                        rs,
                        "cpu_us_per_call",
                        (
                            "rps",
                            "cpu_us_per_call",
                            "upstream_cpu_us_per_call",
                            "p50_us",
                            "p99_us",
                            "verified",
                        ),
                    )
                    print(
                        f"  unary c={level:<4} {name:<6} {r.get('rps', 0):8.0f} req/s  p50 {fmt_ms(r['p50_us'])}  p99 {fmt_ms(r['p99_us'])}  "
                        f"CPU/call {r.get('cpu_us_per_call') or 0:5.0f} us  verified={r['verified']}",
                        flush=True,
                    )
                d = row["direct"].get("rps") or math.nan
                for name in ("bare", "proxy", "envoy"):
                    row[f"{name}_over_direct"] = (row[name].get("rps") or 0) / d
                # aiproxy's cost against the floor of a Python hop (issue 15).
                row["proxy_cpu_over_bare"] = ratio(
                    row["proxy"].get("cpu_us_per_call"), row["bare"].get("cpu_us_per_call")
                )
                row["proxy_rps_over_bare"] = ratio(row["proxy"].get("rps"), row["bare"].get("rps"))
                row["envoy_cpu_over_bare"] = ratio(
                    row["envoy"].get("cpu_us_per_call"), row["bare"].get("cpu_us_per_call")
                )
                # What sending no HPACK dynamic table upstream costs per call (issue 20).
                for key in ("cpu_us_per_call", "upstream_cpu_us_per_call", "p50_us", "p99_us"):
                    a, b = row["envoy_hpack0"].get(key), row["envoy"].get(key)
                    row[f"hpack0_added_{key}"] = a - b if a is not None and b is not None else None
                print(
                    f"  unary c={level:<4} hpack_table_size 0 adds: Envoy CPU/call {row['hpack0_added_cpu_us_per_call'] or 0:+.1f} us, "
                    f"agent CPU/call {row['hpack0_added_upstream_cpu_us_per_call'] or 0:+.1f} us, p50 {row['hpack0_added_p50_us'] or 0:+.0f} us",
                    flush=True,
                )
                print(
                    f"  unary c={level:<4} proxy/bare CPU per call {fmt_x(row['proxy_cpu_over_bare'])}",
                    flush=True,
                )
                rows.append(row)
        finally:
            self.stop(envoy0, envoy, proxy, bare, agent)
        self.results["scenarios"]["unary"] = {
            "rows": rows,
            "agent": "zero token delay (CPU-bound upstream)",
            "request": "Generate, max_tokens=16",
        }

    # -- sequential latency ------------------------------------------------------------

    def scenario_latency(self) -> None:
        import grpc

        agent = self.agent()
        bare = self.barehop(agent.address)
        proxy = self.proxy(agent.address)
        envoy = self.envoy_plain([agent.address])
        envoy0 = self.envoy_plain([agent.address], hpack_table_size=0)
        request = self.unary_request()
        targets = {
            "direct": agent.address,
            "bare": bare.address,
            "proxy": proxy.address,
            "envoy": envoy.address,
            "envoy_hpack0": envoy0.address,
        }
        samples: dict[str, list[float]] = {k: [] for k in targets}
        channels = {
            k: grpc.insecure_channel(v, options=[("grpc.use_local_subchannel_pool", 1)])
            for k, v in targets.items()
        }
        try:
            calls = {k: ch.unary_unary(f"/{SERVICE}/Generate") for k, ch in channels.items()}
            for k, call in calls.items():  # warm up every path
                for _ in range(50):
                    call(request, timeout=10)
            total = self.cfg["latency_calls"]
            block = 50
            # Interleaved blocks, so drift in machine load hits every path alike.
            for _ in range(max(1, total // block)):
                for k, call in calls.items():
                    for _ in range(block):
                        t0 = time.perf_counter_ns()
                        call(request, timeout=10)
                        samples[k].append((time.perf_counter_ns() - t0) / 1000)
        finally:
            for ch in channels.values():
                ch.close()
            self.stop(envoy0, envoy, proxy, bare, agent)
        out: dict[str, Any] = {
            "calls_per_path": len(samples["direct"]),
            "client": "grpc (sync), one channel per path, sequential, interleaved blocks of 50",
        }
        for k, vals in samples.items():
            out[k] = {
                "p50_us": h2load.percentile(vals, 50),
                "p99_us": h2load.percentile(vals, 99),
                "mean_us": sum(vals) / len(vals),
            }
        for k in ("bare", "proxy", "envoy", "envoy_hpack0"):
            out[f"{k}_added_p50_us"] = out[k]["p50_us"] - out["direct"]["p50_us"]
            out[f"{k}_added_p99_us"] = out[k]["p99_us"] - out["direct"]["p99_us"]
        # A ratio of added times means something only when the floor adds time at all.
        out["proxy_added_p50_over_bare"] = ratio(
            out["proxy_added_p50_us"], out["bare_added_p50_us"]
        )
        out["proxy_added_p99_over_bare"] = ratio(
            out["proxy_added_p99_us"], out["bare_added_p99_us"]
        )
        print(
            f"  latency: direct p50 {out['direct']['p50_us']:.0f} us; added p50 / p99: bare {out['bare_added_p50_us']:.0f} / {out['bare_added_p99_us']:.0f} us, "
            f"proxy {out['proxy_added_p50_us']:.0f} / {out['proxy_added_p99_us']:.0f} us ({fmt_x(out['proxy_added_p50_over_bare'])} the bare hop's at p50), "
            f"envoy {out['envoy_added_p50_us']:.0f} / {out['envoy_added_p99_us']:.0f} us, "
            f"envoy with hpack_table_size 0 {out['envoy_hpack0_added_p50_us']:.0f} / {out['envoy_hpack0_added_p99_us']:.0f} us",
            flush=True,
        )
        self.results["scenarios"]["latency"] = out

    # -- streams ---------------------------------------------------------------------

    def stream_load(
        self,
        mode: str,
        target: str,
        shape: dict[str, Any],
        expected: list[str],
        request: Any,
        watch: Proc | None,
    ) -> dict[str, Any]:
        """Run K streams from G generator processes; sample `watch` (CPU, RSS) meanwhile."""
        k = shape["k"]
        # Callers as a fleet opens them: one generator process per 2,500 streams (at least
        # two from 1,000), each on its own connections (at most 1,000 streams on one), at
        # the row's bounded start rate (k / ramp_s): one Python process opening 5,000
        # streams while reading theirs is itself late to read, which is not the hop's cost.
        gens = 1 if k < 1000 else max(2, math.ceil(k / 2500))
        ramp_s = shape.get("ramp_s", min(5.0, k / 2000))
        per_stream_s = (shape["first_ms"] + shape["n"] * shape["interval_ms"]) / 1000
        timeout_s = per_stream_s + ramp_s + 60
        hard_s = max(shape.get("duration_s", 0), per_stream_s) + ramp_s + timeout_s + 30
        procs = []
        for g in range(gens):
            spec = {
                "mode": mode,
                "target": target,
                "streams": k // gens + (1 if g < k % gens else 0),
                "expected": expected,
                "ramp_s": ramp_s,
                "timeout_s": timeout_s,
                "duration_s": shape.get("duration_s", 0),
                "max_rounds": 1000,
            }
            if mode == "grpc":
                spec.update(
                    path=f"/{SERVICE}/StreamGenerate",
                    request=request.hex(),
                    channels=max(1, math.ceil(spec["streams"] / 1000)),
                )
            else:
                spec.update(path="/api/v1/ai/generate/stream", request=request)
            spec_path = self.tmp / f"stream-{shape['name']}-{mode}-{g}-{time.monotonic_ns()}.json"
            spec_path.write_text(json.dumps(spec))
            argv = [sys.executable, "-m", "bench.streamload", "--spec", str(spec_path)]
            self.commands.append(" ".join(argv))
            procs.append(
                subprocess.Popen(
                    argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT
                )
            )
        sampler = Sampler(watch) if watch is not None else None
        outs = []
        try:
            for p in procs:
                try:
                    stdout, stderr = p.communicate(timeout=hard_s)
                except subprocess.TimeoutExpired:
                    p.kill()
                    stdout, stderr = p.communicate()
                    self.notes.append(
                        f"stream generator for {shape['name']} killed after {hard_s:.0f}s"
                    )
                line = stdout.strip().splitlines()[-1] if stdout.strip() else ""
                if not line.startswith("{"):
                    raise RuntimeError(f"stream generator failed:\n{stderr[-3000:]}")
                outs.append(json.loads(line))
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
            watched = sampler.stop() if sampler is not None else None
        return merge_stream_results(outs, watched, k)

    def stream_paths(self, shape: dict[str, Any], with_sse: bool) -> dict[str, Any]:
        """One stream shape through every path of `shape["paths"]` (default: direct, bare
        hop, proxy, Envoy alone), each against a fresh agent-side process set."""
        from aiproxy.ai.agent.v1 import agent_service_pb2 as pb

        n = shape["n"]
        wanted = shape.get("paths", STREAM_PATHS)
        agent = self.agent(first_ms=shape["first_ms"], token_ms=shape["interval_ms"])
        started: list[Proc] = [agent]
        edge = None
        try:
            procs: dict[str, Proc] = {"direct": agent} if "direct" in wanted else {}
            if "bare" in wanted:
                procs["bare"] = self.barehop(agent.address)
                started.append(procs["bare"])
            procs["proxy"] = self.proxy(agent.address, env=shape.get("proxy_env"))
            started.append(procs["proxy"])
            if "envoy" in wanted:
                procs["envoy"] = self.envoy_plain([agent.address])
                started.append(procs["envoy"])
            request = pb.StreamGenerateRequest(
                prompt=PROMPT, options=pb.GenerationOptions(max_tokens=n)
            ).SerializeToString()
            # A slow row's stream lasts first_ms + n * interval_ms: the probes wait for it,
            # all at once (one after the other, three 80 s streams would be 4 minutes).
            probe_s = 60 + (shape["first_ms"] + n * shape["interval_ms"]) / 1000
            targets = {"direct": agent.address} | {
                name: proc.address for name, proc in procs.items() if name != "direct"
            }
            with concurrent.futures.ThreadPoolExecutor(len(targets)) as pool:
                answers = dict(
                    zip(
                        targets,
                        pool.map(
                            lambda a: self.probe_stream(a, request, probe_s), targets.values()
                        ),
                        strict=True,
                    )
                )
            expected = answers["direct"]
            if len(expected) != n:
                raise RuntimeError(f"expected {n} pieces from the agent, got {len(expected)}")
            for name, answer in answers.items():
                if "".join(answer) != "".join(expected):
                    raise RuntimeError(f"the answer through {name} differs from the agent's")
            row: dict[str, Any] = {"shape": shape}
            # Warm every path up (connections, first-call code paths) with a short load
            # of 2-chunk streams; not recorded.
            warm_req = pb.StreamGenerateRequest(
                prompt=PROMPT, options=pb.GenerationOptions(max_tokens=2)
            ).SerializeToString()
            warm_expected = self.probe_stream(agent.address, warm_req)
            warm_shape = {
                **shape,
                "name": f"{shape['name']}-warmup",
                "k": min(shape["k"], 200),
                "n": 2,
                "duration_s": 0,
                "ramp_s": 0.2,
            }
            for proc in procs.values():
                self.stream_load(
                    "grpc", proc.address, warm_shape, warm_expected, warm_req, watch=None
                )
            # Repetitions interleaved path by path; the one with the median server CPU per
            # chunk stands for the path, every repetition is kept.
            runs: dict[str, list[dict[str, Any]]] = {name: [] for name in procs}
            for _ in range(shape.get("reps", 1)):
                for name, proc in procs.items():
                    runs[name].append(
                        self.stream_load("grpc", proc.address, shape, expected, request, watch=proc)
                    )
            for name, rs in runs.items():
                row[name] = median_run(
                    rs,
                    "server_cpu_us_per_chunk",
                    (
                        "chunks_per_s",
                        "server_cpu_us_per_chunk",
                        "ttfc_p50_ms",
                        "ttfc_p99_ms",
                        "failed",
                        "lost_pieces",
                        "seq_errors",
                        "zero_loss",
                    ),
                )
                print_stream(shape, name, row[name])
            if with_sse:
                # The edge as it ships (its SSE coalescing window, when it has one), then,
                # in the same run, with every chunk as it comes ("sse_each").
                variants: list[tuple[str, tuple[str, ...]]] = [("sse", ())]
                if self._edge_available() and "--sse-coalesce-ms" in self._edge_help:
                    variants.append(("sse_each", ("--sse-coalesce-ms", "0")))
                for key, flags in variants:
                    edge = self.envoy_edge(procs["proxy"].address, *flags)
                    if edge is None:
                        break
                    try:
                        self.stream_load(
                            "sse",
                            edge.address,
                            warm_shape,
                            warm_expected,
                            {"prompt": PROMPT, "options": {"maxTokens": 2}},
                            watch=None,
                        )
                        body = {"prompt": PROMPT, "options": {"maxTokens": n}}
                        # The edge's own CPU too (Envoy is its child): a chunk through the
                        # edge costs Envoy + aiproxy, compared with Envoy alone + bare hop.
                        edge_cpu = Sampler(edge)
                        row[key] = self.stream_load(
                            "sse", edge.address, shape, expected, body, watch=procs["proxy"]
                        )
                        edge_s = edge_cpu.stop()["cpu_s"]
                        r = row[key]
                        if r["pieces_delivered"]:
                            r["edge_cpu_us_per_chunk"] = edge_s / r["pieces_delivered"] * 1e6
                            both = (r.get("server_cpu_us_per_chunk") or 0) + r[
                                "edge_cpu_us_per_chunk"
                            ]
                            floor = sum(
                                (row.get(p) or {}).get("server_cpu_us_per_chunk") or 0
                                for p in ("envoy", "bare")
                            )
                            r["edge_plus_proxy_over_envoy_plus_bare"] = ratio(both, floor or None)
                        print_stream(shape, key, r)
                        print(
                            f"  streams {shape['name']:<10} {key}: edge {_num(r.get('edge_cpu_us_per_chunk'))} us/chunk, "
                            f"(edge + aiproxy) / (Envoy + bare) {fmt_x(r.get('edge_plus_proxy_over_envoy_plus_bare'))}",
                            flush=True,
                        )
                    finally:
                        self.stop(edge)
                        edge = None
            d, p = row.get("direct") or {}, row["proxy"]
            row["proxy_over_direct_chunks"] = (
                p["chunks_per_s"] / d["chunks_per_s"] if d.get("chunks_per_s") else None
            )
            if d.get("ttfc_p50_ms") is not None and p.get("ttfc_p50_ms") is not None:
                row["ttfc_added_p50_ms"] = p["ttfc_p50_ms"] - d["ttfc_p50_ms"]
                row["ttfc_added_p99_ms"] = p["ttfc_p99_ms"] - d["ttfc_p99_ms"]
            if "bare" in row:
                # aiproxy's cost against the floor of a Python hop (issue 15).
                row["proxy_cpu_per_chunk_over_bare"] = ratio(
                    p.get("server_cpu_us_per_chunk"), row["bare"].get("server_cpu_us_per_chunk")
                )
                row["proxy_chunks_over_bare"] = ratio(
                    p["chunks_per_s"], row["bare"]["chunks_per_s"]
                )
                print(
                    f"  streams {shape['name']:<10} proxy/bare CPU per chunk {fmt_x(row['proxy_cpu_per_chunk_over_bare'])}",
                    flush=True,
                )
            return row
        finally:
            self.stop(*([edge] if edge else []), *reversed(started))

    def scenario_streams(self, with_sse: bool) -> None:
        rows = []
        for shape in self.cfg["streams"] if self.cfg.get("stream_rows", True) else []:
            rows.append(self.stream_paths(shape, with_sse))
        hold_rows = []
        # Two groups: streams at 1 chunk/s, escalated until one loses anything; then the
        # slow rows (a chunk every few seconds, opened at a bounded rate), where the
        # number held is bounded by memory and by how fast new calls are taken, not by
        # chunks per second.
        groups = [
            [
                {
                    "k": k,
                    "n": self.cfg["hold_n"],
                    "interval_ms": self.cfg.get("hold_interval_ms", 1000),
                    "ramp_s": self.cfg["hold_ramp_s"],
                }
                for k in self.cfg["hold"]
            ],
            [dict(spec) for spec in self.cfg.get("hold_slow", [])],
        ]
        for group in groups:
            for spec in group:
                k = spec["k"]
                shape = {
                    "name": f"hold{k}"
                    if spec["interval_ms"] == 1000
                    else f"hold{k}@{spec['interval_ms'] / 1000:g}s",
                    "k": k,
                    "n": spec["n"],
                    "interval_ms": spec["interval_ms"],
                    "first_ms": 50,
                    "duration_s": 0,
                    "ramp_s": spec["ramp_s"],
                    "paths": self.cfg.get("hold_paths", ["direct", "bare", "proxy"]),
                }
                row = self.stream_paths(shape, with_sse)
                hold_rows.append(row)
                p = row["proxy"]
                if p["failed"] or p["lost_pieces"] or p["seq_errors"]:
                    break
        self.results["scenarios"]["streams"] = {"rows": rows, "hold": hold_rows}
        clean = [
            r["shape"]["k"]
            for r in hold_rows
            if not (r["proxy"]["failed"] or r["proxy"]["lost_pieces"] or r["proxy"]["seq_errors"])
        ]
        self.results["scenarios"]["streams"]["held_zero_loss"] = max(clean) if clean else 0

    # -- the OpenAI API ----------------------------------------------------------------

    def scenario_openai(self) -> None:
        """OpenAI-API streaming through the edge vs the native SSE route (and LiteLLM's
        proxy when BENCH_LITELLM_PYTHON names a Python with `litellm[proxy]`): the row of
        bench/openai_edge.py, run as its own process set."""
        smoke = self.mode == "smoke"
        argv = [sys.executable, "-m", "bench.openai_edge", "--streams", "10" if smoke else "100",
                "--chunks", "30", "--reps", "3" if self.mode == "full" else "1"]  # fmt: skip
        litellm = os.environ.get("BENCH_LITELLM_PYTHON")
        if litellm:
            argv += ["--litellm", litellm]
        self.commands.append(" ".join(argv))
        done = subprocess.run(argv, capture_output=True, text=True, timeout=1800, cwd=ROOT)
        line = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
        if done.returncode or not line.startswith("{"):
            raise RuntimeError(f"bench.openai_edge failed:\n{done.stderr[-3000:]}")
        print(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "", flush=True)
        self.results["scenarios"]["openai"] = json.loads(line)

    # -- workers ---------------------------------------------------------------------

    def scenario_workers(self) -> None:
        help_text = subprocess.run(
            aiproxy_argv("serve", "--help"), capture_output=True, text=True, timeout=60, cwd=ROOT
        ).stdout
        if "--workers" not in help_text:
            self.notes.append("--workers: `aiproxy serve --workers` not available; skipped.")
            return
        level = self.cfg["workers_level"]
        dur, warm = self.cfg["workers_duration_s"], self.cfg["unary_warmup_s"]
        agent = self.agent()
        rows: dict[str, Any] = {}
        try:
            rows["direct"] = self.h2load_run(
                agent.address, level, dur, warm, "w-direct", cpu_pids=[agent.pid], clients=8
            )
            for n in (1, 2):
                proxy = self.proxy(agent.address, "--workers", str(n))
                try:
                    r = self.h2load_run(
                        proxy.address,
                        level,
                        dur,
                        warm,
                        f"w-reuseport{n}",
                        cpu_pids=proxy.tree_pids(),
                        clients=8,
                    )
                    rows[f"reuseport_{n}"] = r
                finally:
                    self.stop(proxy)
            proxies = [self.proxy(agent.address) for _ in range(2)]
            envoy = self.envoy_plain([p.address for p in proxies], lb="LEAST_REQUEST")
            try:
                rows["envoy_2_ports"] = self.h2load_run(
                    envoy.address,
                    level,
                    dur,
                    warm,
                    "w-envoy2",
                    cpu_pids=[p.pid for p in proxies],
                    clients=8,
                )
            finally:
                self.stop(envoy, *proxies)
        finally:
            self.stop(agent)
        for k, r in rows.items():
            print(
                f"  workers {k:<14} {r.get('rps', 0):8.0f} req/s  p99 {fmt_ms(r['p99_us'])}  verified={r['verified']}",
                flush=True,
            )
        base = rows["reuseport_1"].get("rps") or math.nan
        self.results["scenarios"]["workers"] = {
            "level": level,
            "connections": 8,
            "rows": rows,
            "scaling": {k: (r.get("rps") or 0) / base for k, r in rows.items()},
        }

    # -- profile ---------------------------------------------------------------------

    def scenario_affinity(self) -> None:
        """Issue 22's row: first-token p50/p99 of concurrent multi-turn chats over 3
        replicas with the agents' prefix-cache model, affinity on vs off, both at once
        (bench/affinity_load.py)."""
        from bench import affinity_load

        chats, rounds = (
            (200, 2) if self.mode == "full" else (200, 1) if self.mode == "quick" else (6, 1)
        )
        result = affinity_load.run(
            chats=chats,
            turns=6 if self.mode != "smoke" else 2,
            prefill_ms_per_token=0.5,
            rounds=rounds,
            think_s=3.0 if self.mode != "smoke" else 0.1,
            procs=self.procs,
        )
        self.results["scenarios"]["affinity"] = result
        for name in ("off", "on"):
            for r in result["arms"][name]:
                print(
                    f"  affinity {name:<3} first token p50 {r['ttft_p50_ms']} ms, p99 "
                    f"{r['ttft_p99_ms']} ms (turns 2..: {r['later_turns_ttft_p50_ms']} / "
                    f"{r['later_turns_ttft_p99_ms']} ms)",
                    flush=True,
                )

    def scenario_profile(self) -> None:
        """py-spy (with native frames, so time inside gRPC's C core and syscalls is
        attributed) on the proxy under unary load, then under stream load."""
        spy = tool("py-spy")
        if spy is None:
            self.notes.append(
                "profile: py-spy not installed (pip install py-spy, or make bench-deps); skipped."
            )
            return
        secs = self.cfg["profile_s"]
        out: dict[str, Any] = {
            "seconds": secs,
            "note": "py-spy --native pauses the process to sample it: throughput while profiling is lower; shares are what count.",
        }
        # Unary: h2load at 64 in flight, through aiproxy and then through the bare hop: the
        # difference between the two profiles is where aiproxy's own work sits.
        agent = self.agent()
        proxy = self.proxy(agent.address)
        bare = self.barehop(agent.address)
        try:
            for tag, proc in (("unary", proxy), ("bare_unary", bare)):
                load = threading.Thread(
                    target=self.h2load_run,
                    args=(proc.address, 64, secs + 3, 0.0, f"profile-{tag}"),
                    daemon=True,
                )
                load.start()
                time.sleep(1.0)
                out[tag] = self._spy(spy, proc, secs, tag)
                load.join(timeout=secs + 90)
        finally:
            self.stop(bare, proxy, agent)
        # Streams: 200 streams of 20 chunks at 5 ms.
        shape = {
            "name": "profile",
            "k": 200,
            "n": 20,
            "interval_ms": 5,
            "first_ms": 5,
            "duration_s": secs + 3,
        }
        agent = self.agent(first_ms=shape["first_ms"], token_ms=shape["interval_ms"])
        proxy = self.proxy(agent.address)
        try:
            from aiproxy.ai.agent.v1 import agent_service_pb2 as pb

            request = pb.StreamGenerateRequest(
                prompt=PROMPT, options=pb.GenerationOptions(max_tokens=shape["n"])
            ).SerializeToString()
            expected = self.probe_stream(agent.address, request)
            load = threading.Thread(
                target=self.stream_load,
                args=("grpc", proxy.address, shape, expected, request, None),
                daemon=True,
            )
            load.start()
            time.sleep(1.5)
            out["streams"] = self._spy(spy, proxy, secs, "streams")
            load.join(timeout=secs + 120)
        finally:
            self.stop(proxy, agent)
        # Many open slow streams: where the collector shows up (a big live heap).
        k = self.cfg.get("profile_hold_k")
        if k:
            shape = {
                "name": "profile-hold",
                "k": k,
                "n": 20,
                "interval_ms": 1000,
                "first_ms": 50,
                "duration_s": 0,
                "ramp_s": 5.0,
            }
            agent = self.agent(first_ms=shape["first_ms"], token_ms=shape["interval_ms"])
            proxy = self.proxy(agent.address)
            try:
                request = pb.StreamGenerateRequest(
                    prompt=PROMPT, options=pb.GenerationOptions(max_tokens=shape["n"])
                ).SerializeToString()
                expected = self.probe_stream(agent.address, request)
                load = threading.Thread(
                    target=self.stream_load,
                    args=("grpc", proxy.address, shape, expected, request, None),
                    daemon=True,
                )
                load.start()
                time.sleep(7.0)
                out["hold"] = self._spy(spy, proxy, secs, "hold")
                out["hold"]["open_streams"] = k
                load.join(timeout=120)
            finally:
                self.stop(proxy, agent)
        self.results["scenarios"]["profile"] = out

    def _spy(self, spy: str, proxy: Proc, secs: float, tag: str) -> dict[str, Any]:
        raw = self.tmp / f"profile-{tag}.txt"
        argv = [
            spy,
            "record",
            "--pid",
            str(proxy.pid),
            "--duration",
            str(secs),
            "--rate",
            "200",
            "--native",
            "--format",
            "raw",
            "--output",
            str(raw),
        ]
        self.commands.append(" ".join(argv))
        subprocess.run(argv, capture_output=True, timeout=secs + 60)
        summary = summarize_collapsed(raw)
        summary["categories"] = categorize_collapsed(raw)
        speedscope = (
            self.out
            / f"{stamp()}-{'barehop-' + tag.removeprefix('bare_') if tag.startswith('bare_') else 'proxy-' + tag}.speedscope.json"
        )
        try:
            collapsed_to_speedscope(raw, speedscope)
            summary["speedscope"] = speedscope.name
        except OSError:
            pass
        return summary

    # -- the run ---------------------------------------------------------------------

    def scenario_burst(self) -> None:
        """3,000 streams from 50 callers at once beside a light caller, the blind gate and
        the fair one in the same run (bench/burst.py; issue 23)."""
        from bench.burst import burst_rows

        streams = 300 if self.mode == "smoke" else 3000
        self.results["scenarios"]["burst"] = burst_rows(self.procs, streams=streams)

    def scenario_idle(self) -> None:
        """CPU of idle processes, per 10 s: the proxy (default settings) after a few calls,
        beside the bare hop and the agent measured over the same window. Whatever still
        wakes an idle proxy is what every idle replica of a fleet pays."""
        window_s = {"smoke": 2.0, "quick": 20.0, "full": 60.0}[self.mode]
        agent = self.agent()
        bare = self.barehop(agent.address)
        proxy = self.proxy(agent.address)
        procs = {"proxy": proxy, "bare": bare, "agent": agent}
        try:
            for p in (proxy, bare):
                self.probe_unary(p.address, self.unary_request(), calls=5)
            time.sleep(2.0)  # the calls' own after-work (access log, sampler) settles
            before = {name: p.tree_cpu() for name, p in procs.items()}
            t0 = time.monotonic()
            time.sleep(window_s)
            elapsed = time.monotonic() - t0
            per_10s = {
                name: round((p.tree_cpu() - before[name]) * 10.0 / elapsed, 4)
                for name, p in procs.items()
            }
        finally:
            self.stop(proxy, bare, agent)
        self.results["scenarios"]["idle"] = {
            "window_s": round(elapsed, 1),
            "cpu_s_per_10s": per_10s,
        }

    def run(self) -> dict[str, Any]:
        started = time.monotonic()
        self.results["machine"] = machine()
        self.results["versions"] = versions()
        self.results["proxy_env"] = PROXY_ENV
        self.results["started"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        steps = [
            ("unary", self.scenario_unary),
            ("latency", self.scenario_latency),
            ("streams", lambda: self.scenario_streams("sse" in self.only)),
            ("openai", self.scenario_openai),
            ("workers", self.scenario_workers),
            ("profile", self.scenario_profile),
            ("burst", self.scenario_burst),
            ("affinity", self.scenario_affinity),
            ("idle", self.scenario_idle),
        ]
        for name, fn in steps:
            if name not in self.only and not (name == "streams" and "sse" in self.only):
                continue
            print(f"bench: {name}", flush=True)
            t0 = time.monotonic()
            try:
                fn()
            except Exception as exc:  # record and go on: the other scenarios still count
                self.notes.append(f"{name}: failed: {exc!r}"[:2000])
                print(f"bench: {name} failed: {exc!r}", file=sys.stderr, flush=True)
            self.results.setdefault("timings_s", {})[name] = round(time.monotonic() - t0, 1)
        self.results["machine"]["loadavg_after"] = os.getloadavg()
        self.results["duration_s"] = round(time.monotonic() - started, 1)
        self.results["commands"] = self.commands
        self.results["notes"] = self.notes
        return self.results


# -- helpers ----------------------------------------------------------------------------


def _num(v: float | None) -> str:
    return "—" if v is None else f"{v:.0f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="about 3 minutes instead of about 20")
    parser.add_argument(
        "--smoke", action="store_true", help="a few seconds, tiny loads (the test suite's check)"
    )
    parser.add_argument(
        "--only",
        default=",".join(ALL_SCENARIOS),
        help=f"comma-separated subset of {','.join(ALL_SCENARIOS)}",
    )
    parser.add_argument(
        "--out", default=str(RESULTS), help="results directory (default bench/results)"
    )
    parser.add_argument(
        "--envoy-concurrency",
        type=int,
        default=1,
        help="Envoy worker threads for the plain-Envoy baseline (default 1, like one proxy process)",
    )
    parser.add_argument("--no-report", action="store_true", help="write only the JSON results")
    parser.add_argument(
        "--hold",
        help="the slow-stream hold rows to run (comma-separated stream counts; none: no hold row), instead of the mode's",
    )
    parser.add_argument(
        "--hold-paths",
        help="paths of the hold rows (default direct,bare,proxy)",
    )
    parser.add_argument(
        "--hold-ramp-s", type=float, help="seconds over which a hold row opens its streams"
    )
    parser.add_argument(
        "--hold-interval-ms", type=int, help="a hold row's token interval (default 1000)"
    )
    parser.add_argument("--hold-n", type=int, help="chunks per stream of a hold row")
    parser.add_argument(
        "--no-stream-rows",
        action="store_true",
        help="streams scenario: only the hold rows (no throughput rows)",
    )
    args = parser.parse_args(argv)
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    unknown = only - set(ALL_SCENARIOS)
    if unknown:
        parser.error(f"unknown scenario(s): {sorted(unknown)}")
    if only & {"unary", "workers", "profile"} and h2load.find() is None:
        print(f"bench: {h2load.INSTALL_HINT}", file=sys.stderr)
        return 2
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    limits = raise_nofile()

    # SIGTERM/SIGHUP unwind like Ctrl-C, so the finally block stops every child.
    def _interrupt(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGHUP, _interrupt)
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    bench = Bench(mode, only, out, args.envoy_concurrency)
    bench.cfg = dict(bench.cfg)  # the mode's table stays as it is
    if args.hold:
        bench.cfg["hold"] = [
            int(k) for k in args.hold.split(",") if k.strip() and k.strip() != "none"
        ]
        bench.cfg["hold_slow"] = []
    if args.hold_paths:
        bench.cfg["hold_paths"] = [p.strip() for p in args.hold_paths.split(",") if p.strip()]
    if args.hold_ramp_s is not None:
        bench.cfg["hold_ramp_s"] = args.hold_ramp_s
    if args.hold_interval_ms is not None:
        bench.cfg["hold_interval_ms"] = args.hold_interval_ms
    if args.hold_n is not None:
        bench.cfg["hold_n"] = args.hold_n
    if args.no_stream_rows:
        bench.cfg["stream_rows"] = False
    try:
        results = bench.run()
    finally:
        bench.procs.cleanup()
    results["nofile_limit"] = limits
    run_stamp = stamp()
    json_path = out / f"{run_stamp}-results.json"
    json_path.write_text(json.dumps(results, indent=1, default=str))
    print(f"bench: wrote {json_path}")
    if not args.no_report:
        from bench import report

        paths = report.write(results, out, run_stamp, json_path.name)
        for p in paths:
            print(f"bench: wrote {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
