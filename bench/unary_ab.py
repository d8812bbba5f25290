"""Same-run A/B of aiproxy's unary path against the bare hop: variants of the proxy (other
checkouts of the code, or other settings) side by side, interleaved repetitions.

    python -m bench.unary_ab [--variant NAME=CHECKOUT[,ENV=VALUE...]] [--reps 4]
                             [--level 64] [--duration 3] [--latency-calls 600]
                             [--perf-stat] [--out FILE]

Every variant is `aiproxy serve` with the benchmark's proxy settings (bench/stack.PROXY_ENV)
against one agent, beside one bare hop (bench/barehop.py). `CHECKOUT` is a directory with
the code to run (a `git archive` of another commit, with its generated stubs in
aiproxy/ai), `.` for this checkout, or a script taking the bare hop's arguments; the ENV pairs are extra environment for that
variant (e.g. `AIPROXY_LIMITS__ENABLED=false`). Per repetition each path gets one h2load
run (Generate at `--level` in flight) in rotating order, so drift in the machine's load
hits every path alike; the report gives each path's median CPU per call and its ratio to
the bare hop's of the same repetitions, then sequential latency (a sync client, blocks of
50 calls interleaved) as added p50 over a direct call. `--perf-stat` also counts context
switches and CPU migrations per call (`perf stat -p`), when perf is installed.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import time
from typing import Any

from bench import h2load
from bench.procs import Procs
from bench.stack import PROXY_ENV, SERVICE, Stack

ROOT = pathlib.Path(__file__).resolve().parent.parent


class AB(Stack):
    def __init__(self) -> None:
        self.procs = Procs()
        self.tmp = self.procs.workdir
        self.commands: list[str] = []
        self.notes: list[str] = []
        self.cfg = {}
        self.envoy_concurrency = 1

    def variant(self, name: str, checkout: str, env: dict[str, str]) -> Any:
        code = ROOT if checkout == "." else pathlib.Path(checkout).resolve()
        # -P: the working directory is not put first on sys.path, so PYTHONPATH's checkout
        # is the one imported (the venv's editable install points at this one).
        argv = [
            sys.executable,
            "-P",
            "-m",
            "aiproxy.server.cli",
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            self._agent.address,
        ]
        full_env = {**PROXY_ENV, "PYTHONPATH": str(code), **env}
        if checkout.endswith(".py"):
            # Another hop to set beside them (an experiment on the bare hop, say): a
            # script with the bare hop's command line.
            argv = [sys.executable, checkout, "--listen", "127.0.0.1:0"]
            argv += ["--upstream", self._agent.address]
            full_env = {**env}
        return self._start(f"proxy-{name}", argv, env=full_env)


def perf_stat(pid: int, seconds: float) -> subprocess.Popen[str] | None:
    if shutil.which("perf") is None:
        return None
    return subprocess.Popen(
        [
            "perf",
            "stat",
            "-x",
            ",",
            "-e",
            "task-clock,context-switches,cpu-migrations,page-faults",
            "-p",
            str(pid),
            "--",
            "sleep",
            str(seconds),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def parse_perf(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in text.splitlines():
        parts = line.split(",")
        if len(parts) > 2 and parts[0] and parts[0][0].isdigit():
            try:
                out[parts[2]] = float(parts[0])
            except ValueError:
                pass
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.unary_ab", description=__doc__)
    p.add_argument("--variant", action="append", default=[])
    p.add_argument("--reps", type=int, default=4)
    p.add_argument("--level", type=int, default=64)
    p.add_argument("--duration", type=float, default=3.0)
    p.add_argument("--latency-calls", type=int, default=600)
    p.add_argument("--perf-stat", action="store_true")
    p.add_argument("--out", default="")
    args = p.parse_args(argv)
    variants: list[tuple[str, str, dict[str, str]]] = []
    for spec in args.variant or ["proxy=."]:
        name, _, rest = spec.partition("=")
        checkout, *pairs = rest.split(",") if rest else ["."]
        env = dict(pair.split("=", 1) for pair in pairs if pair)
        variants.append((name, checkout or ".", env))

    ab = AB()
    results: dict[str, Any] = {
        "uptime_before": pathlib.Path("/proc/loadavg").read_text().strip(),
        "variants": {n: {"checkout": c, "env": e} for n, c, e in variants},
        "level": args.level,
        "duration_s": args.duration,
        "reps": args.reps,
    }
    try:
        agent = ab._agent = ab.agent()
        bare = ab.barehop(agent.address)
        procs = {"bare": bare}
        for name, checkout, env in variants:
            procs[name] = ab.variant(name, checkout, env)
        for name, proc in procs.items():  # warm up every path
            ab.h2load_run(proc.address, args.level, 1.0, 0.0, f"warm-{name}", cpu_pids=[proc.pid])
        runs: dict[str, list[dict[str, Any]]] = {n: [] for n in procs}
        order = list(procs)
        for rep in range(args.reps):
            rotated = order[rep % len(order) :] + order[: rep % len(order)]
            for name in rotated:
                proc = procs[name]
                stat = perf_stat(proc.pid, args.duration) if args.perf_stat else None
                r = ab.h2load_run(
                    proc.address, args.level, args.duration, 0.0, name, cpu_pids=[proc.pid]
                )
                if stat is not None:
                    _, err = stat.communicate(timeout=args.duration + 30)
                    counts = parse_perf(err)
                    done = r.get("done") or 0
                    if done:
                        r["perf_per_call"] = {k: v / done for k, v in counts.items()}
                runs[name].append(
                    {
                        k: r.get(k)
                        for k in (
                            "rps",
                            "cpu_us_per_call",
                            "p50_us",
                            "p99_us",
                            "verified",
                            "done",
                            "perf_per_call",
                        )
                    }
                )
                print(
                    f"rep {rep} {name:<10} {r.get('rps', 0):7.0f} req/s  CPU/call "
                    f"{r.get('cpu_us_per_call') or 0:6.0f} us  verified={r.get('verified')}"
                    + (
                        f"  cs/call {r['perf_per_call'].get('context-switches', 0):.2f}"
                        if r.get("perf_per_call")
                        else ""
                    ),
                    flush=True,
                )
        summary: dict[str, Any] = {}
        for name, rs in runs.items():
            cpu = [r["cpu_us_per_call"] for r in rs if r.get("cpu_us_per_call")]
            ratios = [
                r["cpu_us_per_call"] / b["cpu_us_per_call"]
                for r, b in zip(rs, runs["bare"], strict=True)
                if r.get("cpu_us_per_call") and b.get("cpu_us_per_call")
            ]
            summary[name] = {
                "cpu_us_per_call_median": statistics.median(cpu) if cpu else None,
                "over_bare_median": statistics.median(ratios) if ratios else None,
                "rps_median": statistics.median([r["rps"] for r in rs if r.get("rps")] or [0]),
                "all_verified": all(r.get("verified") for r in rs),
            }
            print(
                f"{name:<10} CPU/call median {summary[name]['cpu_us_per_call_median'] or 0:6.0f} us"
                f"  /bare {summary[name]['over_bare_median'] or 0:5.2f}x  rps {summary[name]['rps_median']:7.0f}",
                flush=True,
            )
        results["unary"] = {"runs": runs, "summary": summary}
        if args.latency_calls:
            results["latency"] = latency(ab, agent.address, procs, args.latency_calls)
    finally:
        ab.procs.cleanup()
    results["uptime_after"] = pathlib.Path("/proc/loadavg").read_text().strip()
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(results, indent=1, default=str))
        print(f"wrote {args.out}")
    return 0


def latency(ab: AB, direct: str, procs: dict[str, Any], total: int) -> dict[str, Any]:
    import grpc

    request = ab.unary_request()
    targets = {"direct": direct, **{n: p.address for n, p in procs.items()}}
    channels = {
        k: grpc.insecure_channel(v, options=[("grpc.use_local_subchannel_pool", 1)])
        for k, v in targets.items()
    }
    samples: dict[str, list[float]] = {k: [] for k in targets}
    try:
        calls = {k: ch.unary_unary(f"/{SERVICE}/Generate") for k, ch in channels.items()}
        for call in calls.values():
            for _ in range(50):
                call(request, timeout=10)
        for _ in range(max(1, total // 50)):
            for k, call in calls.items():
                for _ in range(50):
                    t0 = time.perf_counter_ns()
                    call(request, timeout=10)
                    samples[k].append((time.perf_counter_ns() - t0) / 1000)
    finally:
        for ch in channels.values():
            ch.close()
    out: dict[str, Any] = {}
    d50 = h2load.percentile(samples["direct"], 50) or 0.0
    for k, vals in samples.items():
        out[k] = {"p50_us": h2load.percentile(vals, 50), "p99_us": h2load.percentile(vals, 99)}
        if k != "direct":
            out[k]["added_p50_us"] = (out[k]["p50_us"] or 0) - d50
    bare_added = out["bare"]["added_p50_us"]
    for k in procs:
        if k != "bare" and bare_added > 0:
            out[k]["added_p50_over_bare"] = out[k]["added_p50_us"] / bare_added
    print(
        "latency added p50: "
        + "  ".join(f"{k} {out[k]['added_p50_us']:.0f} us" for k in procs)
        + f"  (direct p50 {d50:.0f} us)",
        flush=True,
    )
    return out


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
