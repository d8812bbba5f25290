"""Every code block a reader would paste from the docs runs, against a real stack.

The documents: README.md and every `docs/**/*.md` (found at collection time, so a new
page is covered without touching this file). Each fenced code block is one test case,
named `FILE:LINE` of its opening fence.

The convention, by the block's info string (the word after the opening fence):

- ```sh, ```bash, ```shell: run by bash (`set -euo pipefail`), so the first command that
  fails fails the block. curl is called with `--fail-with-body` (an HTTP status >= 400
  is a failure; a stream that ends with an in-band error event is a 200 and is not),
  grpcurl fails on any gRPC error by itself. Commands are bounded (curl `--max-time`,
  grpcurl `-max-time`, the block as a whole BLOCK_TIMEOUT_S).
- ```js, ```javascript: run in headless Chromium (Debian's, as tests/integration/
  test_browser.py) on a blank page of the edge's own origin, so relative paths such as
  `/api/v1/ai/generate/stream` reach Envoy as they would from the page at `/`. The block
  is the body of an async function (top-level `await` works). It fails when it throws or
  rejects, when the page reports an uncaught error, when it calls `showError(...)` (the
  harness defines it, as the README's snippets assume a page does), when an EventSource it
  opened is still open after BLOCK_TIMEOUT_S (a snippet closes its stream at the final
  chunk), or when it names `output` (the harness's `<pre id="output">`) and wrote nothing.
- ```python: run by the project's interpreter (`python -c`), same substitutions.
- Shown, never run: ```text (diagrams, command synopses, example output), ```yaml,
  ```json, ```proto, ```console and the other languages in tests/support/docs.py SHOWN.
- A runnable language with the attribute `no-run` (```sh no-run) is shown, never run: only
  for commands that cannot run inside the test suite: the suite itself (`make test`,
  `pytest`), what runs until stopped (`make demo`), and what needs what CI has not (a
  Docker engine, a Kubernetes cluster, a real model server).
- A block with no info string, or a language this file does not know, fails: every block
  says what it is.

Addresses are the README's defaults, replaced by the stack's (started on port 0):
localhost/127.0.0.1 :8080 is Envoy, :50051 the proxy, :50052 the agent (with
`--enable-faults`, as in `make demo`), :9091 the proxy's metrics. A shell block that
starts its own `aiproxy serve` gets a free port as its :50051 (AIPROXY_SERVER__LISTEN),
and everything a shell block leaves running is stopped with it (its own process group).
`aiproxy`, `grpcurl` and `python` are the project's (.venv/bin on PATH).
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import GENEROUS_LIMITS, agent_args, proxy_args
from tests.support.docs import Block, all_blocks
from tests.support.procs import ServiceProcess, aiproxy_argv

pytestmark = pytest.mark.envoy

BLOCK_TIMEOUT_S = 120.0
CALL_TIMEOUT_S = 60
CHROMIUM = os.environ.get("AIPROXY_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
HARNESS_PATH = "/__docs_harness__"
HARNESS_PAGE = '<!doctype html><meta charset="utf-8"><title>docs</title><pre id="output"></pre>'
DEFAULT_ADDRESS = re.compile(r"\b(?:localhost|127\.0\.0\.1):(8080|50051|50052|9091)\b")
STARTS_PROXY = re.compile(r"\baiproxy\s+serve\b")

BLOCKS = all_blocks()


@pytest.fixture(scope="module")
def stack() -> Iterator[dict[str, str]]:
    started: list[ServiceProcess] = []

    def start(argv: list[str], name: str, env: dict[str, str] | None = None) -> ServiceProcess:
        proc = ServiceProcess(aiproxy_argv(*argv), env=env, name=name)
        started.append(proc)
        return proc.start(timeout=60)

    try:
        agent = start(agent_args(), "agent")
        proxy = start(proxy_args(agent.address), "proxy", env=GENEROUS_LIMITS)
        envoy = start(
            ["envoy", "--listen", "127.0.0.1:0", "--proxy", proxy.address, "--concurrency", "1"],
            "envoy",
        )
        yield {
            "8080": envoy.address,
            "50051": proxy.address,
            "50052": agent.address,
            "9091": proxy.ready["metrics_address"],
        }
    finally:
        for proc in reversed(started):
            proc.cleanup()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _substitute(code: str, addresses: dict[str, str]) -> str:
    return DEFAULT_ADDRESS.sub(lambda m: addresses[m.group(1)], code)


def _tools(directory: pathlib.Path) -> str:
    """A PATH whose curl and grpcurl fail on errors and are bounded, then .venv/bin."""
    venv_bin = pathlib.Path(sys.executable).parent
    curl = shutil.which("curl")
    grpcurl = shutil.which("grpcurl", path=str(venv_bin)) or shutil.which("grpcurl")
    assert curl and grpcurl, "curl and grpcurl are needed (grpcurl: make install)"
    wrappers = {
        "curl": f'exec {curl} --fail-with-body --max-time {CALL_TIMEOUT_S} "$@"\n',
        "grpcurl": f'exec {grpcurl} -max-time {CALL_TIMEOUT_S} "$@"\n',
    }
    for name, body in wrappers.items():
        tool = directory / name
        tool.write_text("#!/bin/sh\n" + body)
        tool.chmod(0o755)
    return os.pathsep.join([str(directory), str(venv_bin), os.environ.get("PATH", "")])


def _run_process(argv: list[str], env: dict[str, str], cwd: str) -> tuple[int | None, str]:
    """Run in a new process group (the block's own); stop the whole group after it, by
    the group id this test created: a block may leave a server running in the background.
    Output goes to a file: a background server would hold a pipe open."""
    log = pathlib.Path(cwd) / "block-output.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        try:
            code: int | None = proc.wait(timeout=BLOCK_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            code = None
        finally:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:  # the group is gone once killpg finds no process in it
                    _wait_group_gone(proc, 10.0)
                    break
                except TimeoutError:
                    continue
            if proc.poll() is None:
                proc.wait(timeout=10)
    return code, log.read_text(errors="replace")


def _wait_group_gone(leader: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        leader.poll()  # reap the leader: a zombie still counts as a member of its group
        try:
            os.killpg(leader.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    raise TimeoutError(f"process group {leader.pid} still alive")


def _run_subprocess(block: Block, addresses: dict[str, str]) -> None:
    with tempfile.TemporaryDirectory(prefix="aiproxy-docs-") as tmp:
        addresses = dict(addresses)
        env = {
            **os.environ,
            "PATH": _tools(pathlib.Path(tmp)),
            # A server a block starts must not take the machine's default ports.
            "AIPROXY_METRICS__LISTEN": "127.0.0.1:0",
        }
        env.pop("AIPROXY_SERVER__LISTEN", None)
        if STARTS_PROXY.search(block.code):
            own = f"127.0.0.1:{_free_port()}"
            env["AIPROXY_SERVER__LISTEN"] = own
            addresses["50051"] = own
        code = _substitute(block.code, addresses)
        if block.kind == "shell":
            argv = ["bash", "--noprofile", "--norc", "-euo", "pipefail", "-c", code]
        else:
            argv = [sys.executable, "-c", code]
        status, output = _run_process(argv, env, tmp)
    assert status == 0, (
        f"{block.name} ({block.lang}) "
        + ("timed out" if status is None else f"exited {status}")
        + f"\n--- block as run ---\n{code}--- output ---\n{output[-6000:]}"
    )


# ---- JavaScript in Chromium ------------------------------------------------------------------

_INSTALL = """() => {
    window.__errors = [];
    window.showError = (error) => window.__errors.push(error);
    const Native = window.EventSource;
    window.__eventSources = [];
    window.EventSource = class extends Native {
        constructor(...args) { super(...args); window.__eventSources.push(this); }
    };
}"""

_RUN = """async ([code, ms]) => {
    const AsyncFunction = (async () => {}).constructor;
    const late = new Promise((_, reject) =>
        setTimeout(() => reject(new Error(`still running after ${ms} ms`)), ms));
    try {
        await Promise.race([new AsyncFunction(code)(), late]);
        return null;
    } catch (error) {
        if (error instanceof Error) return `${error.name}: ${error.message}`;
        return `thrown: ${JSON.stringify(error)}`;
    }
}"""


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if os.environ.get("CI"):
        import playwright.sync_api as sync_api

        assert os.path.exists(CHROMIUM) or shutil.which("chromium"), (
            "Debian chromium is missing (make system-deps)"
        )
    else:
        sync_api = pytest.importorskip("playwright.sync_api")
        if not (os.path.exists(CHROMIUM) or shutil.which("chromium")):
            pytest.skip("Debian chromium is not installed (make system-deps)")
    with sync_api.sync_playwright() as pw:
        chromium = pw.chromium.launch(
            executable_path=CHROMIUM if os.path.exists(CHROMIUM) else shutil.which("chromium"),
            args=CHROMIUM_ARGS,
        )
        try:
            yield chromium
        finally:
            chromium.close()


def _run_browser(block: Block, addresses: dict[str, str], browser: Any) -> None:
    origin = f"http://{addresses['8080']}"
    context = browser.new_context()
    try:
        page = context.new_page()
        page.set_default_timeout(BLOCK_TIMEOUT_S * 1000)
        page_errors: list[str] = []
        page.on("pageerror", lambda error: page_errors.append(str(error)))
        # The blank page is served by the browser itself, on the edge's origin; every
        # other request goes to Envoy.
        page.route(
            origin + HARNESS_PATH,
            lambda route: route.fulfill(status=200, content_type="text/html", body=HARNESS_PAGE),
        )
        page.goto(origin + HARNESS_PATH)
        page.evaluate(_INSTALL)
        code = _substitute(block.code, addresses)
        thrown = page.evaluate(_RUN, [code, int(BLOCK_TIMEOUT_S * 1000)])
        assert thrown is None, f"{block.name} threw: {thrown}\n--- block ---\n{code}"
        page.wait_for_function(
            "() => window.__eventSources.every((es) => es.readyState === EventSource.CLOSED)"
        )
        errors = page.evaluate("() => window.__errors")
        assert not errors, f"{block.name} called showError: {json.dumps(errors)}"
        assert not page_errors, f"{block.name}: uncaught errors on the page: {page_errors}"
        if re.search(r"\boutput\b", code):
            written = page.text_content("#output") or ""
            assert written.strip(), f"{block.name} wrote nothing to output"
    finally:
        context.close()


# ---- the cases ------------------------------------------------------------------------------


def test_the_documents_have_blocks() -> None:
    assert any(b.path.name == "README.md" for b in BLOCKS)
    assert any(b.kind == "shell" for b in BLOCKS) and any(b.kind == "browser" for b in BLOCKS)


@pytest.mark.parametrize(
    "block",
    [
        pytest.param(b, id=b.name, marks=[pytest.mark.browser] if b.kind == "browser" else [])
        for b in BLOCKS
    ],
)
def test_code_block_runs(block: Block, request: pytest.FixtureRequest) -> None:
    assert block.kind != "unknown", (
        f"{block.name}: info string {block.info!r} says neither how to run the block nor "
        "that it is not run (see this module's docstring: ```sh, ```js, ```text, "
        "```sh no-run, ...)"
    )
    if block.kind == "shown":
        pytest.skip(f"shown, not run: ```{block.info}")
    addresses = request.getfixturevalue("stack")
    if block.kind == "browser":
        _run_browser(block, addresses, request.getfixturevalue("browser"))
    else:
        _run_subprocess(block, addresses)


# ---- the harness fails what fails ------------------------------------------------------------

_SELF = pathlib.Path(__file__)


@pytest.mark.parametrize(
    "code",
    [
        "curl -s localhost:8080/api/v1/ai/nope -d '{}'\n",  # HTTP 404
        "grpcurl -plaintext localhost:50051 ai.agent.v1.AgentService/Nope\n",
        "curl -s localhost:8080/healthz | grep -q never-there\n",  # pipefail
    ],
    ids=["http-error", "grpc-error", "pipeline"],
)
def test_a_failing_shell_block_fails(code: str, stack: dict[str, str]) -> None:
    with pytest.raises(AssertionError, match="exited"):
        _run_subprocess(Block(_SELF, 1, "sh", code), stack)


@pytest.mark.browser
@pytest.mark.parametrize(
    ("code", "why"),
    [
        ('JSON.parse("id: 0\\ndata: {}");\n', "threw: SyntaxError"),
        ('showError({ message: "stream failed" });\n', "called showError"),
        ('const reply = await fetch("/api/v1/ai/nope", { method: "POST", body: "{}" });\n'
         "if (!reply.ok) throw await reply.json();\n", 'threw: thrown: {"code":5'),
        ("output.textContent += '';\n", "wrote nothing"),
    ],
    ids=["throws", "show-error", "http-error", "no-output"],
)  # fmt: skip
def test_a_failing_js_block_fails(code: str, why: str, stack: dict[str, str], browser: Any) -> None:
    with pytest.raises(AssertionError, match=re.escape(why)):
        _run_browser(Block(_SELF, 1, "js", code), stack, browser)
