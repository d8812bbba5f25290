"""The operators' live view: `aiproxy envoy --admin-view` serves envoy/page/admin.html at
/admin/, which reads GET /admin/v1/overview (ProxyAdminService.GetOverview through the
transcoder) with an admin token, the proxy's auth being on. Real agents, proxy and Envoy;
the page in headless Chromium (Debian's /usr/bin/chromium), screenshot saved and checked.
The same data over native gRPC (a stub and grpcurl) on the proxy's own port.

Also a browser `fetch` of a large JSON answer: the edge compresses it (brotli or gzip, as
Chromium accepts both) and the page reads it as usual."""

from __future__ import annotations

import asyncio
import json
import os
import pathlib
import subprocess
import threading
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from aiproxy.ai.agent.v1 import agent_service_pb2 as pb
from aiproxy.ai.proxy.v1 import admin_service_pb2 as admin_pb
from aiproxy.ai.proxy.v1 import admin_service_pb2_grpc as admin_grpc
from tests.conftest import GENEROUS_LIMITS, agent_args, proxy_args
from tests.integration.test_auth import AUTH_ENV
from tests.integration.test_auth_envoy import token
from tests.integration.test_browser import browser  # noqa: F401  (the fixture)
from tests.integration.test_grpcurl import GRPCURL
from tests.support.edge import request
from tests.support.grpc_helpers import stub
from tests.support.procs import ServiceProcess, aiproxy_argv

pytestmark = [pytest.mark.envoy, pytest.mark.browser]

ADMIN = token(scope="aiproxy.admin")
NOT_ADMIN = token(scope="agent:execute")
SCREENSHOT = (
    pathlib.Path(
        os.environ.get(
            "AIPROXY_SCREENSHOT_DIR", pathlib.Path(__file__).resolve().parents[2] / "build"
        )
    )
    / "admin-view.png"
)


@pytest.fixture(scope="module")
def stack() -> Iterator[dict[str, ServiceProcess]]:
    started: list[ServiceProcess] = []

    def start(argv: list[str], name: str, env: dict[str, str] | None = None) -> ServiceProcess:
        proc = ServiceProcess(aiproxy_argv(*argv), name=name, env=env)
        started.append(proc)
        return proc.start(timeout=60)

    try:
        agents = [start(agent_args(token_delay_ms=20), f"agent{i}") for i in range(2)]
        proxy = start(
            proxy_args(*(a.address for a in agents)),
            "proxy",
            env={**GENEROUS_LIMITS, **AUTH_ENV, "AIPROXY_RETRY__MAX_ATTEMPTS": "1"},
        )
        envoy = start(
            ["envoy", "--listen", "127.0.0.1:0", "--proxy", proxy.address, "--concurrency", "1",
             "--admin-view"],
            "envoy",
        )  # fmt: skip
        yield {"proxy": proxy, "envoy": envoy, "agent0": agents[0], "agent1": agents[1]}
    finally:
        for proc in reversed(started):
            proc.cleanup()


def run_async(coro: Any) -> Any:
    """Run a coroutine on a loop of its own thread (Playwright's sync API holds this one)."""
    out: list[Any] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            out.append(asyncio.run(coro))
        except BaseException as exc:  # re-raised in the test's thread
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(60)
    if errors:
        raise errors[0]
    assert out, "the coroutine did not finish"
    return out[0]


def auth(value: str) -> dict[str, str]:
    return {"authorization": f"Bearer {value}"}


async def traffic(proxy: str, ok: int, failing: int) -> None:
    """OK calls and calls the agent fails (x-fault-code INTERNAL): both are counted."""
    metadata = (("authorization", f"Bearer {ADMIN}"),)
    async with grpc.aio.insecure_channel(proxy) as channel:
        api = stub(channel)
        for _ in range(ok):
            await api.Generate(pb.GenerateRequest(prompt="hi"), timeout=10, metadata=metadata)
        for _ in range(failing):
            with pytest.raises(grpc.aio.AioRpcError):
                await api.Generate(
                    pb.GenerateRequest(prompt="x"),
                    timeout=10,
                    metadata=(*metadata, ("x-fault-code", "INTERNAL")),
                )


