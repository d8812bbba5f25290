"""The reference agent's pure parts: text generation, retrieval, tools, sessions, fault parsing."""

from __future__ import annotations

import dataclasses
import math

import grpc
import pytest
from google.protobuf import struct_pb2

from aiproxy.agent import faults, textgen
from aiproxy.agent.agents import AgentKind, RunStatus, run_agent
from aiproxy.agent.errors import InvalidArgument
from aiproxy.agent.rag import Corpus
from aiproxy.agent.sessions import Bounds, MemorySessionStore, PrefixCache
from aiproxy.agent.tools import ToolError, build_tools, evaluate, struct_safe

# --- textgen --------------------------------------------------------------------------


def test_tokens_and_pieces_agree() -> None:
    text = "Circuit breakers open, then half-open; retries (with jitter) stay bounded."
    pieces = textgen.split_pieces(text)
    assert "".join(pieces) == text
    assert len(pieces) == textgen.count_tokens(text) == len(textgen.tokenize(text))


def test_completion_is_deterministic_and_depends_on_inputs() -> None:
    first = textgen.complete("Explain circuit breakers", model="m")
    assert textgen.complete("Explain circuit breakers", model="m") == first
    assert textgen.complete("Explain circuit breakers", model="other").text != first.text
    assert (
        textgen.complete("Explain circuit breakers", model="m", temperature=1.3).text != first.text
    )
    assert textgen.complete("Explain rate limits", model="m").text != first.text
    assert "circuit breakers" in first.text.lower()  # the answer is about the prompt


def test_natural_length_and_max_tokens() -> None:
    lengths = [
        textgen.complete(f"prompt {i} about queues", model="m").completion_tokens
        for i in range(200)
    ]
    assert min(lengths) >= 20 and max(lengths) <= 50
    assert 24 <= sum(lengths) / len(lengths) <= 40
    natural = textgen.complete("queues", model="m")
    assert not natural.truncated
    capped = textgen.complete("queues", model="m", max_tokens=5)
    assert capped.truncated and capped.pieces == natural.pieces[:5]
    roomy = textgen.complete("queues", model="m", max_tokens=natural.completion_tokens)
    assert not roomy.truncated and roomy.pieces == natural.pieces


def test_stop_sequence_ends_the_answer_before_it() -> None:
    natural = textgen.complete("queues", model="m")
    stop = natural.text[12:18]
    stopped = textgen.complete("queues", model="m", stop=["never-there", stop])
    assert stopped.text == natural.text[: natural.text.index(stop)].rstrip()
    assert not stopped.truncated


def test_keywords_pair_adjacent_content_words() -> None:
    assert textgen.keywords("Explain circuit breakers in one paragraph") == ["circuit breakers"]
    assert textgen.keywords("What is it?") == []


# --- retrieval ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus() -> Corpus:
    return Corpus.bundled()


def test_bundled_corpus_is_well_formed(corpus: Corpus) -> None:
    assert 20 <= len(corpus.documents) <= 30
    assert len({d.id for d in corpus.documents}) == len(corpus.documents)
    assert all(
        d.title and d.text and {"category", "source"} <= set(d.metadata) for d in corpus.documents
    )


def test_search_ranks_scores_and_filters(corpus: Corpus) -> None:
    hits = corpus.search("circuit breaker half-open state", top_k=5)
    assert hits[0].document.id == "res-001"
    assert all(0 < h.score <= 1 for h in hits)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    assert "circuit breaker" in hits[0].snippet.lower()

    envoy = corpus.search("health checks", top_k=20, filters={"category": "envoy"})
    assert envoy and all(h.document.metadata["category"] == "envoy" for h in envoy)
    assert corpus.search("health checks", filters={"category": "no-such"}) == []
    assert corpus.search("the and of") == []  # only stopwords
    assert len(corpus.search("grpc", top_k=100)) <= 20


# --- tools ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expression", "value"),
    [
        ("12*7", 84),
        ("(3 + 4) * 5", 35),
        ("2**3**2", 512),
        ("-2^2", -4),
        ("7/2", 3.5),
        ("7 // 2", 3),
        ("10 % 3", 1),
    ],
)
def test_calculator_evaluates_arithmetic(expression: str, value: float) -> None:
    assert evaluate(expression) == value


