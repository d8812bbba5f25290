"""The stage interface: one concern of the request pipeline, bound once per method.

server/request/pipeline.py builds one grpc handler per AgentService method at start-up.
For each method it asks every stage, in the order of server/chain.py, `bind(method)`: None when
the concern does not apply to that method, else a Bound whose hooks the handler calls:

  await bound.enter(call, request, context)   on the way in, in order; raise a
                                              ProxyError to refuse the call (the
                                              pipeline shapes it). Awaitable because the
                                              limits store may be remote.
  bound.exit(call)                            optional (None when not needed): run
                                              exactly once when the call ends (unary
                                              return, stream end, error, cancellation),
                                              innermost first, only for the stages whose
                                              enter succeeded. call.code / call.reason
                                              then hold the final status.

Everything per method (label children, validators, limits, scopes) is resolved in bind;
enter and exit do only per-call work. Stages depend on core/ only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final, Protocol

from aiproxy.core.callinfo import CallInfo
from aiproxy.core.service import Method
from aiproxy.core.types import Context

Exit = Callable[[CallInfo], None]


class Bound(Protocol):
    """A stage's hooks for one method."""

    # Read-only here, so a stage may declare it as a plain `exit = None` or a bound method.
    @property
    def exit(self) -> Exit | None: ...

    async def enter(self, call: CallInfo, request: Any, context: Context) -> None: ...


class Stage(Protocol):
    """One concern of the pipeline (see the module docstring)."""

    def bind(self, method: Method) -> Bound | None: ...


class Decode:
    """Where the request is decoded in a pipeline's order: a marker, not a stage.

    Stages before it see the raw request bytes (refusing costs no parse); stages after it
    see the message. A failure to decode is INVALID_ARGUMENT MALFORMED_REQUEST, in one
    place (the pipeline)."""

    def __repr__(self) -> str:
        return "DECODE"


DECODE: Final = Decode()

# One step of a pipeline's order: a stage, or the place of decoding.
Step = Stage | Decode
