"""Memory per open slow stream, held steady: where a hop's bytes go.

    python -m bench.streammem --target proxy --streams 2000 [--server-arg K=V] [--channel-arg K=V]
    python -m bench.streammem --target bare  --streams 2000
    python -m bench.streammem --target proxy --streams 2000 --census   # Python's share, by type

Starts a reference agent that answers slowly (one token a second after the first), the
hop (`proxy`: `aiproxy serve` with the bench's admission settings, bench/stack.py
PROXY_ENV; `bare`: bench/barehop.py), warms it up with short streams, then opens K long
streams from G generator processes and waits until every one has its first chunk. The
RSS of the hop then, minus its RSS after the warm-up, divided by K, is the memory per open
stream (the hold rows of bench/run.py report the peak over the whole load instead, which
also counts transient buffers of the opening burst). Then the streams are cancelled and
the RSS read again (what the allocator keeps).

`--server-arg` / `--channel-arg` add grpc channel arguments to the hop's server (the
callers' side) and to its upstream channel, to see what grpc-core's settings change;
values are ints when they parse as ints. `--census`: the live objects the collector
tracks, by type, counted in the hop (on SIGUSR2) when warmed up and with K open; the
difference per stream (count, `sys.getsizeof` bytes) is what the Python side holds; RSS
minus that is mostly grpc-core's and the allocator's. `--env K=V` sets the hop's
environment (e.g. MALLOC_ARENA_MAX).

One JSON line at the end; the hop's and the agent's processes are stopped by PID.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pathlib
import signal
import subprocess
import sys
import time
from typing import Any

from bench.procs import Procs, aiproxy_argv, rss_bytes
from bench.stack import PROXY_ENV, SERVICE

SNAP_ENV = "BENCH_STREAMMEM_CENSUS"  # where the child writes its object census
ARGS_ENV = "BENCH_STREAMMEM_ARGS"  # JSON {"server": [[k, v]...], "channel": [[k, v]...]}


def _parse_args(pairs: list[str]) -> list[list[Any]]:
    out: list[list[Any]] = []
    for pair in pairs:
        key, _, value = pair.partition("=")
        try:
            out.append([key, int(value)])
        except ValueError:
            out.append([key, value])
    return out


# -- the hop, run in this module so that its grpc arguments can be extended ---------------


def _install_census_handler() -> None:
    """SIGUSR2: the live objects the collector tracks, by type (count, sys.getsizeof
    total), to `<census path>.census.N`: what the Python side holds, by kind."""
    path = os.environ.get(SNAP_ENV)
    if not path:
        return
    count = [0]

    def census(_sig: int, _frame: Any) -> None:
        import gc

        gc.collect()
        by_type: dict[str, list[int]] = {}
        for obj in gc.get_objects():
            t = type(obj)
            name = f"{t.__module__}.{t.__qualname__}"
            if t.__name__ in ("coroutine", "async_generator", "frame", "function") and hasattr(
                obj, "__qualname__"
            ):
                name = f"{name}:{obj.__qualname__}"
            entry = by_type.setdefault(name, [0, 0])
            entry[0] += 1
            entry[1] += sys.getsizeof(obj)
        with open(f"{path}.census.{count[0]}", "w") as f:
            json.dump(by_type, f)
        count[0] += 1

    signal.signal(signal.SIGUSR2, census)


def child(kind: str, argv: list[str]) -> int:
    extra = json.loads(os.environ.get(ARGS_ENV) or "{}")
    server_extra = [tuple(p) for p in extra.get("server", [])]
    channel_extra = [tuple(p) for p in extra.get("channel", [])]
    _install_census_handler()
    if kind == "bare":
        from bench import barehop

        barehop.SERVER_OPTIONS.extend(server_extra)
        barehop.CHANNEL_OPTIONS.extend(channel_extra)
        return barehop.main(argv)
    from aiproxy.server import app
    from aiproxy.server.pool import endpoint

    server_options, channel_options = app.server_options, endpoint.channel_options

    def server_options_plus(settings: Any) -> list[tuple[str, Any]]:
        return [*server_options(settings), *server_extra]

    def channel_options_plus(settings: Any) -> list[tuple[str, Any]]:
        return [*channel_options(settings), *channel_extra]

    app.server_options = server_options_plus  # type: ignore[assignment]
    endpoint.channel_options = channel_options_plus  # type: ignore[assignment]
    from aiproxy.server.cli import main as cli_main

    return cli_main(argv)


# -- the generator: K streams held open, progress on stdout --------------------------------


async def generate(spec: dict[str, Any]) -> None:
    import grpc

    from aiproxy.ai.agent.v1 import agent_service_pb2 as pb

    request = bytes.fromhex(spec["request"])
    k, n_channels, ramp_s = spec["streams"], spec["channels"], spec["ramp_s"]
    channels = [
        grpc.aio.insecure_channel(spec["target"], options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(n_channels)
    ]
    for ch in channels:
        await asyncio.wait_for(ch.channel_ready(), 10)
    first = 0
    errors: dict[str, int] = {}
    calls = []

    async def one(i: int) -> None:
        nonlocal first
        call = channels[i % n_channels].unary_stream(f"/{SERVICE}/StreamGenerate")(
            request, timeout=spec["timeout_s"]
        )
        calls.append(call)
        got = False
        try:
            async for raw in call:
                if not got:
                    got = True
                    first += 1
                pb.StreamGenerateResponse.FromString(raw)
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.CANCELLED:
                errors[exc.code().name] = errors.get(exc.code().name, 0) + 1
        except asyncio.CancelledError:
            pass

    tasks = []
    step = max(1, k // 50)
    for i in range(k):
        tasks.append(asyncio.create_task(one(i)))
        if ramp_s and (i + 1) % step == 0:
            await asyncio.sleep(ramp_s / 50)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_reader(sys.stdin.fileno(), stop.set)  # the harness closes our stdin: stop
    while not stop.is_set():
        print(json.dumps({"first": first, "errors": errors}), flush=True)
        try:
            await asyncio.wait_for(stop.wait(), 0.5)
        except TimeoutError:
            pass
    loop.remove_reader(sys.stdin.fileno())
    for call in calls:
        call.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for ch in channels:
        await ch.close()
    print(json.dumps({"first": first, "errors": errors, "done": True}), flush=True)


# -- the harness ------------------------------------------------------------------------


def _settle_rss(pid: int, seconds: float = 2.0) -> int:
    """RSS after it stopped moving (max of a few samples over `seconds`)."""
    samples = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        samples.append(rss_bytes(pid))
        time.sleep(0.2)
    return max(samples)


def _census(pid: int, path: str, index: int, timeout: float = 120.0) -> dict[str, Any]:
    os.kill(pid, signal.SIGUSR2)
    done = pathlib.Path(f"{path}.census.{index}")
    end = time.monotonic() + timeout
    while True:
        if done.exists():
            try:
                return dict(json.loads(done.read_text()))
            except ValueError:
                pass  # still being written
        if time.monotonic() > end:
            raise TimeoutError("no object census from the hop")
        time.sleep(0.3)


def _run_generators(
    target: str, request: bytes, k: int, gens: int, ramp_s: float, timeout_s: float
) -> list[subprocess.Popen[str]]:
    procs = []
    for g in range(gens):
        mine = k // gens + (1 if g < k % gens else 0)
        spec = {
            "target": target,
            "request": request.hex(),
            "streams": mine,
            "channels": max(1, -(-mine // 1000)),
            "ramp_s": ramp_s,
            "timeout_s": timeout_s,
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "bench.streammem", "--generate", json.dumps(spec)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
        )
    return procs


def _progress(procs: list[subprocess.Popen[str]]) -> tuple[int, dict[str, int]]:
    first = 0
    errors: dict[str, int] = {}
    for p in procs:
        assert p.stdout is not None
        line = p.stdout.readline()
        if not line:
            continue
        got = json.loads(line)
        first += got["first"]
        for key, v in got["errors"].items():
            errors[key] = errors.get(key, 0) + v
    return first, errors


def measure(args: argparse.Namespace) -> dict[str, Any]:
    from aiproxy.ai.agent.v1 import agent_service_pb2 as pb

    procs = Procs()
    out: dict[str, Any] = {
        "target": args.target,
        "streams": args.streams,
        "server_args": args.server_arg,
        "channel_args": args.channel_arg,
        "loadavg_before": os.getloadavg(),
    }
    gens: list[subprocess.Popen[str]] = []
    try:
        agent = procs.start(
            "agent",
            aiproxy_argv(
                "agent",
                "--listen",
                "127.0.0.1:0",
                "--first-token-delay-ms",
                "50",
                "--token-delay-ms",
                "1000",
                "--log-level",
                "WARNING",
            ),
        )
        env = {
            ARGS_ENV: json.dumps(
                {
                    "server": _parse_args(args.server_arg),
                    "channel": _parse_args(args.channel_arg),
                }
            )
        }
        env.update(dict(pair.split("=", 1) for pair in args.env))
        census_path = None
        if args.census:
            census_path = str(procs.workdir / "census")
            env[SNAP_ENV] = census_path
        if args.target == "proxy":
            argv = [
                sys.executable,
                "-m",
                "bench.streammem",
                "--child",
                "proxy",
                "--",
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--upstream",
                agent.address,
            ]
            env.update(PROXY_ENV)
        else:
            argv = [
                sys.executable,
                "-m",
                "bench.streammem",
                "--child",
                "bare",
                "--",
                "--listen",
                "127.0.0.1:0",
                "--upstream",
                agent.address,
            ]
        hop = procs.start(args.target, argv, env=env)
        # Warm-up: short streams, so that pools and first-call paths are in the baseline.
        warm = pb.StreamGenerateRequest(
            prompt="warm up", options=pb.GenerationOptions(max_tokens=1)
        ).SerializeToString()
        gens = _run_generators(hop.address, warm, min(args.streams, 200), 1, 0.2, 30)
        end = time.monotonic() + 30
        while time.monotonic() < end:
            first, _ = _progress(gens)
            if first >= min(args.streams, 200):
                break
        for p in gens:
            assert p.stdin is not None and p.stdout is not None
            p.stdin.close()
            p.stdout.read()
            p.wait(timeout=30)
        gens = []
        time.sleep(1.0)
        base = _settle_rss(hop.pid)
        out["rss_base"] = base
        census0 = _census(hop.pid, census_path, 0) if census_path else None
        request = pb.StreamGenerateRequest(
            prompt="hold", options=pb.GenerationOptions(max_tokens=args.hold_s)
        ).SerializeToString()
        t0 = time.monotonic()
        gens = _run_generators(
            hop.address, request, args.streams, args.gens, args.ramp_s, args.hold_s + 60
        )
        first, errors = 0, {}
        end = t0 + args.ramp_s + 60
        while time.monotonic() < end:
            first, errors = _progress(gens)
            if first + sum(errors.values()) >= args.streams:
                break
        out["open_s"] = time.monotonic() - t0
        out["first_chunks"] = first
        out["errors"] = errors
        held = _settle_rss(hop.pid)
        _progress(gens)
        out["rss_held"] = held
        out["bytes_per_stream"] = (held - base) / max(1, first)
        out["kib_per_stream"] = round(out["bytes_per_stream"] / 1024, 2)
        if census_path:
            census1 = _census(hop.pid, census_path, 1)
            assert census0 is not None
            diff = []
            for name, (count, size) in census1.items():
                c0, s0 = census0.get(name, (0, 0))
                if count - c0 > 0:
                    diff.append((size - s0, count - c0, name))
            diff.sort(reverse=True)
            n = max(1, first)
            out["census_bytes_per_stream"] = round(sum(d[0] for d in diff) / n, 1)
            out["census_top"] = [
                {
                    "type": name,
                    "objects_per_stream": round(c / n, 2),
                    "bytes_per_stream": round(b / n, 1),
                }
                for b, c, name in diff[: args.top]
            ]
        for p in gens:
            assert p.stdin is not None
            p.stdin.close()
        for p in gens:
            assert p.stdout is not None
            p.stdout.read()
            p.wait(timeout=60)
        gens = []
        time.sleep(1.0)
        out["rss_after_cancel"] = _settle_rss(hop.pid)
        out["loadavg_after"] = os.getloadavg()
    finally:
        for p in gens:
            if p.poll() is None:
                p.kill()
                p.wait()
        procs.cleanup()
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        rest = argv[3:] if argv[2:3] == ["--"] else argv[2:]
        return child(argv[1], rest)
    if argv[:1] == ["--generate"]:
        asyncio.run(generate(json.loads(argv[1])))
        return 0
    parser = argparse.ArgumentParser(
        prog="python -m bench.streammem",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--target", choices=("proxy", "bare"), default="proxy")
    parser.add_argument("--streams", type=int, default=2000)
    parser.add_argument("--gens", type=int, default=2, help="generator processes")
    parser.add_argument("--ramp-s", type=float, default=4.0)
    parser.add_argument("--hold-s", type=int, default=40, help="chunks (= seconds) per stream")
    parser.add_argument("--server-arg", action="append", default=[], metavar="K=V")
    parser.add_argument("--channel-arg", action="append", default=[], metavar="K=V")
    parser.add_argument(
        "--env", action="append", default=[], metavar="K=V", help="the hop's environment"
    )
    parser.add_argument("--census", action="store_true", help="live objects by type, per stream")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args(argv)
    result = measure(args)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
