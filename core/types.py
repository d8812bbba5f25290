"""The types the layers share, defined once (Starlette's `starlette/types.py` is the model).

- `Clock`: what every stateful piece takes to read the time (`time.monotonic` in
  production, a fake in tests): token buckets, the breaker, caches, stream buffers,
  deadlines, the stream pump.
- `Context`: the grpc.aio servicer context as the request path passes it along.
- `Metadata`: gRPC metadata as (key, value) pairs; values of `-bin` keys are bytes.
- `UnaryCall` / `StreamCall`: a method's terminal, what the pipeline hands an admitted
  call to (the forwarder, and the wrappers in front of it: the cache, resumable
  streams). It takes the decoded request, the caller's bytes as they came (they go
  upstream unmodified), the servicer context and the call's CallInfo. A stream's is an
  async generator: the pipeline closes it (`aclose`) when the call ends, however it ends.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from typing import Any, TypeAlias

import grpc

from aiproxy.core.callinfo import CallInfo

Clock: TypeAlias = Callable[[], float]

Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]

Metadata: TypeAlias = Sequence[tuple[str, str | bytes]]

UnaryCall: TypeAlias = Callable[[Any, bytes, Context, CallInfo], Awaitable[Any]]
StreamCall: TypeAlias = Callable[[Any, bytes, Context, CallInfo], AsyncGenerator[Any, None]]
