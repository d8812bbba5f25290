"""What the chaos tests share: the `chaos` marker, figures of a live process, outcomes.

Every test in tests/chaos/ is marked `chaos` (run only them with `pytest tests/chaos` or
`-m chaos`; leave them out with `-m "not chaos"`). The processes are the real ones of
tests/conftest.py (`spawn`, `agent_args`, `proxy_args`); this file adds only:

- figures of a process we started, read from /proc: open fds, RSS, threads
  (`proc_figures(pid)`), and its asyncio task count through a probe (`task_probe`):
  a sitecustomize module, put on the child's PYTHONPATH, that makes the main thread's
  event loop write `len(asyncio.all_tasks())` to a file every 0.2 s. It runs only in the
  processes a test starts with its environment; nothing in the product knows of it.
- `poll(...)`: wait for a state with a deadline, never sleep for it (tests/support/waiting.py's
  `eventually`, returning the seconds it took);
- `error_info(...)`: the google.rpc.ErrorInfo a gRPC error carries (its shape);
- `ProxyAdmin`-based `upstream_in_flight(...)`: the calls a proxy has open upstream.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from aiproxy.ai.proxy.v1 import admin_service_pb2 as admin_pb
from aiproxy.ai.proxy.v1 import admin_service_pb2_grpc as admin_grpc
from tests.support.waiting import eventually_timed, wait_until

_HERE = pathlib.Path(__file__).parent.resolve()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # A conftest hook sees every collected item: mark only this folder's.
    for item in items:
        if _HERE in pathlib.Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.chaos)


# ---- figures of a live process -----------------------------------------------------------


def proc_figures(pid: int) -> dict[str, float]:
    """Open fds, resident memory (MiB) and OS threads of a process we started."""
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    status = pathlib.Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    rss_kib = int(fields["VmRSS"].split()[0])
    return {"fds": fds, "rss_mib": round(rss_kib / 1024, 1), "threads": int(fields["Threads"])}


_PROBE_SOURCE = '''\
"""Test-only probe (tests/chaos/conftest.py): the main event loop's task count, to a file."""
import os

_path = os.environ.get("AIPROXY_TEST_TASK_PROBE")
if _path:
    import asyncio
    import threading
    import time

    _run_forever = asyncio.BaseEventLoop.run_forever

    def _probed_run_forever(self):
        if threading.current_thread() is threading.main_thread():
            def _sample():
                tmp = _path + ".tmp"
                with open(tmp, "w") as out:
                    out.write('{"tasks": %d, "ts": %f}' % (len(asyncio.all_tasks(self)), time.time()))
                os.replace(tmp, _path)
                self.call_later(0.2, _sample)

            self.call_soon(_sample)
        return _run_forever(self)

    asyncio.BaseEventLoop.run_forever = _probed_run_forever
'''


class TaskProbe:
    """The asyncio task count of one child process (see the module docstring)."""

    def __init__(self, directory: pathlib.Path, name: str) -> None:
        self.directory = directory
        self.path = directory / f"{name}.tasks.json"

    @property
    def env(self) -> dict[str, str]:
        path = os.pathsep.join(
            p for p in (str(self.directory), os.environ.get("PYTHONPATH", "")) if p
        )
        return {"PYTHONPATH": path, "AIPROXY_TEST_TASK_PROBE": str(self.path)}

    def tasks(self, fresh_after: float | None = None, timeout: float = 5.0) -> int:
        """The latest count; with `fresh_after` (time.time()), one sampled after it."""

        def sample() -> dict[str, Any] | None:
            try:
                value = json.loads(self.path.read_text())
                return value if fresh_after is None or value["ts"] > fresh_after else None
            except (FileNotFoundError, json.JSONDecodeError, KeyError):
                return None

        what = f"the task probe to write to {self.path} (uvloop? not a Python child?)"
        return int(wait_until(sample, timeout, what, interval=0.05)["tasks"])


@pytest.fixture
def task_probe(tmp_path: pathlib.Path) -> Callable[[str], TaskProbe]:
    """task_probe("proxy") -> TaskProbe; pass probe.env to the child's environment."""
    directory = tmp_path / "probe"
    directory.mkdir()
    (directory / "sitecustomize.py").write_text(_PROBE_SOURCE)
    return lambda name: TaskProbe(directory, name)


# ---- waiting and outcomes ------------------------------------------------------------------


async def poll(
    check: Callable[[], Awaitable[Any] | Any], timeout: float, what: str, interval: float = 0.05
) -> float:
    """Await/call `check` until it returns something truthy; returns the seconds it took."""
    _, took = await eventually_timed(check, timeout, what, interval=interval)
    return took


def error_info(err: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo | None:
    """The ErrorInfo in a gRPC error's google.rpc.Status (grpc-status-details-bin), if any."""
    for key, value in err.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            status = status_pb2.Status.FromString(value)
            for detail in status.details:
                if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                    info = error_details_pb2.ErrorInfo()
                    detail.Unpack(info)
                    return info
    return None


async def list_endpoints(channel: grpc.aio.Channel) -> list[admin_pb.UpstreamEndpoint]:
    reply = await admin_grpc.ProxyAdminServiceStub(channel).ListEndpoints(
        admin_pb.ListEndpointsRequest(), timeout=5
    )
    return list(reply.endpoints)


async def upstream_in_flight(channel: grpc.aio.Channel) -> int:
    """Calls the proxy has open to its upstreams now (ProxyAdminService.ListEndpoints)."""
    return sum(ep.in_flight for ep in await list_endpoints(channel))
