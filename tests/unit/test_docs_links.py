"""The README is the front page of the manual: it links every page under docs/, and no
relative link in README.md or docs/ points at a file or heading that is not there."""

from __future__ import annotations

import pathlib
import re

import pytest

from tests.support.docs import documents

ROOT = pathlib.Path(__file__).resolve().parents[2]
# [text](target) and [text](target#anchor), relative targets only.
_LINK = re.compile(r"\]\((?!https?:|mailto:)([^)#\s]*)(#[^)\s]*)?\)")
_HEADING = re.compile(r"^#{1,6} (.+?) *$", re.MULTILINE)
_FENCED = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)


def _anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lowercase, punctuation dropped, spaces to dashes."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(path: pathlib.Path) -> set[str]:
    text = _FENCED.sub("", path.read_text(encoding="utf-8"))
    return {_anchor(h) for h in _HEADING.findall(text)}


def test_the_readme_links_every_docs_page() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    linked = {(ROOT / target).resolve() for target, _ in _LINK.findall(readme)}
    pages = sorted((ROOT / "docs").glob("**/*.md"))
    assert pages, "docs/ has no pages"
    missing = [str(p.relative_to(ROOT)) for p in pages if p.resolve() not in linked]
    assert not missing, f"README.md does not link {missing}"


@pytest.mark.parametrize("doc", documents(ROOT), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(doc: pathlib.Path) -> None:
    broken = []
    text = _FENCED.sub("", doc.read_text(encoding="utf-8"))
    for target, anchor in _LINK.findall(text):
        path = (doc.parent / target).resolve() if target else doc
        if not path.exists():
            broken.append(f"{target}: no such file")
        elif anchor and path.suffix == ".md" and anchor[1:] not in _anchors(path):
            broken.append(f"{target}{anchor}: no such heading")
    assert not broken, f"{doc.relative_to(ROOT)}: {broken}"
