"""A burst of streams from many callers, in its own process (tests/chaos/test_fair_overload.py,
bench/run.py's burst row).

Run as `python -m tests.support.burst SPEC_JSON`; prints one JSON line with every stream's
outcome. SPEC: {"targets": [address per caller], "metadata": [[[k, v], ...] per caller],
"streams": N, "max_tokens": M, "timeout_s": T}. Stream i goes to caller i % callers, each
caller on its own connection. Its own process so the callers' client work (3,000 streams)
does not slow the loop of whoever measures the light caller beside it.

Each outcome: {"code", "reason", "retry", "chunks", "after_s"} for an error, {"code": "OK",
"ttfc_s", "complete"} for a stream that ended well; plus "started"/"ended" (time.time()).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from aiproxy.ai.agent.v1 import agent_service_pb2 as pb
from aiproxy.ai.agent.v1 import agent_service_pb2_grpc as pb_grpc


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
        started = time.time()
        results = await asyncio.gather(
            *(
                one_stream(stubs[i % callers], request, metadata[i % callers], timeout_s)
                for i in range(int(spec["streams"]))
            )
        )
        ended = time.time()
    finally:
        await asyncio.gather(*(c.close() for c in channels))
    return {"started": started, "ended": ended, "results": results}


def main() -> None:
    spec = json.loads(sys.argv[1])
    print(json.dumps(asyncio.run(burst(spec))), flush=True)


if __name__ == "__main__":
    main()