@pytest.mark.parametrize(
    "expression",
    ["1/0", "9**9**9", "((9**64)**64)**64", "(-8)**0.5", "2*(3", "__import__('os')", "1 +", ""],
)
def test_calculator_rejects_what_it_cannot_do_safely(expression: str) -> None:
    with pytest.raises(ToolError):
        evaluate(expression)


def test_agent_run_plans_steps_and_calls_tools(corpus: Corpus) -> None:
    tools = build_tools(corpus)
    run = run_agent(
        AgentKind.ANALYSIS,
        "Compare 12*7 with 90",
        {},
        ["calculator", "word_count"],
        tools,
        model="m",
    )
    assert run.status is RunStatus.COMPLETED
    assert [s.index for s in run.steps] == list(range(len(run.steps)))
    calc, words = run.tool_calls
    assert calc.arguments == {"expression": "12*7"} and calc.result == {
        "expression": "12*7",
        "value": 84,
    }
    assert words.result is not None and words.result["words"] == 4
    assert "12*7 = 84" in run.result.text

    limited = run_agent(
        AgentKind.CREATIVE, "Write about queues", {}, ["search"], tools, model="m", max_steps=2
    )
    assert limited.status is RunStatus.STEP_LIMIT and len(limited.steps) == 2

    failed = run_agent(AgentKind.ASSISTANT, "no numbers here", {}, ["calculator"], tools, model="m")
    assert (
        failed.tool_calls[0].result is None
        and "no arithmetic expression" in failed.tool_calls[0].error
    )


# Input a caller controls that once escaped a tool as an exception (OverflowError from
# the Struct, RecursionError from the parser) and made the agent answer INTERNAL.
HOSTILE_EXPRESSIONS = [
    "4294967296**40",  # a 1281-bit int: valid Python, beyond a double (the Struct's numbers)
    "(2**64)**16",
    "9**64/7",
    "999999999999.5**64",
    "7/0",
    "7//0",
    "7%0.0",
    "0**-1",
    "(-8)**0.5",
    "(" * 90 + "1" + ")" * 90,
    "-" * 150 + "1",
    "2**" * 60 + "1",
    "(2**4000)/3",
]


@pytest.mark.parametrize("expression", HOSTILE_EXPRESSIONS)
def test_calculator_out_of_range_is_a_tool_error_and_the_run_travels(
    expression: str, corpus: Corpus
) -> None:
    try:
        value = evaluate(expression)
    except ToolError:
        pass
    else:  # fine if it is a number a Struct carries
        struct_pb2.Value(number_value=float(value))
    run = run_agent(
        AgentKind.ANALYSIS,
        "compute it",
        {"expression": expression},
        ["calculator"],
        build_tools(corpus),
        model="m",
    )
    (call,) = run.tool_calls
    # What the servicer does with every tool call: both sides must fit a Struct.
    struct_pb2.Struct().update(call.arguments)
    if call.result is not None:
        struct_pb2.Struct().update(call.result)
    else:
        assert call.error and "Traceback" not in call.error
    assert run.status is RunStatus.COMPLETED and run.result.text


def test_struct_safe_refuses_what_a_struct_cannot_carry() -> None:
    assert struct_safe({"a": [1, 2.5, "x", None, True], 3: {"b": 2**60}}) == {
        "a": [1, 2.5, "x", None, True],
        "3": {"b": 2**60},
    }
    for bad in ({"v": 2**2000}, {"v": math.inf}, {"v": math.nan}, {"v": object()}):
        with pytest.raises(ToolError):
            struct_safe(bad)


def test_a_tool_that_crashes_is_that_calls_error_not_the_runs(corpus: Corpus) -> None:
    tools = dict(build_tools(corpus))

    def broken(_args: dict) -> dict:
        raise RuntimeError("secret internals: task text here")

    def weird_result(_args: dict) -> dict:
        return {"value": 10**400}

    tools["calculator"] = dataclasses.replace(tools["calculator"], run=broken)
    tools["word_count"] = dataclasses.replace(tools["word_count"], run=weird_result)
    tools["search"] = dataclasses.replace(
        tools["search"], arguments=lambda _t, _c: {}
    )  # thought needs {query}
    run = run_agent(
        AgentKind.REVIEW,
        "1+1",
        {},
        ["calculator", "word_count", "search"],
        tools,
        model="m",
        max_steps=10,
    )
    calc, words, _search = run.tool_calls
    assert calc.result is None and calc.error == "the tool failed"  # no internals
    assert words.result is None and words.error == "result too large"
    assert run.status is RunStatus.COMPLETED
    assert "secret internals" not in run.result.text


