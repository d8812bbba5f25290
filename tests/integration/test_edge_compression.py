"""Response compression at the edge (Envoy's compressor filter, brotli and gzip) with a
real Envoy, proxy and agent: JSON answers of at least 1 KiB are compressed when the caller
accepts it, small ones and native gRPC never, `--no-compression` turns it off, and SSE
streams are left alone by default. With `--compress-sse` the events are measured: each
still arrives on its own, as the agent produces it (the figures are printed with -s and
recorded in docs/operations.md)."""

from __future__ import annotations

import gzip
import http.client
import itertools
import json
import statistics
import time
import zlib
from collections.abc import Iterator

import pytest

from tests.conftest import GENEROUS_LIMITS, agent_args, proxy_args
from tests.support.edge import SSE_EVENT, request
from tests.support.procs import ServiceProcess, aiproxy_argv

pytestmark = pytest.mark.envoy

TOKEN_DELAY_MS = 60
FIRST_TOKEN_MS = 150
BIG = {"prompts": [f"tell me about {n}" for n in range(8)], "options": {"maxTokens": 64}}
BATCH = "/api/v1/ai/generate/batch"
# What Chromium sends.
CHROMIUM_ACCEPT = "gzip, deflate, br, zstd"
SMALL = {"prompt": "hi", "options": {"maxTokens": 3}}


@pytest.fixture(scope="module")
def edges() -> Iterator[dict[str, ServiceProcess]]:
    started: list[ServiceProcess] = []

    def start(argv: list[str], name: str, env: dict[str, str] | None = None) -> ServiceProcess:
        proc = ServiceProcess(aiproxy_argv(*argv), name=name, env=env)
        started.append(proc)
        return proc.start(timeout=60)

    try:
        agent = start(agent_args(token_delay_ms=1, first_token_delay_ms=FIRST_TOKEN_MS), "agent")
        proxy = start(proxy_args(agent.address), "proxy", env=GENEROUS_LIMITS)
        base = ["envoy", "--listen", "127.0.0.1:0", "--proxy", proxy.address, "--concurrency", "1"]
        yield {
            "default": start(base, "envoy"),
            "sse": start([*base, "--compress-sse"], "envoy-sse"),
            "off": start([*base, "--no-compression"], "envoy-off"),
        }
    finally:
        for proc in reversed(started):
            proc.cleanup()


def test_json_answers_are_compressed_when_accepted(edges) -> None:
    address = edges["default"].address
    plain = request(address, "POST", BATCH, BIG)
    assert plain.status == 200 and "content-encoding" not in plain.headers
    assert len(plain.body) >= 1024

    gz = request(address, "POST", BATCH, BIG, headers={"accept-encoding": "gzip"})
    assert gz.headers.get("content-encoding") == "gzip"
    assert "accept-encoding" in gz.headers.get("vary", "").lower()
    assert json.loads(gzip.decompress(gz.body))["results"] == plain.json()["results"]
    assert len(gz.body) < len(plain.body)

    br = request(address, "POST", BATCH, BIG, headers={"accept-encoding": "gzip;q=0.5, br"})
    assert br.headers.get("content-encoding") == "br"
    assert len(br.body) < len(plain.body)

    # Below the threshold: as it is.
    small = request(
        address, "POST", "/api/v1/ai/generate", SMALL, headers={"accept-encoding": "gzip, br"}
    )
    assert small.status == 200 and len(small.body) < 1024
    assert "content-encoding" not in small.headers

    # An error body (JSON Status) is JSON too: compressed only when large, never broken.
    bad = request(
        address, "POST", "/api/v1/ai/generate", {"prompt": ""}, headers={"accept-encoding": "gzip"}
    )
    assert bad.status == 400
    body = gzip.decompress(bad.body) if bad.headers.get("content-encoding") == "gzip" else bad.body
    assert json.loads(body)["details"]

    # Turned off.
    off = request(edges["off"].address, "POST", BATCH, BIG, headers={"accept-encoding": "gzip, br"})
    assert off.status == 200 and "content-encoding" not in off.headers


def test_curl_compressed(edges) -> None:
    import shutil
    import subprocess

    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed (make system-deps)")
    for accept in ("gzip", "br", None):
        out = subprocess.run(
            [curl, "-sS", "--compressed", "-D", "-", "-H", "content-type: application/json",
             *(["-H", f"accept-encoding: {accept}"] if accept else []),
             "--data", json.dumps(BIG), f"http://{edges['default'].address}{BATCH}"],
            capture_output=True, timeout=30, check=True,
        ).stdout.decode()  # fmt: skip
        head, _, body = out.partition("\r\n\r\n")
        # curl --compressed alone offers every coding it decodes (deflate, gzip, br, zstd).
        assert f"content-encoding: {accept or ''}" in head.lower(), head
        assert len(json.loads(body)["results"]) == 8


