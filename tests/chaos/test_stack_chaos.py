"""Chaos across the whole stack: what callers see when the stack is hurt, and that nothing
is lost (issue 13 item 10).

- a cancel storm through the proxy: every upstream call ends, fds and tasks come back;
- a rolling restart of two proxy replicas behind one Envoy while streams are in flight;
- agents killed and restarted under load behind one proxy.

Each test prints its figures (counts, times, fds, tasks, RSS) on one "chaos:" line; run
with `-s` to see them. Load is bounded in count and wall time (2 shared cores).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import signal
import threading
import time
import urllib.request
from collections import Counter
from typing import Any

import grpc
import pytest

from aiproxy.ai.agent.v1 import agent_service_pb2 as pb
from tests.chaos.conftest import error_info, list_endpoints, poll, proc_figures, upstream_in_flight
from tests.conftest import GENEROUS_LIMITS, agent_args, proxy_args
from tests.support.edge import request, sse_events, wait_host_health
from tests.support.grpc_helpers import stub
from tests.support.procs import ServiceProcess, aiproxy_argv
from tests.support.waiting import wait_until

# A separate HTTP/2 connection per channel: grpc.aio channels to one target share one
# connection unless told not to, and a storm should look like many callers.
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]


def _figures(label: str, **values: Any) -> None:
    print(f"\nchaos: {label}: " + ", ".join(f"{k}={v}" for k, v in values.items()))


def _active_streams(metrics_address: str) -> float:
    """Sum of ai_proxy_active_streams over methods, from the proxy's /metrics."""
    with urllib.request.urlopen(f"http://{metrics_address}/metrics", timeout=5) as reply:  # noqa: S310 (loopback)
        text = reply.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("ai_proxy_active_streams{")
    )


# ---- (a) cancel storm ----------------------------------------------------------------------

STORM = 800  # streams opened, each cancelled after its first chunk
STORM_CHANNELS = 8
SHORT = pb.StreamGenerateRequest(prompt="w", options=pb.GenerationOptions(max_tokens=2))


