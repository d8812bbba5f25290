"""The OpenAI-compatible API with clients nobody here wrote: the official `openai` SDKs.

agent <- proxy (auth on) <- `aiproxy envoy` <- openai-python (sync and async) and the
`openai` npm package (tests/integration/openai_sdk.cjs, run with node). Models, unary
and streamed completions with usage, cancellation that reaches the agent, the SDKs' own
error classes for 400 / 401 / 404 / 429 / 503 with their retries counted in Envoy's
access log (every attempt carries the same x-request-id), a mid-stream failure, and a
slow resumable stream whose heartbeats follow `id:` lines (what openai-python used to
choke on). One stack serves the module; each test uses its own request ids and API keys.
"""

from __future__ import annotations

import asyncio
import json
import os
import pathlib
import shutil
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import jwt
import openai
import pytest

from aiproxy.core.ratelimit import hash_api_key
from tests.conftest import GENEROUS_LIMITS, agent_args, proxy_args
from tests.support.edge import access_logs, request
from tests.support.procs import ServiceProcess, aiproxy_argv, recorded_metadata
from tests.support.waiting import wait_until

pytestmark = pytest.mark.envoy

ROOT = pathlib.Path(__file__).resolve().parents[2]
NODE_SCRIPT = pathlib.Path(__file__).with_name("openai_sdk.cjs")
NODE_MODULES = ROOT / "build" / "tools" / "node_modules"

MODEL = "ref-model-1"
SECRET = "openai-sdk-secret-0123456789abcdefghij"
KEY = "sk-aiproxy-ci-4f1e"  # an API key as the SDKs send it: Bearer
SLOW_KEY = "sk-aiproxy-slow-77aa"  # 1 request per second, burst 1
BROKE_KEY = "sk-aiproxy-broke-0b0b"  # a daily token budget of 1
HEARTBEAT_S = 0.3
MESSAGES = [
    {"role": "system", "content": "Be terse."},
    {"role": "user", "content": "What is backpressure?"},
]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    started: list[ServiceProcess] = []
    record = tmp_path_factory.mktemp("openai") / "metadata.jsonl"

    def start(argv: list[str], name: str, env: dict[str, str] | None = None) -> ServiceProcess:
        proc = ServiceProcess(aiproxy_argv(*argv), env=env, name=name)
        started.append(proc)
        return proc.start(timeout=60)

    keys = [
        {"name": "ci", "key_hash": hash_api_key(KEY), "scopes": []},
        {"name": "slow", "key_hash": hash_api_key(SLOW_KEY), "scopes": []},
        {"name": "broke", "key_hash": hash_api_key(BROKE_KEY), "scopes": []},
    ]
    overrides = {
        "apikey:slow": {"rate_per_s": 1, "burst": 1},
        "apikey:broke": {"tokens_per_day": 1},
    }
    try:
        agent = start(agent_args("--record-metadata", str(record)), "agent")
        proxy = start(
            proxy_args(agent.address),
            "proxy",
            env={
                **GENEROUS_LIMITS,
                "AIPROXY_BREAKER__ENABLED": "false",
                "AIPROXY_STREAM__HEARTBEAT_INTERVAL_S": str(HEARTBEAT_S),
                "AIPROXY_AUTH__JWT_SECRET": SECRET,
                "AIPROXY_AUTH__API_KEYS": json.dumps(keys),
                "AIPROXY_LIMITS__OVERRIDES": json.dumps(overrides),
            },
        )
        envoy = start(
            ["envoy", "--listen", "127.0.0.1:0", "--proxy", proxy.address, "--concurrency", "1",
             "--log-flush-ms", "50", "--health-interval-s", "0.5"],
            "envoy",
        )  # fmt: skip
        yield {"agent": agent, "proxy": proxy, "envoy": envoy, "record": record}
    finally:
        for proc in reversed(started):
            proc.cleanup()


@pytest.fixture
def base_url(stack: dict[str, Any]) -> str:
    return f"http://{stack['envoy'].address}/v1"


def _rid(name: str) -> str:
    return f"oa-{name}-{time.monotonic_ns()}"


def client(
    base_url: str, key: str = KEY, retries: int = 0, rid: str | None = None
) -> openai.OpenAI:
    headers = {"x-request-id": rid} if rid else None
    return openai.OpenAI(
        base_url=base_url, api_key=key, max_retries=retries, timeout=30, default_headers=headers
    )


def attempts(stack: dict[str, Any], rid: str, n: int) -> list[dict[str, Any]]:
    """Envoy's access lines of request `rid`, once there are `n` of them (every SDK
    attempt of one call carries the same x-request-id)."""
    envoy = stack["envoy"]
    wait_until(lambda: len(access_logs(envoy, rid)) >= n, 10, f"{n} access lines of {rid}")
    time.sleep(0.2)  # a further attempt would be logged by now (batched every 50 ms)
    return access_logs(envoy, rid)


