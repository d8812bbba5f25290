"""The knowledge base behind SearchRag and StreamRagGenerate: a bundled corpus and BM25.

BM25 over lightly stemmed tokens is what small production retrievers use before they
reach for embeddings; it is deterministic and needs no model. Scores are normalised to
0..1 by the best score any document could reach for the query, so a score says how
well a document matches, not merely how it ranks.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from aiproxy.agent.textgen import STOPWORDS, tokenize

DEFAULT_TOP_K = 3
MAX_TOP_K = 20
SNIPPET_CHARS = 240

# Standard BM25 constants: term-frequency saturation and length normalisation.
_K1 = 1.2
_B = 0.75
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def terms(text: str) -> list[str]:
    """Index terms: lower-cased content words with plural and -ing endings removed."""
    return [_stem(t) for t in tokenize(text.lower()) if t.isalnum() and t not in STOPWORDS]


def _stem(word: str) -> str:
    # Deliberately tiny: query and documents go through the same rules, so consistency
    # matters more than linguistic accuracy ("breakers" and "breaker" must meet).
    if len(word) > 5 and word.endswith("ing"):
        return word[:-3]
    if len(word) > 4 and word.endswith("ies"):
        return word[:-3] + "y"
    if len(word) > 3 and word.endswith("s") and not word.endswith("ss"):
        return word[:-1]
    return word


@dataclass(frozen=True)
class Document:
    id: str
    title: str
    text: str
    metadata: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Hit:
    document: Document
    score: float  # 0..1
    snippet: str


class Corpus:
    def __init__(self, documents: list[Document]) -> None:
        if not documents:
            raise ValueError("a corpus needs at least one document")
        self.documents = documents
        # The title counts twice: a query that names a document's subject should find it.
        self._tf = [Counter(terms(f"{d.title} {d.title} {d.text}")) for d in documents]
        self._len = [sum(tf.values()) for tf in self._tf]
        self._avg_len = sum(self._len) / len(documents)
        df = Counter(term for tf in self._tf for term in tf)
        n = len(documents)
        self._idf = {term: _idf(n, count) for term, count in df.items()}
        self._idf_unseen = _idf(n, 0)

    @classmethod
    def bundled(cls) -> Corpus:
        """The corpus shipped in agent/data/corpus.json."""
        raw = resources.files("agent").joinpath("data/corpus.json").read_text(encoding="utf-8")
        return cls.from_json(json.loads(raw))

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Corpus:
        documents = []
        for i, item in enumerate(data["documents"]):
            try:
                metadata = {str(k): str(v) for k, v in item.get("metadata", {}).items()}
                documents.append(
                    Document(str(item["id"]), str(item["title"]), str(item["text"]), metadata)
                )
            except (KeyError, TypeError, AttributeError) as exc:
                raise ValueError(f"corpus document {i} is malformed: {exc!r}") from exc
        return cls(documents)

    def search(
        self, query: str, top_k: int = DEFAULT_TOP_K, filters: Mapping[str, str] | None = None
    ) -> list[Hit]:
        """The best `top_k` documents for `query` whose metadata match `filters` exactly."""
        query_terms = list(dict.fromkeys(terms(query)))  # unique, in order
        if not query_terms or top_k <= 0:
            return []
        best_possible = sum(self._idf.get(t, self._idf_unseen) * (_K1 + 1) for t in query_terms)
        scored = []
        for i, doc in enumerate(self.documents):
            if filters and any(doc.metadata.get(k) != v for k, v in filters.items()):
                continue
            raw = self._bm25(i, query_terms)
            if raw > 0:
                scored.append((round(raw / best_possible, 4), doc.id, i))
        scored.sort(key=lambda s: (-s[0], s[1]))
        return [
            Hit(self.documents[i], score, _snippet(self.documents[i].text, query_terms))
            for score, _, i in scored[: min(top_k, MAX_TOP_K)]
        ]

    def _bm25(self, i: int, query_terms: list[str]) -> float:
        tf = self._tf[i]
        norm = _K1 * (1 - _B + _B * self._len[i] / self._avg_len)
        score = 0.0
        for term in query_terms:
            f = tf.get(term, 0)
            if f:
                score += self._idf[term] * f * (_K1 + 1) / (f + norm)
        return score


def _idf(n_docs: int, doc_freq: int) -> float:
    # The "plus one" BM25 idf: never negative, even for terms in most documents.
    return math.log(1 + (n_docs - doc_freq + 0.5) / (doc_freq + 0.5))


def _snippet(text: str, query_terms: list[str]) -> str:
    """The sentence that shares the most terms with the query (the first on ties)."""
    wanted = set(query_terms)
    sentences = _SENTENCE_END.split(text)
    best = max(sentences, key=lambda s: len(wanted.intersection(terms(s))))
    if len(best) > SNIPPET_CHARS:
        best = best[: SNIPPET_CHARS - 1].rsplit(" ", 1)[0] + "…"
    return best
