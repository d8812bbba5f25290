"""The limits stage (interceptors/limits.py): keys, the store, and the rule that a
self-declared x-client-id neither reaches another address's bucket nor counts as an
identity for the breaker."""

from __future__ import annotations

from typing import Any

import pytest

from core.callinfo import CallInfo, metadata_dict
from core.errors import ConcurrencyLimited, Overloaded, RateLimited
from core.service import agent_service
from core.settings import load_settings
from interceptors.limits import Limits, override_key

GENERATE = agent_service().by_name["Generate"]
STREAM = agent_service().by_name["StreamGenerate"]


class Ctx:
    def time_remaining(self) -> None:
        return None


def call_from(peer: str, *metadata: tuple[str, str], caller: str = "") -> CallInfo:
    headers, repeated = metadata_dict(metadata)
    call = CallInfo(GENERATE.path, metadata=headers, repeated=repeated, peer=peer)
    if caller:
        call.caller = call.identity = caller
    return call


def limits(**overrides: Any) -> Limits:
    return Limits(load_settings(limits={"rate_per_s": 0.01, "burst": 2, **overrides}).limits)


async def admit(stage: Limits, call: CallInfo, method: Any = GENERATE) -> None:
    bound = stage.bind(method)
    await bound.enter(call, None, Ctx())


def test_a_client_id_keys_a_bucket_only_inside_the_callers_address() -> None:
    stage = limits()
    a = call_from("ipv4:10.0.0.1:5000", ("x-client-id", "victim"))
    b = call_from("ipv4:10.0.0.2:6000", ("x-client-id", "victim"))
    assert stage.key(a) == "client:victim@10.0.0.1"
    assert stage.key(b) == "client:victim@10.0.0.2"
    # The breaker's identity is the address, never the declared id.
    assert (a.identity, b.identity) == ("peer:10.0.0.1", "peer:10.0.0.2")
    minted = call_from("ipv4:10.0.0.2:6000", ("x-client-id", "fresh-123"))
    stage.key(minted)
    assert minted.identity == b.identity


async def test_sending_a_victims_client_id_does_not_drain_the_victims_bucket() -> None:
    stage = limits()
    victim = "ipv4:10.0.0.1:5000"
    attacker = "ipv4:10.6.6.6:5000"
    for _ in range(2):
        await admit(stage, call_from(attacker, ("x-client-id", "victim")))
    with pytest.raises(RateLimited):
        await admit(stage, call_from(attacker, ("x-client-id", "victim")))
    await admit(stage, call_from(victim, ("x-client-id", "victim")))  # still has its tokens


async def test_minting_client_ids_shares_the_address_identity_and_the_cap() -> None:
    stage = limits(max_concurrent_calls=3)
    held = []
    for i in range(3):
        call = call_from("ipv4:10.6.6.6:1", ("x-client-id", f"id-{i}"))
        await admit(stage, call)
        held.append(call)
    assert {c.identity for c in held} == {"peer:10.6.6.6"}
    with pytest.raises(Overloaded):
        await admit(stage, call_from("ipv4:10.6.6.6:1", ("x-client-id", "id-9")))
    stage.bind(GENERATE).exit(held[0])  # one ends: room again
    await admit(stage, call_from("ipv4:10.6.6.6:1", ("x-client-id", "id-9")))


async def test_overrides_still_match_by_client_id() -> None:
    stage = limits(overrides={"client:batch": {"rate_per_s": 1000, "burst": 50}})
    assert override_key("client:batch@10.0.0.1") == "client:batch"
    for _ in range(20):
        await admit(stage, call_from("ipv4:10.0.0.1:1", ("x-client-id", "batch")))


async def test_an_authenticated_caller_is_keyed_and_identified_by_its_subject() -> None:
    stage = limits()
    call = call_from("ipv4:10.0.0.1:1", ("x-client-id", "spoof"), caller="sub:alice")
    await admit(stage, call)
    assert (call.caller, call.identity) == ("sub:alice", "sub:alice")
    assert dict(call.reply_metadata)["x-ratelimit-limit"] == "2"


async def test_stream_leases_are_taken_at_enter_and_released_at_exit() -> None:
    stage = limits(max_streams_per_caller=1, rate_per_s=1000, burst=100)
    first = call_from("ipv4:10.0.0.1:1")
    await admit(stage, first, STREAM)
    with pytest.raises(ConcurrencyLimited):
        await admit(stage, call_from("ipv4:10.0.0.1:2"), STREAM)
    stage.bind(STREAM).exit(first)
    stage.bind(STREAM).exit(first)  # a second exit changes nothing
    await admit(stage, call_from("ipv4:10.0.0.1:2"), STREAM)
