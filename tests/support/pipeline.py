"""A request pipeline in front of a stand-in agent, on a real grpc.aio server, for tests.

grpclib's `testing.ChannelFor([service])` and httpx's `MockTransport` are the models: a
test names the stages it exercises and the agent behind them, and gets a channel; how
the server is wired (port 0, the generic handler, shutdown) is said once, here.

    async with channel_for(Agent(), [RequestContext(), DECODE, Limits(...)]) as channel:
        await channel.unary_unary(GENERATE)(request_bytes, timeout=5)

The agent is any object with AgentService method names (`Generate(request, context)`,
`async def StreamGenerate(request, context)` yielding chunks): `ServicerTerminal` makes
it the pipeline's terminal in place of the forwarder; a method it lacks is UNIMPLEMENTED.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import grpc

from aiproxy.core.callinfo import CallInfo
from aiproxy.core.service import Method, agent_service
from aiproxy.core.types import Context, StreamCall, UnaryCall
from aiproxy.interceptors.overload import OverloadGate
from aiproxy.interceptors.stage import Step
from aiproxy.server.request.pipeline import Pipeline


async def _unimplemented(request: Any, context: Context) -> Any:
    raise NotImplementedError  # shaped INTERNAL by the pipeline


async def _unimplemented_stream(request: Any, context: Context) -> AsyncGenerator[Any, None]:
    raise NotImplementedError
    yield  # pragma: no cover  (an async generator, as a stream method is)


class ServicerTerminal:
    """A pipeline terminal from an AgentService servicer object: each method calls
    `servicer.<Name>(request, context)`; a method it lacks is UNIMPLEMENTED."""

    def __init__(self, servicer: Any) -> None:
        self._servicer = servicer

    def unary(self, method: Method) -> UnaryCall:
        behavior = getattr(self._servicer, method.name, _unimplemented)

        async def call_servicer(request: Any, raw: bytes, context: Context, call: CallInfo) -> Any:
            return await behavior(request, context)

        return call_servicer

    def stream(self, method: Method) -> StreamCall:
        behavior = getattr(self._servicer, method.name, _unimplemented_stream)

        def call_servicer(
            request: Any, raw: bytes, context: Context, call: CallInfo
        ) -> AsyncGenerator[Any, None]:
            result: AsyncGenerator[Any, None] = behavior(request, context)
            return result

        return call_servicer


def pipeline_for(
    agent: Any, stages: Sequence[Step] = (), gate: OverloadGate | None = None
) -> Pipeline:
    """The AgentService pipeline of `stages` (outermost first) in front of `agent`."""
    return Pipeline(agent_service(), stages, ServicerTerminal(agent), gate)


@asynccontextmanager
async def serving(
    agent: Any,
    stages: Sequence[Step] = (),
    *,
    gate: OverloadGate | None = None,
    beside: Sequence[grpc.GenericRpcHandler] = (),
) -> AsyncIterator[str]:
    """A server on 127.0.0.1, port 0, with `pipeline_for(agent, stages, gate)` and the
    `beside` handlers (services that do not run the pipeline); yields its address and
    stops it (no grace) on the way out."""
    server = grpc.aio.server()
    pipeline_for(agent, stages, gate).register(server)
    if beside:
        server.add_generic_rpc_handlers(tuple(beside))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


@asynccontextmanager
async def channel_for(
    agent: Any,
    stages: Sequence[Step] = (),
    *,
    gate: OverloadGate | None = None,
    beside: Sequence[grpc.GenericRpcHandler] = (),
) -> AsyncIterator[grpc.aio.Channel]:
    """A channel to `serving(agent, stages, ...)`, closed with it."""
    async with (
        serving(agent, stages, gate=gate, beside=beside) as address,
        grpc.aio.insecure_channel(address) as channel,
    ):
        yield channel