class HeldStream:
    """One slow stream kept open through the edge, so the view has an open stream and a
    call in flight; closed by the test."""

    def __init__(self, proxy: str) -> None:
        self._proxy = proxy
        self._stop = threading.Event()
        self._started = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    async def _run(self) -> None:
        async with grpc.aio.insecure_channel(self._proxy) as channel:
            call = stub(channel).StreamGenerate(
                pb.StreamGenerateRequest(
                    prompt="slow", options=pb.GenerationOptions(max_tokens=200)
                ),
                timeout=60,
                metadata=(("authorization", f"Bearer {ADMIN}"), ("x-fault-slow-ms", "300")),
            )
            await call.read()
            self._started.set()
            await asyncio.to_thread(self._stop.wait, 30)
            call.cancel()

    def __enter__(self) -> HeldStream:
        self._thread.start()
        assert self._started.wait(20), "the held stream never started"
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(10)


def test_overview_is_admin_only_and_the_same_over_grpc_and_http(stack) -> None:
    proxy, edge = stack["proxy"].address, stack["envoy"].address
    run_async(traffic(proxy, ok=6, failing=3))

    # Through the edge: an admin scope is needed (the proxy's auth decides).
    assert request(edge, "GET", "/admin/v1/overview").status == 401
    assert request(edge, "GET", "/admin/v1/overview", headers=auth(NOT_ADMIN)).status == 403
    reply = request(edge, "GET", "/admin/v1/overview", headers=auth(ADMIN))
    assert reply.status == 200, reply.body
    http = reply.json()

    # Native gRPC on the proxy's port: the same document.
    async def over_grpc() -> admin_pb.GetOverviewResponse:
        async with grpc.aio.insecure_channel(proxy) as channel:
            return await admin_grpc.ProxyAdminServiceStub(channel).GetOverview(
                admin_pb.GetOverviewRequest(),
                timeout=10,
                metadata=(("authorization", f"Bearer {ADMIN}"),),
            )

    native = run_async(over_grpc())
    assert (
        {e["address"] for e in http["endpoints"]}
        == {e.address for e in native.endpoints}
        == {
            stack["agent0"].address,
            stack["agent1"].address,
        }
    )
    assert http["serving"] is True and native.serving
    assert http["limits"] == {
        "enabled": True,
        "backend": "memory",
        "up": True,
        "failurePolicy": "fail_open",
    }
    sent = sum(int(e["totalCalls"]) for e in http["endpoints"])
    failed = sum(int(e["failedCalls"]) for e in http["endpoints"])
    assert (sent, failed) == (9, 3)
    assert any(e["recentErrorRate"] > 0 for e in http["endpoints"])
    codes = {c["code"]: c["perSecond"] for c in http["callsPerSecond"]}
    assert codes.keys() >= {"OK", "INTERNAL"} and all(v > 0 for v in codes.values())
    assert 0 < http["windowSeconds"] <= 10.5

    # grpcurl sees it too (reflection; the auth header like any caller's).
    if GRPCURL is not None:
        out = subprocess.run(
            [GRPCURL, "-plaintext", "-max-time", "20", "-H", f"authorization: Bearer {ADMIN}",
             proxy, "ai.proxy.v1.ProxyAdminService/GetOverview"],
            capture_output=True, text=True, timeout=30, check=True,
        ).stdout  # fmt: skip
        assert {e["address"] for e in json.loads(out)["endpoints"]} == {
            e["address"] for e in http["endpoints"]
        }

    # The operator RPC itself stays off the edge for native gRPC callers.
    refused = request(
        edge,
        "POST",
        "/ai.proxy.v1.ProxyAdminService/GetOverview",
        b"",
        headers={"content-type": "application/grpc", "te": "trailers", **auth(ADMIN)},
    )
    assert refused.headers["grpc-status"] == "7" and "edge" in refused.headers["grpc-message"]
    assert refused.headers.get("grpc-status-details-bin")
    # ... and for gRPC-Web and Connect callers, each in its protocol.
    web = request(
        edge,
        "POST",
        "/ai.proxy.v1.ProxyAdminService/GetOverview",
        b"\x00\x00\x00\x00\x00",
        headers={"content-type": "application/grpc-web+proto", "x-grpc-web": "1", **auth(ADMIN)},
    )
    assert web.headers.get("grpc-status") == "7", (web.status, web.headers)
    connect = request(
        edge,
        "POST",
        "/ai.proxy.v1.ProxyAdminService/GetOverview",
        b"{}",
        headers={
            "content-type": "application/json",
            "connect-protocol-version": "1",
            **auth(ADMIN),
        },
    )
    assert connect.status == 403 and connect.json()["code"] == "permission_denied", connect.body


