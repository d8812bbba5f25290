"""A deployment's own upstream interceptor, for tests: adds `x-deployment: tagged` to every
call the proxy sends upstream (all four call shapes), and counts them."""

from __future__ import annotations

from typing import Any

import grpc


def _tagged(details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
    metadata = grpc.aio.Metadata(*(details.metadata or ()))
    metadata.add("x-deployment", "tagged")
    return grpc.aio.ClientCallDetails(
        details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
    )


# One object per call shape: grpc.aio files an interceptor under the first shape its type
# implements (server/extensions.py).
class TagUnary(grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(_tagged(details), request)


class TagStream(grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(_tagged(details), request)


def make_tagger() -> list[grpc.aio.ClientInterceptor]:
    """A factory, one of the forms `upstream.extra_interceptors` accepts."""
    return [TagUnary(), TagStream()]


NOT_AN_INTERCEPTOR = 42
