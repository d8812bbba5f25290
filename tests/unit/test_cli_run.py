"""server/cli.py `_run`: the server's coroutine never runs inside the uvloop import's
`except ImportError` (issue 20 §4: every traceback in the proxy's log was chained to
"ModuleNotFoundError: No module named 'uvloop'")."""

from __future__ import annotations

import sys
import traceback

import pytest

from aiproxy.server.cli import _run


def test_errors_in_the_server_are_not_chained_to_the_missing_uvloop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # `import uvloop` raises ImportError
    seen: list[BaseException] = []

    async def server() -> None:
        try:
            raise RuntimeError("an upstream failed")
        except RuntimeError as exc:
            seen.append(exc)

    _run(server())
    assert seen[0].__context__ is None
    text = "".join(traceback.format_exception(seen[0]))
    assert "uvloop" not in text and "During handling" not in text