def agent_finished(stack: dict[str, Any], rid: str) -> dict[str, Any]:
    return stack["agent"].wait_for_log(
        lambda e: e.get("event") == "call_finished" and e.get("request_id") == rid, timeout=10
    )


# ---- models, unary, streams ------------------------------------------------------------


def test_models_list_and_retrieve(base_url: str) -> None:
    c = client(base_url)
    models = list(c.models.list())
    assert [m.id for m in models] == [MODEL]
    assert models[0].object == "model" and models[0].owned_by == "aiproxy"
    assert c.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError) as caught:
        c.models.retrieve("gpt-nope")
    assert caught.value.code == "model_not_found"


def test_unary_completion_maps_parameters_onto_chat(base_url: str, stack: dict[str, Any]) -> None:
    rid = _rid("unary")
    reply = client(base_url, rid=rid).chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=9, temperature=0.5, top_p=0.9,
        stop=["zzz"], seed=7, user="end-user-1",
    )  # fmt: skip
    assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-")
    assert reply.model == MODEL
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason == "length"  # the agent's answer is longer than 9 tokens
    assert reply.usage is not None and reply.usage.completion_tokens == 9
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 9
    # What reached the agent: Chat (not StreamChat), no credentials, seed and user.
    seen = wait_until(
        lambda: next(
            (
                c
                for c in recorded_metadata(stack["record"])
                if c["metadata"].get("x-request-id") == [rid]
            ),
            None,
        ),
        10,
        "the agent's record of the call",
    )
    assert seen["method"] == "/ai.agent.v1.AgentService/Chat"
    assert seen["metadata"]["openai-seed"] == ["7"] and seen["metadata"]["openai-user"] == [
        "end-user-1"
    ]
    assert "authorization" not in seen["metadata"]


def test_a_jwt_works_as_the_bearer_key_too(base_url: str) -> None:
    token = jwt.encode({"sub": "alice", "exp": int(time.time()) + 300}, SECRET, algorithm="HS256")
    reply = client(base_url, key=token).chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=3
    )
    assert reply.choices[0].message.content


def _check_stream(chunks: list[Any], unary_text: str) -> None:
    first = chunks[0]
    assert first.object == "chat.completion.chunk"
    assert first.choices[0].delta.role == "assistant" and first.choices[0].delta.content == ""
    assert len({c.id for c in chunks}) == 1
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == unary_text  # the reference agent answers the same request the same way
    finish = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finish) == 1 and finish[0].choices[0].finish_reason == "length"
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert last.usage.completion_tokens == 12
    assert all(c.usage is None for c in chunks[:-1])


def test_stream_with_usage_sync(base_url: str) -> None:
    c = client(base_url)
    unary = c.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=12)
    stream = c.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=12, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    _check_stream(list(stream), unary.choices[0].message.content or "")


def test_stream_with_usage_async(base_url: str) -> None:
    async def run() -> None:
        c = openai.AsyncOpenAI(base_url=base_url, api_key=KEY, max_retries=0, timeout=30)
        unary = await c.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=12)
        stream = await c.chat.completions.create(
            model=MODEL, messages=MESSAGES, max_tokens=12, stream=True,
            stream_options={"include_usage": True},
        )  # fmt: skip
        _check_stream([chunk async for chunk in stream], unary.choices[0].message.content or "")
        await c.close()

    asyncio.run(run())


def test_closing_the_stream_cancels_the_generation_sync(
    base_url: str, stack: dict[str, Any]
) -> None:
    rid = _rid("cancel")
    stream = client(base_url, rid=rid).chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=300, stream=True,
        extra_headers={"x-fault-slow-ms": "100"},
    )  # fmt: skip
    read = 0
    for chunk in stream:
        read += 1 if chunk.choices and chunk.choices[0].delta.content else 0
        if read == 2:
            break
    stream.close()
    finished = agent_finished(stack, rid)
    assert finished["cancelled"] is True and finished["code"] == "CANCELLED"
    assert finished["chunks"] < 300


def test_closing_the_stream_cancels_the_generation_async(
    base_url: str, stack: dict[str, Any]
) -> None:
    rid = _rid("cancel-async")

    async def run() -> None:
        c = openai.AsyncOpenAI(
            base_url=base_url, api_key=KEY, max_retries=0, timeout=30,
            default_headers={"x-request-id": rid, "x-fault-slow-ms": "100"},
        )  # fmt: skip
        stream = await c.chat.completions.create(
            model=MODEL, messages=MESSAGES, max_tokens=300, stream=True
        )
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                break
        await stream.close()
        await c.close()

    asyncio.run(run())
    finished = agent_finished(stack, rid)
    assert finished["cancelled"] is True and finished["chunks"] < 300


