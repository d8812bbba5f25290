"""tests.support.grpc_helpers.max_wire_timeout_ms: the bound deadline assertions use,
checked against what grpc-core really sends and what a server really sees."""

from __future__ import annotations

import grpc
import pytest

from tests.support.grpc_helpers import max_wire_timeout_ms


def test_the_bound_covers_grpc_cores_rounding() -> None:
    assert max_wire_timeout_ms(0.3) >= 301  # whole ms, rounded up (seen: 301)
    assert max_wire_timeout_ms(10) >= 10_099  # 100 ms units past 10 s (seen in CI: 10099)
    assert max_wire_timeout_ms(10) <= 10_200  # ...and still says "the caller's 10 s"
    assert max_wire_timeout_ms(300) <= 301_000


@pytest.mark.parametrize("timeout_s", [0.2, 0.3, 1.0, 2.5, 10.0, 30.0])
async def test_a_real_server_never_sees_more_than_the_bound(timeout_s: float) -> None:
    """A bare grpc.aio server reports the time remaining of calls made with `timeout_s`."""
    seen: list[float] = []

    async def handler(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        seen.append(context.time_remaining() * 1000)
        return b""

    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "t.T", {"M": grpc.unary_unary_rpc_method_handler(handler)}
            ),
        )
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_unary("/t.T/M")
            for _ in range(20):
                await call(b"", timeout=timeout_s)
    finally:
        await server.stop(None)
    assert len(seen) == 20
    assert 0 < max(seen) <= max_wire_timeout_ms(timeout_s), max(seen)
