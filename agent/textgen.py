"""Deterministic text generation and token counting: the reference agent's "model".

Nothing here is random between runs: every choice comes from a `random.Random` seeded
with a SHA-256 of the inputs (model, sampling options, prompt), so the same request
always produces the same text, in any process (no dependence on PYTHONHASHSEED).

Tokens are words or single punctuation marks. A completion is a list of *pieces*, one
per token, each carrying the whitespace before it, so that joining the pieces gives the
text back exactly and a stream can send one piece per chunk.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

# The natural length of an answer, in tokens, when max_tokens does not cut it short:
# compose() stops at the first sentence end past a target drawn from this range, so
# answers are 20-45 tokens long, 30 on average, and always end with a full sentence.
TARGET_TOKENS = (20, 30)
# The model's context limit: larger max_tokens values are clamped to it.
MAX_TOKENS_LIMIT = 4096

_TOKEN = re.compile(r"\w+|[^\w\s]")
_PIECE = re.compile(r"\s*(?:\w+|[^\w\s])")

STOPWORDS = frozenset(
    """a about above after again all also an and any are as at be because been before being
    between both but by can could did do does doing down during each few for from further had
    has have having he her here hers him his how i if in into is it its itself just me more
    most my no nor not now of off on once only or other our out over own please same she
    should so some such than that the their them then there these they this those through to
    too under until up very was we were what when where which while who whom why will with
    would you your""".split()
)
# Words that say how to answer rather than what about: never an answer's topic.
_INSTRUCTION_WORDS = frozenset(
    """one two three explain tell give write show describe make answer paragraph sentence
    sentences haiku poem stream long short brief summary summarize words word list compare
    count find please""".split()
)


def tokenize(text: str) -> list[str]:
    """Split text into tokens: runs of word characters, or one punctuation mark."""
    return _TOKEN.findall(text)


def count_tokens(text: str) -> int:
    return len(_TOKEN.findall(text))


def split_pieces(text: str) -> list[str]:
    """One piece per token, each with its leading whitespace; trailing space is dropped."""
    return _PIECE.findall(text)


def keywords(text: str, limit: int = 5) -> list[str]:
    """What `text` is about: its first distinct content words, lower-cased, with adjacent
    ones joined in pairs ("circuit breakers"), so answers can name the subject."""
    phrases: list[str] = []
    run: list[str] = []
    for token in [*tokenize(text.lower()), ""]:  # "" ends the last run
        if (
            len(token) >= 3
            and token.isalpha()
            and token not in STOPWORDS
            and token not in _INSTRUCTION_WORDS
        ):
            run.append(token)
            if len(run) < 2:
                continue
        for i in range(0, len(run), 2):
            phrase = " ".join(run[i : i + 2])
            if phrase not in phrases:
                phrases.append(phrase)
        run = []
        if len(phrases) >= limit:
            break
    return phrases[:limit]


def rng_for(*parts: object) -> random.Random:
    """A generator seeded by the inputs, stable across processes and Python versions."""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def sampling_key(temperature: float = 0.0, top_p: float = 0.0) -> str:
    """Sampling options as part of a seed: a different temperature gives different text.

    Rounded so that float32 noise from the wire cannot change the answer.
    """
    return f"t={temperature:.2f},p={top_p:.2f}"


# A tiny grammar. Keywords only fill slots where their number (singular or plural)
# does not matter, so sentences stay grammatical whatever the prompt says.
_VERBS = [
    "shapes",
    "limits",
    "protects",
    "balances",
    "simplifies",
    "improves",
    "stabilizes",
    "exposes",
    "reduces",
    "tracks",
    "guides",
    "supports",
    "bounds",
    "smooths",
]
_OBJECTS = [
    "latency",
    "throughput",
    "error rates",
    "the request path",
    "downstream services",
    "tail latency",
    "resource usage",
    "the user experience",
    "the retry budget",
    "queue depth",
    "each deployment",
    "observability",
    "the hot path",
    "capacity",
]
_ADVERBIALS = [
    "predictably",
    "over time",
    "at scale",
    "in production",
    "under load",
    "with little overhead",
    "by design",
    "across replicas",
    "during peaks",
]
_CONDITIONS = [
    "traffic spikes",
    "a dependency slows down",
    "replicas restart",
    "load shifts",
    "deadlines are tight",
    "errors start to climb",
    "a client retries too eagerly",
]
_NOUNS = [
    "design",
    "service",
    "pipeline",
    "policy",
    "system",
    "team",
    "model",
    "client",
    "proxy",
    "cluster",
    "operator",
    "platform",
]
_ADJECTIVES = ["stable", "predictable", "healthy", "bounded", "observable", "responsive", "simple"]
_EVENTS = [
    "rolling out changes",
    "scaling up",
    "raising limits",
    "a release",
    "an incident review",
    "a load test",
    "the next peak",
]
_CONNECTIVES = [
    "Meanwhile",
    "As a result",
    "In short",
    "Over time",
    "For example",
    "Still",
    "In practice",
    "Put simply",
]
_BASE_VERBS = ["measure", "tune", "review", "monitor", "test", "document", "revisit", "simplify"]
_FALLBACK_TOPICS = ["the system", "the service", "this approach", "the workload"]

_TEMPLATES = [
    "When it comes to {kw}, the {noun} {verb} {obj} {adv}.",
    "In practice, attention to {kw} pays off when {cond}.",
    "Teams usually {base} {kw} before {event}.",
    "A careful approach to {kw} {verb} {obj} when {cond}.",
    "{conn}, the {noun} {verb} {obj} {adv}.",
    "This keeps {obj} {adj} when {cond}.",
    "Good handling of {kw} {verb} {obj} {adv}.",
    "It helps to {base} {obj} {adv}.",
]


def _sentence(rng: random.Random, topics: Sequence[str]) -> str:
    sentence = rng.choice(_TEMPLATES).format(
        kw=rng.choice(topics),
        noun=rng.choice(_NOUNS),
        verb=rng.choice(_VERBS),
        obj=rng.choice(_OBJECTS),
        adv=rng.choice(_ADVERBIALS),
        cond=rng.choice(_CONDITIONS),
        adj=rng.choice(_ADJECTIVES),
        event=rng.choice(_EVENTS),
        conn=rng.choice(_CONNECTIVES),
        base=rng.choice(_BASE_VERBS),
    )
    return sentence[0].upper() + sentence[1:]


def compose(rng: random.Random, topics: Sequence[str], target_tokens: int | None = None) -> str:
    """Readable sentences about `topics`, ending at the first sentence end past the target."""
    topics = list(topics) or _FALLBACK_TOPICS
    target = target_tokens if target_tokens is not None else rng.randint(*TARGET_TOKENS)
    sentences: list[str] = []
    total = 0
    while total < target:
        sentence = _sentence(rng, topics)
        for _ in range(3):  # a repeated sentence reads like a stuck model; redraw
            if sentence not in sentences:
                break
            sentence = _sentence(rng, topics)
        sentences.append(sentence)
        total += count_tokens(sentence)
    return " ".join(sentences)


@dataclass(frozen=True)
class Completion:
    """A finished answer: its pieces (one per token) and why it ended."""

    pieces: tuple[str, ...]
    prompt_tokens: int
    truncated: bool  # True when max_tokens cut the answer short (finish reason LENGTH)

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    @property
    def completion_tokens(self) -> int:
        return len(self.pieces)


def shape(
    text: str, *, prompt_tokens: int, max_tokens: int = 0, stop: Iterable[str] = ()
) -> Completion:
    """Apply stop sequences, then the max_tokens cap, to a natural answer."""
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=-1)
    if cut >= 0:
        text = text[:cut]
    pieces = split_pieces(text)
    limit = min(max_tokens, MAX_TOKENS_LIMIT) if max_tokens > 0 else MAX_TOKENS_LIMIT
    truncated = len(pieces) > limit
    return Completion(tuple(pieces[:limit]), prompt_tokens, truncated)


def complete(
    prompt: str,
    *,
    model: str,
    temperature: float = 0.0,
    top_p: float = 0.0,
    max_tokens: int = 0,
    stop: Iterable[str] = (),
    topic_text: str | None = None,
) -> Completion:
    """Answer `prompt` deterministically.

    `topic_text` (default: the prompt) is what the answer talks about; a chat passes the
    last user message there and the whole conversation as `prompt`, so the answer depends
    on all of it but stays on the latest question.
    """
    rng = rng_for(model, sampling_key(temperature, top_p), prompt)
    text = compose(rng, keywords(prompt if topic_text is None else topic_text))
    return shape(text, prompt_tokens=count_tokens(prompt), max_tokens=max_tokens, stop=stop)