def test_a_slow_resumable_stream_with_heartbeats(base_url: str, stack: dict[str, Any]) -> None:
    """Heartbeats between tokens, after `id:` lines: openai-python keeps the last id and
    turns a blank line after a comment into an event with empty data that it cannot
    parse; the proxy's heartbeat is a comment line without a blank line."""
    headers = {"x-fault-slow-ms": str(int(HEARTBEAT_S * 1000 * 3)), "x-aiproxy-resumable": "1"}
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 3, "stream": True}
    raw = request(
        stack["envoy"].address, "POST", "/v1/chat/completions", body,
        headers={"authorization": f"Bearer {KEY}", **headers},
    )  # fmt: skip
    assert raw.status == 200 and raw.content_type == "text/event-stream"
    sid = raw.headers["x-aiproxy-stream-id"]
    text = raw.body.decode()
    assert text.count(": keep-alive\n") >= 2 and ": keep-alive\n\n" not in text
    assert f"id: {sid}:" in text and text.endswith("data: [DONE]\n\n")
    chunks = list(
        client(base_url).chat.completions.create(
            model=MODEL, messages=MESSAGES, max_tokens=3, stream=True, extra_headers=headers
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == "length"


def test_a_mid_stream_failure_is_raised_by_the_sdk(base_url: str) -> None:
    stream = client(base_url).chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=20, stream=True,
        extra_headers={"x-fault-code": "INTERNAL", "x-fault-after": "3"},
    )  # fmt: skip
    got = []
    with pytest.raises(openai.APIError) as caught:
        for chunk in stream:
            got.append(chunk)
    assert len(got) >= 3  # the role delta and the chunks before the failure
    assert isinstance(caught.value.body, dict) and caught.value.body["type"] == "server_error"


# ---- errors, with the SDKs' retries -----------------------------------------------------


def test_400_names_the_param_and_is_not_retried(base_url: str, stack: dict[str, Any]) -> None:
    rid = _rid("400")
    c = client(base_url, retries=2, rid=rid)
    with pytest.raises(openai.BadRequestError) as caught:
        c.chat.completions.create(model=MODEL, messages=MESSAGES, n=2)
    assert caught.value.param == "n" and caught.value.code == "unsupported_parameter"
    assert len(attempts(stack, rid, 1)) == 1
    with pytest.raises(openai.BadRequestError) as caught:
        c.chat.completions.create(model=MODEL, messages=MESSAGES, extra_body={"foo": 1})
    assert caught.value.param == "foo" and caught.value.code == "unknown_parameter"
    with pytest.raises(openai.BadRequestError) as caught:
        c.chat.completions.create(
            model=MODEL,
            messages=[
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}
            ],
        )
    assert caught.value.param == "messages[0].content[0].type"
    with pytest.raises(openai.BadRequestError) as caught:
        c.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=100_000)
    assert caught.value.param == "max_tokens"  # the proxy's own validation, mapped back
    with pytest.raises(openai.NotFoundError) as caught:
        c.chat.completions.create(model="gpt-nope", messages=MESSAGES, stream=True)
    assert caught.value.code == "model_not_found" and caught.value.param == "model"


def test_401_without_a_valid_key_is_not_retried(base_url: str, stack: dict[str, Any]) -> None:
    rid = _rid("401")
    with pytest.raises(openai.AuthenticationError) as caught:
        client(base_url, key="sk-wrong", retries=2, rid=rid).chat.completions.create(
            model=MODEL, messages=MESSAGES
        )
    assert caught.value.code == "invalid_api_key"
    assert len(attempts(stack, rid, 1)) == 1
    with pytest.raises(openai.AuthenticationError):
        client(base_url, key="sk-wrong").models.list()


def test_429_carries_retry_after_and_the_sdk_waits_and_retries(
    base_url: str, stack: dict[str, Any]
) -> None:
    c = client(base_url, key=SLOW_KEY)
    c.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2)  # takes the burst
    with pytest.raises(openai.RateLimitError) as caught:
        c.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2)
    headers = caught.value.response.headers
    assert int(headers["retry-after"]) >= 1 and int(headers["retry-after-ms"]) > 0
    assert caught.value.code == "rate_limit_exceeded"
    # With retries the SDK waits what retry-after-ms says and gets in.
    rid = _rid("429-retry")
    reply = client(base_url, key=SLOW_KEY, retries=2, rid=rid).chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=2
    )
    assert reply.choices[0].message.content
    statuses = [line["http_status"] for line in attempts(stack, rid, 2)]
    assert statuses[-1] == 200 and 429 in statuses


