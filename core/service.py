"""The service model: AgentService's name, descriptor and methods, built once.

Every layer that needs to know what a method is (its path, whether it streams, its
request and chunk classes, which deadline class it falls in) reads it here instead of
walking the descriptor again: the pipeline builds its handlers from it at start-up,
the deadline, limits and auth settings validate method names against it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Final, Literal

from google.protobuf import descriptor as _descriptor
from google.protobuf import message_factory

SERVICE_NAME: Final = "ai.agent.v1.AgentService"

# Agent runs are what is long, streamed or not (5 min by default, against 30 s / 2 min).
AGENT_METHODS: Final = frozenset({"ExecuteAgent", "StreamExecuteAgent"})

# Methods that read or change a conversation the agent remembers (ChatRequest.session_id
# and the session API): the forwarder tells the agent whose it is (core/sessions.py),
# and the response cache never answers them (their answer depends on stored state).
SESSION_METHODS: Final = frozenset(
    {"Chat", "StreamChat", "CreateSession", "GetSession", "DeleteSession"}
)

DeadlineClass = Literal["unary", "stream", "agent"]


@dataclass(frozen=True, slots=True)
class Method:
    """One AgentService method, as every layer needs it."""

    name: str
    path: str  # "/ai.agent.v1.AgentService/Generate": grpc's method path
    streaming: bool  # server streaming (the API has no client-streaming methods)
    request_cls: Any  # the generated message classes
    response_cls: Any
    deadline_class: DeadlineClass
    sessions: bool = False  # in SESSION_METHODS


class Service:
    """The service and its methods, with a look-up by name."""

    __slots__ = ("by_name", "descriptor", "methods", "name")

    def __init__(
        self, name: str, descriptor: _descriptor.ServiceDescriptor, methods: tuple[Method, ...]
    ) -> None:
        self.name = name
        self.descriptor = descriptor
        self.methods = methods
        self.by_name: dict[str, Method] = {m.name: m for m in methods}

    @property
    def paths(self) -> tuple[str, ...]:
        return tuple(m.path for m in self.methods)


def _deadline_class(method: _descriptor.MethodDescriptor) -> DeadlineClass:
    if method.name in AGENT_METHODS:
        return "agent"
    return "stream" if method.server_streaming else "unary"


@functools.cache
def agent_service() -> Service:
    """The model of AgentService (built on first use, then shared)."""
    from aiproxy.ai.agent.v1 import (
        agent_service_pb2,  # generated stubs: settings import this module without them
    )

    descriptor = agent_service_pb2.DESCRIPTOR.services_by_name["AgentService"]
    assert descriptor.full_name == SERVICE_NAME
    methods = tuple(
        Method(
            name=m.name,
            path=f"/{SERVICE_NAME}/{m.name}",
            streaming=m.server_streaming,
            request_cls=message_factory.GetMessageClass(m.input_type),
            response_cls=message_factory.GetMessageClass(m.output_type),
            deadline_class=_deadline_class(m),
            sessions=m.name in SESSION_METHODS,
        )
        for m in descriptor.methods
    )
    return Service(SERVICE_NAME, descriptor, methods)