def test_live_view_in_chromium(stack, browser) -> None:  # noqa: F811
    edge, proxy = stack["envoy"].address, stack["proxy"].address
    run_async(traffic(proxy, ok=8, failing=2))
    context = browser.new_context(viewport={"width": 1200, "height": 900})
    page = context.new_page()
    page.set_default_timeout(30_000)
    try:
        page.goto(f"http://{edge}/admin/")
        # No token yet: the proxy's 401 is shown, not a blank page.
        page.wait_for_selector('body[data-state="error"]')
        assert "401" in page.inner_text("#error")
        with HeldStream(proxy):
            page.fill("#token", ADMIN)
            page.dispatch_event("#token", "change")
            page.wait_for_selector('body[data-state="ok"]')
            # It refreshes itself: more answers come without any action.
            first = int(page.get_attribute("body", "data-updates") or 0)
            page.wait_for_function(
                f"Number(document.body.dataset.updates) >= {first + 2} && document.body.dataset.state === 'ok'"
            )
            page.wait_for_function(
                "document.getElementById('streams').textContent.startsWith('1 open')"
            )
            rows = page.locator("#endpoints tbody tr")
            assert rows.count() == 2
            table = page.inner_text("#endpoints")
            assert stack["agent0"].address in table and stack["agent1"].address in table
            assert table.count("closed") == 2 and table.count("serving") >= 2
            codes = page.inner_text("#codes")
            assert "OK" in codes and "INTERNAL" in codes
            assert page.inner_text("#limits").strip() == "memory · up"
            assert page.inner_text("#proxy") == "serving"
            assert page.inner_text("#active").strip() == "1"
            SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(SCREENSHOT), full_page=True)
        assert SCREENSHOT.stat().st_size > 10_000

        # A browser fetch of a large JSON answer: compressed by the edge, read as usual.
        result = page.evaluate(
            """async (token) => {
                const r = await fetch('/api/v1/ai/generate/batch', {
                    method: 'POST',
                    headers: {'content-type': 'application/json', authorization: 'Bearer ' + token},
                    body: JSON.stringify({prompts: Array.from({length: 8}, (_, i) => 'about ' + i),
                                          options: {maxTokens: 64}}),
                });
                const body = await r.json();
                return {status: r.status, encoding: r.headers.get('content-encoding'),
                        results: body.results.length};
            }""",
            ADMIN,
        )
        assert result == {"status": 200, "encoding": result["encoding"], "results": 8}
        assert result["encoding"] in ("br", "gzip"), result
    finally:
        context.close()


def test_view_is_off_by_default(spawn, agent) -> None:
    proxy = spawn(*proxy_args(agent.address), name="proxy")
    envoy = spawn(
        "envoy",
        "--listen",
        "127.0.0.1:0",
        "--proxy",
        proxy.address,
        "--concurrency",
        "1",
        name="envoy",
    )
    page = request(envoy.address, "GET", "/admin/")
    assert page.status == 404 and "--admin-view" in page.json()["message"]
    assert request(envoy.address, "GET", "/admin/v1/overview").status == 404
