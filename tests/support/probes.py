"""What a backlog probe (server/pool/backlog.py) sends, for tests that check when it probes."""

from __future__ import annotations

from typing import Any


def record_probes(probe: Any) -> list[str]:
    """The method paths `probe` sends a probe call on, in order, from now on (its record of
    calls in flight, `_sent`, swapped for one that also lists each path it is given)."""
    sent: list[str] = []

    class Recording(dict):  # type: ignore[type-arg]
        def __setitem__(self, key: str, value: float) -> None:
            sent.append(key)
            super().__setitem__(key, value)

    probe._sent = Recording()
    return sent
