"""The tools an agent may call: search, calculator, word_count.

Every tool is deterministic (no clock, no network), takes its arguments from the task
and its context, and returns a JSON-like dict (it travels as a google.protobuf.Struct).
A tool that cannot do its job raises ToolError; the run records the error and goes on.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from agent.rag import Corpus


class ToolError(Exception):
    """The tool ran but could not produce a result; the message is shown to the caller."""


@dataclass(frozen=True)
class Tool:
    name: str
    # The agent's reasoning step before the call; formatted with the call's arguments.
    thought: str
    # Simulated latency, in token-times: a search is slower than arithmetic.
    cost_tokens: int
    # (task, context) -> the call's arguments
    arguments: Callable[[str, Mapping[str, Any]], dict[str, Any]]
    # arguments -> result; raises ToolError
    run: Callable[[dict[str, Any]], dict[str, Any]]


def build_tools(corpus: Corpus) -> dict[str, Tool]:
    """The tool registry, by name."""

    def search_arguments(task: str, context: Mapping[str, Any]) -> dict[str, Any]:
        query = context.get("query")
        return {"query": query if isinstance(query, str) and query.strip() else task, "top_k": 3}

    def search(args: dict[str, Any]) -> dict[str, Any]:
        hits = corpus.search(str(args["query"]), top_k=int(args["top_k"]))
        return {
            "query": args["query"],
            "results": [
                {"id": h.document.id, "title": h.document.title, "score": h.score} for h in hits
            ],
        }

    tools = [
        Tool(
            "search",
            "Search the knowledge base for {query!r} to ground the answer.",
            6,
            search_arguments,
            search,
        ),
        Tool(
            "calculator",
            "Use the calculator to evaluate {expression!r}.",
            1,
            _calculator_arguments,
            _calculate,
        ),
        Tool(
            "word_count",
            "Count the words of the text.",
            1,
            _word_count_arguments,
            _word_count,
        ),
    ]
    return {t.name: t for t in tools}


# --- calculator ---------------------------------------------------------------------

MAX_EXPRESSION_CHARS = 200
# Results stay small, so no expression of 200 characters can eat the CPU or memory
# (9**9**9 has 370 million digits).
MAX_EXPONENT = 64
MAX_INT_BITS = 4096
_CANDIDATE = re.compile(r"[-(]*\d[\d\s.+\-*/%^()]*")
_OPERATOR = re.compile(r"\d\s*(\*\*|[-+*/%^])\s*[-(]*\d")


def _calculator_arguments(task: str, context: Mapping[str, Any]) -> dict[str, Any]:
    given = context.get("expression")
    if isinstance(given, str) and given.strip():
        return {"expression": given.strip()}
    # The longest run of digits and operators in the task, e.g. "12*7" in "Compare 12*7 with 90".
    candidates = [m.group().strip() for m in _CANDIDATE.finditer(task)]
    candidates = [c for c in candidates if _OPERATOR.search(c)]
    return {"expression": max(candidates, key=len, default="")}


def _calculate(args: dict[str, Any]) -> dict[str, Any]:
    expression = str(args.get("expression", ""))
    if not expression:
        raise ToolError("no arithmetic expression found in the task or context")
    value = evaluate(expression)
    return {"expression": expression, "value": value}


def evaluate(expression: str) -> float | int:
    """Evaluate + - * / // % ** (or ^) and parentheses over numbers. Never uses eval()."""
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise ToolError(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        return _Parser(expression).parse()
    except OverflowError:
        raise ToolError("result too large") from None


_TOKENS = re.compile(r"\s*(?:(\d+\.?\d*|\.\d+)|(\*\*|//|[-+*/%^()]))")
_BINARY: dict[str, Callable[[Any, Any], Any]] = {
    "+": operator.add,
    "-": operator.sub,
    "*": operator.mul,
    "/": operator.truediv,
    "//": operator.floordiv,
    "%": operator.mod,
}


class _Parser:
    """Recursive descent over this grammar (precedence and associativity as in Python):

    expr  := term (('+' | '-') term)*
    term  := unary (('*' | '/' | '//' | '%') unary)*
    unary := ('-' | '+') unary | power
    power := atom (('**' | '^') unary)?
    atom  := number | '(' expr ')'
    """

    def __init__(self, text: str) -> None:
        self.tokens: list[str] = []
        pos = 0
        text = text.rstrip()
        while pos < len(text):
            match = _TOKENS.match(text, pos)
            if not match:
                raise ToolError(f"unexpected character {text[pos:].strip()[:1]!r} in expression")
            self.tokens.append(match.group(1) or match.group(2))
            pos = match.end()
        self.pos = 0

    def parse(self) -> float | int:
        if not self.tokens:
            raise ToolError("empty expression")
        value = self._expr()
        if self.pos != len(self.tokens):
            raise ToolError(f"unexpected {self.tokens[self.pos]!r} in expression")
        if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
            return int(value)
        return value

    def _peek(self) -> str | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def _take(self) -> str:
        token = self._peek()
        if token is None:
            raise ToolError("expression ends too early")
        self.pos += 1
        return token

    def _expr(self) -> Any:
        value = self._term()
        while self._peek() in ("+", "-"):
            value = _checked(_BINARY[self._take()](value, self._term()))
        return value

    def _term(self) -> Any:
        value = self._unary()
        while self._peek() in ("*", "/", "//", "%"):
            op = self._take()
            right = self._unary()
            if op != "*" and right == 0:
                raise ToolError("division by zero")
            value = _checked(_BINARY[op](value, right))
        return value

    def _unary(self) -> Any:
        if self._peek() in ("-", "+"):
            sign = -1 if self._take() == "-" else 1
            return sign * self._unary()
        return self._power()

    def _power(self) -> Any:
        base = self._atom()
        if self._peek() in ("**", "^"):
            self._take()
            exponent = self._unary()  # right-associative: 2**3**2 == 2**9
            if abs(exponent) > MAX_EXPONENT:
                raise ToolError(f"exponent larger than {MAX_EXPONENT}")
            if base == 0 and exponent < 0:
                raise ToolError("division by zero")
            if (
                isinstance(base, int)
                and isinstance(exponent, int)
                and base.bit_length() * exponent > MAX_INT_BITS
            ):
                raise ToolError("result too large")
            return _checked(base**exponent)
        return base

    def _atom(self) -> Any:
        token = self._take()
        if token == "(":
            value = self._expr()
            if self._take() != ")":
                raise ToolError("missing ')' in expression")
            return value
        if token[0].isdigit() or token[0] == ".":
            return float(token) if "." in token else int(token)
        raise ToolError(f"unexpected {token!r} in expression")


def _checked(value: Any) -> Any:
    if isinstance(value, complex):
        raise ToolError("result is not a real number")
    if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
        raise ToolError("result too large")
    if isinstance(value, float) and not math.isfinite(value):
        raise ToolError("result too large")
    return value


# --- word_count ---------------------------------------------------------------------

_SENTENCES = re.compile(r"[.!?]+(?:\s|$)")


def _word_count_arguments(task: str, context: Mapping[str, Any]) -> dict[str, Any]:
    text = context.get("text")
    return {"text": text if isinstance(text, str) else task}


def _word_count(args: dict[str, Any]) -> dict[str, Any]:
    text = str(args.get("text", ""))
    return {
        "words": len(text.split()),
        "characters": len(text),
        "sentences": len(_SENTENCES.findall(text)) or (1 if text.strip() else 0),
    }