def test_an_exhausted_daily_budget_says_do_not_retry(base_url: str, stack: dict[str, Any]) -> None:
    # A call larger than the budget still gets in while none of it is used; it spends it.
    client(base_url, key=BROKE_KEY).chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=5
    )
    rid = _rid("429-day")
    with pytest.raises(openai.RateLimitError) as caught:
        client(base_url, key=BROKE_KEY, retries=2, rid=rid).chat.completions.create(
            model=MODEL, messages=MESSAGES, max_tokens=5
        )
    assert caught.value.code == "insufficient_quota"
    assert caught.value.response.headers["x-should-retry"] == "false"
    assert len(attempts(stack, rid, 1)) == 1  # max_retries=2, yet one attempt


def test_503_is_retried_by_the_sdk_after_retry_after(base_url: str, stack: dict[str, Any]) -> None:
    rid = _rid("503")
    c = client(base_url, retries=1, rid=rid)
    with pytest.raises(openai.InternalServerError) as caught:
        c.chat.completions.create(
            model=MODEL, messages=MESSAGES, extra_headers={"x-fault-code": "UNAVAILABLE"}
        )
    assert caught.value.status_code == 503 and caught.value.code == "service_unavailable"
    assert caught.value.response.headers["retry-after"] == "1"
    assert [line["http_status"] for line in attempts(stack, rid, 2)] == [503, 503]


# ---- the npm package ---------------------------------------------------------------------


def test_the_openai_npm_package(stack: dict[str, Any], base_url: str) -> None:
    node = shutil.which("node")
    if node is None or not (NODE_MODULES / "openai" / "package.json").is_file():
        pytest.skip("node or the openai npm package missing: `make node-deps` installs it")
    env = {
        **os.environ,
        "NODE_PATH": str(NODE_MODULES),
        "BASE_URL": base_url,
        "API_KEY": KEY,
        "SLOW_KEY": SLOW_KEY,
        "BROKE_KEY": BROKE_KEY,
        "MODEL": MODEL,
    }
    done = subprocess.run(
        [node, str(NODE_SCRIPT)], env=env, capture_output=True, text=True, timeout=120,
        cwd=str(NODE_MODULES.parent),
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["models"] == [MODEL]
    assert report["unary"]["finish_reason"] == "length"
    assert report["stream"]["text"] == report["unary"]["text"]
    assert report["stream"]["usage"]["completion_tokens"] == 6
    assert report["errors"] == {
        "400": "BadRequestError:n",
        "401": "AuthenticationError",
        "404": "NotFoundError:model_not_found",
    }
    finished = agent_finished(stack, report["cancel_request_id"])
    assert finished["cancelled"] is True
    ids = report["retry_ids"]
    assert report["unavailable"] == "InternalServerError:503"
    assert [line["http_status"] for line in attempts(stack, ids["unavailable"], 2)] == [503, 503]
    assert report["rate_retried"] is True
    statuses = [line["http_status"] for line in attempts(stack, ids["rate"], 2)]
    assert statuses[-1] == 200 and 429 in statuses
    assert report["day"] == "RateLimitError:insufficient_quota"
    assert len(attempts(stack, ids["day"], 1)) == 1


# ---- the same RPCs for gRPC callers -------------------------------------------------------


@pytest.mark.parametrize("through", ["proxy", "envoy"])
def test_native_grpc_callers_reach_the_same_service(stack: dict[str, Any], through: str) -> None:
    import grpc

    from aiproxy.ai.openai.v1 import openai_service_pb2 as opb
    from aiproxy.ai.openai.v1 import openai_service_pb2_grpc as ogrpc

    auth = (("authorization", f"Bearer {KEY}"),)
    with grpc.insecure_channel(stack[through].address) as channel:
        service = ogrpc.OpenAIServiceStub(channel)
        models = service.ListModels(opb.ListModelsRequest(), metadata=auth, timeout=10)
        assert models.content_type == "application/json"
        assert json.loads(models.data)["data"][0]["id"] == MODEL
        body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 3, "n": 2}
        request = opb.CreateChatCompletionRequest()
        request.body.content_type = "application/json"
        request.body.data = json.dumps(body).encode()
        call = service.CreateChatCompletion(request, metadata=auth, timeout=10)
        replies = []
        with pytest.raises(grpc.RpcError) as caught:
            replies.extend(call)
        # The OpenAI error body first (an HTTP caller's answer), then the real status.
        assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert json.loads(replies[0].data)["error"]["param"] == "n"
        assert dict(call.initial_metadata())["x-aiproxy-http-status"] == "400"
