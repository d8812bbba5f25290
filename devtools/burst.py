"""A burst of streams from many callers, in its own process (tests/chaos/test_fair_overload.py,
bench/run.py's burst row).

Run as `python -m devtools.burst SPEC_JSON`; prints one JSON line with every stream's
outcome. SPEC: {"targets": [address per caller], "metadata": [[[k, v], ...] per caller],
"streams": N, "max_tokens": M, "timeout_s": T, "rate_per_s": R (0: all at once)}. Stream i goes to caller i % callers, each
caller on its own connection. Its own process so the callers' client work (3,000 streams)
does not slow the loop of whoever measures the light caller beside it.

Each outcome: {"code", "reason", "retry", "chunks", "after_s"} for an error, {"code": "OK",
"ttfc_s", "complete"} for a stream that ended well; plus "started"/"ended" (time.time()).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import pathlib
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from aiproxy.ai.agent.v1 import agent_service_pb2 as pb
from aiproxy.ai.agent.v1 import agent_service_pb2_grpc as pb_grpc


def cause_of(err: grpc.aio.AioRpcError) -> str:
    """The ErrorInfo's `cause` (the overload gate's reason for a refusal), or ""."""
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return str(info.metadata.get("cause", ""))
    return ""


def shape(err: grpc.aio.AioRpcError) -> tuple[str, str, bool]:
    """(code, ErrorInfo reason, whether RetryInfo is there) of a gRPC error."""
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    reason, retry = "", False
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason = info.reason
        retry = retry or detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR)
    return err.code().name, reason, retry


async def one_stream(
    stub: pb_grpc.AgentServiceStub,
    request: pb.StreamGenerateRequest,
    metadata: tuple[tuple[str, str], ...],
    timeout_s: float,
) -> dict[str, Any]:
    started = time.monotonic()
    first_at = None
    chunks = 0
    last = None
    try:
        async for chunk in stub.StreamGenerate(request, metadata=metadata, timeout=timeout_s):
            if first_at is None:
                first_at = time.monotonic()
            chunks += 1
            last = chunk
    except grpc.aio.AioRpcError as err:
        code, reason, retry = shape(err)
        return {"code": code, "reason": reason, "retry": retry, "chunks": chunks,
                "after_s": time.monotonic() - started}  # fmt: skip
    return {
        "code": "OK",
        "ttfc_s": first_at - started if first_at is not None else None,
        "complete": last is not None and last.is_final and not last.HasField("error"),
    }


async def burst(spec: dict[str, Any]) -> dict[str, Any]:
    targets: list[str] = spec["targets"]
    metadata = [tuple((k, v) for k, v in md) for md in spec["metadata"]]
    callers = len(targets)
    request = pb.StreamGenerateRequest(
        prompt="burst", options=pb.GenerationOptions(max_tokens=spec.get("max_tokens", 20))
    )
    options = [("grpc.use_local_subchannel_pool", 1)]
    channels = [grpc.aio.insecure_channel(t, options=options) for t in targets]
    try:
        await asyncio.gather(*(asyncio.wait_for(c.channel_ready(), 30) for c in channels))
        stubs = [pb_grpc.AgentServiceStub(c) for c in channels]
        timeout_s = float(spec.get("timeout_s", 60))
        rate = float(spec.get("rate_per_s", 0))
        t0 = time.monotonic()

        async def paced(i: int) -> dict[str, Any]:
            if rate:  # stream i starts at i / rate (0: all at once)
                await asyncio.sleep(max(0.0, t0 + i / rate - time.monotonic()))
            return await one_stream(stubs[i % callers], request, metadata[i % callers], timeout_s)

        started = time.time()
        results = await asyncio.gather(*(paced(i) for i in range(int(spec["streams"]))))
        ended = time.time()
    finally:
        await asyncio.gather(*(c.close() for c in channels))
    return {"started": started, "ended": ended, "results": results}


LIGHT_EVERY_S = 0.1
LIGHT_REQUEST = pb.GenerateRequest(prompt="light", options=pb.GenerationOptions(max_tokens=4))
ROOT = pathlib.Path(__file__).resolve().parents[1]


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p * len(ordered)))] if ordered else 0.0


async def light_caller(
    channel: grpc.aio.Channel,
    metadata: tuple[tuple[str, str], ...],
    stop: asyncio.Event,
    request: pb.GenerateRequest = LIGHT_REQUEST,
) -> list[dict]:
    """One Generate every LIGHT_EVERY_S (started on a clock, not after the last answer)."""
    calls: list[asyncio.Task[dict]] = []
    # Each call carries its own x-request-id, so the proxy's and Envoy's access logs can
    # be matched with what the caller saw (bench/edge_burst.py).
    prefix = f"light-{time.time_ns()}-"

    async def one(n: int) -> dict:
        started, at = time.monotonic(), time.time()
        rid = f"{prefix}{n}"
        md = (*metadata, ("x-request-id", rid))
        try:
            await pb_grpc.AgentServiceStub(channel).Generate(request, metadata=md, timeout=10)
            return {"code": "OK", "s": time.monotonic() - started, "at": at, "rid": rid}
        except grpc.aio.AioRpcError as err:
            code, reason, retry = shape(err)
            return {"code": code, "reason": reason, "retry": retry, "cause": cause_of(err),
                    "s": time.monotonic() - started, "at": at, "rid": rid}  # fmt: skip

    next_at = time.monotonic()
    while not stop.is_set():
        calls.append(asyncio.create_task(one(len(calls))))
        next_at += LIGHT_EVERY_S
        await asyncio.sleep(max(0.0, next_at - time.monotonic()))
    return list(await asyncio.gather(*calls))


@contextlib.asynccontextmanager
async def relayed(target: str, callers: int, first_host: int = 10) -> AsyncIterator[list[str]]:
    """Addresses that reach `target` from 127.0.0.first_host, +1, ... (devtools/relay.py,
    its own process, killed by its handle at the end)."""
    relay = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "devtools.relay", target, str(callers), str(first_host),
        stdout=asyncio.subprocess.PIPE, cwd=ROOT,
    )  # fmt: skip
    try:
        assert relay.stdout is not None
        ports = json.loads(await asyncio.wait_for(relay.stdout.readline(), 30))["ports"]
        yield [f"127.0.0.1:{port}" for port in ports]
    finally:
        relay.kill()
        await relay.wait()


async def run_burst(
    proxy_address: str,
    burst_metadata: list[tuple[tuple[str, str], ...]],
    light_metadata: tuple[tuple[str, str], ...],
    *,
    burst_targets: list[str] | None = None,
    light_target: str | None = None,
    streams: int = 3000,
    quiet: bool = False,
    by_address: bool = False,
    rate_per_s: float = 0.0,
    max_tokens: int = 20,
    light_max_tokens: int = 4,
) -> dict[str, Any]:
    """The burst (`streams` over the callers' own connections, from its own process: this
    module's main) beside the light caller (on the caller's loop); the figures.
    `burst_targets` / `light_target`: per-caller addresses. `by_address`: each burst
    caller connects from its own 127.0.0.N (through devtools/relay.py), the light caller
    from 127.0.0.1: callers told apart by address, as without auth they are."""
    if by_address and burst_targets is None:
        async with relayed(proxy_address, len(burst_metadata)) as targets:
            return await run_burst(
                proxy_address, burst_metadata, light_metadata, burst_targets=targets,
                light_target=light_target, streams=streams, quiet=quiet,
                rate_per_s=rate_per_s, max_tokens=max_tokens,
                light_max_tokens=light_max_tokens,
            )  # fmt: skip
    callers = len(burst_metadata)
    spec = {
        "targets": burst_targets or [proxy_address] * callers,
        "metadata": [list(md) for md in burst_metadata],
        "streams": streams,
        "rate_per_s": rate_per_s,
        "max_tokens": max_tokens,
        "timeout_s": 60,
    }
    light = grpc.aio.insecure_channel(
        light_target or proxy_address, options=[("grpc.use_local_subchannel_pool", 1)]
    )
    stop = asyncio.Event()
    burster = None
    try:
        await asyncio.wait_for(light.channel_ready(), 30)
        # The light caller is already calling when the burst comes.
        light_request = pb.GenerateRequest(
            prompt="light", options=pb.GenerationOptions(max_tokens=light_max_tokens)
        )
        await pb_grpc.AgentServiceStub(light).Generate(
            light_request, metadata=light_metadata, timeout=10
        )
        lighter = asyncio.create_task(light_caller(light, light_metadata, stop, light_request))
        burster = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "devtools.burst", json.dumps(spec),
            stdout=asyncio.subprocess.PIPE, cwd=ROOT,
        )  # fmt: skip
        paced_s = streams / rate_per_s if rate_per_s else 0.0
        out, _ = await asyncio.wait_for(burster.communicate(), 90 + paced_s)
        stop.set()
        light_results = await asyncio.wait_for(lighter, 30)
    finally:
        stop.set()
        if burster is not None and burster.returncode is None:
            burster.kill()  # ours, by its handle
            await burster.wait()
        await light.close()
    assert burster.returncode == 0, out
    outcome = json.loads(out)
    started, ended, results = outcome["started"], outcome["ended"], outcome["results"]
    during = [r for r in light_results if started <= r["at"] <= ended]
    ok = [r for r in results if r["code"] == "OK"]
    refused = [r for r in results if r["code"] != "OK"]
    light_ok = [r for r in during if r["code"] == "OK"]
    figures = {
        "started": started,
        "wall_s": ended - started,
        "counts": collections.Counter((r["code"], r.get("reason", "")) for r in results),
        "admitted": len(ok) / len(results),
        "ttfc_p50": percentile([r["ttfc_s"] for r in ok], 0.5),
        "ttfc_p99": percentile([r["ttfc_s"] for r in ok], 0.99),
        "refusal_p50": percentile([r["after_s"] for r in refused], 0.5),
        "refusal_p99": percentile([r["after_s"] for r in refused], 0.99),
        "light_calls": len(during),
        "light_served": len(light_ok) / len(during) if during else 0.0,
        "light_p50": percentile([r["s"] for r in during], 0.5),
        "light_p99": percentile([r["s"] for r in during], 0.99),
        "light_codes": collections.Counter(r["code"] for r in during),
        # Why the light caller was refused, when it was (the gate's ErrorInfo cause).
        "light_causes": collections.Counter(
            r.get("cause", "") for r in during if r["code"] != "OK"
        ),
        "results": results,
        "light": during,
    }
    if not quiet:
        print(
            "\n"
            + ", ".join(
                f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                for k, v in figures.items()
                if k not in ("results", "light", "started")
            )
        )
    return figures


def main() -> None:
    spec = json.loads(sys.argv[1])
    print(json.dumps(asyncio.run(burst(spec))), flush=True)


if __name__ == "__main__":
    main()
