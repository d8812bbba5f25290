"""The machine and the versions a run was measured on (written beside every result),
and the open-file limit the hold rows need."""

from __future__ import annotations

import os
import platform
import resource
import subprocess
from typing import Any

from bench import h2load
from bench.procs import tool
from bench.stack import ROOT


def machine() -> dict[str, Any]:
    model = ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        mem = next(
            line.split(":", 1)[1].strip()
            for line in open("/proc/meminfo")
            if line.startswith("MemTotal")
        )
    except (OSError, StopIteration):
        pass
    return {
        "cores": os.cpu_count(),
        "cpu_model": model,
        "memory": mem,
        "kernel": platform.release(),
        "loadavg_before": os.getloadavg(),
    }


def versions() -> dict[str, Any]:
    import google.protobuf
    import grpc

    def run(argv: list[str]) -> str:
        try:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=30)
            return (r.stdout + r.stderr).strip()
        except (OSError, subprocess.TimeoutExpired):
            return "missing"

    envoy = tool("envoy")
    envoy_v = run([envoy, "--version"]) if envoy else "missing"
    envoy_v = next(
        (ln.split("version:")[1].strip() for ln in envoy_v.splitlines() if "version:" in ln),
        envoy_v,
    )
    commit = run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    dirty = run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"])
    try:
        import uvloop  # noqa: F401

        loop = "uvloop"
    except ImportError:
        loop = "asyncio"
    return {
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "protobuf": google.protobuf.__version__,
        "envoy": envoy_v,
        "h2load": h2load.version(),
        "event_loop": loop,
        "git_commit": commit + (" (with local changes)" if dirty else ""),
    }


def raise_nofile() -> tuple[int, int]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, max(soft, 65536)) if hard != resource.RLIM_INFINITY else max(soft, 65536)
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)
