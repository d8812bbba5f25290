"""Issue 20 §3: a value the caller declares about itself (x-client-id; x-api-key while auth
is off) can only NARROW a key it becomes part of, never widen or multiply it: the limits'
owner, the cache's scope, the resume scope and the per-caller resume bounds. Generated
inputs, fresh per run: addresses from a small pool, declared values shared across them."""

from __future__ import annotations

import itertools
import random
from typing import Any

from aiproxy.core.callinfo import CallInfo, metadata_dict
from aiproxy.core.settings import load_settings
from aiproxy.interceptors.limits import Limits
from aiproxy.server.request.caching import Caching
from aiproxy.server.request.resume import caller_of, stream_scope


def generated_calls(rng: random.Random, n: int, *, authenticated: bool) -> list[CallInfo]:
    addresses = [f"ipv4:10.{rng.randrange(256)}.{rng.randrange(256)}.{i}" for i in range(1, 5)]
    subjects = [f"sub:{rng.getrandbits(32):x}" for _ in range(3)]
    values = [f"{rng.getrandbits(40):x}" for _ in range(4)]
    calls = []
    for _ in range(n):
        metadata: list[tuple[str, str]] = []
        for header in ("x-client-id", "x-api-key"):
            if rng.random() < 0.5:
                metadata.append((header, rng.choice(values)))
        headers, repeated = metadata_dict(metadata)
        call = CallInfo("/x", metadata=headers, repeated=repeated)
        call.peer = f"{rng.choice(addresses)}:{rng.randrange(1, 65536)}"
        if authenticated:
            call.caller = call.identity = rng.choice(subjects)
        calls.append(call)
    return calls


def scopes(call: CallInfo, caching: Caching) -> dict[str, Any]:
    return {
        "limits owner": call.identity,
        "cache": caching._scope(call),
        "resume scope": stream_scope(call),
        "resume holder": caller_of(call),
    }


def test_a_declared_value_never_widens_or_multiplies_a_scope() -> None:
    rng = random.Random()
    stage = Limits(load_settings(limits={"rate_per_s": 1, "burst": 2}).limits)
    caching = Caching(None, load_settings().cache)  # type: ignore[arg-type]
    for authenticated in (False, True):
        calls = generated_calls(rng, 200, authenticated=authenticated)
        for call in calls:
            stage.key(call)
        owner = {id(c): c.identity for c in calls}
        seen = {id(c): scopes(c, caching) for c in calls}
        for a, b in itertools.combinations(calls, 2):
            sa, sb = seen[id(a)], seen[id(b)]
            # Widen: two different owners never meet in a declared-value-derived scope
            # (the resume scope of anonymous callers is shared on purpose: "anon").
            for name in ("limits owner", "cache", "resume holder"):
                if sa[name] == sb[name]:
                    assert owner[id(a)] == owner[id(b)], (name, a.metadata, b.metadata)
            # Multiply: one owner gets one limits bucket, one resume holder and one resume
            # scope, whatever it declares.
            if owner[id(a)] == owner[id(b)]:
                for name in ("limits owner", "resume scope", "resume holder"):
                    assert sa[name] == sb[name], (name, a.metadata, b.metadata)


def test_an_unverified_api_key_from_another_address_shares_no_cached_answer() -> None:
    stage = Limits(load_settings().limits)
    caching = Caching(None, load_settings().cache)  # type: ignore[arg-type]
    value = f"{random.getrandbits(64):x}"
    a = CallInfo("/x", metadata={"x-api-key": value}, peer="ipv4:10.0.0.1:1")
    b = CallInfo("/x", metadata={"x-api-key": value}, peer="ipv4:10.0.0.2:1")
    stage.key(a), stage.key(b)
    assert caching._scope(a) != caching._scope(b)
    # Behind one address, a label narrows the cache's scope (never shares beyond it).
    c = CallInfo("/x", metadata={"x-client-id": "u1"}, peer="ipv4:10.0.0.1:2")
    stage.key(c)
    assert caching._scope(c) not in (caching._scope(a), "peer:10.0.0.1")
