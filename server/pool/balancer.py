"""How the pool picks the endpoint for a call (and for its retries).

Two pickers, chosen per call by whether it has an affinity key:

`pick_p2c`, calls without a key: power of two choices on outstanding calls among the
usable endpoints: two at random, the one with fewer calls in flight, so a slow replica
receives less work without a global scan.

`pick_affine`, calls with a key (a session's scoped id, or the caller's
x-aiproxy-affinity): rendezvous hashing (highest random weight) with bounded loads.
Every endpoint gets a weight for the key; the key's order is the endpoints by weight,
highest first, and the call goes to the first usable one in that order, so:

- every call of one key goes to one replica while the pool does not change, and every
  proxy process that knows the same addresses picks the same one (the weights depend on
  the key and the address only: no process seed, no Python `hash`);
- when that replica becomes unusable (unhealthy, breaker open) or leaves the pool, its
  keys move to their own next choices, spread over the others, and every later call of
  the key follows the same fallback; the other keys do not move at all; when it comes
  back, its keys return to it;
- bounded load (consistent hashing with bounded loads, Mirrokni, Thorup and Zadimoghaddam
  2016): an endpoint whose calls in flight are already at the bound,
  ceil(load_factor x (in flight over the usable endpoints + 1) / usable endpoints), but
  never below `min_spill`, takes no more keyed calls: they spill to the key's next
  choice under the bound (a session that spilled returns once its replica is under the
  bound again);
- a retry passes the endpoints it already tried in `exclude`: it goes to the key's next
  choice, the one the key's later calls fail over to if the first stays down.

The weight of endpoint i for a key is (h x a_i + b_i) mod (2^61 - 1): h is 64 bits of
BLAKE2b of the key, computed once per call; a_i, b_i come from BLAKE2b of the address,
computed once per endpoint (`EndpointSeed`). A universal hash: one multiplication and
one modulo per endpoint instead of a cryptographic hash each (measured: bench/
affinity_cost.py).

Each affine pick says what happened (`Outcome`): hit (the key's first choice), spill
(its first usable choice was at the load bound), failover (its first choice is not
usable, or failed this call already); the pool's caller puts it in the call's metrics.

When nothing else is usable, both pickers return an excluded endpoint rather than none:
trying one again is better than failing the call.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Literal

if TYPE_CHECKING:
    from aiproxy.server.pool.endpoint import Endpoint

Outcome = Literal["hit", "spill", "failover"]
HIT: Final = "hit"
SPILL: Final = "spill"
FAILOVER: Final = "failover"

# The Mersenne prime 2^61 - 1: the universal hash's modulus.
_P: Final = (1 << 61) - 1


def pick_p2c(
    usable: Sequence[Endpoint],
    rng: random.Random,
    exclude: frozenset[str] | set[str] = frozenset(),
) -> Endpoint | None:
    """The endpoint for the next attempt, or None when none is usable."""
    candidates = usable
    if exclude:
        others = [ep for ep in candidates if ep.address not in exclude]
        candidates = others or candidates
    n = len(candidates)
    if n == 0:
        return None
    if n == 1:
        return candidates[0]
    a, b = rng.sample(candidates, 2)
    return a if a.in_flight <= b.in_flight else b


def key_hash(key: str) -> int:
    """The 64-bit hash of an affinity key that every endpoint's weight starts from."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest())


@dataclass(frozen=True, slots=True)
class Member:
    """An endpoint of the pool as the affine picker sees it: its hash coefficients, and
    whether it was usable when the pool last changed (what P2C's list says too)."""

    a: int
    b: int
    endpoint: Endpoint
    usable: bool


def seed(address: str) -> tuple[int, int]:
    """An address's coefficients (a, b) for the universal hash: a in [1, P), b in [0, P)."""
    digest = hashlib.blake2b(address.encode(), digest_size=16, person=b"aiproxy-hrw").digest()
    a = int.from_bytes(digest[:8]) % (_P - 1) + 1
    b = int.from_bytes(digest[8:]) % _P
    return a, b


def rendezvous_order(members: Sequence[Member], h: int) -> list[Member]:
    """The key's order: every member, highest weight first."""
    return sorted(members, key=lambda m: (h * m.a + m.b) % _P, reverse=True)


def pick_affine(
    members: Sequence[Member],
    h: int,
    *,
    load_factor: float,
    min_spill: int,
    exclude: frozenset[str] | set[str] = frozenset(),
) -> tuple[Endpoint | None, Outcome]:
    """The endpoint for the next attempt of a call whose key hashes to `h` (see the
    module docstring), and how it relates to the key's first choice; None when no
    member is usable.

    One pass computes the weights, the load over the usable members and the best
    candidate; the sorted order is only needed when that candidate is at the bound.
    """
    p = _P
    top: Member | None = None  # the key's first choice, usable or not
    top_w = -1
    best: Member | None = None  # its first usable choice not excluded
    best_w = -1
    usable = 0
    total = 0
    for m in members:
        w = (h * m.a + m.b) % p
        if w > top_w:
            top, top_w = m, w
        if m.usable:
            usable += 1
            total += m.endpoint.in_flight
            if w > best_w and (not exclude or m.endpoint.address not in exclude):
                best, best_w = m, w
    if usable == 0:
        return None, FAILOVER
    if best is None:  # every usable member was tried already: try them again
        return pick_affine(
            members, h, load_factor=load_factor, min_spill=min_spill, exclude=frozenset()
        )
    bound = max(min_spill, math.ceil(load_factor * (total + 1) / usable))
    chosen = best
    if best.endpoint.in_flight >= bound:
        for m in rendezvous_order(members, h):
            if m.usable and m.endpoint.in_flight < bound and m.endpoint.address not in exclude:
                chosen = m
                break
        # (none under the bound, some being excluded: the best candidate, over it)
    if chosen is not best:
        return chosen.endpoint, SPILL
    return chosen.endpoint, HIT if chosen is top else FAILOVER
