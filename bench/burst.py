"""The burst row (issue 23): 3,000 streams from 50 callers at once beside a light caller
(one Generate every 100 ms), against the old blind gate and the fair one, same run. Each
burst caller connects from its own 127.0.0.N (devtools/relay.py), the light one from
127.0.0.1: callers by address, as the proxy tells them apart with auth off.

    .venv/bin/python -m bench.burst [--streams 3000] [--rounds 1]

One reference agent (10 ms per token, 20 tokens a stream); for each round one proxy with
`overload.policy: blind` and one with `fair` (started in turn, alternating, on the same
agent, default settings otherwise). The burst runs in its own process (devtools/burst.py).
First the box's capacity, with the fair gate: streams started per second (paced runs at
rising rates, the highest whose first chunk p99 stays within 0.5 s with nothing refused)
and streams held at once (two thirds of the burst, 10 s streams). Then per policy, the
burst all at once and paced at that start rate: the admitted share, first-chunk p50/p99
of admitted streams, refusal latency p50/p99 (as the burst's own loaded client sees
them), the light caller's success share and p50/p99 while the burst lasts, and streams
started per second (admitted / burst wall).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
from typing import Any

from bench.procs import Procs, aiproxy_argv
from devtools.burst import run_burst

POLICIES = ("blind", "fair")
TARGET_S = 0.5  # first chunk (DESIGN: the streaming spec's target)
KEYS = ("admitted", "ttfc_p50", "ttfc_p99", "refusal_p50", "refusal_p99", "light_served",
        "light_p50", "light_p99", "started_per_s", "wall_s")  # fmt: skip


def _proxy_env(policy: str) -> dict[str, str]:
    return {
        "AIPROXY_OVERLOAD__POLICY": policy,
        "AIPROXY_LOG__ACCESS": "false",
        "AIPROXY_METRICS__LISTEN": "127.0.0.1:0",
        # Limits far above the load: this row is about the gate.
        "AIPROXY_LIMITS__RATE_PER_S": "1000000",
        "AIPROXY_LIMITS__BURST": "1000000",
        "AIPROXY_LIMITS__MAX_STREAMS_PER_CALLER": "100000",
    }


def _one(procs: Procs, agent: Any, policy: str, name: str, **kw: Any) -> dict[str, Any]:
    proxy = procs.start(
        name,
        aiproxy_argv("serve", "--listen", "127.0.0.1:0", "--upstream", agent.address),
        env=_proxy_env(policy),
    )
    try:
        figures = asyncio.run(
            run_burst(proxy.address, [() for _ in range(50)], (), quiet=True, by_address=True, **kw)
        )
    finally:
        procs.stop(proxy)
    figures["started_per_s"] = figures["admitted"] * kw["streams"] / figures["wall_s"]
    return {k: figures[k] for k in KEYS}


def start_capacity(
    procs: Procs, agent: Any, rates: tuple[int, ...], seconds: float
) -> dict[str, Any]:
    """Streams started per second this box serves: short streams (20 chunks, 10 ms apart)
    paced for `seconds` at rising rates, fair gate; the highest rate whose streams were all
    admitted with first chunk p99 within TARGET_S."""
    runs = {}
    best = 0
    for rate in rates:
        n = max(50, int(rate * seconds))
        r = _one(procs, agent, "fair", f"capacity-{rate}", streams=n, rate_per_s=rate)
        runs[rate] = r
        if r["admitted"] == 1.0 and r["ttfc_p99"] <= TARGET_S:
            best = rate
        else:
            break
    return {"rate_per_s": best, "runs": runs}


def burst_rows(procs: Procs, streams: int = 3000, rounds: int = 1) -> dict[str, Any]:
    small = streams <= 300
    agent = procs.start(
        "burst-agent",
        aiproxy_argv("agent", "--listen", "127.0.0.1:0", "--token-delay-ms", "10"),
    )
    # Long streams for the held rows: 40 chunks 250 ms apart (10 s); the light caller
    # asks for one token (250 ms).
    slow = procs.start(
        "held-agent",
        aiproxy_argv("agent", "--listen", "127.0.0.1:0", "--token-delay-ms", "250"),
    )
    # Past the ceiling: streams of 30 s (30 chunks 1 s apart: few messages, so holding
    # them is cheap) started fast enough that 1.5x server.max_active_calls would be open
    # together; the gate can only hold the ceiling, and should hold about that.
    ceiling_agent = procs.start(
        "ceiling-agent",
        aiproxy_argv("agent", "--listen", "127.0.0.1:0", "--token-delay-ms", "1000"),
    )
    capacity = start_capacity(
        procs, agent, (25, 50) if small else (25, 50, 100, 200, 400, 800), 2 if small else 4
    )
    rate = max(capacity["rate_per_s"], 25)
    ceiling_tokens = 3 if small else 30
    # All started within 25 s (5 s before the first ends), at least at the start capacity.
    ceiling_rate = max(rate, streams / (ceiling_tokens - 5)) if not small else rate
    runs: dict[str, list[dict[str, Any]]] = {}
    for r in range(rounds):
        for policy in POLICIES if r % 2 == 0 else POLICIES[::-1]:
            # All at once: what a burst does to a light caller beside it.
            runs.setdefault(f"{policy}, at once", []).append(
                _one(procs, agent, policy, f"burst-{policy}-{r}", streams=streams)
            )
            # Held: `streams` 10 s streams started at the start capacity, so that they
            # are open together (1.5x server.max_active_calls for 3,000).
            runs.setdefault(f"{policy}, held", []).append(
                _one(
                    procs,
                    slow,
                    policy,
                    f"held-{policy}-{r}",
                    streams=streams,
                    rate_per_s=rate,
                    max_tokens=40,
                    light_max_tokens=1,
                )
            )
            # Past the ceiling: what the gate holds of 1.5x server.max_active_calls.
            runs.setdefault(f"{policy}, past the ceiling", []).append(
                _one(
                    procs,
                    ceiling_agent,
                    policy,
                    f"ceiling-{policy}-{r}",
                    streams=streams,
                    rate_per_s=ceiling_rate,
                    max_tokens=ceiling_tokens,
                    light_max_tokens=1,
                )
            )
    procs.stop(agent)
    procs.stop(slow)
    procs.stop(ceiling_agent)
    rows = {
        name: {k: statistics.median(run[k] for run in got) for k in KEYS}
        for name, got in runs.items()
    }
    return {"streams": streams, "callers": 50, "rounds": rounds, "rows": rows, "runs": runs,
            "start_capacity": capacity, "held_rate_per_s": rate,
            "ceiling_rate_per_s": ceiling_rate, "ceiling_tokens": ceiling_tokens}  # fmt: skip


def format_rows(result: dict[str, Any]) -> list[str]:
    head = ("| gate | admitted | first chunk p50 / p99 | refusal p50 / p99 | light served | "
            "light p50 / p99 | streams started/s |")  # fmt: skip
    cap = result["start_capacity"]
    lines = [
        f"Capacity measured in the same run: **{cap['rate_per_s']} streams started per second** "
        f"(the highest rate, paced for 4 s, with every stream admitted and first chunk p99 <= "
        f"{TARGET_S} s; 20 chunks 10 ms apart).",
        "",
        f"*at once*: all {result['streams']} streams sent together (20 chunks, 10 ms apart); "
        f"*held*: {result['streams']} streams of 10 s (40 chunks, 250 ms apart) started at "
        f"{result['held_rate_per_s']}/s, the start capacity (about "
        f"{min(result['streams'], result['held_rate_per_s'] * 10)} open at once; 3,000 at once "
        "is 1.5x server.max_active_calls).",
        "",
        f"*past the ceiling*: {result['streams']} streams of "
        f"{result.get('ceiling_tokens', 30)} s (a chunk a second) started at "
        f"{result.get('ceiling_rate_per_s', 0):.0f}/s, so that all would be open together: "
        "the gate can hold server.max_active_calls (2,000) of them at most.",
        "",
        head,
        "|---|---|---|---|---|---|---|",
    ]
    for policy, r in result["rows"].items():
        lines.append(
            f"| {policy} | {r['admitted']:.0%} | {r['ttfc_p50']:.2f} / {r['ttfc_p99']:.2f} s | "
            f"{r['refusal_p50']:.2f} / {r['refusal_p99']:.2f} s | {r['light_served']:.0%} | "
            f"{r['light_p50'] * 1000:.0f} / {r['light_p99'] * 1000:.0f} ms | "
            f"{r['started_per_s']:.0f} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.burst", description=__doc__)
    parser.add_argument("--streams", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    procs = Procs()
    try:
        result = burst_rows(procs, args.streams, args.rounds)
    finally:
        procs.cleanup()
    print("\n".join(format_rows(result)))
    print(json.dumps(result["rows"]))


if __name__ == "__main__":
    main()
