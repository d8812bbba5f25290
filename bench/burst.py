"""The burst row (issue 23): 3,000 streams from 50 callers at once beside a light caller
(one Generate every 100 ms), against the old blind gate and the fair one, same run. Each
burst caller connects from its own 127.0.0.N (devtools/relay.py), the light one from
127.0.0.1: callers by address, as the proxy tells them apart with auth off.

    .venv/bin/python -m bench.burst [--streams 3000] [--rounds 1]

One reference agent (10 ms per token, 20 tokens a stream); for each round one proxy with
`overload.policy: blind` and one with `fair` (started in turn, alternating, on the same
agent, default settings otherwise). The burst runs in its own process (devtools/burst.py).
Per policy: the admitted share, first-chunk p50/p99 of admitted streams, refusal latency
p50/p99 (as the burst's own loaded client sees them), the light caller's success share
and p50/p99 while the burst lasts, and streams started per second (admitted / burst wall).
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


def burst_rows(procs: Procs, streams: int = 3000, rounds: int = 1) -> dict[str, Any]:
    agent = procs.start(
        "burst-agent",
        aiproxy_argv("agent", "--listen", "127.0.0.1:0", "--token-delay-ms", "10"),
    )
    runs: dict[str, list[dict[str, Any]]] = {p: [] for p in POLICIES}
    for r in range(rounds):
        for policy in POLICIES if r % 2 == 0 else POLICIES[::-1]:
            proxy = procs.start(
                f"burst-proxy-{policy}-{r}",
                aiproxy_argv("serve", "--listen", "127.0.0.1:0", "--upstream", agent.address),
                env=_proxy_env(policy),
            )
            try:
                figures = asyncio.run(
                    run_burst(
                        proxy.address,
                        [() for _ in range(50)],
                        (),
                        streams=streams,
                        quiet=True,
                        by_address=True,
                    )
                )
            finally:
                procs.stop(proxy)
            figures["started_per_s"] = figures["admitted"] * streams / figures["wall_s"]
            runs[policy].append({k: figures[k] for k in KEYS})
    procs.stop(agent)
    rows = {
        policy: {k: statistics.median(run[k] for run in got) for k in KEYS}
        for policy, got in runs.items()
    }
    return {"streams": streams, "callers": 50, "rounds": rounds, "rows": rows, "runs": runs}


def format_rows(result: dict[str, Any]) -> list[str]:
    head = ("| gate | admitted | first chunk p50 / p99 | refusal p50 / p99 | light served | "
            "light p50 / p99 | streams started/s |")  # fmt: skip
    lines = [head, "|---|---|---|---|---|---|---|"]
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
