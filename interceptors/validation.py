"""Stage: reject malformed AgentService requests before they cost anything.

Every violation in a request is reported at once, as INVALID_ARGUMENT with a
google.rpc.BadRequest listing each field path ("messages[2].role") and what is wrong,
so a caller fixes everything in one round trip.

Why hand-written rules and not protovalidate annotations in the proto: protovalidate
for Python 1.x evaluates its CEL rules with cel-python, an interpreter in pure Python
that costs far more per message than the proxy's whole CPU budget per call (300 us),
and 2.x brings its own protobuf runtime instead of google.protobuf's messages; both need
`buf/validate/validate.proto` from the Buf Schema Registry, which CI cannot reach. The
rules are few and stable; they live here, one small function per request kind, with
their limits in ValidationSettings.

The agent validates too (it is a service of its own); these checks exist so that a bad
request never takes a rate-limit slot upstream, an upstream connection or a retry.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from google.protobuf.descriptor import EnumDescriptor, ServiceDescriptor

from aiproxy.ai.agent.v1 import agent_service_pb2 as pb
from aiproxy.core.callinfo import CallInfo
from aiproxy.core.contract import TEMPERATURE, TOP_P
from aiproxy.core.errors import FieldViolation, InvalidArgument
from aiproxy.core.service import Method
from aiproxy.core.settings import ValidationSettings
from aiproxy.core.types import Context

Violations = list[FieldViolation]
Validator = Callable[[Any], Violations]

_ROLES = frozenset({pb.CHAT_ROLE_SYSTEM, pb.CHAT_ROLE_USER, pb.CHAT_ROLE_ASSISTANT})
_AGENT_TYPES = frozenset(
    {pb.AGENT_TYPE_CREATIVE, pb.AGENT_TYPE_ANALYSIS, pb.AGENT_TYPE_REVIEW, pb.AGENT_TYPE_ASSISTANT}
)


def _names(enum: EnumDescriptor, values: Iterable[int]) -> str:
    names = [enum.values_by_number[v].name for v in sorted(values)]
    return ", ".join(names[:-1]) + " or " + names[-1]


_ROLE_NAMES = _names(pb.ChatRole.DESCRIPTOR, _ROLES)
_AGENT_TYPE_NAMES = _names(pb.AgentType.DESCRIPTOR, _AGENT_TYPES)


class RequestRules:
    """The checks for each kind of request, with their limits from configuration."""

    def __init__(self, limits: ValidationSettings) -> None:
        self.limits = limits
        # Request message full name -> validator. Streaming and unary twins share one.
        self.by_message: dict[str, Validator] = {
            pb.GenerateRequest.DESCRIPTOR.full_name: self.generate,
            pb.StreamGenerateRequest.DESCRIPTOR.full_name: self.generate,
            pb.ChatRequest.DESCRIPTOR.full_name: self.chat,
            pb.StreamChatRequest.DESCRIPTOR.full_name: self.chat,
            pb.SearchRagRequest.DESCRIPTOR.full_name: self.rag_search,
            pb.StreamRagGenerateRequest.DESCRIPTOR.full_name: self.rag_generate,
            pb.ExecuteAgentRequest.DESCRIPTOR.full_name: self.agent,
            pb.StreamExecuteAgentRequest.DESCRIPTOR.full_name: self.agent,
            pb.BatchGenerateRequest.DESCRIPTOR.full_name: self.batch,
            pb.CreateSessionRequest.DESCRIPTOR.full_name: self.create_session,
            pb.GetSessionRequest.DESCRIPTOR.full_name: self.session,
            pb.DeleteSessionRequest.DESCRIPTOR.full_name: self.session,
        }

    def for_service(self, service: ServiceDescriptor) -> dict[str, Validator]:
        """Method path -> validator; every method must have one (a new RPC without rules
        fails at start-up, not in production)."""
        out: dict[str, Validator] = {}
        for method in service.methods:
            validator = self.by_message.get(method.input_type.full_name)
            if validator is None:
                raise ValueError(f"no validation rules for {method.input_type.full_name}")
            out[f"/{service.full_name}/{method.name}"] = validator
        return out

    # -- shared pieces --------------------------------------------------------------

    def _text(
        self, out: Violations, field: str, value: str, *, required: bool, max_chars: int
    ) -> None:
        if required and not value.strip():
            out.append(FieldViolation(field, "must not be empty"))
        elif len(value) > max_chars:
            out.append(
                FieldViolation(field, f"must be at most {max_chars} characters, got {len(value)}")
            )

    def _id(self, out: Violations, field: str, value: str) -> None:
        max_chars = self.limits.max_id_chars
        if len(value) > max_chars:
            out.append(FieldViolation(field, f"must be at most {max_chars} characters"))
        elif value and not value.isprintable():
            out.append(FieldViolation(field, "must be printable text"))

    def _options(self, out: Violations, request: Any) -> None:
        if not request.HasField("options"):
            return
        o = request.options
        # Outside a contract Range is also true for NaN (core/contract.py).
        if o.temperature not in TEMPERATURE:
            out.append(FieldViolation("options.temperature", TEMPERATURE.violation))
        if o.top_p not in TOP_P:
            out.append(FieldViolation("options.top_p", TOP_P.violation))
        if not 0 <= o.max_tokens <= self.limits.max_tokens:
            out.append(
                FieldViolation(
                    "options.max_tokens", f"must be between 0 and {self.limits.max_tokens}"
                )
            )
        if len(o.stop) > self.limits.max_stop_sequences:
            out.append(
                FieldViolation(
                    "options.stop", f"at most {self.limits.max_stop_sequences} stop sequences"
                )
            )
        for i, stop in enumerate(o.stop):
            self._text(
                out, f"options.stop[{i}]", stop, required=True, max_chars=self.limits.max_id_chars
            )

    def _retrieval(self, out: Violations, request: Any) -> None:
        self._text(
            out, "query", request.query, required=True, max_chars=self.limits.max_prompt_chars
        )
        if not 0 <= request.top_k <= self.limits.max_top_k:
            out.append(FieldViolation("top_k", f"must be between 0 and {self.limits.max_top_k}"))
        if len(request.filters) > self.limits.max_filters:
            out.append(FieldViolation("filters", f"at most {self.limits.max_filters} filters"))
        for key, value in request.filters.items():
            self._id(out, f"filters[{key[:32]!r}]", key)
            self._id(out, f"filters[{key[:32]!r}]", value)

    # -- one validator per kind of request --------------------------------------------

    def generate(self, request: Any) -> Violations:
        out: Violations = []
        self._text(
            out, "prompt", request.prompt, required=True, max_chars=self.limits.max_prompt_chars
        )
        self._id(out, "model", request.model)
        self._options(out, request)
        return out

    def chat(self, request: Any) -> Violations:
        limits = self.limits
        out: Violations = []
        self._id(out, "session_id", request.session_id)
        if not request.messages and not request.user_message.strip():
            out.append(
                FieldViolation(
                    "messages", "the conversation is empty: send messages or user_message"
                )
            )
        if len(request.messages) > limits.max_messages:
            out.append(FieldViolation("messages", f"at most {limits.max_messages} messages"))
        total = len(request.user_message)
        for i, message in enumerate(request.messages[: limits.max_messages]):
            if message.role not in _ROLES:
                out.append(FieldViolation(f"messages[{i}].role", f"must be {_ROLE_NAMES}"))
            self._text(
                out,
                f"messages[{i}].content",
                message.content,
                required=True,
                max_chars=limits.max_message_chars,
            )
            total += len(message.content)
        self._text(
            out,
            "user_message",
            request.user_message,
            required=False,
            max_chars=limits.max_message_chars,
        )
        if total > limits.max_total_chars:
            out.append(
                FieldViolation(
                    "messages",
                    f"the conversation must be at most {limits.max_total_chars} characters",
                )
            )
        self._id(out, "model", request.model)
        self._options(out, request)
        return out

    def rag_search(self, request: Any) -> Violations:
        out: Violations = []
        self._retrieval(out, request)
        return out

    def rag_generate(self, request: Any) -> Violations:
        out: Violations = []
        self._retrieval(out, request)
        self._id(out, "model", request.model)
        self._options(out, request)
        return out

    def agent(self, request: Any) -> Violations:
        limits = self.limits
        out: Violations = []
        if request.agent_type not in _AGENT_TYPES:
            out.append(FieldViolation("agent_type", f"must be {_AGENT_TYPE_NAMES}"))
        self._text(out, "task", request.task, required=True, max_chars=limits.max_prompt_chars)
        if request.HasField("context") and request.context.ByteSize() > limits.max_context_bytes:
            out.append(
                FieldViolation(
                    "context", f"must be at most {limits.max_context_bytes} bytes serialized"
                )
            )
        if len(request.tools) > limits.max_tools:
            out.append(FieldViolation("tools", f"at most {limits.max_tools} tools per run"))
        for i, tool in enumerate(request.tools[: limits.max_tools]):
            self._text(out, f"tools[{i}]", tool, required=True, max_chars=limits.max_id_chars)
        if not 0 <= request.max_steps <= limits.max_steps:
            out.append(FieldViolation("max_steps", f"must be between 0 and {limits.max_steps}"))
        self._id(out, "model", request.model)
        return out

    def batch(self, request: Any) -> Violations:
        limits = self.limits
        out: Violations = []
        if not request.prompts:
            out.append(FieldViolation("prompts", "must hold at least one prompt"))
        elif len(request.prompts) > limits.max_batch_prompts:
            out.append(
                FieldViolation("prompts", f"at most {limits.max_batch_prompts} prompts per batch")
            )
        total = 0
        for i, prompt in enumerate(request.prompts[: limits.max_batch_prompts]):
            # An empty prompt is that item's own failure (the batch reports it per item).
            self._text(
                out, f"prompts[{i}]", prompt, required=False, max_chars=limits.max_prompt_chars
            )
            total += len(prompt)
        if total > limits.max_total_chars:
            out.append(
                FieldViolation(
                    "prompts",
                    f"the prompts must be at most {limits.max_total_chars} characters together",
                )
            )
        self._id(out, "model", request.model)
        self._options(out, request)
        return out

    def create_session(self, request: Any) -> Violations:
        return []  # nothing to check: the agent mints the id

    def session(self, request: Any) -> Violations:
        out: Violations = []
        if not request.session_id:
            out.append(FieldViolation("session_id", "must not be empty"))
        self._id(out, "session_id", request.session_id)
        return out


def invalid_request(violations: Violations) -> InvalidArgument:
    first = violations[0]
    more = f" (and {len(violations) - 1} more)" if len(violations) > 1 else ""
    return InvalidArgument(
        f"invalid request: {first.field} {first.description}{more}", field_violations=violations
    )


class _Bound:
    __slots__ = ("_validator",)
    exit = None

    def __init__(self, validator: Validator) -> None:
        self._validator = validator

    async def enter(self, call: CallInfo, request: Any, context: Context) -> None:
        violations = self._validator(request)
        if violations:
            raise invalid_request(violations)


class Validation:
    """Stage: each method's validator, chosen once (`validators`: method path -> rules,
    from RequestRules.for_service)."""

    def __init__(self, validators: dict[str, Validator]) -> None:
        self._validators = validators

    def bind(self, method: Method) -> _Bound | None:
        validator = self._validators.get(method.path)
        return None if validator is None else _Bound(validator)
