"""What a load costs a process: CPU and peak RSS while it runs, and py-spy profiles
summarized (top frames, where the time goes by category, speedscope files)."""

from __future__ import annotations

import json
import pathlib
import threading
import time
from typing import Any

from bench.procs import Proc, cpu_seconds


def cpu_of(pid: int) -> float:
    try:
        return cpu_seconds(pid)
    except OSError:
        return 0.0


class Sampler:
    """CPU at start/end and peak RSS of a process (and its children) while a load runs."""

    def __init__(self, proc: Proc, interval_s: float = 0.1) -> None:
        self.proc = proc
        self.rss0 = proc.tree_rss()
        self.cpu0 = proc.tree_cpu()
        self.t0 = time.monotonic()
        self.peak = self.rss0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, args=(interval_s,), daemon=True)
        self._thread.start()

    def _loop(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            try:
                self.peak = max(self.peak, self.proc.tree_rss())
            except OSError:
                return

    def stop(self) -> dict[str, Any]:
        self._stop.set()
        self._thread.join()
        return {
            "rss_before": self.rss0,
            "rss_peak": self.peak,
            "cpu_s": self.proc.tree_cpu() - self.cpu0,
            "window_s": time.monotonic() - self.t0,
        }


def frame_name(frame: str) -> str:
    """'func (path/to/file.py:12)' -> 'func (file.py)'; native frames keep their library."""
    name, sep, where = frame.partition(" (")
    if not sep:
        return frame
    where = where.rstrip(")").split(":")[0].rsplit("/", 1)[-1]
    return f"{name} ({where})"


def summarize_collapsed(path: pathlib.Path, top: int = 20) -> dict[str, Any]:
    """py-spy's raw (collapsed) stacks -> the functions that take the samples.

    self: samples where the function is the innermost frame; total: samples where it is
    anywhere on the stack (counted once per sample)."""
    self_c: dict[str, int] = {}
    total_c: dict[str, int] = {}
    samples = 0
    if not path.exists():
        return {"samples": 0, "note": "py-spy produced no output"}
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        samples += n
        frames = [frame_name(f) for f in stack.split(";")]
        self_c[frames[-1]] = self_c.get(frames[-1], 0) + n
        for f in set(frames):
            total_c[f] = total_c.get(f, 0) + n

    def rank(d: dict[str, int]) -> list[dict[str, Any]]:
        return [
            {"function": f, "samples": c, "share": c / samples}
            for f, c in sorted(d.items(), key=lambda kv: -kv[1])[:top]
        ]

    return {"samples": samples, "self": rank(self_c), "total": rank(total_c)}


_SYSCALLS = (
    "sendmsg",
    "write",
    "writev",
    "recv",
    "recvmsg",
    "read",
    "syscall",
    "getpid",
    "sendto",
    "futex",
    "eventfd_write",
    "clock_gettime",
)
# Our own Python: aiproxy's layers, and the bare hop's one file when it is the one profiled.
_AIPROXY_FILES = ("core/", "server/", "interceptors/", "bench/barehop.py")


def categorize_collapsed(path: pathlib.Path) -> dict[str, Any]:
    """Where the proxy's event-loop thread spends its samples, in a few buckets.

    idle: waiting in epoll; syscalls: the innermost frame is a libc system call (gRPC
    writing and reading sockets, waking its poller), split by whether the innermost Python
    frame is ours; gc: Python's cyclic garbage collector; aiproxy: the innermost Python
    frame is our code (server/, interceptors/), including C it calls directly (protobuf);
    grpc: everything else under the loop (gRPC's Cython/C core, grpc.aio, grpc_interceptor,
    asyncio). Other threads (gRPC's poller) are counted separately."""
    buckets = {
        "idle": 0,
        "syscalls_under_aiproxy_code": 0,
        "syscalls_in_grpc": 0,
        "python_gc": 0,
        "aiproxy_python": 0,
        "grpc_and_asyncio": 0,
    }
    other_threads = 0
    main = 0
    if not path.exists():
        return {}
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        if any(f.startswith(("Thread.run ", "Thread._bootstrap")) for f in frames[:8]):
            other_threads += n
            continue
        main += n
        leaf = frames[-1].split(" (")[0]
        # The innermost frame of Python source: whose code is running (or called the C below).
        innermost_py = next((f for f in reversed(frames) if ".py:" in f), "")
        ours = (
            any(p in innermost_py for p in _AIPROXY_FILES) and "server/cli.py" not in innermost_py
        )
        if leaf in ("epoll_wait", "epoll_pwait", "select_epoll_poll_impl"):
            buckets["idle"] += n
        elif leaf in _SYSCALLS:
            buckets["syscalls_under_aiproxy_code" if ours else "syscalls_in_grpc"] += n
        elif leaf == "gc_collect_main" or any(f.startswith("gc_collect") for f in frames[-3:]):
            buckets["python_gc"] += n
        elif ours:
            buckets["aiproxy_python"] += n
        else:
            buckets["grpc_and_asyncio"] += n
    busy = main - buckets["idle"]
    return {
        "main_thread_samples": main,
        "other_thread_samples": other_threads,
        "share_of_busy_main_thread": {k: v / busy for k, v in buckets.items() if k != "idle"}
        if busy
        else {},
        "idle_share": buckets["idle"] / main if main else None,
    }


def collapsed_to_speedscope(raw: pathlib.Path, out: pathlib.Path) -> None:
    """Write the collapsed stacks as a speedscope 'sampled' profile (open in speedscope.app)."""
    frames: list[dict[str, str]] = []
    index: dict[str, int] = {}
    samples: list[list[int]] = []
    weights: list[int] = []
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        ids = []
        for f in stack.split(";"):
            if f not in index:
                index[f] = len(frames)
                frames.append({"name": f})
            ids.append(index[f])
        samples.append(ids)
        weights.append(int(count))
    doc = {
        "$schema": "https://www.speedscope.app/file-format-schema.json",
        "shared": {"frames": frames},
        "profiles": [
            {
                "type": "sampled",
                "name": "aiproxy under unary load",
                "unit": "none",
                "startValue": 0,
                "endValue": sum(weights),
                "samples": samples,
                "weights": weights,
            }
        ],
    }
    out.write_text(json.dumps(doc))
