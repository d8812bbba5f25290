"""Chat session memory: a bounded, in-process LRU of conversations.

Bounded on every axis (sessions, messages per session, characters per message) so that
no caller can grow the agent's memory without limit. It lives in one process: replicas
do not share sessions, like many real LLM front-ends without a session store.
"""

from __future__ import annotations

from collections import OrderedDict

# (role, content); role is the ai.agent.v1.ChatRole number.
Message = tuple[int, str]

SYSTEM_ROLE = 1  # ai.agent.v1.CHAT_ROLE_SYSTEM


class SessionStore:
    def __init__(
        self, max_sessions: int = 10_000, max_messages: int = 100, max_chars: int = 8192
    ) -> None:
        if max_sessions < 1 or max_messages < 2 or max_chars < 1:
            raise ValueError("session limits must be positive (and max_messages >= 2)")
        self.max_sessions = max_sessions
        self.max_messages = max_messages
        self.max_chars = max_chars
        self._sessions: OrderedDict[str, tuple[Message, ...]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._sessions)

    def __contains__(self, session_id: str) -> bool:
        return session_id in self._sessions

    def get(self, session_id: str) -> tuple[Message, ...]:
        """The remembered conversation (empty if unknown); marks the session recently used."""
        messages = self._sessions.get(session_id)
        if messages is None:
            return ()
        self._sessions.move_to_end(session_id)
        return messages

    def put(self, session_id: str, messages: tuple[Message, ...] | list[Message]) -> None:
        """Remember `messages` as the whole conversation, trimmed to the limits."""
        trimmed = tuple((role, content[: self.max_chars]) for role, content in messages)
        if len(trimmed) > self.max_messages:
            # Keep a leading system message: it frames everything that follows.
            if trimmed[0][0] == SYSTEM_ROLE:
                trimmed = (trimmed[0], *trimmed[-(self.max_messages - 1) :])
            else:
                trimmed = trimmed[-self.max_messages :]
        self._sessions[session_id] = trimmed
        self._sessions.move_to_end(session_id)
        while len(self._sessions) > self.max_sessions:
            self._sessions.popitem(last=False)
