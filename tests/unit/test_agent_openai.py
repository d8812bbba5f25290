"""Pure logic of the agent's OpenAI-compatible backend: settings and environment,
Retry-After, finish reasons, the HTTP status -> google.rpc.Status mapping (whose fault each
status is), and the client against tests.support.fake_openai for the 404 cases."""

from __future__ import annotations

import argparse
import email.utils
from collections.abc import Awaitable, Callable, Iterator

import grpc
import httpx
import pytest
from google.rpc import error_details_pb2

from aiproxy.agent import cli
from aiproxy.agent.model_service import _model_options, rag_prompt
from aiproxy.agent.openai_backend import (
    FINISH_ERROR,
    FINISH_LENGTH,
    FINISH_STOP,
    MAX_RETRY_S,
    ModelClient,
    ModelError,
    ModelSettings,
    _finish,
    _http_error,
    retry_after_s,
)
from aiproxy.agent.settings import AgentSettings, safe_url
from aiproxy.ai.agent.v1 import agent_service_pb2 as pb
from tests.support.fake_openai import Behaviour, FakeOpenAI

KEY = "sk-unit-0123456789"


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_reference_stays_the_default_and_ignores_openai_environment() -> None:
    env = {"OPENAI_BASE_URL": "http://x/v1", "OPENAI_MODEL": "gpt", "OPENAI_API_KEY": KEY}
    settings = cli.settings_from_args(parse(), env)
    assert settings.backend == "reference"
    assert settings.model == "ref-model-1" and settings.api_key is None


def test_openai_settings_from_flags_env_and_openai_env() -> None:
    env = {
        "OPENAI_BASE_URL": "http://openai-env/v1",
        "OPENAI_MODEL": "env-model",
        "OPENAI_API_KEY": KEY,
    }
    settings = cli.settings_from_args(parse("--backend", "openai"), env)
    assert (settings.base_url, settings.model, settings.api_key) == (
        "http://openai-env/v1",
        "env-model",
        KEY,
    )
    env |= {"AIPROXY_AGENT_BASE_URL": "http://agent-env/v1", "AIPROXY_AGENT_MODEL": "agent-model"}
    settings = cli.settings_from_args(parse("--backend", "openai"), env)
    assert (settings.base_url, settings.model) == ("http://agent-env/v1", "agent-model")
    settings = cli.settings_from_args(
        parse("--backend", "openai", "--base-url", "http://flag/v1", "--model", "flag-model"), env
    )
    assert (settings.base_url, settings.model) == ("http://flag/v1", "flag-model")
    env |= {"AIPROXY_AGENT_BACKEND": "openai", "AIPROXY_AGENT_BATCH_CONCURRENCY": "9"}
    settings = cli.settings_from_args(parse(), env)
    assert settings.backend == "openai" and settings.batch_concurrency == 9