def curl_sse_timings(address: str, accept_encoding: str) -> tuple[str | None, list[float], int]:
    """sse_timings through `curl -N --compressed` (which decodes brotli; nothing in the
    test environment's Python does), reading its output as it comes."""
    import os
    import select
    import shutil
    import subprocess
    import tempfile

    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed (make system-deps)")
    with tempfile.NamedTemporaryFile() as head:
        started = time.monotonic()
        proc = subprocess.Popen(
            [curl, "-sS", "-N", "--compressed", "-D", head.name, "-o", "-",
             "-H", "content-type: application/json", "-H", f"accept-encoding: {accept_encoding}",
             "-H", f"x-fault-slow-ms: {TOKEN_DELAY_MS}",
             "--data", json.dumps({"prompt": "count for me", "options": {"maxTokens": 20}}),
             f"http://{address}/api/v1/ai/generate/stream"],
            stdout=subprocess.PIPE,
        )  # fmt: skip
        assert proc.stdout is not None
        text, times = b"", []
        try:
            deadline = started + 30
            while time.monotonic() < deadline:
                ready, _, _ = select.select([proc.stdout], [], [], 1.0)
                if not ready:
                    continue
                data = os.read(proc.stdout.fileno(), 65536)
                if not data:
                    break
                text += data
                now = time.monotonic() - started
                events = SSE_EVENT.findall(text)
                times.extend([now] * (len(events) - len(times)))
        finally:
            proc.kill()  # our own child, by its handle
            proc.wait(5)
            proc.stdout.close()
        headers = head.read().decode().lower()
    encoding = next(
        (
            line.split(":", 1)[1].strip()
            for line in headers.splitlines()
            if line.startswith("content-encoding:")
        ),
        None,
    )
    return encoding, times, len(text)


def sse_timings(address: str, accept_encoding: str | None) -> tuple[str | None, list[float], int]:
    """(content-encoding, the time each SSE event became readable since the request was
    sent, bytes on the wire), decoding gzip incrementally as the bytes arrive."""
    host, _, port = address.rpartition(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    body = json.dumps({"prompt": "count for me", "options": {"maxTokens": 20}}).encode()
    # The agent spaces this stream's tokens TOKEN_DELAY_MS apart (its x-fault-slow-ms).
    headers = {
        "content-type": "application/json",
        "accept": "text/event-stream",
        "x-fault-slow-ms": str(TOKEN_DELAY_MS),
    }
    if accept_encoding:
        headers["accept-encoding"] = accept_encoding
    try:
        started = time.monotonic()
        conn.request("POST", "/api/v1/ai/generate/stream", body, headers)
        resp = conn.getresponse()
        encoding = resp.getheader("content-encoding")
        decoder = zlib.decompressobj(16 + zlib.MAX_WBITS) if encoding == "gzip" else None
        assert encoding in (None, "gzip")
        text, times, wire = b"", [], 0
        for _ in range(10_000):
            data = resp.read1(65536)
            if not data:
                break
            wire += len(data)
            text += decoder.decompress(data) if decoder else data
            now = time.monotonic() - started
            events = SSE_EVENT.findall(text)
            times.extend([now] * (len(events) - len(times)))
        return encoding, times, wire
    finally:
        conn.close()


def _summary(name: str, encoding: str | None, times: list[float], wire: int) -> str:
    gaps = [b - a for a, b in itertools.pairwise(times)]
    return (
        f"{name:<28} encoding={encoding!s:<5} events={len(times)} first={times[0] * 1000:6.1f} ms "
        f"gap mean={statistics.mean(gaps) * 1000:5.1f} ms min={min(gaps) * 1000:5.1f} ms "
        f"max={max(gaps) * 1000:5.1f} ms bytes read={wire}"
    )


def test_sse_streams_stay_unbuffered(edges) -> None:
    runs = {
        "default (SSE not compressed)": sse_timings(edges["default"].address, "gzip"),
        "--compress-sse, gzip": sse_timings(edges["sse"].address, "gzip"),
        "--compress-sse, identity": sse_timings(edges["sse"].address, None),
        "--compress-sse, br (curl)": curl_sse_timings(edges["sse"].address, "br"),
        "--compress-sse, Chromium's (curl)": curl_sse_timings(
            edges["sse"].address, CHROMIUM_ACCEPT
        ),
    }
    for name, (encoding, times, wire) in runs.items():
        print(_summary(name, encoding, times, wire))
    encoding, times, _ = runs["default (SSE not compressed)"]
    assert encoding is None  # text/event-stream is not in the default list
    compressed_encoding, compressed, _ = runs["--compress-sse, gzip"]
    assert compressed_encoding == "gzip"
    # Every event arrived on its own (the agent spaces them TOKEN_DELAY_MS apart): had the
    # compressor buffered, several would share one arrival time. No timing threshold: the
    # count of distinct arrivals is the property.
    for series in (times, compressed):
        assert len(series) >= 20
        assert len(set(series)) >= len(series) - 2, series
