"""What affinity routing buys: first-token time of multi-turn chats, affinity on vs off.

    .venv/bin/python -m bench.affinity_load [--chats 200] [--turns 6] [--prefill-ms-per-token 0.5]
                                            [--rounds 1] [--out bench/results]

One run, one machine, the same agents for both arms:
  - a redis-server (devtools/redis_server.py) holds the chat sessions of every replica
    (`aiproxy agent --sessions redis`), so each turn's prompt is the whole conversation
    wherever it lands: the arms differ only in where the turns go;
  - 3 agent replicas with the modelled prefix cache (`--prefill-ms-per-token`): a turn's
    first token waits that long per prompt token not already cached on the replica that
    serves it (a replica caches a session's conversation when it serves one of its turns);
  - two proxies over the same 3 agents: `on` (the default, rendezvous hashing with
    bounded loads on the session) and `off` (upstream.affinity.enabled false: P2C).
Each chat starts with a system prompt of `--context-words` (600) words, like the
instructions and documents real conversations carry, and answers are short
(`--max-tokens`, 16): the prompt, which prefill is paid on, is what grows, and the CPU a
chunk costs (not what is measured) stays low enough on a shared 2-core box not to drown
the prefill the arms differ by. Between turns a chat pauses `--think-s` (3 s, 0.5x to
1.5x at random), as its user reads and types: 200 chats without pauses are 80 turns/s,
which saturates this box's CPU and measures its queues instead (measured: ~1 s p50 for
first turns too, in both arms).
The `--chats` conversations run at once (their starts spread over `--ramp-s`), half
through each proxy: both arms see the same moments of a shared machine, whose other load
otherwise decides which arm looks faster (`--one-arm-at-a-time`: each arm runs all the
chats alone, arms alternating off, on, then on, off). Each chat is `--turns` StreamChat
turns one after the other, with fresh session ids per arm and round (no arm inherits the
other's caches; a prefix cache holds per session, so the arms do not share entries).
Measured per turn: the time from the call's start to its first chunk carrying text. The
row: first-token p50 / p99 of all turns, and of turns 2.. (the first turn of a chat has
nothing cached anywhere), per arm; the `on` proxy's ai_proxy_affinity_total outcomes.
Every process is stopped by its own PID when the run ends.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import pathlib
import random
import sys
import time
import urllib.request
from typing import Any

import grpc

from aiproxy.ai.agent.v1 import agent_service_pb2 as pb
from aiproxy.ai.agent.v1 import agent_service_pb2_grpc as pb_grpc
from aiproxy.ai.proxy.v1 import admin_service_pb2 as admin_pb
from aiproxy.ai.proxy.v1 import admin_service_pb2_grpc as admin_grpc
from bench.procs import Procs, aiproxy_argv
from bench.stack import PROXY_ENV, ROOT
from bench.stats import stamp
from devtools.redis_server import RedisServer

RESULTS = ROOT / "bench" / "results"
QUESTIONS = (
    "How does a circuit breaker protect an upstream service?",
    "And what happens when it is half open?",
    "Which failures should it count, and which not?",
    "How would you test that with real processes?",
    "What should a caller see while it is open?",
    "Summarize what we said so far in three sentences.",
)


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def summary(ttft: list[list[float]]) -> dict[str, Any]:
    """ttft[turn] = first-token seconds of that turn index across chats."""
    every = [s for turn in ttft for s in turn]
    later = [s for turn in ttft[1:] for s in turn]

    def ms(v: float | None) -> float | None:
        return None if v is None else round(v * 1000, 1)

    return {
        "turns": len(every),
        "ttft_p50_ms": ms(pct(every, 0.5)),
        "ttft_p99_ms": ms(pct(every, 0.99)),
        "later_turns_ttft_p50_ms": ms(pct(later, 0.5)),
        "later_turns_ttft_p99_ms": ms(pct(later, 0.99)),
        "first_turn_ttft_p50_ms": ms(pct(ttft[0], 0.5)),
        "by_turn_p50_ms": [ms(pct(t, 0.5)) for t in ttft],
    }


async def chat(
    stub: Any,
    session: str,
    turns: int,
    ramp_s: float,
    rng: random.Random,
    out: list[list[float]],
    max_tokens: int,
    context: str,
    think_s: float,
) -> str | None:
    """One conversation; appends each turn's first-token time to out[turn]. The error
    code name if a turn failed (the chat stops there)."""
    await asyncio.sleep(rng.random() * ramp_s)
    for t in range(turns):
        if t:  # the user reads the answer and types the next message
            await asyncio.sleep(think_s * (0.5 + rng.random()))
        request = pb.StreamChatRequest(
            session_id=session,
            user_message=QUESTIONS[t % len(QUESTIONS)],
            options=pb.GenerationOptions(max_tokens=max_tokens),
        )
        if t == 0 and context:  # the conversation starts with its context (a system prompt)
            request.messages.add(role=pb.CHAT_ROLE_SYSTEM, content=context)
        start = time.perf_counter()
        first = None
        try:
            async for chunk in stub.StreamChat(request, timeout=120):
                if first is None and chunk.delta:
                    first = time.perf_counter() - start
                if chunk.is_final and chunk.HasField("error"):
                    return f"in-band {chunk.error.code}"
        except grpc.aio.AioRpcError as exc:
            return exc.code().name
        if first is None:
            return "no text"
        out[t].append(first)
    return None


async def arm(
    target: str,
    name: str,
    n: int,
    turns: int,
    ramp_s: float,
    seed: int,
    max_tokens: int,
    context: str,
    think_s: float,
) -> dict[str, Any]:
    rng = random.Random(seed)
    ttft: list[list[float]] = [[] for _ in range(turns)]
    # A few connections, as a pool of clients would have.
    channels = [
        grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(4)
    ]
    try:
        stubs = [pb_grpc.AgentServiceStub(ch) for ch in channels]
        started = time.monotonic()
        errors = await asyncio.gather(
            *(
                chat(
                    stubs[i % len(stubs)],
                    f"bench-{name}-{seed}-{i}-{rng.getrandbits(48):012x}",
                    turns,
                    ramp_s,
                    rng,
                    ttft,
                    max_tokens,
                    context,
                    think_s,
                )
                for i in range(n)
            )
        )
        took = time.monotonic() - started
    finally:
        await asyncio.gather(*(ch.close() for ch in channels))
    failed: dict[str, int] = {}
    for e in errors:
        if e is not None:
            failed[e] = failed.get(e, 0) + 1
    return {**summary(ttft), "chats": n, "failed": failed, "duration_s": round(took, 1)}


async def wait_usable(target: str, want: int, timeout: float = 30.0) -> None:
    async with grpc.aio.insecure_channel(target) as channel:
        admin = admin_grpc.ProxyAdminServiceStub(channel)
        deadline = time.monotonic() + timeout
        while True:
            reply = await admin.ListEndpoints(admin_pb.ListEndpointsRequest(), timeout=5)
            if sum(1 for ep in reply.endpoints if ep.usable) >= want:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{target}: fewer than {want} usable endpoints")
            await asyncio.sleep(0.1)


def affinity_outcomes(metrics_address: str) -> dict[str, float]:
    with urllib.request.urlopen(f"http://{metrics_address}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("ai_proxy_affinity_total{"):
            labels, value = line.rsplit(" ", 1)
            outcome = labels.split('outcome="', 1)[1].split('"', 1)[0]
            out[outcome] = out.get(outcome, 0.0) + float(value)
    return out


def run(
    *,
    chats: int = 200,
    turns: int = 6,
    prefill_ms_per_token: float = 0.5,
    replicas: int = 3,
    rounds: int = 1,
    ramp_s: float = 2.0,
    token_delay_ms: float = 5.0,
    max_tokens: int = 16,
    context_words: int = 600,
    think_s: float = 3.0,
    simultaneous: bool = True,
    procs: Procs | None = None,
) -> dict[str, Any]:
    own = procs is None
    words = "the proxy routes every turn of a conversation to the replica that holds it".split()
    context = " ".join(words[i % len(words)] for i in range(context_words))
    procs = procs or Procs()
    redis = RedisServer().start()
    try:
        url = redis.url.rsplit("/", 1)[0] + "/1"
        agents = [
            procs.start(
                "agent",
                aiproxy_argv(
                    "agent",
                    "--listen",
                    "127.0.0.1:0",
                    "--sessions",
                    "redis",
                    "--redis-url",
                    url,
                    "--prefill-ms-per-token",
                    str(prefill_ms_per_token),
                    "--first-token-delay-ms",
                    "0",
                    "--token-delay-ms",
                    str(token_delay_ms),
                ),
            )
            for _ in range(replicas)
        ]
        upstreams = [a for agent in agents for a in ("--upstream", agent.address)]
        proxies = {}
        for name, env in (
            ("on", {}),
            ("off", {"AIPROXY_UPSTREAM__AFFINITY__ENABLED": "false"}),
        ):
            proxies[name] = procs.start(
                f"proxy-{name}",
                aiproxy_argv("serve", "--listen", "127.0.0.1:0", *upstreams),
                env={**PROXY_ENV, **env},
            )
        for p in proxies.values():
            asyncio.run(wait_usable(p.address, replicas))
        results: dict[str, list[dict[str, Any]]] = {"off": [], "on": []}

        async def both(r: int) -> list[dict[str, Any]]:
            # The arms at once, half the chats each: the same moment of a shared box.
            half = chats // 2
            return list(
                await asyncio.gather(
                    *(
                        arm(
                            proxies[name].address,
                            name,
                            half,
                            turns,
                            ramp_s,
                            r,
                            max_tokens,
                            context,
                            think_s,
                        )
                        for name in ("off", "on")
                    )
                )
            )

        for r in range(rounds):
            if simultaneous:
                for name, res in zip(("off", "on"), asyncio.run(both(r)), strict=True):
                    print(f"affinity {name:>3} round {r}: {json.dumps(res)}", flush=True)
                    results[name].append(res)
                continue
            order = ("off", "on") if r % 2 == 0 else ("on", "off")
            for name in order:
                res = asyncio.run(
                    arm(
                        proxies[name].address,
                        name,
                        chats,
                        turns,
                        ramp_s,
                        r,
                        max_tokens,
                        context,
                        think_s,
                    )
                )
                print(f"affinity {name:>3} round {r}: {json.dumps(res)}", flush=True)
                results[name].append(res)
        return {
            "chats": chats,
            "turns": turns,
            "replicas": replicas,
            "prefill_ms_per_token": prefill_ms_per_token,
            "token_delay_ms": token_delay_ms,
            "max_tokens": max_tokens,
            "context_words": context_words,
            "think_s": think_s,
            "simultaneous": simultaneous,
            "ramp_s": ramp_s,
            "rounds": rounds,
            "session_store": "redis",
            "arms": results,
            "on_proxy_affinity_outcomes": affinity_outcomes(proxies["on"].ready["metrics_address"]),
        }
    finally:
        if own:
            procs.cleanup()
        redis.cleanup()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chats", type=int, default=200)
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--prefill-ms-per-token", type=float, default=0.5)
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--ramp-s", type=float, default=2.0)
    parser.add_argument("--token-delay-ms", type=float, default=5.0)
    parser.add_argument(
        "--max-tokens", type=int, default=16, help="per answer: short answers, less CPU"
    )
    parser.add_argument(
        "--context-words", type=int, default=600, help="the system prompt each chat starts with"
    )
    parser.add_argument(
        "--think-s", type=float, default=3.0, help="mean pause between a chat's turns"
    )
    parser.add_argument(
        "--one-arm-at-a-time",
        action="store_true",
        help="each arm runs all --chats alone, in turn (default: both at once, half each)",
    )
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    result = run(
        chats=args.chats,
        turns=args.turns,
        prefill_ms_per_token=args.prefill_ms_per_token,
        replicas=args.replicas,
        rounds=args.rounds,
        ramp_s=args.ramp_s,
        token_delay_ms=args.token_delay_ms,
        max_tokens=args.max_tokens,
        context_words=args.context_words,
        think_s=args.think_s,
        simultaneous=not args.one_arm_at_a_time,
    )
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{stamp()}-affinity.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"bench: wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