def test_agent_types_reason_differently(corpus: Corpus) -> None:
    tools = build_tools(corpus)
    openings = {
        run_agent(kind, "Plan a launch", {}, [], tools, model="m").steps[0].thought
        for kind in AgentKind
    }
    assert len(openings) == len(AgentKind)


# --- sessions -------------------------------------------------------------------------


async def test_sessions_are_bounded_by_last_write_with_a_ttl() -> None:
    now = [0.0]
    store = MemorySessionStore(
        Bounds(max_sessions=2, max_messages=3, max_chars=5, ttl_s=10), clock=lambda: now[0]
    )
    await store.append("b", [(2, "x")], replace=False)
    await store.append("a", [(2, "hello world")], replace=False)
    assert await store.load("b") == ((2, "x"),)  # a read changes nothing
    await store.append("c", [(2, "y")], replace=False)
    assert await store.load("b") is None  # the least recently written went
    assert await store.load("a") == ((2, "hello"),)  # content capped

    await store.append("a", [(1, "sys"), (2, "1"), (3, "2"), (2, "3"), (3, "4")], replace=True)
    assert await store.load("a") == ((1, "sys"), (2, "3"), (3, "4"))  # the system message is kept
    await store.append("a", [(2, "5")], replace=False)
    assert await store.load("a") == ((1, "sys"), (3, "4"), (2, "5"))

    now[0] = 9.0
    await store.append("c", [(3, "z")], replace=False)  # a turn refreshes the TTL
    now[0] = 12.0
    assert await store.load("a") is None  # expired: 10 s after its last turn
    assert await store.load("c") == ((2, "y"), (3, "z"))
    await store.create("d")
    assert await store.load("d") == ()  # created: exists, empty
    assert await store.delete("d") and not await store.delete("d")


def test_the_prefix_cache_counts_what_a_replica_has_not_seen() -> None:
    cache = PrefixCache(max_tokens=100)
    assert cache.uncached("s", 40) == 40  # never served here: everything is prefilled
    cache.remember("s", 60)  # prompt and answer
    assert cache.uncached("s", 75) == 15  # the next turn extends it
    cache.remember("t", 50)  # 110 tokens held: the least recently used goes
    assert cache.uncached("s", 75) == 75 and cache.uncached("t", 50) == 0


# --- faults ---------------------------------------------------------------------------


def test_fault_metadata_parses() -> None:
    assert faults.parse([("x-request-id", "r")]) is faults.NO_FAULTS
    spec = faults.parse(
        [
            ("x-fault-code", "resource_exhausted"),
            ("x-fault-after", "3"),
            ("x-fault-delay-ms", "12.5"),
            ("x-fault-hang", "true"),
            ("x-fault-rate", "0.25"),
            ("x-fault-slow-ms", "40"),
        ]
    )
    assert spec == faults.FaultSpec(grpc.StatusCode.RESOURCE_EXHAUSTED, 3, 12.5, True, 0.25, 40.0)
    assert faults.parse([("x-fault-code", "14")]).code is grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("x-fault-code", "OK"),
        ("x-fault-code", "NOPE"),
        ("x-fault-after", "-1"),
        ("x-fault-after", "two"),
        ("x-fault-delay-ms", "nan"),
        ("x-fault-hang", "maybe"),
        ("x-fault-rate", "1.5"),
        ("x-fault-slow-ms", "-3"),
    ],
)
def test_bad_fault_metadata_names_the_key(key: str, value: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        faults.parse([(key, value)])
    assert err.value.field == key


def test_fault_rolls() -> None:
    assert not faults.NO_FAULTS.roll_call()
    assert faults.FaultSpec(code=grpc.StatusCode.INTERNAL).roll_call()
    assert (
        faults.FaultSpec(rate=1.0).roll_call()
        and faults.FaultSpec(rate=1.0).failure_code is grpc.StatusCode.UNAVAILABLE
    )
    assert not faults.FaultSpec(code=grpc.StatusCode.INTERNAL, rate=0.0).roll_call()
    # On a per-item method a rate is rolled per item, not per call.
    per_item = faults.FaultSpec(code=grpc.StatusCode.INTERNAL, rate=1.0)
    assert not per_item.roll_call(per_item=True)
    assert per_item.roll_item() is grpc.StatusCode.INTERNAL