async def test_cancel_storm_leaves_no_upstream_call_fd_or_task_behind(spawn, task_probe) -> None:
    # Slow tokens: 800 live streams stay cheap for the agent (2 chunks/s each).
    agent = spawn(*agent_args(token_delay_ms=500), name="agent")
    probe = task_probe("proxy")
    # The storm is about what cancellation leaves behind, not admission: the adaptive
    # overload gate (tests/chaos/test_burst_and_storms.py covers it) would refuse part of
    # an 800-stream burst on a loaded 2-core box.
    no_gate = {"AIPROXY_SERVER__OVERLOAD_WAIT_TARGET_MS": "0"}
    proxy = spawn(*proxy_args(agent.address), env={**probe.env, **no_gate}, name="proxy")
    request_msg = pb.StreamGenerateRequest(
        prompt="storm", options=pb.GenerationOptions(max_tokens=400)
    )

    async with grpc.aio.insecure_channel(proxy.address) as admin:
        # Warm up (first calls create lazily-built state), then take the baseline.
        for _ in range(5):
            assert [c async for c in stub(admin).StreamGenerate(SHORT, timeout=10)][-1].is_final
        await poll(lambda: _no_upstream(admin), 10, "warm-up calls to end")
        before = {**proc_figures(proxy.pid), "tasks": probe.tasks(fresh_after=time.time())}

        channels = [
            grpc.aio.insecure_channel(proxy.address, options=OWN_CONNECTION)
            for _ in range(STORM_CHANNELS)
        ]
        try:
            calls = [
                stub(channels[i % STORM_CHANNELS]).StreamGenerate(request_msg, timeout=120)
                for i in range(STORM)
            ]
            opened_at = time.monotonic()
            firsts = await asyncio.wait_for(asyncio.gather(*(c.read() for c in calls)), timeout=90)
            open_s = time.monotonic() - opened_at
            assert all(isinstance(f, pb.StreamGenerateResponse) and f.delta for f in firsts)
            peak_in_flight = await upstream_in_flight(admin)
            peak = {**proc_figures(proxy.pid), "tasks": probe.tasks(fresh_after=time.time())}
            # Every stream is live upstream: none was dropped or merged on the way.
            assert peak_in_flight == STORM, (
                f"{peak_in_flight} upstream calls open for {STORM} streams"
            )

            cancelled_at = time.monotonic()
            for call in calls:
                call.cancel()
            await poll(lambda: _no_upstream(admin), 10, "0 upstream calls alive after the storm")
            drained_s = time.monotonic() - cancelled_at
            assert all(await asyncio.gather(*(_cancelled(c) for c in calls)))
        finally:
            for channel in channels:
                await channel.close()

        # The agent saw each stream start and end as cancelled: no upstream work left behind.
        def storm_ends() -> list[dict[str, Any]]:
            return [
                e
                for e in agent.log_events("call_finished")
                if e.get("method", "").endswith("StreamGenerate") and e["cancelled"]
            ]

        await poll(
            lambda: len(storm_ends()) >= STORM, 10, "the agent to log every cancelled stream"
        )
        started = [
            e
            for e in agent.log_events("call_started")
            if e.get("method", "").endswith("StreamGenerate")
        ]
        finished = [
            e
            for e in agent.log_events("call_finished")
            if e.get("method", "").endswith("StreamGenerate")
        ]
        assert len(started) == len(finished) == STORM + 5
        assert await asyncio.to_thread(_active_streams, proxy.ready["metrics_address"]) == 0

        # fds and tasks come back near the baseline. fds: none per stream. The storm's own
        # connections may outlive channel.close() for a while (measured: still ESTABLISHED
        # from the test process's side 15 s later), so they are allowed for.
        def settled() -> bool:
            now = proc_figures(proxy.pid)
            return (
                now["fds"] <= before["fds"] + STORM_CHANNELS + 2
                and probe.tasks(fresh_after=time.time()) <= before["tasks"] + 5
            )

        try:
            settle_s = await poll(
                lambda: asyncio.to_thread(settled),
                15,
                "proxy fds and tasks back near baseline",
                interval=0.2,
            )
        except AssertionError as exc:
            now = {**proc_figures(proxy.pid), "tasks": probe.tasks(fresh_after=time.time())}
            raise AssertionError(f"{exc}: before {before}, peak {peak}, now {now}") from None
        after = {**proc_figures(proxy.pid), "tasks": probe.tasks(fresh_after=time.time())}
        # Still serving: cancellations are the callers' doing, never an upstream failure
        # (the breaker is on, as by default, and stays closed).
        assert all(ep.usable for ep in await list_endpoints(admin))
        assert [c async for c in stub(admin).StreamGenerate(SHORT, timeout=10)][-1].is_final

    _figures(
        "cancel storm",
        streams=STORM, open_all_s=round(open_s, 2), peak_upstream_in_flight=peak_in_flight,
        upstream_zero_after_cancel_s=round(drained_s, 2), settle_s=round(settle_s, 2),
        fds=f"{before['fds']}->{peak['fds']}->{after['fds']}", tasks=f"{before['tasks']}->{peak['tasks']}->{after['tasks']}",
        rss_mib=f"{before['rss_mib']}->{peak['rss_mib']}->{after['rss_mib']}",
    )  # fmt: skip


async def _no_upstream(admin: grpc.aio.Channel) -> bool:
    return await upstream_in_flight(admin) == 0


async def _cancelled(call: Any) -> bool:
    return (await call.code()) == grpc.StatusCode.CANCELLED


# ---- (b) rolling restart of proxy replicas behind Envoy ------------------------------------

HTTP_CLIENTS = 6  # concurrent SSE callers, each looping until the restart is over
ROLL_STREAM = {"prompt": "rolling", "options": {"maxTokens": 30}}  # ~0.6 s at 20 ms a token
ERROR_INFO = "type.googleapis.com/google.rpc.ErrorInfo"


def _classify(reply: Any) -> str:
    """complete | shaped (an error with a google.rpc.Status and ErrorInfo) | unshaped | cut."""
    if reply.status == 200:
        try:
            events = sse_events(reply.body)
        except (AssertionError, ValueError):
            return "cut"
        final = events[-1] if events else {}
        if not final.get("isFinal"):
            return "cut"  # the body ended without a final event: a silent cut
        if "error" not in final:
            return "complete"
        details = final["error"].get("details", [])
        return "shaped" if any(d.get("@type") == ERROR_INFO for d in details) else "unshaped"
    try:
        status = json.loads(reply.body)
    except ValueError:
        return "unshaped"
    details = status.get("details", []) if isinstance(status, dict) else []
    return "shaped" if any(d.get("@type") == ERROR_INFO for d in details) else "unshaped"


