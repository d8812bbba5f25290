"""core/accesslog.py: the access log written in batches by one thread."""

from __future__ import annotations

import io
import json
import logging
import threading
import time
from collections.abc import Iterator

import pytest

from aiproxy.core.accesslog import AccessLogWriter
from aiproxy.core.logs import JsonFormatter


class CountingStream(io.StringIO):
    """A stream that counts its writes and can be held (a pipe nobody reads)."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0
        self.gate = threading.Event()
        self.gate.set()

    def write(self, s: str) -> int:
        self.gate.wait(10)
        self.writes += 1
        return super().write(s)


@pytest.fixture
def root_stream() -> Iterator[tuple[CountingStream, logging.StreamHandler[CountingStream]]]:
    """The root logger's only handler: a JSON stream handler on a CountingStream, as
    core.logs.configure sets it up (the writer takes the root handlers at start)."""
    stream = CountingStream()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    saved = root.handlers[:]
    root.handlers[:] = [handler]
    try:
        yield stream, handler
    finally:
        root.handlers[:] = saved


def _taken(writer: AccessLogWriter) -> None:
    """Until the writer thread has taken everything queued (polled, bounded)."""
    deadline = time.monotonic() + 10
    while writer._queue.qsize():
        assert time.monotonic() < deadline, "the writer thread never took the record"
        time.sleep(0.002)


def _logger(name: str) -> logging.Logger:
    logger = logging.getLogger(name)
    logger.setLevel(logging.INFO)
    return logger


def test_a_batch_is_one_write_in_order_with_the_time_of_the_call(root_stream) -> None:
    stream, _ = root_stream
    writer = AccessLogWriter(_logger("test.access.batch"), linger_s=0.05)
    writer.start()
    stream.gate.clear()  # hold the first write so the rest queue up behind it
    before = time.time()
    writer.write({"i": 0})
    _taken(writer)  # the thread holds the first record (and blocks in write)
    for i in range(1, 500):
        writer.write({"i": i})
    stream.gate.set()
    writer.stop()
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [line["i"] for line in lines] == list(range(500))
    assert all(
        line["event"] == "access" and line["logger"] == "test.access.batch" for line in lines
    )
    assert lines[0]["ts"] >= round(before, 6) - 1e-6
    assert lines[0]["ts"] <= lines[-1]["ts"]
    # 500 lines, a handful of writes: the first record, then the 499 queued behind it.
    assert stream.writes <= 3


def test_a_writer_that_falls_behind_drops_and_says_so(root_stream) -> None:
    stream, _ = root_stream
    writer = AccessLogWriter(_logger("test.access.drop"), linger_s=0.01, max_queued=10)
    writer.start()
    stream.gate.clear()
    writer.write({"i": 0})
    _taken(writer)
    for i in range(1, 101):
        writer.write({"i": i})
    stream.gate.set()
    writer.stop()
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    kept = [line["i"] for line in lines if line["event"] == "access"]
    assert kept == list(range(11))  # the one in flight and the 10 queued
    warnings = [line for line in lines if line["event"] == "access_log_dropped"]
    assert [(w["dropped"], w["level"]) for w in warnings] == [(90, "warning")]


def test_handler_levels_and_other_handlers_are_respected(root_stream) -> None:
    stream, handler = root_stream
    seen: list[str] = []

    class Recording(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    logging.getLogger().addHandler(Recording())
    handler.setLevel(logging.WARNING)  # the stream wants warnings only
    writer = AccessLogWriter(_logger("test.access.levels"))
    writer.start()
    writer.write({"i": 1})
    writer.stop()
    assert stream.getvalue() == "" and seen == ["access"]


def test_stop_without_start_and_twice_is_harmless() -> None:
    writer = AccessLogWriter(_logger("test.access.idle"))
    writer.stop()
    assert not writer.running
