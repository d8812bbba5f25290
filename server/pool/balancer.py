"""How the pool picks the endpoint for a call (and for its retries).

Power of two choices on outstanding calls among the usable endpoints: two at random, the
one with fewer calls in flight, so a slow replica receives less work without a global
scan. A retry passes the endpoints it already tried in `exclude`; when nothing else is
usable they are still better than failing the call.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from aiproxy.server.pool.endpoint import Endpoint


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
