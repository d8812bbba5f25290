"""The request contract of ai.agent.v1 in numbers, written once.

The proto's comments state these ranges to callers; two places enforce them: the proxy's
validation stage (interceptors/validation.py, before a call costs anything upstream) and
the reference agent (agent/service.py, a service of its own that checks what it is
sent). Both read them from here, so they cannot drift apart. The agent may import core/
(it never imports server/ or interceptors/: pyproject.toml's import-linter contracts);
this module imports nothing of the proxy.

The counts below are also the defaults of the proxy's configurable limits (core/settings.py
ValidationSettings); the ranges that are part of a field's meaning (a temperature above 2
means nothing) are not settings.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final


@dataclass(frozen=True, slots=True)
class Range:
    """A closed numeric range; `value in r` is False for NaN too."""

    low: float
    high: float

    def __contains__(self, value: float) -> bool:
        return self.low <= value <= self.high

    @property
    def violation(self) -> str:
        """What a field outside the range is told."""
        return f"must be between {self.low:g} and {self.high:g}"


# GenerationOptions.temperature and .top_p (0: the model's default).
TEMPERATURE: Final = Range(0.0, 2.0)
TOP_P: Final = Range(0.0, 1.0)
# GenerationOptions.stop: how many stop sequences a request may list.
MAX_STOP_SEQUENCES: Final = 16
# ExecuteAgentRequest.tools: how many tools one agent run may name.
MAX_TOOLS: Final = 16
# ExecuteAgentRequest.max_steps: the most reasoning steps a run may ask for.
MAX_STEPS: Final = 50
# Identifiers (model, session id, tool and filter names, stop sequences): characters.
MAX_ID_CHARS: Final = 128
