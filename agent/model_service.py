"""AgentService answered by a real model (`--backend openai`): the same validation,
sessions and retrieval as the reference servicer, the text from agent.openai_backend.

Which method calls the model:
  Generate, StreamGenerate       one user message: the prompt
  Chat, StreamChat               the conversation, roles kept (system/user/assistant)
  StreamRagGenerate              a system message listing the retrieved sources as [n],
                                 then the query; the sources ride on the first chunk
  BatchGenerate                  one model call per prompt, at most batch_concurrency at
                                 once; a failed prompt is that item's error (its status),
                                 the batch itself succeeds
  SearchRag                      retrieval only, no model (as the reference)
  ExecuteAgent, StreamExecuteAgent  the reference agent loop (deterministic steps and tools):
                                 tool calling through the model is not part of this backend
Streams map the model's SSE chunks one to one: each chunk that carries text is one gRPC
chunk (the role-only and finish-only chunks carry none), then a final chunk with usage and
finish reason. Usage is the model's own `usage` (streams ask for it with
stream_options.include_usage); a server that reports none leaves the field unset.
The caller's remaining deadline bounds the model call (agent.openai_backend); a caller who
leaves cancels the handler, which closes the HTTP request to the model.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from aiproxy.agent import faults
from aiproxy.agent.errors import InvalidArgument
from aiproxy.agent.openai_backend import (
    FINISH_ERROR,
    FINISH_LENGTH,
    Delta,
    ModelClient,
    ModelError,
    Usage,
)
from aiproxy.agent.rag import Hit
from aiproxy.agent.service import (
    _ROLE_NAMES,
    AgentServicer,
    Chunk,
    _add_usage,
    _batch_item_error,
    _checked_options,
    _source,
)
from aiproxy.ai.agent.v1 import agent_service_pb2 as pb

_FINISH = {FINISH_LENGTH: pb.FINISH_REASON_LENGTH, FINISH_ERROR: pb.FINISH_REASON_ERROR}

RAG_INSTRUCTIONS = (
    "Answer the question using only the numbered sources below and cite them as [n]. "
    "If they do not contain the answer, say so."
)


class ModelAgentServicer(AgentServicer):
    def __init__(self, *args: Any, client: ModelClient, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.client = client

    # --- generation ---------------------------------------------------------------

    async def Generate(self, request: pb.GenerateRequest, context: Any) -> pb.GenerateResponse:
        model, options = self._prepare(request.prompt, request.model, request.options)
        completion = await self.client.complete(
            [{"role": "user", "content": request.prompt}],
            model=model,
            options=options,
            timeout_s=context.time_remaining(),
        )
        return pb.GenerateResponse(
            text=completion.text,
            model=model,
            usage=_usage(completion.usage),
            finish_reason=_finish(completion.finish),
        )

    async def StreamGenerate(
        self, request: pb.StreamGenerateRequest, context: Any
    ) -> AsyncIterator[pb.StreamGenerateResponse]:
        model, options = self._prepare(request.prompt, request.model, request.options)
        messages = [{"role": "user", "content": request.prompt}]
        async with contextlib.aclosing(
            self._stream(pb.StreamGenerateResponse, messages, model, options, context, {})
        ) as chunks:
            async for chunk in chunks:
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
        options = _model_options(_checked_options(request.options))
        spec = faults.current()
        response = pb.BatchGenerateResponse(model=model)
        results = [response.results.add(index=i) for i in range(len(request.prompts))]
        gate = asyncio.Semaphore(self.settings.batch_concurrency)

        async def one(index: int, prompt: str) -> None:
            result = results[index]
            error = _batch_item_error(index, prompt, spec)
            if error is not None:
                result.error.CopyFrom(error)
                result.finish_reason = pb.FINISH_REASON_ERROR
                return
            async with gate:
                try:
                    completion = await self.client.complete(
                        [{"role": "user", "content": prompt}],
                        model=model,
                        options=options,
                        timeout_s=context.time_remaining(),
                    )
                except ModelError as exc:
                    result.error.CopyFrom(exc.to_status())
                    result.finish_reason = pb.FINISH_REASON_ERROR
                    return
            result.text = completion.text
            if completion.usage is not None:
                result.usage.CopyFrom(_usage(completion.usage))
            result.finish_reason = _finish(completion.finish)

        # A caller who leaves cancels the group: every model request in flight is closed.
        async with asyncio.TaskGroup() as group:
            for index, prompt in enumerate(request.prompts):
                group.create_task(one(index, prompt))
        for result in results:
            if not result.HasField("error"):
                _add_usage(response.usage, result.usage)
        response.failed = sum(1 for r in results if r.HasField("error"))
        response.succeeded = len(results) - response.failed
        return response

    # --- chat ---------------------------------------------------------------------

    async def Chat(self, request: pb.ChatRequest, context: Any) -> pb.ChatResponse:
        turn = await self._turn(request, context)
        model = request.model or self.settings.model
        options = _model_options(_checked_options(request.options))
        completion = await self.client.complete(
            _chat_messages(turn.history),
            model=model,
            options=options,
            timeout_s=context.time_remaining(),
        )
        await self.conversations.finish(turn, (pb.CHAT_ROLE_ASSISTANT, completion.text))
        return pb.ChatResponse(
            session_id=turn.session_id,
            message=pb.ChatMessage(role=pb.CHAT_ROLE_ASSISTANT, content=completion.text),
            model=model,
            usage=_usage(completion.usage),
            finish_reason=_finish(completion.finish),
        )

    async def StreamChat(
        self, request: pb.StreamChatRequest, context: Any
    ) -> AsyncIterator[pb.StreamChatResponse]:
        turn = await self._turn(request, context)
        model = request.model or self.settings.model
        options = _model_options(_checked_options(request.options))
        text: list[str] = []
        async with contextlib.aclosing(
            self._stream(
                pb.StreamChatResponse,
                _chat_messages(turn.history),
                model,
                options,
                context,
                {"session_id": turn.session_id},
                text,
            )
        ) as chunks:
            async for chunk in chunks:
                if chunk.is_final and not chunk.HasField("error"):
                    # Remembered once the whole answer is out, before the final chunk (a
                    # store failure ends the stream with its error instead); a cancelled
                    # or failed answer is forgotten.
                    await self.conversations.finish(turn, (pb.CHAT_ROLE_ASSISTANT, "".join(text)))
                yield chunk

    # --- retrieval ------------------------------------------------------------------

    async def StreamRagGenerate(
        self, request: pb.StreamRagGenerateRequest, context: Any
    ) -> AsyncIterator[pb.StreamRagGenerateResponse]:
        hits = self._search(request)
        model = request.model or self.settings.model
        options = _model_options(_checked_options(request.options))
        messages = [
            {"role": "system", "content": rag_prompt(hits)},
            {"role": "user", "content": request.query},
        ]
        first = {"sources": [_source(h) for h in hits]}
        async with contextlib.aclosing(
            self._stream(pb.StreamRagGenerateResponse, messages, model, options, context, first)
        ) as chunks:
            async for chunk in chunks:
                yield chunk

    # --- shared ---------------------------------------------------------------------

    def _prepare(
        self, prompt: str, requested_model: str, options: pb.GenerationOptions
    ) -> tuple[str, dict[str, Any]]:
        if not prompt.strip():
            raise InvalidArgument("prompt", "must not be empty")
        return requested_model or self.settings.model, _model_options(_checked_options(options))

    async def _stream(
        self,
        cls: type[Chunk],
        messages: list[dict[str, str]],
        model: str,
        options: dict[str, Any],
        context: Any,
        first: dict[str, Any],
        text: list[str] | None = None,
    ) -> AsyncIterator[Chunk]:
        """One chunk per model delta (the first also carries `model` and `first`), then
        the final chunk; `text` collects the answer for callers that keep it."""
        first = {"model": model, **first}
        seq = 0
        async with contextlib.aclosing(
            self.client.stream(
                messages, model=model, options=options, timeout_s=context.time_remaining()
            )
        ) as events:
            async for event in events:
                if isinstance(event, Delta):
                    if text is not None:
                        text.append(event.text)
                    yield cls(delta=event.text, seq=seq, **first)
                else:
                    yield cls(
                        is_final=True,
                        seq=seq,
                        usage=_usage(event.usage),
                        finish_reason=_finish(event.finish),
                        **first,
                    )
                first = {}
                seq += 1


# --- mapping ----------------------------------------------------------------------------


def _model_options(options: pb.GenerationOptions) -> dict[str, Any]:
    """GenerationOptions as chat-completion parameters; 0 means the model's default."""
    out: dict[str, Any] = {}
    if options.temperature:
        out["temperature"] = round(float(options.temperature), 4)
    if options.top_p:
        out["top_p"] = round(float(options.top_p), 4)
    if options.max_tokens:
        out["max_tokens"] = options.max_tokens
    if options.stop:
        out["stop"] = list(options.stop)
    return out


def _chat_messages(history: list[tuple[int, str]]) -> list[dict[str, str]]:
    return [
        {"role": _ROLE_NAMES.get(role, "user"), "content": content} for role, content in history
    ]


def rag_prompt(hits: list[Hit]) -> str:
    """The system message of a RAG answer: instructions, then each source as [n]."""
    if not hits:
        return f"{RAG_INSTRUCTIONS}\n\n(no sources matched the question)"
    sources = "\n".join(
        f"[{i}] {hit.document.title}: {hit.snippet}" for i, hit in enumerate(hits, start=1)
    )
    return f"{RAG_INSTRUCTIONS}\n\n{sources}"


def _usage(usage: Usage | None) -> pb.Usage | None:
    if usage is None:
        return None
    return pb.Usage(
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        total_tokens=usage.prompt_tokens + usage.completion_tokens,
    )


def _finish(finish: str) -> int:
    return _FINISH.get(finish, pb.FINISH_REASON_STOP)
