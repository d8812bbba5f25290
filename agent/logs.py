"""JSON-lines logging on stderr for the reference agent.

Self-contained on purpose: the agent is a stand-in for someone else's upstream and must
not import the proxy's packages. One event per line:
{"ts": 1700000000.123456, "level": "info", "logger": "agent.calls", "event": "call_started", ...}
Callers pass field values explicitly; nothing here ever sees prompt text.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            # record.created is time.time() when the event was logged: tests compare it
            # with their own clock, so it is kept at microsecond precision.
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if fields:
            out.update(fields)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, separators=(",", ":"))


def configure(level: str | int = "INFO") -> None:
    """Route every logger to one JSON handler on stderr (idempotent)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # grpc's own logger reports at INFO what the call log already says.
    logging.getLogger("grpc").setLevel(logging.WARNING)


def log_event(logger: logging.Logger, event: str, level: int = logging.INFO, **fields: Any) -> None:
    if logger.isEnabledFor(level):
        logger.log(level, event, extra={"fields": fields})
