"""The fenced code blocks of the project's Markdown documents (README.md, docs/**/*.md),
for tests/integration/test_docs.py, which runs them. The convention is in that module's
docstring; this module only finds and classifies blocks."""

from __future__ import annotations

import pathlib
import re
from dataclasses import dataclass

ROOT = pathlib.Path(__file__).resolve().parents[2]

# Languages whose blocks run, by how they run.
SHELL = frozenset({"sh", "bash", "shell"})
BROWSER = frozenset({"js", "javascript"})
PYTHON = frozenset({"python", "py"})
# Languages that are shown, never run: configuration, output, layouts, other files' text.
SHOWN = frozenset({
    "text", "console", "output", "yaml", "yml", "json", "jsonc", "proto", "protobuf", "toml",
    "ini", "dockerfile", "html", "lua", "diff", "http", "env", "dotenv", "promql", "sql",
    "mermaid", "csv", "log",
})  # fmt: skip
NO_RUN = "no-run"  # an attribute after a runnable language: shown, not run

_FENCE = re.compile(r"^(?P<indent> *)(?P<fence>`{3,}|~{3,})(?P<info>[^`]*)$")


@dataclass(frozen=True)
class Block:
    path: pathlib.Path
    line: int  # 1-based line of the opening fence
    info: str  # the whole info string
    code: str

    @property
    def lang(self) -> str:
        return self.info.split()[0].lower() if self.info.split() else ""

    @property
    def attrs(self) -> tuple[str, ...]:
        return tuple(self.info.split()[1:])

    @property
    def kind(self) -> str:
        """'shell', 'browser', 'python' (run), 'shown' (not run), or 'unknown' (an
        error: every block must say what it is)."""
        if self.lang in SHOWN:
            return "shown"
        runner = (
            "shell"
            if self.lang in SHELL
            else "browser"
            if self.lang in BROWSER
            else "python"
            if self.lang in PYTHON
            else "unknown"
        )
        if runner != "unknown" and NO_RUN in self.attrs:
            return "shown"
        return runner

    @property
    def name(self) -> str:
        path = self.path.relative_to(ROOT) if self.path.is_relative_to(ROOT) else self.path
        return f"{path}:{self.line}"


def blocks(path: pathlib.Path) -> list[Block]:
    """Every fenced code block of a CommonMark document (``` or ~~~, 3 or more, indented
    up to any depth as in list items; the content is dedented by the fence's indent). An
    unclosed fence runs to the end of the document, as CommonMark says."""
    out: list[Block] = []
    lines = path.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        opening = _FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        indent, fence = len(opening["indent"]), opening["fence"]
        start, body = i + 1, []
        i += 1
        while i < len(lines):
            closing = re.match(rf"^ *{re.escape(fence[0])}{{{len(fence)},}} *$", lines[i])
            if closing:
                break
            line = lines[i]
            body.append(line[indent:] if line[:indent].strip() == "" else line.lstrip())
            i += 1
        out.append(Block(path, start, opening["info"].strip(), "\n".join(body) + "\n"))
        i += 1
    return out


def documents(root: pathlib.Path = ROOT) -> list[pathlib.Path]:
    """README.md and every Markdown file under docs/ (found anew on every run)."""
    found = [root / "README.md"] if (root / "README.md").is_file() else []
    return found + sorted((root / "docs").glob("**/*.md"))


def all_blocks(root: pathlib.Path = ROOT) -> list[Block]:
    return [block for doc in documents(root) for block in blocks(doc)]
