"""The client of an OpenAI-compatible `/v1/chat/completions` server (vLLM, Ollama,
llama.cpp's server, LM Studio, OpenAI itself): one per process, pooled, keep-alive.

    client = ModelClient(settings)            # at start-up
    text = await client.complete(messages, model=..., options=..., timeout_s=...)
    async for event in client.stream(...):    # Delta(text) ..., then one Done(usage, finish)
        ...
    ok = await client.probe()                 # GET /models, for health
    await client.aclose()                     # at shutdown

Built on httpx rather than the official `openai` package: the proxy in front already retries
(within the caller's deadline, on another replica), and `openai` retries 429/5xx by itself
(twice by default, sleeping on retry-after), which would hide the model server's answer from
the proxy and spend the caller's deadline; it also parses every chunk into pydantic models
we would convert again. httpx (which `openai` itself is built on) gives the pool, keep-alive,
per-request timeouts and a response we close ourselves when the caller leaves.

Cancellation: the handler's task is cancelled when the gRPC caller leaves; the cancel lands
in the read of the response, whose `async with` closes it. A response that was not read to
the end is not returned to the pool: httpcore closes its connection, so the model server
sees the client go away and stops generating.

Errors become `ModelError`, which carries a google.rpc.Status (ErrorInfo, RetryInfo).
Whose fault an HTTP status is decides the code (`_http_error`):
- the caller's request (its prompt, options or model): 400, 413, 422 -> INVALID_ARGUMENT
  with the model server's own words; a 404/410 that names a model the caller asked for
  -> NOT_FOUND;
- the model server's load or state, worth a retry elsewhere: 429 -> RESOURCE_EXHAUSTED
  (RetryInfo from retry-after); 408, 409, 425, 5xx, connection failures and waiting longer
  than pool_timeout_s for a free connection -> UNAVAILABLE;
- the agent's own configuration (the caller did nothing wrong, a retry will not help):
  401/403 (the key), 404/410 for the agent's URL or its configured model, 3xx (we never
  follow redirects: the base URL is wrong) and every other status -> INTERNAL, with a
  message naming the URL path and the model, never the key or the host.
A timeout -> DEADLINE_EXCEEDED, a broken answer (bad JSON, a stream cut before [DONE], a
2xx other than 200) -> UNAVAILABLE. The API key is sent in the Authorization header and
appears in no message and no log line.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import json
import logging
import math
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import httpx
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2, status_pb2

from aiproxy.agent.errors import StatusError, rpc_status_proto
from aiproxy.agent.logs import log_event

log = logging.getLogger("agent.model")

# ErrorInfo.domain of the errors the agent makes about its model server.
DOMAIN = "agent.aiproxy.model"
# RetryInfo when the model server says 429/503 without retry-after.
DEFAULT_RETRY_S = 1.0
# A retry-after above this is capped (a caller should not be told to wait an hour).
MAX_RETRY_S = 300.0
# Characters of the model server's error message passed on for a 400.
MAX_MESSAGE_CHARS = 200

# A model server is not trusted with our memory: a whole non-stream answer (or error body)
# and one SSE line are bounded; past that the answer is MODEL_BAD_ANSWER.
MAX_ANSWER_BYTES = 8 << 20
MAX_EVENT_BYTES = 1 << 20
# After [DONE], how long the rest of the body may take before the connection is dropped.
DRAIN_AFTER_DONE_S = 1.0

FINISH_STOP = "stop"
FINISH_LENGTH = "length"
FINISH_ERROR = "error"


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass(frozen=True)
class Delta:
    """One SSE chunk's text."""

    text: str


@dataclass(frozen=True)
class Done:
    """The end of an answer: why it ended, and what it cost (None if the server said nothing)."""

    finish: str
    usage: Usage | None


@dataclass(frozen=True)
class Completion:
    text: str
    finish: str
    usage: Usage | None