class HttpLoad:
    """HTTP_CLIENTS threads streaming through Envoy until stopped; outcomes counted."""

    def __init__(self, edge: str) -> None:
        self.edge = edge
        self.outcomes: Counter[str] = Counter()
        self.samples: dict[str, str] = {}
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._pool = concurrent.futures.ThreadPoolExecutor(HTTP_CLIENTS, thread_name_prefix="sse")
        self._futures: list[concurrent.futures.Future[None]] = []

    def start(self) -> HttpLoad:
        self._futures = [self._pool.submit(self._client, i) for i in range(HTTP_CLIENTS)]
        return self

    def _client(self, n: int) -> None:
        i = 0
        while not self._stop.is_set():
            i += 1
            try:
                reply = request(self.edge, "POST", "/api/v1/ai/generate/stream", ROLL_STREAM,
                                headers={"x-request-id": f"roll-{n}-{i}"}, timeout=30)  # fmt: skip
                outcome = _classify(reply)
                sample = f"{reply.status} {reply.body[-300:]!r}"
            except OSError as exc:  # reset, refused, timed out, incomplete read: all cuts
                outcome, sample = "cut", repr(exc)
            with self._lock:
                self.outcomes[outcome] += 1
                self.samples.setdefault(outcome, sample)

    def stop(self) -> Counter[str]:
        self._stop.set()
        for future in self._futures:
            future.result(timeout=60)
        self._pool.shutdown()
        return self.outcomes


@pytest.mark.envoy
def test_rolling_proxy_restart_behind_envoy_loses_no_stream(tmp_path) -> None:
    started: list[ServiceProcess] = []

    def start(argv: list[str], name: str, env: dict[str, str] | None = None) -> ServiceProcess:
        proc = ServiceProcess(aiproxy_argv(*argv), env=env, name=name)
        started.append(proc)
        return proc.start(timeout=60)

    # SIGTERM: NOT_SERVING for drain_delay_s (Envoy checks every 0.5 s and ejects it), then
    # no new calls, and calls in flight get the grace period: what deploy/ configures.
    proxy_env = {
        **GENEROUS_LIMITS,
        "AIPROXY_SERVER__DRAIN_DELAY_S": "1.5",
        "AIPROXY_SERVER__GRACE_PERIOD_S": "20",
    }
    load: HttpLoad | None = None
    try:
        agent = start(agent_args(token_delay_ms=20), "agent")
        proxies = [start(proxy_args(agent.address), f"proxy-{n}", proxy_env) for n in "ab"]
        envoy = start(
            ["envoy", "--listen", "127.0.0.1:0", "--proxy", proxies[0].address, "--proxy", proxies[1].address,
             "--concurrency", "1", "--log-flush-ms", "50", "--health-interval-s", "0.5"],
            "envoy",
        )  # fmt: skip
        for proxy in proxies:
            wait_host_health(envoy, proxy.address, True)
        load = HttpLoad(envoy.address).start()
        began = time.monotonic()
        _wait_outcomes(load, 10)
        steps: list[str] = []
        during_drain: list[dict[str, Any]] = []
        for n, old in enumerate(list(proxies)):
            t0 = time.monotonic()
            old.send_signal(signal.SIGTERM)
            assert old.wait(timeout=60) == 0  # drained and exited cleanly
            drained_s = time.monotonic() - t0
            during_drain += _ended_while_draining(old)
            # The replacement takes the same address: Envoy's cluster lists addresses.
            new = start(
                proxy_args(agent.address, extra=("--listen", old.address)),
                f"proxy-{'ab'[n]}2",
                proxy_env,
            )
            wait_host_health(envoy, new.address, True)
            steps.append(
                f"{'ab'[n]}: drained+exited {drained_s:.1f} s, replaced and healthy {time.monotonic() - t0:.1f} s"
            )
            proxies[n] = new
            _wait_outcomes(load, sum(load.outcomes.values()) + 10)  # traffic flows between steps
        outcomes = load.stop()
        samples = load.samples
        load = None
        wall = time.monotonic() - began

        # New requests keep succeeding once both replicas are the new ones.
        after = Counter(
            _classify(request(envoy.address, "POST", "/api/v1/ai/generate/stream", ROLL_STREAM))
            for _ in range(20)
        )
    finally:
        if load is not None:
            load.stop()
        for proc in reversed(started):
            proc.cleanup()

    _figures("rolling restart", streams=sum(outcomes.values()), outcomes=dict(outcomes), wall_s=round(wall, 1),
             steps="; ".join(steps), calls_that_ended_while_a_replica_drained=len(during_drain),
             after=dict(after))  # fmt: skip
    assert outcomes["cut"] == 0, f"silent cuts, e.g. {samples['cut']}"
    assert outcomes["unshaped"] == 0, f"errors without the Status shape, e.g. {samples['unshaped']}"
    assert outcomes["complete"] >= 30
    # Streams were in flight on the replicas as they drained, and they finished.
    assert during_drain and all(e["code"] == "OK" for e in during_drain), during_drain
    assert after == Counter(complete=20)


