"""The floor of a Python gRPC hop: a bare grpc.aio pass-through, raw bytes, no interceptors.

    python -m bench.barehop --listen 127.0.0.1:0 --upstream HOST:PORT

The least a Python proxy does for a call: one generic handler per method of the agent's
service (built once at start-up), the request forwarded as the bytes that came in, over one
channel to the upstream, with the caller's remaining deadline; the answer (one message, or
each chunk as it comes) relayed as bytes; an upstream error relayed as its status code.
Nothing else: no metadata forwarded, no parsing, no interceptors, no retries, no metrics.

The benchmark runs it next to aiproxy in every run, so aiproxy's cost can be stated as a
ratio to the floor of the same hop in the same language, runtime and machine state (issue
15). The transport settings that change behaviour under load are aiproxy's defaults
(server/app.py server_options, server/pool/endpoint.py channel_options, server/app.py tune_gc),
copied here rather than imported: the floor must not move when the proxy's code does.

Ready line on stdout, as aiproxy's commands print it:
{"event": "listening", "service": "barehop", "address": "127.0.0.1:PORT"}
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from aiproxy.ai.agent.v1 import agent_service_pb2

SERVICE = agent_service_pb2.DESCRIPTOR.services_by_name["AgentService"]

# aiproxy's defaults for what matters under load: bursts of new calls are queued, not
# CANCELLED (grpc's default max_pending_requests is 1000), many streams per connection,
# the same message size limits.
SERVER_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.server.max_pending_requests", 20_000),
    ("grpc.server.max_pending_requests_hard_limit", 40_000),
    ("grpc.max_concurrent_streams", 10_000),
    ("grpc.max_receive_message_length", 4 * 1024 * 1024),
    ("grpc.max_send_message_length", 16 * 1024 * 1024),
    ("grpc.so_reuseport", 0),
]
CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.use_local_subchannel_pool", 1),
    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
    ("grpc.enable_retries", 0),
]


def _unary(upstream: grpc.aio.UnaryUnaryMultiCallable) -> Callable[..., Awaitable[bytes]]:
    async def forward(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        try:
            return await upstream(request, timeout=context.time_remaining())
        except grpc.aio.AioRpcError as exc:
            await context.abort(exc.code(), exc.details() or "")
            raise  # abort raises; this line is for type checkers

    return forward


def _stream(upstream: grpc.aio.UnaryStreamMultiCallable) -> Callable[..., AsyncIterator[bytes]]:
    async def forward(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        call = upstream(request, timeout=context.time_remaining())
        try:
            async for chunk in call:
                yield chunk
        except grpc.aio.AioRpcError as exc:
            await context.abort(exc.code(), exc.details() or "")
        finally:
            call.cancel()  # the caller left (or the stream ended: then a no-op)

    return forward


def generic_handler(channel: grpc.aio.Channel) -> grpc.GenericRpcHandler:
    """One raw-bytes handler per method (no (de)serializers: grpc passes bytes through)."""
    handlers: dict[str, grpc.RpcMethodHandler] = {}
    for method in SERVICE.methods:
        path = f"/{SERVICE.full_name}/{method.name}"
        if method.client_streaming:
            raise SystemExit(
                f"barehop: {path} is client-streaming; only unary and server-streaming methods are forwarded"
            )
        if method.server_streaming:
            handlers[method.name] = grpc.unary_stream_rpc_method_handler(
                _stream(channel.unary_stream(path))
            )
        else:
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                _unary(channel.unary_unary(path))
            )
    return grpc.method_handlers_generic_handler(SERVICE.full_name, handlers)


async def serve(listen: str, upstream: str) -> None:
    channel = grpc.aio.insecure_channel(upstream, options=CHANNEL_OPTIONS)
    await asyncio.wait_for(channel.channel_ready(), 30)
    server = grpc.aio.server(options=SERVER_OPTIONS)
    server.add_generic_rpc_handlers((generic_handler(channel),))
    port = server.add_insecure_port(listen)
    if not port:
        raise SystemExit(f"barehop: cannot listen on {listen}")
    await server.start()
    # As aiproxy does at start-up (server/app.py tune_gc): the collector's cost at
    # thousands of open streams is the process's, not the per-call work being compared.
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    host = listen.rsplit(":", 1)[0]
    print(
        json.dumps({"event": "listening", "service": "barehop", "address": f"{host}:{port}"}),
        flush=True,
    )
    await stop.wait()
    await server.stop(grace=2)
    await channel.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.barehop",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--listen", default="127.0.0.1:0")
    parser.add_argument("--upstream", required=True, help="HOST:PORT of the agent")
    args = parser.parse_args(argv)
    coro = serve(args.listen, args.upstream)
    try:
        import uvloop  # the event loop aiproxy runs on when it is installed (server/cli.py)
    except ImportError:
        asyncio.run(coro)
    else:
        uvloop.run(coro)
    return 0


if __name__ == "__main__":
    sys.exit(main())
