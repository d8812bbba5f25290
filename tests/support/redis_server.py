"""The redis_server fixture: a fresh, empty Debian redis-server per test (devtools/redis_server.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from devtools.redis_server import RedisServer

__all__ = ["RedisServer", "redis_server"]


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A fresh, empty redis-server for one test, stopped by PID afterwards."""
    server = RedisServer().start()
    try:
        yield server
    finally:
        server.cleanup()
