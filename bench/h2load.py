"""h2load (Debian nghttp2-client) as the unary gRPC load generator.

h2load speaks HTTP/2 but not gRPC: it sends a prepared body (the 5-byte gRPC prefix and
the serialized request) and counts HTTP 200s as successes even when the call failed
(gRPC puts the status in trailers, which h2load does not read). So every run is checked
twice: the response DATA bytes must add up to a full response message per request, and
the caller counts the calls its upstream actually served (see run.py).
Latency percentiles come from h2load's per-request --log-file (microseconds).
"""

from __future__ import annotations

import pathlib
import re
import shutil
import struct
import subprocess
from typing import Any

INSTALL_HINT = (
    "h2load is missing: install it with `apt-get install -y nghttp2-client` (Debian/Ubuntu)"
)


def find() -> str | None:
    return shutil.which("h2load")


def version() -> str:
    exe = find()
    if not exe:
        return "missing"
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=10).stdout
    return out.strip().splitlines()[0] if out.strip() else "unknown"


def grpc_frame(message: bytes) -> bytes:
    """A gRPC length-prefixed message: flag 0 (not compressed), 4-byte big-endian length."""
    return struct.pack(">BI", 0, len(message)) + message


def write_body(path: pathlib.Path, message: bytes) -> pathlib.Path:
    path.write_bytes(grpc_frame(message))
    return path


def argv(
    url: str,
    body: pathlib.Path,
    *,
    clients: int,
    streams: int,
    duration_s: float,
    log_file: pathlib.Path,
    threads: int = 1,
) -> list[str]:
    exe = find() or "h2load"
    return [
        exe,
        "-c",
        str(clients),
        "-m",
        str(streams),
        "-t",
        str(threads),
        "-D",
        f"{duration_s:g}",
        "-d",
        str(body),
        "-H",
        "content-type: application/grpc",
        "-H",
        "te: trailers",
        "--log-file",
        str(log_file),
        url,
    ]


_DONE = re.compile(
    r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored"
)
_RPS = re.compile(r"finished in ([\d.]+)(m?s), ([\d.]+) req/s")
_TRAFFIC = re.compile(r"traffic: .*?\((\d+)\) total, .*?\((\d+)\) headers .*?, .*?\((\d+)\) data")
_STATUS = re.compile(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx")


def parse(stdout: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if m := _DONE.search(stdout):
        keys = ("total", "started", "done", "succeeded", "failed", "errored")
        out.update({k: int(v) for k, v in zip(keys, m.groups())})
    if m := _RPS.search(stdout):
        secs = float(m.group(1)) / (1000 if m.group(2) == "ms" else 1)
        out["elapsed_s"] = secs
        out["rps"] = float(m.group(3))
    if m := _TRAFFIC.search(stdout):
        out["bytes_total"], out["bytes_headers"], out["bytes_data"] = (int(g) for g in m.groups())
    if m := _STATUS.search(stdout):
        out["http_2xx"], out["http_3xx"], out["http_4xx"], out["http_5xx"] = (
            int(g) for g in m.groups()
        )
    return out


def latencies_us(log_file: pathlib.Path) -> list[int]:
    """Per-request durations (microseconds) of the requests that got HTTP 200."""
    out = []
    if not log_file.exists():
        return out
    for line in log_file.read_text().splitlines():
        parts = line.split("\t")
        if len(parts) >= 3 and parts[1] == "200":
            out.append(int(parts[2]))
    return out


def percentile(values: list[float] | list[int], p: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))
    return float(ordered[k])
