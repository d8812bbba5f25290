"""Chaos: a burst of 3,000 streams from 50 callers beside one light caller (issue 23).

The light caller sends one unary call every 100 ms on its own connection while the burst
lasts; it must be served (>= 90 %, p99 < 500 ms) while the burst is shed: the gate refuses
from the callers using the most, every refusal shaped, none CANCELLED. Three ways of
telling callers apart: direct with auth off (the address, then x-client-id within it),
direct with auth on (the JWT's credential, then its verified subject), through Envoy
(the client address Envoy puts in the trusted header; each caller on its own source
address through a small relay, devtools/relay.py).

Bounded for a shared 2-core box: each test well under 60 s; the figures are printed.
"""

from __future__ import annotations

import collections
import time
from typing import Any

import jwt

from devtools.burst import run_burst
from tests.conftest import agent_args, proxy_args

BURST_STREAMS = 3000
BURST_CALLERS = 50


def assert_fair(figures: dict[str, Any], p99_s: float = 0.5, served: float = 0.9) -> None:
    results = figures["results"]
    assert figures["counts"][("CANCELLED", "")] == 0, figures["counts"]
    refused = [r for r in results if r["code"] != "OK"]
    assert all(
        (r["code"], r["reason"], r["retry"], r["chunks"])
        == ("RESOURCE_EXHAUSTED", "OVERLOADED", True, 0)
        for r in refused
    ), collections.Counter((r["code"], r["reason"], r["retry"]) for r in refused)
    assert all(r["complete"] for r in results if r["code"] == "OK")
    light_refused = [r for r in figures["light"] if r["code"] != "OK"]
    assert all((r["code"], r["reason"], r["retry"]) == ("RESOURCE_EXHAUSTED", "OVERLOADED", True)
               for r in light_refused), light_refused  # fmt: skip
    assert figures["light_served"] >= served, figures["light_codes"]
    assert figures["light_p99"] < p99_s


async def test_light_caller_is_served_beside_a_burst(spawn) -> None:
    """Auth off: callers are their addresses (each burst caller on its own 127.0.0.N)."""
    agent = spawn(*agent_args(token_delay_ms=10), name="agent")
    proxy = spawn(
        *proxy_args(agent.address),
        env={"AIPROXY_LOG__ACCESS": "false"},
        name="proxy",
    )
    figures = await run_burst(
        proxy.address, [() for _ in range(BURST_CALLERS)], (), by_address=True
    )
    assert_fair(figures)


SECRET = "fair-overload-test-secret-of-32-bytes-or-more"


def bearer(subject: str) -> tuple[tuple[str, str], ...]:
    claims = {"sub": subject, "exp": int(time.time()) + 600}
    return (("authorization", f"Bearer {jwt.encode(claims, SECRET, algorithm='HS256')}"),)


async def test_light_caller_is_served_beside_a_burst_with_auth_on(spawn) -> None:
    """Callers by JWT subject: at the gate a token counts by its keyed hash inside its
    address until the auth stage has verified it once, then under its subject."""
    agent = spawn(*agent_args(token_delay_ms=10), name="agent")
    proxy = spawn(
        *proxy_args(agent.address),
        env={"AIPROXY_LOG__ACCESS": "false", "AIPROXY_AUTH__JWT_SECRET": SECRET},
        name="proxy",
    )
    figures = await run_burst(
        proxy.address, [bearer(f"burst-{i}") for i in range(BURST_CALLERS)], bearer("light")
    )
    # Measured on the shared 2-core box: served 100 %, p99 0.07-0.18 s (6 runs, load
    # average 2-10; earlier 0.23-0.77 s at load average 13-22): the bounds.
    assert_fair(figures)


async def test_light_caller_is_served_beside_a_burst_through_envoy(spawn) -> None:
    """Callers by address: each burst caller reaches Envoy from its own 127.0.0.N (a relay,
    devtools/relay.py), Envoy writes it in the trusted client-address header, the
    gate counts by it; the light caller comes from 127.0.0.1."""
    agent = spawn(*agent_args(token_delay_ms=10), name="agent")
    proxy = spawn(*proxy_args(agent.address), env={"AIPROXY_LOG__ACCESS": "false"}, name="proxy")
    envoy = spawn(
        "envoy", "--listen", "127.0.0.1:0", "--concurrency", "2", "--proxy", proxy.address,
        name="envoy",
    )  # fmt: skip
    figures = await run_burst(
        envoy.address, [() for _ in range(BURST_CALLERS)], (), by_address=True
    )
    # Through Envoy the light call used to wait 0.7-1.4 s (p99) in Envoy's worker before
    # Envoy read it, while the worker decoded a burst's 1,500 requests per connection
    # batch first; `aiproxy envoy` now sets Envoy's http.max_requests_per_io_cycle to 1, so
    # every connection takes turns (docs/overload.md, "Through Envoy"; bench/edge_burst.py
    # measures each part). Its calls that still reach the gate together are kept in by
    # overload.min_share and the share wait. Measured on the shared 2-core box (load
    # average 2-3, 13 runs): served 100 %, p99 0.14-0.42 s; before the runtime key, the
    # same session: p99 0.85-1.1 s.
    assert_fair(figures)
