"""Child processes for tests and benchmarks: stop by PID, read JSON lines, sample CPU and RSS.

Nothing here stops a process by name: only a `subprocess.Popen` the caller started itself.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
from typing import Any

CLK_TCK = os.sysconf("SC_CLK_TCK")


def stop_child(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> int:
    """SIGTERM to our own child, SIGKILL if it has not exited after `timeout`; its code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
    return proc.returncode


def json_lines(path: pathlib.Path) -> list[dict[str, Any]]:
    """The JSON-object lines of a file a child writes (its ready line, its logs); a line
    still being written, or any other text, is skipped."""
    if not path.exists():
        return []
    out = []
    for raw in path.read_text(errors="replace").splitlines():
        raw = raw.strip()
        if raw.startswith("{"):
            try:
                out.append(json.loads(raw))
            except json.JSONDecodeError:
                continue
    return out


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process, from /proc/PID/stat (fields 14 and 15)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_bytes(pid: int) -> int:
    """Resident set size (VmRSS) from /proc/PID/status."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0
