"""The ai.agent.v1.AgentService handlers: validate, answer deterministically, pace.

Each handler builds its whole answer first (generation is pure and cheap), then paces
it out: unary calls wait the total time once, streams wait before each chunk. Logging,
fault injection and turning InvalidArgument into a status live in agent.interceptor.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Iterator
from typing import Any, TypeVar

from google.protobuf import json_format, struct_pb2
from google.protobuf.message import Message
from google.rpc import code_pb2, error_details_pb2, status_pb2

from aiproxy.agent import faults, textgen
from aiproxy.agent.agents import (
    AgentKind,
    AgentRun,
    RunStatus,
    Step,
    ToolCallRecord,
    run_agent,
)
from aiproxy.agent.errors import InvalidArgument, rpc_status_proto
from aiproxy.agent.pacing import Pacer
from aiproxy.agent.rag import DEFAULT_TOP_K, MAX_TOP_K, Corpus, Hit
from aiproxy.agent.sessions import Conversations, Turn
from aiproxy.agent.settings import AgentSettings
from aiproxy.agent.tools import Tool
from aiproxy.ai.agent.v1 import agent_service_pb2 as pb
from aiproxy.ai.agent.v1 import agent_service_pb2_grpc as pb_grpc
from aiproxy.core.contract import MAX_ID_CHARS, MAX_STOP_SEQUENCES, MAX_TOOLS, TEMPERATURE, TOP_P

Chunk = TypeVar("Chunk", bound=Message)

_ROLE_NAMES = {
    pb.CHAT_ROLE_SYSTEM: "system",
    pb.CHAT_ROLE_USER: "user",
    pb.CHAT_ROLE_ASSISTANT: "assistant",
}
_AGENT_KINDS = frozenset(kind.value for kind in AgentKind)
_AGENT_STATUS = {
    RunStatus.COMPLETED: pb.AGENT_STATUS_COMPLETED,
    RunStatus.STEP_LIMIT: pb.AGENT_STATUS_STEP_LIMIT,
}


class AgentServicer(pb_grpc.AgentServiceServicer):
    def __init__(
        self,
        settings: AgentSettings,
        corpus: Corpus,
        conversations: Conversations,
        tools: dict[str, Tool],
    ) -> None:
        self.settings = settings
        self.corpus = corpus
        self.conversations = conversations
        self.tools = tools

    # --- generation ---------------------------------------------------------------

    async def Generate(self, request: pb.GenerateRequest, context: Any) -> pb.GenerateResponse:
        model, completion = self._generate(request.prompt, request.model, request.options)
        await self._pacer().wait(completion.completion_tokens)
        return pb.GenerateResponse(
            text=completion.text,
            model=model,
            usage=_usage(completion),
            finish_reason=_finish(completion),
        )

    async def StreamGenerate(
        self, request: pb.StreamGenerateRequest, context: Any
    ) -> AsyncIterator[pb.StreamGenerateResponse]:
        model, completion = self._generate(request.prompt, request.model, request.options)
        events = _text_events(pb.StreamGenerateResponse, completion, first={"model": model})
        async for chunk in _paced(events, self._pacer()):
            yield chunk

    async def BatchGenerate(
        self, request: pb.BatchGenerateRequest, context: Any
    ) -> pb.BatchGenerateResponse:
        if not request.prompts:
            raise InvalidArgument("prompts", "must hold at least one prompt")
        if len(request.prompts) > self.settings.max_batch_size:
            raise InvalidArgument(
                "prompts",
                f"at most {self.settings.max_batch_size} prompts per batch, "
                f"got {len(request.prompts)}",
            )
        model = request.model or self.settings.model
        options = _checked_options(request.options)
        spec = faults.current()
        response = pb.BatchGenerateResponse(model=model)
        longest = 0
        for index, prompt in enumerate(request.prompts):
            result = response.results.add(index=index)
            error = _batch_item_error(index, prompt, spec)
            if error is not None:
                result.error.CopyFrom(error)
                result.finish_reason = pb.FINISH_REASON_ERROR
                continue
            completion = self._complete(prompt, model, options)
            result.text = completion.text
            result.usage.CopyFrom(_usage(completion))
            result.finish_reason = _finish(completion)
            _add_usage(response.usage, result.usage)
            longest = max(longest, completion.completion_tokens)
        response.failed = sum(1 for r in response.results if r.HasField("error"))
        response.succeeded = len(response.results) - response.failed
        # A batch is generated in parallel: it takes as long as its longest answer.
        await self._pacer().wait(longest)
        return response

    # --- chat ---------------------------------------------------------------------
    #
    # A turn reads its session when it starts and remembers its message(s) and answer in
    # one append when the answer is complete (agent/sessions.py: order, scope, bounds);
    # a turn cancelled or failed before that leaves no trace. A stream remembers before
    # its final chunk: if the store fails then, the stream ends with that error instead.

    async def Chat(self, request: pb.ChatRequest, context: Any) -> pb.ChatResponse:
        turn = await self._turn(request, context)
        model, completion = self._chat_completion(request, turn)
        await self._pacer(self._prefill(turn, completion)).wait(completion.completion_tokens)
        await self._remember(turn, completion)
        return pb.ChatResponse(
            session_id=turn.session_id,
            message=pb.ChatMessage(role=pb.CHAT_ROLE_ASSISTANT, content=completion.text),
            model=model,
            usage=_usage(completion),
            finish_reason=_finish(completion),
        )

    async def StreamChat(
        self, request: pb.StreamChatRequest, context: Any
    ) -> AsyncIterator[pb.StreamChatResponse]:
        turn = await self._turn(request, context)
        model, completion = self._chat_completion(request, turn)
        events = _text_events(
            pb.StreamChatResponse, completion, first={"model": model, "session_id": turn.session_id}
        )
        async for chunk in _paced(events, self._pacer(self._prefill(turn, completion))):
            if chunk.is_final:
                await self._remember(turn, completion)
            yield chunk

    def _chat_completion(
        self, request: pb.ChatRequest | pb.StreamChatRequest, turn: Turn
    ) -> tuple[str, textgen.Completion]:
        history = turn.history
        prompt = "\n".join(
            f"{_ROLE_NAMES.get(role, 'user')}: {content}" for role, content in history
        )
        latest = next((c for r, c in reversed(history) if r == pb.CHAT_ROLE_USER), history[-1][1])
        return self._generate(prompt, request.model, request.options, topic_text=latest)

    async def _turn(self, request: pb.ChatRequest | pb.StreamChatRequest, context: Any) -> Turn:
        """Validate a chat request, then read the conversation it continues."""
        _check_session_id(request.session_id, required=False)
        for i, message in enumerate(request.messages):
            if message.role not in _ROLE_NAMES:
                raise InvalidArgument(
                    f"messages[{i}].role",
                    "must be CHAT_ROLE_SYSTEM, CHAT_ROLE_USER or CHAT_ROLE_ASSISTANT",
                )
        if not request.messages and not request.user_message:
            raise InvalidArgument(
                "messages", "the conversation is empty: send messages or user_message"
            )
        # Messages sent with the request are the conversation so far and replace what the
        # session remembers (so a repeated request gets the same answer); user_message
        # alone continues the remembered conversation (the GET binding's only input).
        turn = await self.conversations.begin(
            context.invocation_metadata(),
            request.session_id,
            [(m.role, m.content) for m in request.messages],
            request.user_message,
            pb.CHAT_ROLE_USER,
        )
        if not turn.history:  # unreachable after the checks above; kept for the types
            raise InvalidArgument("messages", "the conversation is empty")
        return turn

    def _prefill(self, turn: Turn, completion: textgen.Completion) -> float:
        """The modelled prefill (ms) of a turn: its prompt tokens not cached on this
        replica (sessions.PrefixCache), which then holds the prompt."""
        per_token = self.settings.prefill_ms_per_token
        cache = self.conversations.prefix_cache
        uncached = cache.uncached(turn.key, completion.prompt_tokens)
        cache.remember(turn.key, completion.prompt_tokens)
        return uncached * per_token

    async def _remember(self, turn: Turn, completion: textgen.Completion) -> None:
        await self.conversations.finish(turn, (pb.CHAT_ROLE_ASSISTANT, completion.text))
        self.conversations.prefix_cache.remember(
            turn.key, completion.prompt_tokens + completion.completion_tokens
        )

    # --- sessions -------------------------------------------------------------------

    async def CreateSession(
        self, request: pb.CreateSessionRequest, context: Any
    ) -> pb.CreateSessionResponse:
        session_id = await self.conversations.create(context.invocation_metadata())
        return pb.CreateSessionResponse(session_id=session_id)

    async def GetSession(
        self, request: pb.GetSessionRequest, context: Any
    ) -> pb.GetSessionResponse:
        _check_session_id(request.session_id, required=True)
        messages = await self.conversations.get(context.invocation_metadata(), request.session_id)
        return pb.GetSessionResponse(
            session_id=request.session_id,
            messages=[pb.ChatMessage(role=role, content=content) for role, content in messages],
        )

    async def DeleteSession(
        self, request: pb.DeleteSessionRequest, context: Any
    ) -> pb.DeleteSessionResponse:
        _check_session_id(request.session_id, required=True)
        await self.conversations.delete(context.invocation_metadata(), request.session_id)
        return pb.DeleteSessionResponse()

    # --- retrieval ------------------------------------------------------------------

    async def SearchRag(self, request: pb.SearchRagRequest, context: Any) -> pb.SearchRagResponse:
        hits = self._search(request)
        await self._pacer().wait(1)  # a lookup costs about one token's latency
        return pb.SearchRagResponse(sources=[_source(h) for h in hits])

    async def StreamRagGenerate(
        self, request: pb.StreamRagGenerateRequest, context: Any
    ) -> AsyncIterator[pb.StreamRagGenerateResponse]:
        hits = self._search(request)
        model = request.model or self.settings.model
        options = _checked_options(request.options)
        completion = _grounded_answer(request.query, hits, model, options)
        first = {"model": model, "sources": [_source(h) for h in hits]}
        async for chunk in _paced(
            _text_events(pb.StreamRagGenerateResponse, completion, first=first), self._pacer()
        ):
            yield chunk

    def _search(self, request: pb.SearchRagRequest | pb.StreamRagGenerateRequest) -> list[Hit]:
        if not request.query.strip():
            raise InvalidArgument("query", "must not be empty")
        if request.top_k < 0:
            raise InvalidArgument("top_k", "must not be negative")
        top_k = min(request.top_k or DEFAULT_TOP_K, MAX_TOP_K)
        return self.corpus.search(request.query, top_k=top_k, filters=dict(request.filters))

    # --- agents -----------------------------------------------------------------------

    async def ExecuteAgent(
        self, request: pb.ExecuteAgentRequest, context: Any
    ) -> pb.ExecuteAgentResponse:
        model, run = self._run_agent(request)
        pacer = self._pacer()
        await pacer.wait(_agent_tokens(run))
        return pb.ExecuteAgentResponse(
            result=run.result.text,
            tool_calls=[_tool_call(c, pacer) for c in run.tool_calls],
            status=_AGENT_STATUS[run.status],
            reasoning_steps=[_step(s) for s in run.steps],
            usage=_agent_usage(run),
            model=model,
        )

    async def StreamExecuteAgent(
        self, request: pb.StreamExecuteAgentRequest, context: Any
    ) -> AsyncIterator[pb.StreamExecuteAgentResponse]:
        model, run = self._run_agent(request)
        pacer = self._pacer()
        async for chunk in _paced(_agent_events(run, model, pacer), pacer):
            yield chunk

    def _run_agent(
        self, request: pb.ExecuteAgentRequest | pb.StreamExecuteAgentRequest
    ) -> tuple[str, AgentRun]:
        if request.agent_type not in _AGENT_KINDS:
            raise InvalidArgument(
                "agent_type",
                "must be AGENT_TYPE_CREATIVE, AGENT_TYPE_ANALYSIS, AGENT_TYPE_REVIEW "
                "or AGENT_TYPE_ASSISTANT",
            )
        if not request.task.strip():
            raise InvalidArgument("task", "must not be empty")
        if request.max_steps < 0:
            raise InvalidArgument("max_steps", "must not be negative")
        if len(request.tools) > MAX_TOOLS:
            raise InvalidArgument("tools", f"at most {MAX_TOOLS} tools per run")
        for i, name in enumerate(request.tools):
            if name not in self.tools:
                raise InvalidArgument(
                    f"tools[{i}]",
                    f"unknown tool {name!r}; available: {', '.join(sorted(self.tools))}",
                )
        model = request.model or self.settings.model
        context = json_format.MessageToDict(request.context) if request.HasField("context") else {}
        run = run_agent(
            AgentKind(request.agent_type),
            request.task,
            context,
            list(request.tools),
            self.tools,
            model=model,
            max_steps=request.max_steps,
        )
        return model, run

    # --- shared ---------------------------------------------------------------------

    def _pacer(self, prefill_ms: float = 0.0) -> Pacer:
        slow = faults.current().slow_ms
        return Pacer(
            self.settings.first_token_delay_ms + prefill_ms,
            self.settings.token_delay_ms if slow is None else slow,
        )

    def _generate(
        self,
        prompt: str,
        requested_model: str,
        options: pb.GenerationOptions,
        topic_text: str | None = None,
    ) -> tuple[str, textgen.Completion]:
        if not prompt.strip():
            raise InvalidArgument("prompt", "must not be empty")
        model = requested_model or self.settings.model
        return model, self._complete(prompt, model, _checked_options(options), topic_text)

    @staticmethod
    def _complete(
        prompt: str, model: str, options: pb.GenerationOptions, topic_text: str | None = None
    ) -> textgen.Completion:
        return textgen.complete(
            prompt,
            model=model,
            temperature=options.temperature,
            top_p=options.top_p,
            max_tokens=options.max_tokens,
            stop=list(options.stop),
            topic_text=topic_text,
        )


# --- validation ---------------------------------------------------------------------


def _check_session_id(session_id: str, *, required: bool) -> None:
    if required and not session_id:
        raise InvalidArgument("session_id", "must not be empty")
    if len(session_id) > MAX_ID_CHARS:
        raise InvalidArgument("session_id", f"must be at most {MAX_ID_CHARS} characters")
    if session_id and not session_id.isprintable():
        raise InvalidArgument("session_id", "must be printable text")


def _checked_options(options: pb.GenerationOptions) -> pb.GenerationOptions:
    # The contract's ranges (core/contract.py, shared with the proxy); NaN is outside.
    if options.temperature not in TEMPERATURE:
        raise InvalidArgument("options.temperature", TEMPERATURE.violation)
    if options.top_p not in TOP_P:
        raise InvalidArgument("options.top_p", TOP_P.violation)
    if options.max_tokens < 0:
        raise InvalidArgument("options.max_tokens", "must not be negative")
    if len(options.stop) > MAX_STOP_SEQUENCES:
        raise InvalidArgument("options.stop", f"at most {MAX_STOP_SEQUENCES} stop sequences")
    return options


def _batch_item_error(index: int, prompt: str, spec: faults.FaultSpec) -> status_pb2.Status | None:
    """Why one prompt of a batch fails, or None: the batch itself still succeeds."""
    if not prompt.strip():
        field, description = f"prompts[{index}]", "must not be empty"
        violation = error_details_pb2.BadRequest.FieldViolation(
            field=field, description=description
        )
        return rpc_status_proto(
            code_pb2.INVALID_ARGUMENT,
            f"{field}: {description}",
            error_details_pb2.BadRequest(field_violations=[violation]),
        )
    fault = spec.roll_item()
    if fault is not None:
        return rpc_status_proto(fault.value[0], f"injected fault: {fault.name}")
    return None


# --- streams ------------------------------------------------------------------------


async def _paced(events: Iterable[tuple[Chunk, int]], pacer: Pacer) -> AsyncIterator[Chunk]:
    """Number the chunks from 0 and release each when its tokens are due."""
    for seq, (chunk, tokens) in enumerate(events):
        await pacer.wait(tokens)
        chunk.seq = seq  # type: ignore[attr-defined]
        yield chunk


def _text_events(
    cls: type[Chunk], completion: textgen.Completion, first: dict[str, Any]
) -> Iterator[tuple[Chunk, int]]:
    """One chunk per token (the first with `first` fields), then a final chunk with usage."""
    final = {"is_final": True, "usage": _usage(completion), "finish_reason": _finish(completion)}
    if not completion.pieces:
        yield cls(**first, **final), 0
        return
    for i, piece in enumerate(completion.pieces):
        yield cls(delta=piece, **(first if i == 0 else {})), 1
    yield cls(**final), 0


def _agent_events(
    run: AgentRun, model: str, pacer: Pacer
) -> Iterator[tuple[pb.StreamExecuteAgentResponse, int]]:
    """Each step, each tool call, then the result token by token, then the outcome."""
    first: dict[str, Any] = {"model": model}
    for step in run.steps:
        yield pb.StreamExecuteAgentResponse(step=_step(step), **first), step.tokens
        first = {}
        if step.tool_call is not None:
            yield (
                pb.StreamExecuteAgentResponse(tool_call=_tool_call(step.tool_call, pacer)),
                step.tool_call.cost_tokens,
            )
    for piece in run.result.pieces:
        yield pb.StreamExecuteAgentResponse(delta=piece, **first), 1
        first = {}
    yield (
        pb.StreamExecuteAgentResponse(
            is_final=True,
            usage=_agent_usage(run),
            finish_reason=_agent_finish(run),
            status=_AGENT_STATUS[run.status],
            **first,
        ),
        0,
    )


# --- message building ---------------------------------------------------------------


def _usage(completion: textgen.Completion) -> pb.Usage:
    return pb.Usage(
        prompt_tokens=completion.prompt_tokens,
        completion_tokens=completion.completion_tokens,
        total_tokens=completion.prompt_tokens + completion.completion_tokens,
    )


def _add_usage(total: pb.Usage, item: pb.Usage) -> None:
    total.prompt_tokens += item.prompt_tokens
    total.completion_tokens += item.completion_tokens
    total.total_tokens += item.total_tokens


def _finish(completion: textgen.Completion) -> int:
    return pb.FINISH_REASON_LENGTH if completion.truncated else pb.FINISH_REASON_STOP


def _source(hit: Hit) -> pb.RagSource:
    doc = hit.document
    return pb.RagSource(
        id=doc.id,
        title=doc.title,
        snippet=hit.snippet,
        score=hit.score,
        metadata=dict(doc.metadata),
    )


def _grounded_answer(
    query: str, hits: list[Hit], model: str, options: pb.GenerationOptions
) -> textgen.Completion:
    """Quote the best sentence of each source with its citation, then sum up."""
    rng = textgen.rng_for(
        model, textgen.sampling_key(options.temperature, options.top_p), "rag", query
    )
    if hits:
        plural = "s" if len(hits) > 1 else ""
        quotes = [f"{hit.snippet} [{i}]" for i, hit in enumerate(hits, start=1)]
        lead = f"Based on {len(hits)} source{plural}: {' '.join(quotes)}"
    else:
        lead = "The knowledge base has nothing on this, so the answer is not grounded."
    text = f"{lead} {textgen.compose(rng, textgen.keywords(query), target_tokens=10)}"
    # The model reads the query and the retrieved snippets.
    prompt_tokens = textgen.count_tokens(query) + sum(textgen.count_tokens(h.snippet) for h in hits)
    return textgen.shape(
        text, prompt_tokens=prompt_tokens, max_tokens=options.max_tokens, stop=list(options.stop)
    )


def _step(step: Step) -> pb.ReasoningStep:
    return pb.ReasoningStep(
        index=step.index,
        thought=step.thought,
        tool_call_id=step.tool_call.id if step.tool_call else "",
    )


def _tool_call(call: ToolCallRecord, pacer: Pacer) -> pb.ToolCall:
    message = pb.ToolCall(
        id=call.id,
        name=call.name,
        arguments=_struct(call.arguments),
        error=call.error,
        duration_ms=pacer.tool_ms(call.cost_tokens),
    )
    if call.result is not None:
        message.result.CopyFrom(_struct(call.result))
    return message


def _struct(values: dict[str, Any]) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    struct.update(values)
    return struct


def _agent_tokens(run: AgentRun) -> int:
    """Token-times of a whole run: thoughts, tool calls and result."""
    steps = sum(s.tokens + (s.tool_call.cost_tokens if s.tool_call else 0) for s in run.steps)
    return steps + len(run.result.pieces)


def _agent_usage(run: AgentRun) -> pb.Usage:
    return pb.Usage(
        prompt_tokens=run.prompt_tokens,
        completion_tokens=run.completion_tokens,
        total_tokens=run.prompt_tokens + run.completion_tokens,
    )


def _agent_finish(run: AgentRun) -> int:
    return pb.FINISH_REASON_STOP if run.status is RunStatus.COMPLETED else pb.FINISH_REASON_LENGTH