def test_the_key_is_not_in_the_settings_repr() -> None:
    settings = AgentSettings(backend="openai", base_url="http://m/v1", api_key=KEY)
    assert KEY not in repr(settings)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"backend": "openai"}, "needs base_url"),
        ({"backend": "openai", "base_url": "ftp://m/v1"}, r"http\(s\) URL"),
        ({"backend": "gpt"}, "backend must be one of"),
        (
            {"backend": "openai", "base_url": "http://m", "health_interval_s": 0},
            "health_interval_s",
        ),
        (
            {"backend": "openai", "base_url": "http://m", "batch_concurrency": 0},
            "batch_concurrency",
        ),
    ],
)
def test_bad_settings_are_refused(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        AgentSettings(**kwargs)  # type: ignore[arg-type]


def test_cli_refuses_openai_without_a_url(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("OPENAI_BASE_URL", "AIPROXY_AGENT_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(cli.logs, "configure", lambda level: None)  # keep pytest's logging
    assert cli.run(parse("--backend", "openai")) == 2
    assert "needs base_url" in capsys.readouterr().err


def test_safe_url_drops_credentials() -> None:
    assert safe_url("http://user:pw@host:8000/v1") == "http://host:8000/v1"
    assert safe_url("http://host/v1") == "http://host/v1"


def test_retry_after() -> None:
    assert retry_after_s("7") == 7.0
    assert retry_after_s(" 1.5 ") == 1.5
    assert retry_after_s(None) is None and retry_after_s("soon") is None
    assert retry_after_s("-3") == 0.0
    assert retry_after_s("99999") == MAX_RETRY_S
    assert retry_after_s("nan") is None
    now = 1_700_000_000.0
    assert retry_after_s(email.utils.formatdate(now + 30, usegmt=True), now=now) == 30.0


def test_finish_reasons() -> None:
    assert _finish("stop") == FINISH_STOP and _finish(None) == FINISH_STOP
    assert _finish("tool_calls") == FINISH_STOP
    assert _finish("length") == FINISH_LENGTH
    assert _finish("content_filter") == FINISH_ERROR


def test_model_options_leave_zero_to_the_model() -> None:
    assert _model_options(pb.GenerationOptions()) == {}
    options = pb.GenerationOptions(temperature=0.5, top_p=0.9, max_tokens=3, stop=["\n"])
    assert _model_options(options) == {
        "temperature": 0.5,
        "top_p": 0.9,
        "max_tokens": 3,
        "stop": ["\n"],
    }


def test_rag_prompt_numbers_the_sources() -> None:
    assert "no sources matched" in rag_prompt([])


def _details(error: ModelError) -> dict[str, object]:
    out: dict[str, object] = {}
    for detail in error.to_status().details:
        for cls in (error_details_pb2.ErrorInfo, error_details_pb2.RetryInfo):
            if detail.Is(cls.DESCRIPTOR):
                msg = cls()
                detail.Unpack(msg)
                out[cls.__name__] = msg
    return out


@pytest.mark.parametrize(
    ("status", "code", "retry"),
    [
        (429, grpc.StatusCode.RESOURCE_EXHAUSTED, True),
        (500, grpc.StatusCode.UNAVAILABLE, True),
        (502, grpc.StatusCode.UNAVAILABLE, True),
        (503, grpc.StatusCode.UNAVAILABLE, True),
        # "Not now": the model server's state, worth a retry (on another replica too).
        (408, grpc.StatusCode.UNAVAILABLE, True),
        (409, grpc.StatusCode.UNAVAILABLE, True),
        (425, grpc.StatusCode.UNAVAILABLE, True),
        # About the request's content (prompt too long, an option out of range): the caller's.
        (400, grpc.StatusCode.INVALID_ARGUMENT, False),
        (413, grpc.StatusCode.INVALID_ARGUMENT, False),
        (422, grpc.StatusCode.INVALID_ARGUMENT, False),
        # The agent's own configuration (key, base URL, model, redirects): never the caller's.
        (401, grpc.StatusCode.INTERNAL, False),
        (403, grpc.StatusCode.INTERNAL, False),
        (404, grpc.StatusCode.INTERNAL, False),
        (405, grpc.StatusCode.INTERNAL, False),
        (410, grpc.StatusCode.INTERNAL, False),
        (415, grpc.StatusCode.INTERNAL, False),
        (418, grpc.StatusCode.INTERNAL, False),
        (301, grpc.StatusCode.INTERNAL, False),
        (307, grpc.StatusCode.INTERNAL, False),
        # A success that is not an answer: a broken model server.
        (204, grpc.StatusCode.UNAVAILABLE, False),
    ],
)
def test_http_status_mapping(status: int, code: grpc.StatusCode, retry: bool) -> None:
    error = _http_error("m", status, httpx.Headers(), b'{"error": {"message": "why"}}')
    assert error.code is code
    assert error.to_status().code == code.value[0]
    details = _details(error)
    if status >= 300:
        assert details["ErrorInfo"].metadata["httpStatus"] == str(status)  # type: ignore[attr-defined]
    assert ("RetryInfo" in details) is retry
    if code is grpc.StatusCode.INTERNAL:
        assert "the request was fine" in error.message  # never blames the caller


@pytest.mark.parametrize("status", [404, 405, 410, 301])
def test_the_agents_own_misconfiguration_names_the_path_and_model(status: int) -> None:
    error = _http_error(
        "llama-3-8b",
        status,
        httpx.Headers(),
        b'{"error": "404 page not found"}',
        path="/api/chat/completions",
    )
    assert error.code is grpc.StatusCode.INTERNAL
    assert _details(error)["ErrorInfo"].reason == "MODEL_MISCONFIGURED"  # type: ignore[attr-defined]
    assert "POST /api/chat/completions" in error.message
    if status != 301:
        assert "'llama-3-8b'" in error.message
    assert "base URL" in error.message


@pytest.mark.parametrize(
    ("raw", "caller_model", "code", "reason"),
    [
        # The caller asked for a model the server does not have (OpenAI, vLLM, Ollama words).
        (b'{"error": {"message": "The model `gpt-9` does not exist"}}', True,
         grpc.StatusCode.NOT_FOUND, "MODEL_UNKNOWN"),
        (b'{"error": "model \\"gpt-9\\" not found, try pulling it first"}', True,
         grpc.StatusCode.NOT_FOUND, "MODEL_UNKNOWN"),
        # The same words about the agent's configured model: the operator's mistake.
        (b'{"error": {"message": "The model `gpt-9` does not exist"}}', False,
         grpc.StatusCode.INTERNAL, "MODEL_MISCONFIGURED"),
        # A bare 404 (a wrong base URL) says nothing about the model: the operator's.
        (b'{"detail": "Not Found"}', True, grpc.StatusCode.INTERNAL, "MODEL_MISCONFIGURED"),
        (b"404 page not found", True, grpc.StatusCode.INTERNAL, "MODEL_MISCONFIGURED"),
        # Another model named (a longer name containing ours) is not ours.
        (b'{"error": {"message": "The model `gpt-9-turbo` does not exist"}}', True,
         grpc.StatusCode.INTERNAL, "MODEL_MISCONFIGURED"),
    ],
)  # fmt: skip
def test_404_blames_the_caller_only_for_a_model_it_named(
    raw: bytes, caller_model: bool, code: grpc.StatusCode, reason: str
) -> None:
    error = _http_error("gpt-9", 404, httpx.Headers(), raw, caller_model=caller_model)
    assert error.code is code
    assert _details(error)["ErrorInfo"].reason == reason  # type: ignore[attr-defined]
    assert "gpt-9" in error.message


def test_429_without_retry_after_still_says_when() -> None:
    error = _http_error("m", 429, httpx.Headers(), b"")
    assert _details(error)["RetryInfo"].retry_delay.seconds == 1  # type: ignore[attr-defined]


def test_provider_message_is_short_and_one_line() -> None:
    raw = b'{"error": {"message": "bad\\nthing ' + b"x" * 500 + b'"}}'
    error = _http_error("m", 400, httpx.Headers(), raw)
    assert "\n" not in error.message and len(error.message) < 300
    assert "bad thing" in error.message
    error = _http_error("m", 400, httpx.Headers(), b"<html>not json</html>")
    assert error.message == "the model server rejected the request (HTTP 400)"


# --- against a real HTTP server (tests.support.fake_openai) ------------------------------


@pytest.fixture
def fake() -> Iterator[FakeOpenAI]:
    server = FakeOpenAI().start()
    yield server
    server.shutdown()


async def _complete_error(client: ModelClient, model: str) -> ModelError:
    try:
        with pytest.raises(ModelError) as err:
            await client.complete(
                [{"role": "user", "content": "hi"}], model=model, options={}, timeout_s=10
            )
        return err.value
    finally:
        await client.aclose()


async def _stream_error(client: ModelClient, model: str) -> ModelError:
    try:
        with pytest.raises(ModelError) as err:
            async for _ in client.stream(
                [{"role": "user", "content": "hi"}], model=model, options={}, timeout_s=10
            ):
                pass
        return err.value
    finally:
        await client.aclose()


@pytest.mark.parametrize("call", [_complete_error, _stream_error])
async def test_a_wrong_base_url_is_the_agents_failure_naming_path_and_model(
    fake: FakeOpenAI, call: Callable[[ModelClient, str], Awaitable[ModelError]]
) -> None:
    """The base URL without /v1, with credentials in it too: the fake answers 404 for the
    path. The error names the path and the model, and neither the key nor the URL's
    secrets."""
    url = fake.base_url.replace("http://", "http://user:url-secret@").removesuffix("/v1")
    client = ModelClient(ModelSettings(base_url=url, api_key=KEY, model="fake-model"))
    error = await call(client, "fake-model")
    assert error.code is grpc.StatusCode.INTERNAL
    assert _details(error)["ErrorInfo"].reason == "MODEL_MISCONFIGURED"  # type: ignore[attr-defined]
    assert "POST /chat/completions" in error.message and "'fake-model'" in error.message
    status = error.to_status()
    text = status.SerializeToString()
    assert KEY.encode() not in text and b"url-secret" not in text and b"127.0.0.1" not in text
    assert [r.path for r in fake.requests] == ["/chat/completions"]


async def test_an_unknown_model_is_the_callers_only_if_the_caller_named_it(
    fake: FakeOpenAI,
) -> None:
    for name in ("gpt-9", "configured-but-gone"):
        fake.behaviours[name] = Behaviour(
            status=404, error_message=f"The model `{name}` does not exist."
        )
    # The caller asked for gpt-9 (the agent is configured with fake-model).
    settings = ModelSettings(base_url=fake.base_url, api_key=KEY, model="fake-model")
    error = await _stream_error(ModelClient(settings), "gpt-9")
    assert error.code is grpc.StatusCode.NOT_FOUND
    assert _details(error)["ErrorInfo"].reason == "MODEL_UNKNOWN"  # type: ignore[attr-defined]
    # The agent's own model is gone: the operator's to fix, not the caller's.
    settings = ModelSettings(base_url=fake.base_url, api_key=KEY, model="configured-but-gone")
    error = await _complete_error(ModelClient(settings), "configured-but-gone")
    assert error.code is grpc.StatusCode.INTERNAL
    assert _details(error)["ErrorInfo"].reason == "MODEL_MISCONFIGURED"  # type: ignore[attr-defined]
    assert "/v1/chat/completions" in error.message and "'configured-but-gone'" in error.message
