"""The tools an agent may call: search, calculator, word_count.

Every tool is deterministic (no clock, no network), takes its arguments from the task
and its context, and returns a JSON-like dict (it travels as a google.protobuf.Struct,
whose numbers are doubles: `struct_safe` checks a result fits before it leaves here).
A tool that cannot do its job raises ToolError; the run records the error and goes on.
Out-of-range input (a result too large for a double, division by zero, an expression
nested too deep) is a ToolError like any other, never an exception that escapes into the
handler: that would answer INTERNAL, which says "the agent is broken" to everyone
upstream of it (a circuit breaker, a retry policy) when only this request was bad.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from aiproxy.agent.rag import Corpus


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
# Parentheses and signs nest at most this deep: the parser recurses per level, and no
# real expression needs more.
MAX_NESTING = 32
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
        return _as_number(_Parser(expression).parse())
    except (OverflowError, RecursionError):
        raise ToolError("result too large") from None


def _as_number(value: float | int) -> float | int:
    """`value` if a Struct (whose numbers are doubles) can carry it, else ToolError:
    4294967296**40 is a valid Python int of 1281 bits, beyond any double."""
    as_float = float(value)  # OverflowError past ~1.8e308
    if not math.isfinite(as_float):
        raise ToolError("result too large")
    return value


def struct_safe(value: Any, _depth: int = 0) -> Any:
    """`value` as plain JSON types a google.protobuf.Struct accepts (str keys; numbers a
    double holds; no NaN or infinity), or ToolError: a tool result that cannot travel
    is the tool's failure, not the agent's crash."""
    if _depth > MAX_NESTING:
        raise ToolError("result nested too deeply")
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, (int, float)):
        try:
            number = _as_number(value)
        except OverflowError:
            raise ToolError("result too large") from None
        if isinstance(number, float) and not math.isfinite(number):
            raise ToolError("result is not a finite number")
        return number
    if isinstance(value, Mapping):
        return {str(k): struct_safe(v, _depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [struct_safe(v, _depth + 1) for v in value]
    raise ToolError(f"result of unsupported type {type(value).__name__}")


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
        self.depth = 0

    def _nest(self) -> None:
        self.depth += 1
        if self.depth > MAX_NESTING:
            raise ToolError(f"expression nested deeper than {MAX_NESTING} levels")

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
            self._nest()
            value = _checked(sign * self._unary())
            self.depth -= 1
            return value
        return self._power()

    def _power(self) -> Any:
        base = self._atom()
        if self._peek() in ("**", "^"):
            self._take()
            self._nest()
            exponent = self._unary()  # right-associative: 2**3**2 == 2**9
            self.depth -= 1
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
            self._nest()
            value = self._expr()
            if self._take() != ")":
                raise ToolError("missing ')' in expression")
            self.depth -= 1
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
