"""The limits stage (interceptors/limits.py): keys, the store, and the rule that a
self-declared x-client-id neither reaches another address's bucket nor counts as an
identity for the breaker."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest

from aiproxy.ai.agent.v1 import agent_service_pb2 as pb
from aiproxy.core.callinfo import CallInfo, metadata_dict
from aiproxy.core.errors import ConcurrencyLimited, Overloaded, RateLimited
from aiproxy.core.limitpolicy import LimitPolicy
from aiproxy.core.limitstore import Admission, MemoryLimitStore, TokenLimits
from aiproxy.core.ratelimit import hash_api_key
from aiproxy.core.service import agent_service
from aiproxy.core.settings import load_settings
from aiproxy.core.tokens import DEFAULT_COMPLETION_TOKENS
from aiproxy.interceptors.limits import Limits, used_tokens

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
    assert stage.keys(a) == ("peer:10.0.0.1", "client:victim@peer:10.0.0.1", "client:victim")
    assert stage.key(b) == "client:victim@peer:10.0.0.2"
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


def declared(kind: str, value: str) -> tuple[str, str]:
    return ("x-client-id" if kind == "client" else "x-api-key", value)


@pytest.mark.parametrize("kind", ["client", "api_key"])
async def test_rotating_declared_ids_never_multiplies_the_address_budget(kind: str) -> None:
    """Issue 20 §3: one anonymous address rotating x-client-id (or x-api-key, a label
    while auth is off) got a fresh bucket per value: 20/20 admitted where 2 are."""
    rng = random.Random()
    stage = limits()  # burst 2, no refill to speak of
    address = f"ipv4:10.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 255)}"
    ids = {f"{rng.getrandbits(64):x}-{i}" for i in range(rng.randrange(20, 200))}
    admitted = 0
    for value in ids:
        try:
            await admit(
                stage, call_from(f"{address}:{rng.randrange(1, 65536)}", declared(kind, value))
            )
        except RateLimited:
            continue
        admitted += 1
    assert admitted == 2, f"{len(ids)} ids from one address got {admitted} calls"
    # Without any id, the address is refused too: the ids spent its budget.
    with pytest.raises(RateLimited):
        await admit(stage, call_from(f"{address}:1"))


async def test_an_override_for_a_declared_id_splits_its_owners_budget_never_adds() -> None:
    stage = limits(
        rate_per_s=0.01,
        burst=2,
        overrides={
            "peer:10.0.0.1": {"burst": 50},  # a backend serving many users
            "client:batch": {"burst": 1},  # one of them, narrowed
            "client:greedy": {"burst": 1000},  # an override can never widen
        },
    )
    backend = "ipv4:10.0.0.1:1"
    await admit(stage, call_from(backend, ("x-client-id", "batch")))
    with pytest.raises(RateLimited) as refused:
        await admit(stage, call_from(backend, ("x-client-id", "batch")))
    assert refused.value.quota_violations[0].subject == "client:batch@peer:10.0.0.1"
    for user in range(10):  # the others behind it still get their share
        await admit(stage, call_from(backend, ("x-client-id", f"user-{user}")))
    # Elsewhere, the generous id override gets no more than the address's default.
    elsewhere = "ipv4:10.0.0.2:1"
    for _ in range(2):
        await admit(stage, call_from(elsewhere, ("x-client-id", "greedy")))
    with pytest.raises(RateLimited) as owner:
        await admit(stage, call_from(elsewhere, ("x-client-id", "greedy")))
    assert owner.value.quota_violations[0].subject == "peer:10.0.0.2"


async def test_a_refusal_by_the_declared_ids_bucket_spends_nothing_of_the_owners() -> None:
    stage = limits(overrides={"client:one": {"burst": 1}})
    address = "ipv4:10.0.0.9:1"
    await admit(stage, call_from(address, ("x-client-id", "one")))
    for _ in range(5):
        with pytest.raises(RateLimited):
            await admit(stage, call_from(address, ("x-client-id", "one")))
    await admit(stage, call_from(address))  # the address's second token is still there


async def test_an_authenticated_callers_declared_ids_split_its_subject_budget() -> None:
    stage = limits(overrides={"client:u1": {"burst": 1}})
    ids = [f"u{i}" for i in range(1, 30)]
    admitted = 0
    for value in ids:
        call = call_from("ipv4:10.0.0.1:1", ("x-client-id", value), caller="sub:svc")
        try:
            await admit(stage, call)
        except RateLimited:
            continue
        admitted += 1
        assert call.identity == "sub:svc"
    assert admitted == 2


async def test_minting_client_ids_shares_the_address_identity_and_the_cap() -> None:
    stage = limits(max_concurrent_calls=3, rate_per_s=1000, burst=100)
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


async def test_rotating_ids_does_not_multiply_the_stream_cap() -> None:
    stage = limits(max_streams_per_caller=2, rate_per_s=1000, burst=1000)
    admitted = 0
    for i in range(20):
        call = call_from("ipv4:10.0.0.1:1", ("x-client-id", f"s-{random.getrandbits(32)}-{i}"))
        try:
            await admit(stage, call, STREAM)
        except ConcurrencyLimited:
            continue
        admitted += 1
    assert admitted == 2


async def test_an_authenticated_caller_is_keyed_and_identified_by_its_subject() -> None:
    stage = limits()
    call = call_from("ipv4:10.0.0.1:1", ("x-client-id", "spoof"), caller="sub:alice")
    await admit(stage, call)
    # The declared id is a label inside the subject's budget (logs show it), never its identity.
    assert (call.caller, call.identity) == ("client:spoof@sub:alice", "sub:alice")
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


# ---- token-aware limits --------------------------------------------------------------


class FakeStore(MemoryLimitStore):
    """A memory store that records what the stage asked of it (the store's own logic is
    tested in test_limitstore.py)."""

    local = True

    def __init__(self) -> None:
        super().__init__()
        self.admits: list[dict[str, Any]] = []
        self.finishes: list[tuple[Any, Any, int]] = []

    def admit_nowait(self, key: str, spec: Any, **kwargs: Any) -> Admission:  # type: ignore[override]
        self.admits.append({"key": key, **kwargs})
        return super().admit_nowait(key, spec, **kwargs)

    def finish_nowait(self, lease: Any, reservation: Any, actual_tokens: int = 0) -> None:
        self.finishes.append((lease, reservation, actual_tokens))
        super().finish_nowait(lease, reservation, actual_tokens)


PROMPT = "Explain token buckets, briefly."  # 6 tokens by the estimate
PROMPT_TOKENS = 6


def token_stage(store: MemoryLimitStore | None = None, **limit_settings: Any) -> Limits:
    settings = load_settings(
        auth={"api_keys": [{"name": "ci", "key_hash": hash_api_key("k-ci")}]},
        limits={
            "rate_per_s": 1000,
            "burst": 1000,
            "tokens_per_minute": 10_000,
            "tokens_per_day": 100,
            **limit_settings,
        },
    )
    return Limits(settings.limits, store, policy=LimitPolicy.from_settings(settings))


def gen(max_tokens: int = 10) -> pb.GenerateRequest:
    return pb.GenerateRequest(prompt=PROMPT, options=pb.GenerationOptions(max_tokens=max_tokens))


async def enter(stage: Limits, call: CallInfo, request: Any, method: Any = GENERATE) -> Any:
    bound = stage.bind(method)
    await bound.enter(call, request, Ctx())
    return bound


async def test_admission_reserves_the_prompt_estimate_plus_max_tokens() -> None:
    store = FakeStore()
    stage = token_stage(store)
    call = call_from("ipv4:10.0.0.1:1", caller="sub:alice")
    await enter(stage, call, gen(10))
    (asked,) = store.admits
    assert asked["tokens"] == PROMPT_TOKENS + 10
    assert asked["token_limits"] == TokenLimits(10_000, 100)
    assert asked["budget_key"] is None
    headers = dict(call.reply_metadata)
    assert headers["x-ratelimit-remaining-tokens-day"] == str(100 - 16)
    assert headers["x-ratelimit-limit-tokens"] == "10000"
    assert headers["x-ratelimit-remaining-tokens"] == str(10_000 - 16)


async def test_without_max_tokens_the_completion_is_estimated() -> None:
    store = FakeStore()
    stage = token_stage(store, tokens_per_day=None)
    await enter(stage, call_from("ipv4:10.0.0.1:1"), pb.GenerateRequest(prompt=PROMPT))
    assert store.admits[0]["tokens"] == PROMPT_TOKENS + DEFAULT_COMPLETION_TOKENS


async def test_a_method_without_usage_reserves_no_tokens() -> None:
    store = FakeStore()
    stage = token_stage(store)
    search = agent_service().by_name["SearchRag"]
    await enter(stage, call_from("ipv4:10.0.0.1:1"), pb.SearchRagRequest(query="q"), search)
    assert store.admits[0]["token_limits"] is None


async def test_the_end_settles_once_with_the_reported_usage() -> None:
    store = FakeStore()
    stage = token_stage(store)
    call = call_from("ipv4:10.0.0.1:1", caller="sub:alice")
    bound = await enter(stage, call, gen(10))
    call.first = call.last = pb.GenerateResponse(
        text="x", usage=pb.Usage(prompt_tokens=5, completion_tokens=3)
    )
    bound.exit(call)
    bound.exit(call)  # a second exit settles nothing
    assert [actual for _, _, actual in store.finishes] == [8]
    # The daily budget was charged 8, not the 16 reserved.
    budget = store.token_budget("sub:alice", TokenLimits(10_000, 100))
    assert budget.day_remaining == 92


async def test_a_cancelled_stream_is_charged_what_went_out() -> None:
    store = FakeStore()
    stage = token_stage(store)
    call = call_from("ipv4:10.0.0.1:1", caller="sub:alice")
    request = pb.StreamGenerateRequest(prompt=PROMPT, options=pb.GenerationOptions(max_tokens=50))
    bound = await enter(stage, call, request, STREAM)
    assert call.chunk_tokens is not None  # the pipeline counts what goes out
    sent = [pb.StreamGenerateResponse(delta=d, seq=i) for i, d in enumerate(["Hi", ",", " there"])]
    for chunk in sent:
        call.streamed_tokens += call.chunk_tokens(chunk)
    call.chunks, call.first, call.last = len(sent), sent[0], sent[-1]
    call.code = "CANCELLED"
    bound.exit(call)
    assert [actual for _, _, actual in store.finishes] == [PROMPT_TOKENS + 3]


async def test_a_stream_that_sent_nothing_is_charged_nothing() -> None:
    store = FakeStore()
    stage = token_stage(store)
    call = call_from("ipv4:10.0.0.1:1", caller="sub:alice")
    bound = await enter(stage, call, pb.StreamGenerateRequest(prompt=PROMPT), STREAM)
    call.code = "UNAVAILABLE"
    bound.exit(call)
    assert [actual for _, _, actual in store.finishes] == [0]
    assert store.token_budget("sub:alice", TokenLimits(10_000, 100)).day_remaining == 100


async def test_a_failed_stream_with_an_error_chunk_is_charged_its_deltas() -> None:
    call = call_from("ipv4:10.0.0.1:1")
    call.prompt_estimate, call.streamed_tokens, call.chunks = 4, 6, 7
    call.last = pb.StreamGenerateResponse(is_final=True, seq=6)  # the in-band error chunk
    assert used_tokens(call) == 10


async def test_a_generation_that_outlives_its_caller_is_charged_all_it_produced() -> None:
    """A resumable stream whose caller left goes on (server/request/resume.py): its stream slot is
    freed at once, its tokens are settled once, when the generation ends, with its usage."""
    store = FakeStore()
    stage = token_stage(store)
    call = call_from("ipv4:10.0.0.1:1", caller="sub:alice")
    bound = await enter(stage, call, pb.StreamGenerateRequest(prompt=PROMPT), STREAM)
    reservation = call.reservation
    call.streamed_tokens, call.chunks = 2, 2  # what the caller saw before it left
    end: asyncio.Future[tuple[object, int]] = asyncio.get_running_loop().create_future()
    call.generation_end = end
    bound.exit(call)
    assert [(r, n) for _, r, n in store.finishes] == [(None, 0)]  # the slot only
    usage = pb.Usage(prompt_tokens=PROMPT_TOKENS, completion_tokens=40, total_tokens=46)
    end.set_result((pb.StreamGenerateResponse(is_final=True, seq=41, usage=usage), 40))
    await asyncio.sleep(0)  # the done callback runs on the next loop turn
    assert [(r, n) for _, r, n in store.finishes] == [(None, 0), (reservation, 46)]


@pytest.mark.parametrize("replayed", ["cache", "resume", "cancel"])
async def test_a_replayed_answer_is_charged_nothing(replayed: str) -> None:
    """A cache hit or a resume generated nothing: the call that ran the generation paid."""
    call = call_from("ipv4:10.0.0.1:1")
    call.prompt_estimate, call.streamed_tokens, call.chunks = 4, 6, 7
    call.last = pb.StreamGenerateResponse(
        is_final=True, seq=6, usage=pb.Usage(prompt_tokens=4, completion_tokens=6, total_tokens=10)
    )
    assert used_tokens(call) == 10
    call.replayed = replayed
    assert used_tokens(call) == 0


async def test_a_refused_reservation_is_resource_exhausted_with_quota_and_retry() -> None:
    stage = token_stage(tokens_per_day=32)
    await enter(stage, call_from("ipv4:10.0.0.1:1", caller="sub:alice"), gen(10))  # 16
    await enter(stage, call_from("ipv4:10.0.0.1:1", caller="sub:alice"), gen(10))  # 32
    with pytest.raises(RateLimited) as refused:
        await enter(stage, call_from("ipv4:10.0.0.1:1", caller="sub:alice"), gen(10))
    err = refused.value
    assert err.metadata["quota"] == "tokens_per_day"
    assert err.quota_violations and err.quota_violations[0].subject == "sub:alice"
    assert err.retry_delay_s is not None and 0 < err.retry_delay_s <= 86_400
    # Someone else still has their own budget.
    await enter(stage, call_from("ipv4:10.0.0.1:1", caller="sub:bob"), gen(10))


async def test_a_tenants_callers_share_its_daily_budget() -> None:
    store = FakeStore()
    stage = token_stage(
        store,
        tokens_per_day=1000,
        tenant_claim="tenant",
        overrides={"tenant:acme": {"tokens_per_day": 32}},
    )
    alice = call_from("ipv4:10.0.0.1:1", caller="sub:alice")
    alice.tenant = "acme"
    await enter(stage, alice, gen(10))
    assert store.admits[0]["budget_key"] == "tenant:acme"
    bob = call_from("ipv4:10.0.0.2:1", caller="sub:bob")
    bob.tenant = "acme"
    await enter(stage, bob, gen(10))
    carol = call_from("ipv4:10.0.0.3:1", caller="sub:carol")
    carol.tenant = "acme"
    with pytest.raises(RateLimited) as refused:
        await enter(stage, carol, gen(10))
    assert refused.value.quota_violations[0].subject == "tenant:acme"
    # A caller of no tenant keeps the default budget.
    await enter(stage, call_from("ipv4:10.0.0.4:1", caller="sub:dave"), gen(10))


async def test_an_api_key_caller_gets_its_names_override() -> None:
    store = FakeStore()
    stage = token_stage(store, overrides={"apikey:ci": {"tokens_per_day": 7}})
    # Verified by auth (which sets the identity before the limits run).
    call = call_from("ipv4:10.0.0.1:1", ("x-api-key", "k-ci"), caller=f"key:{hash_api_key('k-ci')}")
    await enter(stage, call, gen(1))
    assert store.admits[0]["token_limits"] == TokenLimits(10_000, 7)
    # Unverified (auth off), the key is a label inside its address: the address's quotas.
    await enter(stage, call_from("ipv4:10.0.0.2:1", ("x-api-key", "k-ci")), gen(1))
    assert store.admits[1]["key"] == "peer:10.0.0.2"
    assert store.admits[1]["token_limits"] == TokenLimits(10_000, 100)
