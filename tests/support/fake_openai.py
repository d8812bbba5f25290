"""A small OpenAI-compatible HTTP server for tests: a real server on 127.0.0.1, port 0.

The network cannot reach a real provider here, so the tests start this instead. It speaks
HTTP/1.1 with keep-alive over asyncio streams (no framework, so that faults are exact):

  GET  /v1/models              {"object": "list", "data": [{"id": ...}]}
  POST /v1/chat/completions    non-stream JSON, or SSE (`data: {...}` ... `data: [DONE]`)
                               with a last usage chunk when stream_options.include_usage

It runs on its own event loop in a daemon thread, so a test may block (wait for a child
process, say) without stalling it. What a request gets is chosen by its "model" field:
`server.behaviours["m429"] = Behaviour(status=429, headers={"retry-after": "3"})`; any
other model gets `server.default`. Every request is recorded (`server.requests`), with
whether the client closed the connection before the answer was complete, and when:
that is how tests prove a gRPC caller's cancel reached the model server.

    with FakeOpenAI() as fake:           # or fake.start() ... fake.stop()
        url = fake.base_url              # http://127.0.0.1:PORT/v1
        fake.stop(); fake.start()        # same port again (health flip tests)

Also runnable by hand: `python -m tests.support.fake_openai --port 8000`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

MODELS = ("fake-model",)


@dataclass
class Behaviour:
    """What the server does with a chat completion request."""

    # The answer, one SSE chunk per token; None: "Echo: <last user message>" split on spaces.
    tokens: list[str] | None = None
    # Seconds before the first token and between tokens (or before a non-stream answer).
    first_delay_s: float = 0.0
    token_delay_s: float = 0.0
    finish_reason: str | None = "stop"
    # Usage reported (prompt, completion); None: counted from the request and the tokens.
    usage: tuple[int, int] | None = None
    # An HTTP error instead of an answer: status, JSON body and headers.
    status: int = 200
    error_message: str = "error"
    headers: dict[str, str] = field(default_factory=dict)
    # Close the connection (no [DONE], no final chunk) after this many token chunks.
    disconnect_after: int | None = None
    # Honour stream_options.include_usage (some servers ignore it).
    stream_usage: bool = True
    # Before the tokens, send one `data:` line of this many bytes that never ends (a
    # hostile or broken server); the client must give up rather than buffer it all.
    endless_line_bytes: int = 0


@dataclass
class Recorded:
    """One request as the server saw it."""

    method: str
    path: str
    headers: dict[str, str]
    body: dict[str, Any] | None
    started: float  # time.monotonic()
    connection: int  # requests on one kept-alive connection share this number
    completed: bool = False  # the whole answer was written
    disconnected_at: float | None = None  # the client closed the connection mid-answer
    chunks_sent: int = 0


class _Disconnected(Exception):
    pass


class FakeOpenAI:
    def __init__(self, port: int = 0) -> None:
        self.port = port
        self.default = Behaviour()
        self.behaviours: dict[str, Behaviour] = {}
        # What GET /v1/models answers with (503: the server is up but not ready).
        self.models_status = 200
        self.requests: list[Recorded] = []
        self._lock = threading.RLock()  # wait_for predicates may call chat_requests()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        # Chat completions being answered now, and the most ever at once.
        self.in_flight = 0
        self._connections = itertools.count(1)
        self.max_in_flight = 0

    # --- lifecycle (called from the test's thread) ----------------------------------

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> FakeOpenAI:
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
            self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
            self._thread.start()
        asyncio.run_coroutine_threadsafe(self._listen(), self._loop).result(10)
        return self

    def stop(self) -> None:
        """Stop listening and drop every open connection (the loop stays for start())."""
        if self._loop is not None and self._server is not None:
            asyncio.run_coroutine_threadsafe(self._close(), self._loop).result(10)

    def shutdown(self) -> None:
        self.stop()
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop.close()
            self._loop = None

    def __enter__(self) -> FakeOpenAI:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def chat_requests(self) -> list[Recorded]:
        with self._lock:
            return [r for r in self.requests if r.path == "/v1/chat/completions"]

    def wait_for(self, predicate: Callable[[Recorded], bool], timeout: float = 10.0) -> Recorded:
        """The first recorded request that satisfies `predicate`, polling until `timeout`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                found = next((r for r in self.requests if predicate(r)), None)
            if found is not None:
                return found
            time.sleep(0.005)
        raise TimeoutError("no matching request reached the fake model server")

    # --- the server (on its own loop) -------------------------------------------------

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(
            self._connection, "127.0.0.1", self.port, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def _close(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        await self._server.wait_closed()
        self._server = None

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        connection = next(self._connections)
        try:
            while True:  # keep-alive: one request after another
                head = await reader.readuntil(b"\r\n\r\n")
                request_line, *lines = head.decode("latin-1").split("\r\n")
                method, path, _ = request_line.split(" ", 2)
                headers = {}
                for line in lines:
                    if ":" in line:
                        name, value = line.split(":", 1)
                        headers[name.strip().lower()] = value.strip()
                raw = await reader.readexactly(int(headers.get("content-length", "0")))
                body = json.loads(raw) if raw else None
                record = Recorded(method, path, headers, body, time.monotonic(), connection)
                with self._lock:
                    self.requests.append(record)
                try:
                    await self._answer(record, reader, writer)
                except _Disconnected:
                    record.disconnected_at = time.monotonic()
                    return
                record.completed = True
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._writers.discard(writer)
            writer.transport.abort()

    async def _answer(
        self, record: Recorded, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        if record.method == "GET" and record.path == "/v1/models":
            if self.models_status != 200:
                await _send_json(writer, self.models_status, _error("not ready", "server_error"))
                return
            data = [{"id": m, "object": "model", "owned_by": "tests"} for m in MODELS]
            await _send_json(writer, 200, {"object": "list", "data": data})
            return
        if record.method != "POST" or record.path != "/v1/chat/completions":
            await _send_json(writer, 404, _error("not found", "invalid_request_error"))
            return
        body = record.body or {}
        behaviour = self.behaviours.get(str(body.get("model")), self.default)
        # While the answer is slow, a client that closes the connection is seen at once:
        # an idle keep-alive client sends nothing, so EOF here means it went away.
        watcher = asyncio.ensure_future(reader.read(1))
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await _sleep_or_disconnect(behaviour.first_delay_s, watcher)
            if behaviour.status != 200:
                kind = "rate_limit_error" if behaviour.status == 429 else "invalid_request_error"
                await _send_json(
                    writer,
                    behaviour.status,
                    _error(behaviour.error_message, kind),
                    behaviour.headers,
                )
                return
            tokens = behaviour.tokens if behaviour.tokens is not None else _echo(body)
            usage = behaviour.usage or (_prompt_tokens(body), len(tokens))
            if body.get("stream"):
                await self._stream(record, body, behaviour, tokens, usage, writer, watcher)
            else:
                await _sleep_or_disconnect(behaviour.token_delay_s * len(tokens), watcher)
                await _send_json(writer, 200, _completion(body, tokens, behaviour, usage))
        finally:
            self.in_flight -= 1
            # Wait for the cancel to land: the next request's read must be the only reader.
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                await watcher

    async def _stream(
        self,
        record: Recorded,
        body: dict[str, Any],
        behaviour: Behaviour,
        tokens: list[str],
        usage: tuple[int, int],
        writer: asyncio.StreamWriter,
        watcher: asyncio.Future[bytes],
    ) -> None:
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
            b"transfer-encoding: chunked\r\ncache-control: no-cache\r\n\r\n"
        )
        model = body.get("model", MODELS[0])

        async def event(data: dict[str, Any] | str) -> None:
            text = data if isinstance(data, str) else json.dumps(data)
            payload = f"data: {text}\n\n".encode()
            writer.write(b"%x\r\n%s\r\n" % (len(payload), payload))
            try:
                await writer.drain()
            except ConnectionError as exc:
                raise _Disconnected from exc

        base = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "model": model}
        await event(
            {**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}
        )
        if behaviour.endless_line_bytes:
            block = b"x" * 65536
            line = b"data: "
            for _ in range(behaviour.endless_line_bytes // len(block)):
                line += block
            writer.write(b"%x\r\n%s\r\n" % (len(line), line))
            await writer.drain()
            await _sleep_or_disconnect(30, watcher)
        for i, token in enumerate(tokens):
            if i:
                await _sleep_or_disconnect(behaviour.token_delay_s, watcher)
            if behaviour.disconnect_after is not None and i >= behaviour.disconnect_after:
                writer.transport.abort()  # the model server dies mid-answer
                raise _Disconnected
            await event({**base, "choices": [{"index": 0, "delta": {"content": token}}]})
            record.chunks_sent += 1
        await event(
            {
                **base,
                "choices": [{"index": 0, "delta": {}, "finish_reason": behaviour.finish_reason}],
            }
        )
        if behaviour.stream_usage and (body.get("stream_options") or {}).get("include_usage"):
            await event({**base, "choices": [], "usage": _usage(usage)})
        await event("[DONE]")
        writer.write(b"0\r\n\r\n")
        await writer.drain()


async def _sleep_or_disconnect(seconds: float, watcher: asyncio.Future[bytes]) -> None:
    if watcher.done():
        raise _Disconnected
    if seconds <= 0:
        return
    done, _ = await asyncio.wait({watcher}, timeout=seconds)
    if done:
        raise _Disconnected


async def _send_json(
    writer: asyncio.StreamWriter, status: int, payload: Any, headers: dict[str, str] | None = None
) -> None:
    data = json.dumps(payload).encode()
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    writer.write(
        f"HTTP/1.1 {status} X\r\ncontent-type: application/json\r\n"
        f"content-length: {len(data)}\r\n{extra}\r\n".encode()
        + data
    )
    await writer.drain()


def _error(message: str, kind: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": None, "code": None}}


def _echo(body: dict[str, Any]) -> list[str]:
    messages = body.get("messages") or []
    last = next((m for m in reversed(messages) if m.get("role") == "user"), {"content": ""})
    words = ["Echo:", *str(last.get("content", "")).split()]
    return [w if i == 0 else f" {w}" for i, w in enumerate(words)]


def _prompt_tokens(body: dict[str, Any]) -> int:
    return sum(len(str(m.get("content", "")).split()) for m in body.get("messages") or [])


def _usage(usage: tuple[int, int]) -> dict[str, int]:
    return {"prompt_tokens": usage[0], "completion_tokens": usage[1], "total_tokens": sum(usage)}


def _completion(
    body: dict[str, Any], tokens: list[str], behaviour: Behaviour, usage: tuple[int, int]
) -> dict[str, Any]:
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "model": body.get("model", MODELS[0]),
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "".join(tokens)},
                "finish_reason": behaviour.finish_reason,
            }
        ],
        "usage": _usage(usage),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--token-delay-s", type=float, default=0.02)
    args = parser.parse_args()
    fake = FakeOpenAI(args.port)
    fake.default = Behaviour(token_delay_s=args.token_delay_s)
    fake.start()
    print(
        json.dumps(
            {"event": "listening", "service": "fake-openai", "address": f"127.0.0.1:{fake.port}"}
        ),
        flush=True,
    )
    with contextlib.suppress(KeyboardInterrupt):
        threading.Event().wait()
    fake.shutdown()


if __name__ == "__main__":
    main()
