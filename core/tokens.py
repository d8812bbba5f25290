"""LLM token counts the limits need before and after a call, without a tokenizer.

Token-aware limits (core/limitstore.py) reserve tokens when a call is admitted and
settle with what it actually used when it ends. This module says how many:

- at admission, `reserve(request)` = the prompt's estimated tokens + the completion's
  budget: `options.max_tokens` when the request sets it (times the number of prompts for
  a batch), else DEFAULT_COMPLETION_TOKENS. The prompt is counted too because what the
  agent reports, and what the settle charges, is prompt + completion: reserving only
  max_tokens would let every call overshoot by its prompt.
- at the end, `reported_usage(answer)` = prompt + completion from the `usage` the agent
  put in its unary response or its stream's final chunk; when none arrived (the caller
  cancelled, the upstream failed mid-stream, or the agent reports no usage) the call is
  charged what actually went out: the prompt estimate plus `chunk_tokens` of every chunk
  the caller was sent (the pipeline adds them up in CallInfo.streamed_tokens), or, for
  a unary answer without usage, the prompt estimate plus the answer's text tokens.

The estimate counts tokens the way the reference agent does (agent/textgen.count_tokens:
a run of word characters, or one punctuation mark, is one token), so for that agent the
estimate is exact (up to EXACT_CHARS of text per request; longer text is extrapolated,
so the work per call stays bounded); for a real model it is within a small factor of
its BPE count, and the settle corrects the difference. Only text fields of the request are counted (not
the model name or session id); nothing here keeps or logs any text.
"""

from __future__ import annotations

import math
import re
from typing import Any, Final

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

# What a call without max_tokens is assumed to produce until it reports its usage: a
# typical answer of a chat model. Too low only lets more calls in before the settles
# charge the rest; too high only holds budget back until the settles give it back.
DEFAULT_COMPLETION_TOKENS: Final = 256
# Request fields that are not text sent to the model.
_NOT_PROMPT: Final = frozenset({"model", "session_id", "id"})
# Characters counted exactly per request (or chunk); the rest is extrapolated.
EXACT_CHARS: Final = 4096
# The rate for text past EXACT_CHARS when the counted part had no tokens (OpenAI's rule
# of thumb for English; the reference agent's rule gives about the same).
CHARS_PER_TOKEN: Final = 4

_TOKEN = re.compile(r"\w+|[^\w\s]")
_STRING = FieldDescriptor.TYPE_STRING
_MESSAGE = FieldDescriptor.TYPE_MESSAGE


def count_tokens(text: str) -> int:
    """Tokens in `text`: words and punctuation marks (agent/textgen.count_tokens's rule),
    counted exactly up to EXACT_CHARS, extrapolated beyond (see `estimate`)."""
    return estimate([text]) if text else 0


def estimate(texts: list[str]) -> int:
    """The tokens of `texts` together. The first EXACT_CHARS characters are counted
    exactly; the rest at the rate those showed (CHARS_PER_TOKEN when there were none).
    Bounded work per call: a regex over a 200 KB prompt would hold the event loop for
    tens of ms (measured 35-45 ms for 92 KB on the shared 2-core box), and one caller
    must not be able to stall every other call with large requests."""
    budget = EXACT_CHARS
    counted_chars = counted = rest = 0
    for text in texts:
        if budget <= 0:
            rest += len(text)
            continue
        head = text if len(text) <= budget else text[:budget]
        counted += len(_TOKEN.findall(head))
        counted_chars += len(head)
        budget -= len(head)
        rest += len(text) - len(head)
    if not rest:
        return counted
    rate = counted / counted_chars if counted else 1 / CHARS_PER_TOKEN
    return counted + math.ceil(rest * rate)


def _texts(message: Message, out: list[str]) -> None:
    """Every text field of a message, recursively (chat history, RAG filters, an
    agent's context), except identifiers like the model name."""
    for field, value in message.ListFields():
        if field.name in _NOT_PROMPT:
            continue
        if field.type == _STRING:
            if field.is_repeated:
                out.extend(value)
            else:
                out.append(value)
        elif field.type == _MESSAGE:
            entry = field.message_type
            if entry is not None and entry.GetOptions().map_entry:
                for k, v in value.items():
                    out.append(k)
                    if isinstance(v, Message):
                        _texts(v, out)
                    elif isinstance(v, str):
                        out.append(v)
            elif field.is_repeated:
                for item in value:
                    _texts(item, out)
            else:
                _texts(value, out)


def text_tokens(message: Message) -> int:
    """The estimated tokens of every text field of a message (see `_texts`)."""
    texts: list[str] = []
    _texts(message, texts)
    return estimate(texts)


def completion_budget(message: Message) -> int:
    """The completion tokens a request may produce: options.max_tokens (per prompt of a
    batch) when set, else DEFAULT_COMPLETION_TOKENS (per prompt)."""
    fields = message.DESCRIPTOR.fields_by_name
    per_answer = 0
    if "options" in fields and message.HasField("options"):
        per_answer = max(0, getattr(message, "options").max_tokens)  # noqa: B009
    if not per_answer:
        per_answer = DEFAULT_COMPLETION_TOKENS
    answers = len(getattr(message, "prompts")) if "prompts" in fields else 1  # noqa: B009
    return per_answer * max(1, answers)


def reserve(request: Any) -> tuple[int, int]:
    """(prompt estimate, tokens to reserve) for a decoded request; (0, 0) for anything
    else (bytes that did not decode never reach an upstream)."""
    if not isinstance(request, Message):
        return 0, 0
    prompt = text_tokens(request)
    return prompt, prompt + completion_budget(request)


def reports_usage(response_cls: type) -> bool:
    """Whether a method's answers carry `usage`, i.e. whether it spends LLM tokens."""
    descriptor = getattr(response_cls, "DESCRIPTOR", None)
    return descriptor is not None and "usage" in descriptor.fields_by_name


def reported_usage(answer: Any) -> int | None:
    """prompt + completion tokens from an answer's `usage`, or None when it has none."""
    if not isinstance(answer, Message) or "usage" not in answer.DESCRIPTOR.fields_by_name:
        return None
    if not answer.HasField("usage"):
        return None
    usage = getattr(answer, "usage")  # noqa: B009
    prompt: int = usage.prompt_tokens
    completion: int = usage.completion_tokens
    return max(0, prompt) + max(0, completion)


def chunk_tokens(chunk: Any) -> int:
    """The completion tokens a stream chunk carried to the caller (its `delta` text)."""
    delta = getattr(chunk, "delta", "")
    return count_tokens(delta) if isinstance(delta, str) else 0
