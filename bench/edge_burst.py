"""Where a light caller's time goes through Envoy while a burst is shed (diagnostic).

    flock /work/load.lock .venv/bin/python -m bench.edge_burst [--streams 3000] [--concurrency 2]

One reference agent (10 ms per token), one proxy (access log on), Envoy in front
(`aiproxy envoy`), the burst of tests/chaos/test_fair_overload.py through Envoy (50 callers,
each from its own 127.0.0.N through devtools/relay.py) beside the light caller (one
Generate every 100 ms from 127.0.0.1). Prints, for the light caller's calls during the
burst: what the caller saw, what Envoy's access log says (its first byte to the replica,
the replica's first byte back, the whole), what the proxy's access log says (its own
duration); the proxy's queue wait (ai_proxy_queue_wait_seconds, scraped every 100 ms);
and each process's CPU seconds over the burst (Envoy, proxy, agent, relay, burst client,
this process), so the light caller's p99 can be put on one of them. The caller's wait
outside Envoy is split by Envoy's START_TIME: before Envoy's codec took the request
(`light_to_envoy`) and after its last byte (`light_after_envoy`).

Controls: `--envoy-config bench/edge_burst_control.yaml` puts a router-only Envoy in the
edge's place; `--nice envoy=-10` (or proxy, agent) starts that process at another
niceness. What they showed (2026-12-06, docs/overload.md "Through Envoy"): the light
caller's wait is before Envoy reads its request, with the edge's configuration and with
the router-only one alike.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import pathlib
import socket
import sys
import threading
import time
import urllib.request
from typing import Any

from bench.procs import Procs, aiproxy_argv
from devtools.burst import percentile, run_burst
from devtools.procs import cpu_seconds


def _tree(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            with open(f"/proc/{p}/task/{p}/children") as f:
                todo += [int(c) for c in f.read().split()]
        except OSError:
            pass
    return out


def _name(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return "?"
    words = [a.decode(errors="replace") for a in argv if a]
    for key in ("devtools.relay", "devtools.burst", "agent", "serve", "envoy"):
        if any(key in w for w in words):
            return "envoy-binary" if words and words[0].endswith("/envoy") else key
    return os.path.basename(words[0]) if words else "?"


class CpuSampler(threading.Thread):
    """CPU seconds per process of this process's tree, sampled every 0.2 s."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.first: dict[int, float] = {}
        self.last: dict[int, float] = {}
        self.names: dict[int, str] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.2):
            for pid in _tree(os.getpid()):
                try:
                    cpu = cpu_seconds(pid)
                except OSError:
                    continue
                if pid not in self.first:
                    self.first[pid] = cpu if pid in self.last else 0.0
                    self.names[pid] = _name(pid)
                self.last[pid] = cpu

    def start_window(self) -> None:
        self.first = dict(self.last)

    def totals(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for pid, cpu in self.last.items():
            name = self.names.get(pid) or _name(pid)
            out[name] = out.get(name, 0.0) + cpu - self.first.get(pid, 0.0)
        return {k: round(v, 2) for k, v in sorted(out.items(), key=lambda kv: -kv[1])}


def _scrape(url: str, stop: threading.Event, out: list[tuple[float, float, float]]) -> None:
    while not stop.wait(0.1):
        try:
            text = urllib.request.urlopen(url, timeout=1).read().decode()
        except OSError:
            continue
        wait = limit = 0.0
        for line in text.splitlines():
            if line.startswith("ai_proxy_queue_wait_seconds "):
                wait = float(line.split()[1])
            elif line.startswith("ai_proxy_overload_limit "):
                limit = float(line.split()[1])
        out.append((time.time(), wait, limit))


def _ms(values: list[float]) -> str:
    if not values:
        return "-"
    return f"p50 {percentile(values, 0.5):.0f} / p99 {percentile(values, 0.99):.0f} / max {max(values):.0f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.edge_burst", description=__doc__)
    parser.add_argument("--streams", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--proxy-access-log", action="store_true")
    parser.add_argument("--proxy-env", action="append", default=[], help="K=V for the proxy")
    parser.add_argument("--envoy-arg", action="append", default=[])
    parser.add_argument(
        "--envoy-config",
        help="run this Envoy config instead of `aiproxy envoy` (a control: {{PORT}}, "
        "{{ADMIN_PORT}}, {{PROXY_HOST}}, {{PROXY_PORT}} are filled in)",
    )
    parser.add_argument(
        "--nice", action="append", default=[],
        help="NAME=N: start that process (agent, proxy, envoy) at this niceness (experiment)",
    )  # fmt: skip
    args = parser.parse_args()
    procs = Procs()
    sampler = CpuSampler()
    sampler.start()
    try:
        agent = procs.start(
            "agent", aiproxy_argv("agent", "--listen", "127.0.0.1:0", "--token-delay-ms", "10")
        )
        env = {
            "AIPROXY_LOG__ACCESS": "true" if args.proxy_access_log else "false",
            "AIPROXY_METRICS__LISTEN": "127.0.0.1:0",
            "AIPROXY_LIMITS__RATE_PER_S": "1000000",
            "AIPROXY_LIMITS__BURST": "1000000",
            "AIPROXY_LIMITS__MAX_STREAMS_PER_CALLER": "100000",
        }
        env.update(kv.split("=", 1) for kv in args.proxy_env)
        proxy = procs.start(
            "proxy",
            aiproxy_argv("serve", "--listen", "127.0.0.1:0", "--upstream", agent.address),
            env=env,
        )
        if args.envoy_config:
            port, admin_port = _free_port(), _free_port()
            host, _, proxy_port = proxy.address.rpartition(":")
            config = pathlib.Path(args.envoy_config).read_text()
            for key, value in (("PORT", port), ("ADMIN_PORT", admin_port),
                               ("PROXY_HOST", host), ("PROXY_PORT", proxy_port)):  # fmt: skip
                config = config.replace("{{" + key + "}}", str(value))
            path = pathlib.Path(procs.workdir) / "envoy-control.yaml"
            path.write_text(config)
            envoy = procs.start(
                "envoy",
                [_envoy_binary(), "-c", str(path), "--concurrency", str(args.concurrency),
                 "--log-level", "error", "--base-id", str(os.getpid() % 60000)],
                ready=lambda _p: _listening(port),
            )  # fmt: skip
            envoy_address = f"127.0.0.1:{port}"
        else:
            envoy = procs.start(
                "envoy",
                aiproxy_argv(
                    "envoy", "--listen", "127.0.0.1:0", "--proxy", proxy.address,
                    "--concurrency", str(args.concurrency), "--log-flush-ms", "100",
                    "--log-level", "error", *args.envoy_arg,
                ),
            )  # fmt: skip
            envoy_address = envoy.address
        metrics_at = next(
            (
                x["address"]
                for x in _json_file(proxy.stderr_path)
                if x.get("event") == "metrics_listening"
            ),
            "",
        )
        metrics_url = f"http://{metrics_at}/metrics" if metrics_at else ""
        scraped: list[tuple[float, float, float]] = []
        stop = threading.Event()
        if metrics_url:
            threading.Thread(target=_scrape, args=(metrics_url, stop, scraped), daemon=True).start()
        for spec in args.nice:
            name, _, value = spec.partition("=")
            pid = {"agent": agent, "proxy": proxy, "envoy": envoy}[name].pid
            for each in _tree(pid):
                for task in os.listdir(f"/proc/{each}/task"):
                    os.setpriority(os.PRIO_PROCESS, int(task), int(value))
        time.sleep(0.5)
        sampler.start_window()
        t0 = time.time()
        figures = asyncio.run(
            run_burst(envoy_address, [() for _ in range(50)], (), streams=args.streams,
                      quiet=True, by_address=True)
        )  # fmt: skip
        time.sleep(0.4)
        cpu = sampler.totals()
        wall = time.time() - t0
        stop.set()
        refusals = {}
        if metrics_url:
            for line in urllib.request.urlopen(metrics_url, timeout=2).read().decode().splitlines():
                if line.startswith("ai_proxy_overload_refusals_total{"):
                    labels, value = line.rsplit(" ", 1)
                    refusals[labels[len("ai_proxy_overload_refusals_total") :]] = float(value)
        time.sleep(1.2)  # Envoy flushes its access log every 100 ms
        started, ended = t0, t0 + wall
        light = figures["light"]
        envoy_lines = [
            line for line in envoy.stdout_lines() + _json_file(envoy.stderr_path)
            if line.get("event") == "access" and str(line.get("grpc_method", "")).endswith("/Generate")
        ]  # fmt: skip
        proxy_lines = [
            line for line in _json_file(proxy.stderr_path)
            if line.get("event") == "access" and str(line.get("method", "")).endswith("Generate")
            and not str(line.get("method", "")).endswith("StreamGenerate")
        ]  # fmt: skip
        waits = [w for at, w, _ in scraped if started <= at <= ended]
        limits = [lim for at, _, lim in scraped if started <= at <= ended]
        report = {
            "uptime": pathlib.Path("/proc/loadavg").read_text().split()[:3],
            "wall_s": round(figures["wall_s"], 2),
            "admitted": round(figures["admitted"], 3),
            "counts": {f"{k[0]}/{k[1]}": v for k, v in figures["counts"].items()},
            "ttfc": _ms([1000 * r["ttfc_s"] for r in figures["results"] if r["code"] == "OK"]),
            "light_served": round(figures["light_served"], 3),
            "light_codes": dict(figures["light_codes"]),
            "light_client": _ms([1000 * r["s"] for r in light]),
            "envoy_generate_lines": len(envoy_lines),
            "envoy_duration": _ms(
                [_num(x["duration_ms"]) for x in envoy_lines if _num(x["duration_ms"]) is not None]
            ),
            "envoy_to_upstream_tx": _ms(
                [v for x in envoy_lines if (v := _num(x.get("upstream_tx_ms"))) is not None]
            ),
            "envoy_upstream_rx": _ms(
                [v for x in envoy_lines if (v := _num(x.get("upstream_rx_ms"))) is not None]
            ),
            "proxy_generate_lines": len(proxy_lines),
            "proxy_duration": _ms([x["duration_ms"] for x in proxy_lines]),
            "queue_wait_s_max": round(max(waits), 3) if waits else None,
            "limit_min": min(limits) if limits else None,
            "cpu_s": cpu,
            "refusals": refusals,
        }
        by_rid_envoy = {x.get("request_id"): x for x in envoy_lines}
        by_rid_proxy = {x.get("request_id"): x for x in proxy_lines}
        rows = []
        for r in sorted(light, key=lambda r: -r["s"])[:8]:
            e = by_rid_envoy.get(r["rid"], {})
            p = by_rid_proxy.get(r["rid"], {})
            rows.append({
                "at_s": round(r["at"] - figures["started"], 2) if "started" in figures else None,
                "code": r["code"], "client_ms": round(1000 * r["s"]),
                "envoy_ms": _num(e.get("duration_ms")), "to_upstream_ms": _num(e.get("upstream_tx_ms")),
                "upstream_rx_ms": _num(e.get("upstream_rx_ms")), "proxy_ms": p.get("duration_ms"),
            })  # fmt: skip
        report["slowest_light"] = rows
        admin = next((x.get("admin") for x in envoy.stdout_lines() if x.get("admin")), "")
        if admin:
            # Envoy's flow control during the run: paused reads and backed-up buffers.
            text = urllib.request.urlopen(f"http://{admin}/stats", timeout=2).read().decode()
            report["envoy_flow_control"] = {
                k: v for k, _, v in (line.partition(": ") for line in text.splitlines())
                if ("flow_control" in k or "watermark" in k or "overflow" in k)
                and v not in ("0", "")
            }  # fmt: skip
        before_envoy, in_proxy_queue = [], []
        to_envoy: list[float] = []
        after_envoy: list[float] = []
        for r in light:
            e = by_rid_envoy.get(r["rid"])
            if e is None or _num(e.get("duration_ms")) is None:
                continue
            before_envoy.append(1000 * r["s"] - _num(e["duration_ms"]))  # type: ignore[operator]
            started_at = _epoch(e.get("ts"))
            if started_at is not None:
                # Envoy's START_TIME has ms resolution: the split is good to about 1 ms.
                to_envoy.append(1000 * (started_at - r["at"]))
                after_envoy.append(
                    1000 * (r["at"] + r["s"] - started_at) - _num(e["duration_ms"])  # type: ignore[operator]
                )
            p = by_rid_proxy.get(r["rid"])
            rx = _num(e.get("upstream_rx_ms"))
            tx = _num(e.get("upstream_tx_ms")) or 0.0
            if rx is not None:
                in_proxy_queue.append(rx - tx - (p["duration_ms"] if p else 0.0))
        # caller -> Envoy's first byte (and Envoy's last byte -> caller); Envoy's send ->
        # the proxy's answer, minus the proxy's own handler time (its intake queue).
        report["light_before_envoy"] = _ms(before_envoy)
        report["light_proxy_intake"] = _ms(in_proxy_queue)
        # The same wait split: sent by the caller -> Envoy's first byte; Envoy's last
        # byte -> the caller's answer.
        report["light_to_envoy"] = _ms(to_envoy)
        report["light_after_envoy"] = _ms(after_envoy)
        print(json.dumps(report, indent=1))
    finally:
        sampler.stop.set()
        procs.cleanup()


def _num(v: Any) -> float | None:
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
    except OSError:
        return False
    return True


def _envoy_binary() -> str:
    return str(pathlib.Path(sys.executable).parent / "envoy")


def _epoch(ts: Any) -> float | None:
    """Envoy's START_TIME (%Y-%m-%dT%H:%M:%S.%3fZ, UTC) as epoch seconds."""
    try:
        return (
            datetime.datetime.strptime(str(ts), "%Y-%m-%dT%H:%M:%S.%fZ")
            .replace(tzinfo=datetime.UTC)
            .timestamp()
        )
    except ValueError:
        return None


def _json_file(path: Any) -> list[dict[str, Any]]:
    out = []
    try:
        text = pathlib.Path(path).read_text(errors="replace")
    except OSError:
        return out
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
    return out


if __name__ == "__main__":
    main()
