"""Pacing: make answers take the time an LLM would, without blocking the event loop.

A call waits `first_token_ms` for its first token and `token_ms` for each later one.
The schedule is absolute (start + cumulative delay), so per-chunk scheduling jitter
does not add up over a long stream, and a reader that falls behind gets the backlog
at once, as from a real model server.
"""

from __future__ import annotations

import asyncio


class Pacer:
    """The clock of one call; not shared between calls."""

    def __init__(self, first_token_ms: float, token_ms: float) -> None:
        self.first_token_s = max(0.0, first_token_ms) / 1000
        self.token_s = max(0.0, token_ms) / 1000
        self._due: float | None = None

    async def wait(self, tokens: int) -> None:
        """Wait until a chunk that carries `tokens` tokens is due.

        The first call also covers the time to the first token. A unary call waits once
        with its whole token count; a stream waits before each chunk (0 for a chunk that
        carries no text, like the final one).
        """
        loop = asyncio.get_running_loop()
        if self._due is None:
            self._due = loop.time() + self.first_token_s + max(0, tokens - 1) * self.token_s
        else:
            self._due += max(0, tokens) * self.token_s
        delay = self._due - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)

    def tool_ms(self, cost_tokens: int) -> int:
        """How long a tool call that costs `cost_tokens` token-times takes, in ms."""
        return round(cost_tokens * self.token_s * 1000)