class ModelError(StatusError):
    """A failed model call, as the google.rpc.Status the agent answers with."""

    def __init__(
        self,
        code: grpc.StatusCode,
        reason: str,
        message: str,
        *,
        http_status: int | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.code_name = code.name
        self.reason = reason
        self.message = message
        self.http_status = http_status
        self.retry_after_s = retry_after_s

    def to_status(self) -> status_pb2.Status:
        metadata = {} if self.http_status is None else {"httpStatus": str(self.http_status)}
        details: list[Any] = [
            error_details_pb2.ErrorInfo(reason=self.reason, domain=DOMAIN, metadata=metadata)
        ]
        if self.retry_after_s is not None:
            delay = duration_pb2.Duration()
            delay.FromNanoseconds(int(self.retry_after_s * 1e9))
            details.append(error_details_pb2.RetryInfo(retry_delay=delay))
        return rpc_status_proto(self.code.value[0], self.message, *details)


@dataclass(frozen=True)
class ModelSettings:
    base_url: str
    api_key: str | None = None
    # The agent's configured model: a 404 for it is the operator's mistake, while a 404 for
    # a model the caller named instead may be the caller's (see _http_error).
    model: str | None = None
    # Timeout when the caller set no deadline: for a whole unary answer, and between two
    # chunks of a stream (a stream as a whole is bounded by the caller's deadline only).
    timeout_s: float = 120.0
    connect_timeout_s: float = 5.0
    max_connections: int = 100
    # Wait for a free connection this long at most, then UNAVAILABLE (MODEL_BUSY): the
    # proxy can try another replica rather than queue behind max_connections here.
    pool_timeout_s: float = 5.0
    probe_timeout_s: float = 2.0


class ModelClient:
    def __init__(self, settings: ModelSettings) -> None:
        self.settings = settings
        headers = {"accept": "application/json"}
        if settings.api_key:
            headers["authorization"] = f"Bearer {settings.api_key}"
        self._http = httpx.AsyncClient(
            base_url=settings.base_url.rstrip("/") + "/",
            headers=headers,
            limits=httpx.Limits(
                max_connections=settings.max_connections,
                max_keepalive_connections=settings.max_connections,
                keepalive_expiry=30.0,
            ),
            timeout=httpx.Timeout(settings.timeout_s, connect=settings.connect_timeout_s),
            follow_redirects=False,
            trust_env=False,  # no proxy or netrc from the environment: the URL says it all
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    async def probe(self) -> tuple[bool, str]:
        """(reachable, why): GET /models within probe_timeout_s.

        Reachable means it answered and would serve us: 5xx, 401 and 403 are not (every
        call would fail); any other answer is (a server without /models still chats).
        """
        try:
            response = await self._http.get(
                "models", timeout=httpx.Timeout(self.settings.probe_timeout_s)
            )
            await response.aclose()
        except httpx.HTTPError as exc:
            return False, type(exc).__name__
        if response.status_code >= 500 or response.status_code in (401, 403):
            return False, f"HTTP {response.status_code}"
        return True, f"HTTP {response.status_code}"

    async def complete(
        self,
        messages: list[dict[str, str]],
        *,
        model: str,
        options: dict[str, Any],
        timeout_s: float | None,
    ) -> Completion:
        body = {"model": model, "messages": messages, "stream": False, **options}
        if timeout_s is not None and timeout_s <= 0:
            raise _timed_out(model)  # the caller's deadline has already passed
        timeout = self._timeout(timeout_s)
        try:
            async with (
                asyncio.timeout(timeout_s),
                self._http.stream(
                    "POST", "chat/completions", json=body, timeout=timeout
                ) as response,
            ):
                raw = await _read_bounded(response, MAX_ANSWER_BYTES)
        except httpx.PoolTimeout as exc:
            raise _busy(model) from exc
        except (TimeoutError, httpx.TimeoutException) as exc:
            raise _timed_out(model) from exc
        except httpx.HTTPError as exc:
            raise _unreachable(model, exc) from exc
        if raw is None:
            raise _broken(model, f"an answer larger than {MAX_ANSWER_BYTES} bytes")
        if response.status_code != 200:
            raise self._http_error(model, response, raw)
        try:
            payload = json.loads(raw)
            choice = payload["choices"][0]
            text = choice["message"].get("content") or ""
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
            raise _broken(model, "an answer that is not a chat completion") from exc
        return Completion(
            text=str(text), finish=_finish(choice.get("finish_reason")), usage=_usage(payload)
        )

    async def stream(
        self,
        messages: list[dict[str, str]],
        *,
        model: str,
        options: dict[str, Any],
        timeout_s: float | None,
    ) -> AsyncIterator[Delta | Done]:
        """Delta per SSE chunk that carries text, then exactly one Done, or a ModelError."""
        body = {
            "model": model,
            "messages": messages,
            "stream": True,
            "stream_options": {"include_usage": True},
            **options,
        }
        if timeout_s is not None and timeout_s <= 0:
            raise _timed_out(model)  # the caller's deadline has already passed
        finish: str | None = None
        usage: Usage | None = None
        done = begun = False
        # No asyncio.timeout here: its cancel would land in whatever the consumer awaits
        # between chunks. The caller's deadline ends the whole stream (gRPC cancels the
        # handler); httpx's read timeout bounds the wait for each chunk.
        try:
            async with self._http.stream(
                "POST", "chat/completions", json=body, timeout=self._timeout(timeout_s)
            ) as response:
                if response.status_code != 200:
                    raw = await _read_bounded(response, MAX_ANSWER_BYTES)
                    raise self._http_error(model, response, raw or b"")
                begun = True
                async with contextlib.aclosing(_lines(response, MAX_EVENT_BYTES)) as lines:
                    async for line in lines:
                        if line is None:
                            raise _broken(model, f"a line longer than {MAX_EVENT_BYTES} bytes")
                        if not line.startswith("data:"):
                            continue  # blank separators, ": keep-alive" comments, event: lines
                        data = line[5:].strip()
                        if data == "[DONE]":
                            done = True
                            break
                        try:
                            chunk = json.loads(data)
                        except ValueError as exc:
                            raise _broken(model, "a stream event that is not JSON") from exc
                        if not isinstance(chunk, dict):
                            raise _broken(model, "a stream event that is not a JSON object")
                        if chunk.get("error"):  # some servers report a late failure in-band
                            raise ModelError(
                                grpc.StatusCode.UNAVAILABLE,
                                "MODEL_STREAM_FAILED",
                                "the model server failed mid-answer",
                            )
                        usage = _usage(chunk) or usage
                        for text, reason in _choices(chunk):
                            if text:
                                yield Delta(text)
                            if reason:
                                finish = _finish(reason)
                    if done:
                        await _drain(lines)
        except httpx.PoolTimeout as exc:
            raise _busy(model) from exc
        except (TimeoutError, httpx.TimeoutException) as exc:
            raise _timed_out(model) from exc
        except httpx.HTTPError as exc:
            # Includes the connection closing before the last chunk (RemoteProtocolError).
            raise _unreachable(model, exc, started=begun) from exc
        if not done and finish is None:
            # The connection ended cleanly but the answer did not: a cut stream.
            raise ModelError(
                grpc.StatusCode.UNAVAILABLE,
                "MODEL_STREAM_CUT",
                "the model server ended the answer before it was complete",
            )
        yield Done(finish or FINISH_STOP, usage)

    def _http_error(self, model: str, response: httpx.Response, raw: bytes) -> ModelError:
        return _http_error(
            model,
            response.status_code,
            response.headers,
            raw,
            # The path only: the URL's host, userinfo and query are the operator's business.
            path=response.request.url.path,
            caller_model=model != self.settings.model,
        )

    def _timeout(self, timeout_s: float | None) -> httpx.Timeout:
        """The caller's remaining deadline bounds every phase; without one, the defaults."""
        limit = self.settings.timeout_s
        if timeout_s is not None:
            limit = min(timeout_s, limit)
        return httpx.Timeout(
            limit,
            connect=min(limit, self.settings.connect_timeout_s),
            pool=min(limit, self.settings.pool_timeout_s),
        )


class HealthMonitor:
    """Probes the model server every `interval_s`; calls `report(ok)` on every change."""

    def __init__(
        self,
        client: ModelClient,
        interval_s: float,
        report: Callable[[bool], Awaitable[None]],
    ) -> None:
        self._client = client
        self._interval_s = interval_s
        self._report = report
        self._ok: bool | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def ok(self) -> bool:
        return bool(self._ok)

    async def check(self) -> bool:
        started = time.monotonic()
        ok, why = await self._client.probe()
        if ok != self._ok:
            self._ok = ok
            log_event(
                log,
                "model_health_changed",
                logging.INFO if ok else logging.WARNING,
                reachable=ok,
                probe=why,
                probe_ms=round((time.monotonic() - started) * 1000, 1),
            )
            await self._report(ok)
        return ok

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            try:
                await self.check()
            except Exception:  # a bug in a probe must not end health checking
                log.exception("model_probe_failed")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


# --- reading -------------------------------------------------------------------------


async def _read_bounded(response: httpx.Response, limit: int) -> bytes | None:
    """The body, or None once it passes `limit` bytes (the rest is never read)."""
    parts: list[bytes] = []
    size = 0
    async for part in response.aiter_bytes():
        size += len(part)
        if size > limit:
            return None
        parts.append(part)
    return b"".join(parts)


async def _lines(response: httpx.Response, limit: int) -> AsyncIterator[str | None]:
    """The body's lines (\n, \r\n or \r ends one), decoded; None if one passes `limit`."""
    pending = b""
    async for part in response.aiter_bytes():
        pending += part
        *lines, pending = pending.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
        for line in lines:
            yield line.decode("utf-8", errors="replace")
        if len(pending) > limit:
            yield None
            return
    if pending:
        yield pending.decode("utf-8", errors="replace")


async def _drain(lines: AsyncIterator[str | None]) -> None:
    """Read the body to its end after [DONE] (the chunked terminator), so that the
    connection goes back to the pool: httpx closes a response that was not read through.
    Bounded in time and lines for a server that keeps talking; a failure here is moot."""
    with contextlib.suppress(TimeoutError, httpx.HTTPError):
        async with asyncio.timeout(DRAIN_AFTER_DONE_S):
            extra = 0
            async for line in lines:
                extra += 1
                if line is None or extra > 100:
                    return


def _choices(chunk: dict[str, Any]) -> list[tuple[str, Any]]:
    """(delta text, finish_reason) of each choice of a stream chunk, tolerating junk."""
    choices = chunk.get("choices")
    out = []
    for choice in choices if isinstance(choices, list) else ():
        if isinstance(choice, dict):
            delta = choice.get("delta")
            text = delta.get("content") if isinstance(delta, dict) else None
            out.append((str(text) if text else "", choice.get("finish_reason")))
    return out


# --- mapping -------------------------------------------------------------------------


def _finish(reason: Any) -> str:
    if reason in ("length", "max_tokens"):
        return FINISH_LENGTH
    if reason == "content_filter":
        return FINISH_ERROR
    return FINISH_STOP  # "stop", "eos", "tool_calls", "function_call", or missing


def _usage(payload: dict[str, Any]) -> Usage | None:
    usage = payload.get("usage")
    if not isinstance(usage, dict):
        return None
    try:
        prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
        return Usage(int(prompt or 0), int(completion or 0))
    except (TypeError, ValueError):
        return None


def retry_after_s(value: str | None, now: float | None = None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date), capped."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
    if not math.isfinite(seconds):
        return None
    return min(max(seconds, 0.0), MAX_RETRY_S)


def _provider_message(raw: bytes) -> str:
    """The model server's own error message, short and on one line, or ''."""
    try:
        payload = json.loads(raw)
        error = payload.get("error")
        # OpenAI/vLLM: {"error": {"message": ...}}; Ollama, llama.cpp: {"error": "..."} or
        # {"message": ...}.
        message = (
            error.get("message") if isinstance(error, dict) else error or payload.get("message")
        )
    except (ValueError, KeyError, TypeError, AttributeError):
        return ""
    text = " ".join(str(message or "").split())
    return text[:MAX_MESSAGE_CHARS] if text.isprintable() else ""


# HTTP statuses that are about the caller's request (its prompt, options), not the agent.
CALLER_STATUSES = frozenset({400, 413, 422})
# Statuses that say "not now": worth a retry, on this model server or another replica.
TRANSIENT_STATUSES = frozenset({408, 409, 425})
# Characters of a model name quoted in a message (the name may come from the caller).
MAX_MODEL_CHARS = 100


def _http_error(
    model: str,
    status: int,
    headers: httpx.Headers,
    raw: bytes,
    *,
    path: str = "/chat/completions",
    caller_model: bool = False,
) -> ModelError:
    """The ModelError for a non-200 answer. `caller_model`: the caller named `model`
    (it is not the agent's configured one), so a 404 about that model is the caller's.

    The default is the agent's fault: a status we do not know to be about the request
    must not tell the caller to change a request that was fine."""
    log_event(
        log,
        "model_http_error",
        logging.WARNING,
        model=model[:MAX_MODEL_CHARS],
        http_status=status,
        path=path[:200],
    )
    named = repr(model[:MAX_MODEL_CHARS])
    if status == 429:
        delay = retry_after_s(headers.get("retry-after"))
        return ModelError(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "MODEL_RATE_LIMITED",
            "the model server is rate limiting this agent; retry later",
            http_status=status,
            retry_after_s=DEFAULT_RETRY_S if delay is None else delay,
        )
    if status in (401, 403):
        return ModelError(
            grpc.StatusCode.INTERNAL,
            "MODEL_AUTH_FAILED",
            f"the agent's credentials for its model server were refused (HTTP {status}): "
            "the agent is misconfigured (check OPENAI_API_KEY), the request was fine",
            http_status=status,
        )
    if status >= 500 or status in TRANSIENT_STATUSES:
        delay = retry_after_s(headers.get("retry-after"))
        return ModelError(
            grpc.StatusCode.UNAVAILABLE,
            "MODEL_UNAVAILABLE",
            f"the model server failed (HTTP {status})",
            http_status=status,
            retry_after_s=DEFAULT_RETRY_S if delay is None else delay,
        )
    if status in CALLER_STATUSES:
        detail = _provider_message(raw)
        return ModelError(
            grpc.StatusCode.INVALID_ARGUMENT,
            "MODEL_REJECTED_REQUEST",
            f"the model server rejected the request (HTTP {status})"
            + (f": {detail}" if detail else ""),
            http_status=status,
        )
    if 200 <= status < 300:
        return _broken(model, f"HTTP {status} instead of an answer")
    if status in (404, 410) and caller_model and _names_model(_provider_message(raw), model):
        # The path exists (the server talks about models) and it has no such model.
        return ModelError(
            grpc.StatusCode.NOT_FOUND,
            "MODEL_UNKNOWN",
            f"the model server has no model {named} (HTTP {status}): "
            "ask for another model, or none for the agent's default",
            http_status=status,
        )
    if status in (404, 410):
        what = f"the model server has no POST {path} for model {named} (HTTP {status})"
        check = "its base URL (it usually ends in /v1) and its model"
    elif 300 <= status < 400:
        what = (
            f"the model server redirected POST {path} (HTTP {status}; redirects are not followed)"
        )
        check = "its base URL: use the address it redirects to"
    else:
        what = f"the model server refused POST {path} for model {named} (HTTP {status})"
        check = "its base URL and model"
    return ModelError(
        grpc.StatusCode.INTERNAL,
        "MODEL_MISCONFIGURED",
        f"{what}: the agent is misconfigured (check {check}), the request was fine",
        http_status=status,
    )


def _names_model(message: str, model: str) -> bool:
    """Whether a model server's error message is about the model `model`: it says
    "model" and names it as a whole word (OpenAI and vLLM: "The model `x` does not exist",
    Ollama: 'model "x" not found'); a bare "Not Found" from a wrong path is not."""
    if not model or "model" not in message.lower():
        return False
    return re.search(rf"(?<![\w.:/-]){re.escape(model)}(?![\w.:/-])", message) is not None


def _unreachable(model: str, exc: httpx.HTTPError, started: bool = False) -> ModelError:
    log_event(
        log,
        "model_unreachable",
        logging.WARNING,
        model=model[:100],
        error=type(exc).__name__,
        mid_stream=started,
    )
    return ModelError(
        grpc.StatusCode.UNAVAILABLE,
        "MODEL_UNAVAILABLE",
        "the model server closed the connection mid-answer"
        if started
        else "the model server could not be reached",
        retry_after_s=DEFAULT_RETRY_S,
    )


def _busy(model: str) -> ModelError:
    log_event(log, "model_connections_exhausted", logging.WARNING, model=model[:100])
    return ModelError(
        grpc.StatusCode.UNAVAILABLE,
        "MODEL_BUSY",
        "the agent has no free connection to its model server; retry later",
        retry_after_s=DEFAULT_RETRY_S,
    )


def _timed_out(model: str) -> ModelError:
    log_event(log, "model_timeout", logging.WARNING, model=model[:100])
    return ModelError(
        grpc.StatusCode.DEADLINE_EXCEEDED,
        "MODEL_TIMEOUT",
        "the model server did not answer in time",
    )


def _broken(model: str, what: str) -> ModelError:
    log_event(log, "model_bad_answer", logging.WARNING, model=model[:100], what=what)
    return ModelError(
        grpc.StatusCode.UNAVAILABLE, "MODEL_BAD_ANSWER", f"the model server sent {what}"
    )
