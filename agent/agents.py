"""Agent runs: a deterministic plan of reasoning steps and tool calls, then a result.

Each agent type reasons in its own style (creative brainstorms and drafts, analysis
decomposes and compares, review sets criteria and gives a verdict, assistant answers
directly). A run is: an opening step, one step per requested tool (in request order),
the type's closing steps; it stops at max_steps with STEP_LIMIT if the plan is longer.

The run is computed up front, since tools are instant and pure; the servicer paces its
steps, tool calls and result text as a model would produce them.
"""

from __future__ import annotations

import enum
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from aiproxy.agent import textgen
from aiproxy.agent.logs import log_event
from aiproxy.agent.tools import Tool, ToolError, struct_safe
from aiproxy.core.contract import MAX_STEPS

log = logging.getLogger("agent.tools")

DEFAULT_MAX_STEPS = 5
MAX_STEPS_LIMIT = MAX_STEPS  # the contract's (core/contract.py, shared with the proxy)


class AgentKind(enum.IntEnum):
    """Mirrors ai.agent.v1.AgentType, so this module does not depend on the stubs."""

    CREATIVE = 1
    ANALYSIS = 2
    REVIEW = 3
    ASSISTANT = 4


class RunStatus(enum.IntEnum):
    """Mirrors ai.agent.v1.AgentStatus."""

    COMPLETED = 1
    STEP_LIMIT = 3


@dataclass(frozen=True)
class ToolCallRecord:
    id: str
    name: str
    arguments: dict[str, Any]
    result: dict[str, Any] | None
    error: str
    cost_tokens: int


@dataclass(frozen=True)
class Step:
    index: int
    thought: str
    tool_call: ToolCallRecord | None = None

    @property
    def tokens(self) -> int:
        return textgen.count_tokens(self.thought)


@dataclass(frozen=True)
class AgentRun:
    steps: tuple[Step, ...]
    result: textgen.Completion
    status: RunStatus
    # Everything the "model" wrote: thoughts and result.
    completion_tokens: int

    @property
    def prompt_tokens(self) -> int:
        return self.result.prompt_tokens

    @property
    def tool_calls(self) -> list[ToolCallRecord]:
        return [s.tool_call for s in self.steps if s.tool_call is not None]


@dataclass(frozen=True)
class _Style:
    opening: str
    closing: tuple[str, ...]
    result_lead: str


# {topic} is the task's keywords; {context} says which context keys were given.
_STYLES = {
    AgentKind.CREATIVE: _Style(
        "Brainstorm angles on {topic}{context}.",
        (
            "Draft a short piece around the strongest angle.",
            "Polish the draft for rhythm and clarity.",
        ),
        "Here is a short piece on {topic}.",
    ),
    AgentKind.ANALYSIS: _Style(
        "Break the task into measurable parts: {topic}{context}.",
        (
            "Compare the findings and check them against each other.",
            "Conclude with the key numbers.",
        ),
        "Analysis of {topic}.",
    ),
    AgentKind.REVIEW: _Style(
        "Set the review criteria for {topic}: correctness, clarity and risk{context}.",
        (
            "Note the strengths and the issues found.",
            "Give a verdict with the most important fix first.",
        ),
        "Review of {topic}.",
    ),
    AgentKind.ASSISTANT: _Style(
        "Work out what is being asked about {topic}{context}.",
        ("Answer directly and briefly.",),
        "Answer on {topic}.",
    ),
}


def run_agent(
    kind: AgentKind,
    task: str,
    context: Mapping[str, Any],
    tool_names: Sequence[str],
    tools: Mapping[str, Tool],
    *,
    model: str,
    max_steps: int = 0,
) -> AgentRun:
    """Plan and run an agent; the caller has validated kind, tool names and limits."""
    style = _STYLES[kind]
    topic = " and ".join(textgen.keywords(task, limit=2)) or "the task"
    context_note = f", using the context ({', '.join(sorted(context))})" if context else ""
    limit = min(max_steps, MAX_STEPS_LIMIT) if max_steps > 0 else DEFAULT_MAX_STEPS

    plan: list[tuple[str, str | None]] = [
        (style.opening.format(topic=topic, context=context_note), None)
    ]
    plan += [("", name) for name in tool_names]
    plan += [(thought, None) for thought in style.closing]
    status = RunStatus.COMPLETED if len(plan) <= limit else RunStatus.STEP_LIMIT

    steps: list[Step] = []
    calls = 0
    for index, (thought, tool_name) in enumerate(plan[:limit]):
        if tool_name is None:
            steps.append(Step(index, thought))
            continue
        call = _call_tool(tools[tool_name], f"call_{calls}", task, context)
        calls += 1
        steps.append(Step(index, _thought(tools[tool_name], call.arguments), call))

    rng = textgen.rng_for(
        model, "agent", int(kind), task, _canonical(context), ",".join(tool_names)
    )
    findings = [_finding(call) for call in (s.tool_call for s in steps) if call is not None]
    if status is RunStatus.STEP_LIMIT:
        lead = f"Stopped after {limit} steps before finishing {topic}."
    else:
        lead = style.result_lead.format(topic=topic)
    text = " ".join([lead, *findings, textgen.compose(rng, textgen.keywords(task))])
    prompt_tokens = textgen.count_tokens(task) + (
        textgen.count_tokens(_canonical(context)) if context else 0
    )
    result = textgen.shape(text, prompt_tokens=prompt_tokens)
    thought_tokens = sum(s.tokens for s in steps)
    return AgentRun(tuple(steps), result, status, thought_tokens + result.completion_tokens)


def _call_tool(tool: Tool, call_id: str, task: str, context: Mapping[str, Any]) -> ToolCallRecord:
    """Run one tool; whatever goes wrong inside it is that call's error, recorded in the
    run like a model would see it, never an exception out of the run (which the handler
    could only answer with INTERNAL: "the agent is broken", for one bad request)."""
    arguments: dict[str, Any] = {}
    try:
        arguments = struct_safe(tool.arguments(task, context))
        result = struct_safe(tool.run(arguments))
        return ToolCallRecord(call_id, tool.name, arguments, result, "", tool.cost_tokens)
    except ToolError as exc:
        return ToolCallRecord(call_id, tool.name, arguments, None, str(exc), tool.cost_tokens)
    except Exception as exc:  # a tool's bug, or input it did not foresee
        # The exception's class only: its message or traceback could quote the task.
        log_event(log, "tool_failed", logging.WARNING, tool=tool.name, error=type(exc).__name__)
        return ToolCallRecord(
            call_id, tool.name, arguments, None, "the tool failed", tool.cost_tokens
        )


def _thought(tool: Tool, arguments: Mapping[str, Any]) -> str:
    """The reasoning step before a tool call; plain when its arguments are missing."""
    try:
        return tool.thought.format(**arguments)
    except (KeyError, IndexError, ValueError):
        return f"Use the {tool.name} tool."


def _finding(call: ToolCallRecord) -> str:
    """One sentence of the result per tool call: what the agent learned from it."""
    if call.error:
        return f"The {call.name} tool failed: {call.error}."
    result = call.result or {}
    if call.name == "calculator":
        return f"{result['expression']} = {result['value']}."
    if call.name == "word_count":
        return f"The text has {result['words']} words."
    if call.name == "search":
        hits = result.get("results", [])
        if not hits:
            return "The knowledge base has nothing on it."
        return f"The most relevant source is {hits[0]['title']!r} ({hits[0]['id']})."
    return f"The {call.name} tool answered."


def _canonical(context: Mapping[str, Any]) -> str:
    return json.dumps(context, sort_keys=True, separators=(",", ":"), default=str)
