"""CPU per pick of the pool's balancer: P2C against affinity routing.

    .venv/bin/python -m bench.affinity_cost [--picks 20000] [--out FILE]

For 3 and 30 endpoints, this process's CPU (time.process_time) per call of:
  - p2c:          `pick_p2c` (calls without a key, today's path);
  - key:          what the forwarder adds per keyed call before picking: the scoped key
                  string and its 64-bit BLAKE2b (`key_hash`);
  - affine:       `pick_affine` with every endpoint under the load bound (the usual case:
                  one pass, no sort);
  - affine_spill: `pick_affine` when the key's replica is at the bound (one pass + the
                  sorted order);
  - key+affine:   both, i.e. a keyed call's whole routing cost.
Best of --repeat runs (this machine is shared: the minimum is the least disturbed).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

from aiproxy.server.pool.balancer import Member, key_hash, pick_affine, pick_p2c, seed


@dataclass
class _Endpoint:
    address: str
    in_flight: int = 0


def _per_call_us(fn: Callable[[], object], picks: int, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.process_time()
        for _ in range(picks):
            fn()
        best = min(best, time.process_time() - start)
    return best / picks * 1e6


def measure(n: int, picks: int, repeat: int) -> dict[str, float]:
    rng = random.Random(n)
    eps = [_Endpoint(f"10.0.{i // 250}.{i % 250 + 1}:50052", rng.randrange(6)) for i in range(n)]
    members = [Member(*seed(ep.address), ep, True) for ep in eps]  # type: ignore[arg-type]
    scope, session = "0123456789abcdef0123456789abcdef", "sess_5b0c1f6e9d2a4c8e"
    h = key_hash(f"{scope}\x00{session}")
    kw = {"load_factor": 1.25, "min_spill": 8}

    def p2c() -> object:
        return pick_p2c(eps, rng)  # type: ignore[arg-type]

    def key() -> object:
        return key_hash(f"{scope}\x00{session}")

    def affine() -> object:
        return pick_affine(members, h, **kw)  # type: ignore[arg-type]

    def both() -> object:
        return pick_affine(members, key_hash(f"{scope}\x00{session}"), **kw)  # type: ignore[arg-type]

    out = {
        "p2c": _per_call_us(p2c, picks, repeat),
        "key": _per_call_us(key, picks, repeat),
        "affine": _per_call_us(affine, picks, repeat),
        "key+affine": _per_call_us(both, picks, repeat),
    }
    home, outcome = pick_affine(members, h, **kw)  # type: ignore[arg-type]
    assert outcome == "hit" and home is not None
    saved = home.in_flight
    home.in_flight = 10_000  # at the bound: the spill path
    assert pick_affine(members, h, **kw)[1] == "spill"  # type: ignore[arg-type]
    out["affine_spill"] = _per_call_us(affine, picks, repeat)
    home.in_flight = saved
    return {k: round(v, 2) for k, v in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--picks", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--out", help="also write the results as JSON here")
    args = parser.parse_args()
    results = {str(n): measure(n, args.picks, args.repeat) for n in (3, 30)}
    report = {"unit": "us of CPU per call (best of --repeat)", "endpoints": results}
    print(json.dumps(report, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    main()