def _ended_while_draining(proxy: ServiceProcess) -> list[dict[str, Any]]:
    """Access log lines of the calls a proxy finished after its SIGTERM."""
    draining = next(e["ts"] for e in proxy.log_events("proxy_draining"))
    return [e for e in proxy.log_events("access") if e["ts"] > draining]


def _wait_outcomes(load: HttpLoad, count: int, timeout: float = 60.0) -> None:
    def done() -> bool:
        assert sum(load.outcomes.values()) >= count, f"load stalled at {dict(load.outcomes)}"
        return True

    wait_until(done, timeout, f"{count} outcomes of the load", interval=0.05)


# ---- (c) agents killed and restarted under load --------------------------------------------

GRPC_WORKERS = 12
CALL_DEADLINE_S = 5.0
HANG_SLACK_S = 2.0  # past its deadline by more than this, a call counts as hung


class GrpcLoad:
    """GRPC_WORKERS callers alternating unary and streaming calls, each with a deadline."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.client = stub(channel)
        self.outcomes: Counter[str] = Counter()
        self.reasons: Counter[str] = Counter()
        self.samples: dict[str, str] = {}
        self.slowest_s = 0.0
        self.unshaped_ids: list[str] = []
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> GrpcLoad:
        self._tasks = [asyncio.create_task(self._worker(i)) for i in range(GRPC_WORKERS)]
        return self

    @property
    def total(self) -> int:
        return sum(self.outcomes.values())

    async def _worker(self, n: int) -> None:
        i = 0
        while not self._stop.is_set():
            i += 1
            started = time.monotonic()
            rid = f"kill-{n}-{i}"
            try:
                outcome = await self._one(rid, stream=i % 2 == 0)
            except grpc.aio.AioRpcError as err:
                info = error_info(err)
                outcome = "shaped" if info is not None else "unshaped"
                self.reasons[f"{err.code().name}/{info.reason if info else '-'}"] += 1
                self.samples.setdefault(outcome, f"{rid} {err.code().name}: {err.details()}")
                if outcome == "unshaped":
                    self.unshaped_ids.append(rid)
            elapsed = time.monotonic() - started
            self.slowest_s = max(self.slowest_s, elapsed)
            self.outcomes["hung" if elapsed > CALL_DEADLINE_S + HANG_SLACK_S else outcome] += 1

    async def _one(self, rid: str, stream: bool) -> str:
        metadata = (("x-request-id", rid),)
        if not stream:
            reply = await self.client.Generate(
                pb.GenerateRequest(prompt="kill", options=pb.GenerationOptions(max_tokens=8)),
                metadata=metadata, timeout=CALL_DEADLINE_S,
            )  # fmt: skip
            return "ok" if reply.text else "incomplete"
        chunks = [c async for c in self.client.StreamGenerate(
            pb.StreamGenerateRequest(prompt="kill", options=pb.GenerationOptions(max_tokens=30)),
            metadata=metadata, timeout=CALL_DEADLINE_S,
        )]  # fmt: skip
        # Ended OK: it must have ended with its final chunk and no error in it.
        return (
            "ok"
            if chunks and chunks[-1].is_final and not chunks[-1].HasField("error")
            else "incomplete"
        )

    async def stop(self) -> Counter[str]:
        self._stop.set()
        await asyncio.wait_for(asyncio.gather(*self._tasks), timeout=CALL_DEADLINE_S + 10)
        return self.outcomes


async def test_agents_killed_and_restarted_under_load(spawn) -> None:
    agents = [spawn(*agent_args(token_delay_ms=10), name=f"agent-{n}") for n in "ab"]
    proxy = spawn(*proxy_args(*(a.address for a in agents)), name="proxy")
    figures: dict[str, Any] = {}
    async with grpc.aio.insecure_channel(proxy.address) as channel:
        await poll(lambda: _usable(channel, {a.address for a in agents}), 10, "both agents usable")
        load = GrpcLoad(channel).start()
        began = time.monotonic()
        try:
            await poll(lambda: load.total >= 40, 30, "load to get going")
            for n, old in enumerate(list(agents)):
                name = "ab"[n]
                in_flight = {ep.address: ep.in_flight for ep in await list_endpoints(channel)}[
                    old.address
                ]
                old.proc.kill()  # SIGKILL, calls in flight
                old.wait(timeout=10)
                killed_at = time.monotonic()
                before_kill = load.total
                # (B023: each poll is awaited before the loop variables change.)
                await poll(
                    lambda: load.total >= before_kill + 20,  # noqa: B023
                    30,
                    "traffic to continue on the other agent",
                )
                new = spawn(
                    *agent_args("--listen", old.address, token_delay_ms=10), name=f"agent-{name}2"
                )
                restarted_at = time.monotonic()
                try:
                    usable_s = await poll(
                        lambda: _usable(channel, {new.address}),  # noqa: B023
                        20,
                        f"agent {name} usable again",
                    )
                except AssertionError as exc:  # say what the proxy thinks of it
                    raise AssertionError(
                        f"{exc}; the proxy's endpoints: {await _states(channel)}"
                    ) from None
                calls_before = await _total_calls(channel, new.address)
                traffic_s = await poll(
                    lambda: _calls_since(channel, new.address, calls_before, 5),  # noqa: B023
                    20,
                    f"traffic back on agent {name}",
                )
                agents[n] = new
                figures[f"agent_{name}"] = (
                    f"{in_flight} in flight at kill, down {restarted_at - killed_at:.1f} s, usable {usable_s:.1f} s "
                    f"after restart, traffic back {usable_s + traffic_s:.1f} s after restart"
                )
            await poll(lambda: load.total >= before_kill + 60, 30, "load after both restarts")
        finally:
            outcomes = await load.stop()
    _figures("agents killed", calls=load.total, outcomes=dict(outcomes), errors=dict(load.reasons),
             slowest_call_s=round(load.slowest_s, 2), wall_s=round(time.monotonic() - began, 1), **figures)  # fmt: skip
    assert outcomes["hung"] == 0, f"calls past their deadline: {outcomes}"
    unshaped = [e for e in proxy.log_events("access") if e.get("request_id") in load.unshaped_ids]
    assert outcomes["unshaped"] == 0, (
        f"errors without ErrorInfo, e.g. {load.samples['unshaped']}; the proxy logged {unshaped}"
    )
    assert outcomes["incomplete"] == 0, "a stream ended OK without its final chunk"
    assert outcomes["ok"] >= 100


async def _usable(channel: grpc.aio.Channel, addresses: set[str]) -> bool:
    usable = {ep.address for ep in await list_endpoints(channel) if ep.usable}
    return addresses <= usable


async def _states(channel: grpc.aio.Channel) -> list[str]:
    return [
        f"{ep.address} serving={ep.serving} usable={ep.usable} breaker={ep.breaker_state} in_flight={ep.in_flight}"
        for ep in await list_endpoints(channel)
    ]


async def _total_calls(channel: grpc.aio.Channel, address: str) -> int:
    return next(ep.total_calls for ep in await list_endpoints(channel) if ep.address == address)


async def _calls_since(channel: grpc.aio.Channel, address: str, before: int, at_least: int) -> bool:
    return await _total_calls(channel, address) >= before + at_least
