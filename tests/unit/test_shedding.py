"""Fair shedding (core/shedding.py) and who a call comes from at the gate
(interceptors/overload.CallerIdentity): pure logic, no server."""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Callable

import pytest

from aiproxy.core.ratelimit import as_peer, hash_api_key, peer_host
from aiproxy.core.settings import Settings
from aiproxy.core.shedding import FULL, OVER_SHARE, FairShedder, Ticket, late_p90, lateness
from aiproxy.interceptors.overload import CallerIdentity, FirstChunkEstimate, OverloadGate

# ---- FairShedder ---------------------------------------------------------------------------


def fill(shedder: FairShedder, group: str, key: str, n: int) -> list[Ticket]:
    tickets = []
    for _ in range(n):
        t = shedder.admit(group, key)
        assert isinstance(t, Ticket)
        tickets.append(t)
    return tickets


def test_under_the_limit_everyone_is_admitted() -> None:
    shedder = FairShedder(ceiling=100, limit=10)
    fill(shedder, "peer:a", "", 10)
    assert shedder.in_flight == 10


def test_past_the_limit_the_heavy_caller_is_refused_and_the_light_one_admitted() -> None:
    shedder = FairShedder(ceiling=100, limit=10)
    fill(shedder, "peer:heavy", "", 10)
    assert shedder.admit("peer:heavy", "") == OVER_SHARE
    # The heavy caller's calls were admitted before the limit was reached and are still
    # open: the light caller is under its share while it holds less than the others do
    # on average, so it is admitted up to what the heavy caller holds, not past it.
    fill(shedder, "peer:light", "", 10)
    assert shedder.admit("peer:light", "") == OVER_SHARE
    assert shedder.admit("peer:heavy", "") == OVER_SHARE
    assert shedder.in_flight == 20  # past the limit, under the ceiling


@pytest.mark.parametrize("seed", range(20))
def test_past_the_limit_only_callers_at_or_over_the_mean_are_refused(seed: int) -> None:
    """Generated holdings: a caller under the mean of what groups hold is never refused
    over_share, and the caller holding the most (past min_share) always is."""
    rng = random.Random(seed)
    groups = rng.randint(2, 40)
    held = {f"peer:{i}": rng.choice([0, 0, 1, 2, 5, 8, 20, 60]) for i in range(groups)}
    n = sum(held.values())
    min_share = rng.choice([1, 2, 4])
    shedder = FairShedder(ceiling=10 * n + 100, min_share=min_share)
    for group, count in held.items():
        if count:
            fill(shedder, group, "", count)
    shedder.limit = max(1, n // rng.randint(2, 8))  # the limit fell with these open
    in_flight = shedder.in_flight
    if in_flight < shedder.limit:
        return  # under the limit everyone is admitted (another test)
    for group, count in held.items():
        counted = len(shedder) + (count == 0)
        mean = in_flight / counted
        ticket = shedder.admit(group, "")
        if isinstance(ticket, Ticket):
            ticket.release()
            assert count < min_share or count + 1 <= max(shedder.limit, mean) + 1e-9, (
                group,
                count,
                mean,
            )
        else:
            assert ticket == OVER_SHARE
            assert count >= min_share and count + 1 > mean, (group, count, mean)
    top = max(held, key=lambda g: held[g])
    if held[top] >= min_share and held[top] + 1 > max(shedder.limit, in_flight) / len(shedder):
        assert shedder.admit(top, "") == OVER_SHARE


def test_the_ceiling_refuses_everyone() -> None:
    shedder = FairShedder(ceiling=4, limit=4)
    fill(shedder, "peer:a", "", 4)
    assert shedder.admit("peer:b", "") == FULL


def test_minted_keys_split_their_group_share_and_never_add_to_it() -> None:
    """x-client-id or unverified credentials inside one address share that address's part."""
    shedder = FairShedder(ceiling=1000, limit=20)
    fill(shedder, "peer:other", "", 20)
    admitted = 0
    for i in range(100):  # one address minting 100 client ids, 5 calls each
        for _ in range(5):
            if isinstance(shedder.admit("peer:minter", f"client:{i}"), Ticket):
                admitted += 1
    # Its group's share is what the other group holds (20), and past it its keys split
    # the limit's share (20 / 2 = 10): about that (keys seen before the group held its
    # share got their call), nowhere near 500.
    assert admitted <= 30
    assert shedder.admit("peer:third", "") != OVER_SHARE


def test_min_share_keeps_a_light_caller_in_when_many_callers_divide_a_low_limit() -> None:
    shedder = FairShedder(ceiling=1000, limit=16, min_share=4)
    for i in range(50):
        fill(shedder, f"peer:{i}", "", 4)
    for i in range(50):
        assert shedder.admit(f"peer:{i}", "") == OVER_SHARE  # share 16 / 51 < 1
    fill(shedder, "peer:light", "", 4)
    assert shedder.admit("peer:light", "") == OVER_SHARE


def test_inside_a_heavy_group_a_light_key_still_gets_its_part() -> None:
    shedder = FairShedder(ceiling=1000, limit=20)
    fill(shedder, "peer:a", "client:heavy", 20)
    assert shedder.admit("peer:a", "client:heavy") == OVER_SHARE
    # The group's share (20) split between 2 keys: the light key gets up to 10.
    fill(shedder, "peer:a", "client:light", 10)
    assert shedder.admit("peer:a", "client:light") == OVER_SHARE


def test_a_class_that_sheds_earlier_is_held_to_its_share_sooner() -> None:
    shedder = FairShedder(ceiling=100, limit=10)
    fill(shedder, "peer:a", "", 7)
    assert shedder.admit("peer:a", "", sheds_at=0.7) == OVER_SHARE  # batch: share 7
    assert isinstance(shedder.admit("peer:a", "", sheds_at=1.0), Ticket)  # default
    fill(shedder, "peer:a", "", 2)
    assert shedder.admit("peer:a", "") == OVER_SHARE
    assert isinstance(shedder.admit("peer:a", "", sheds_at=1.1), Ticket)  # interactive


def test_release_frees_the_place_once_and_forgets_idle_callers() -> None:
    shedder = FairShedder(ceiling=10, limit=10)
    tickets = fill(shedder, "peer:a", "client:x", 3)
    for t in tickets:
        t.release()
        t.release()
    assert shedder.in_flight == 0 and len(shedder) == 0
    assert shedder.usage("peer:a", "client:x") == 0


def test_someone_elses_busier_count_is_the_one_that_counts() -> None:
    shedder = FairShedder(ceiling=10, limit=5)
    assert shedder.admit("peer:a", "", busy=10) == FULL


def test_a_waiter_is_woken_by_its_own_groups_release_only_oldest_first() -> None:
    shedder = FairShedder(ceiling=10, limit=4)
    mine = fill(shedder, "peer:a", "", 2)
    theirs = fill(shedder, "peer:b", "", 2)
    woken: list[str] = []
    first, second = (lambda: woken.append("first")), (lambda: woken.append("second"))
    shedder.wait("peer:a", first)
    shedder.wait("peer:a", second)
    assert shedder.waiters("peer:a") == 2 and shedder.waiters() == 2
    theirs[0].release()  # another group's call ending wakes nobody here
    assert woken == []
    mine[0].release()
    assert woken == ["first"] and shedder.waiters("peer:a") == 1
    shedder.unwait("peer:a", second)  # gone (timed out, cancelled): forgotten
    shedder.unwait("peer:a", second)  # twice is a no-op
    mine[1].release()
    assert woken == ["first"] and shedder.waiters() == 0


@pytest.mark.parametrize("seed", range(20))
def test_every_waiter_is_woken_once_by_its_own_group_or_forgotten(seed: int) -> None:
    """Generated interleavings of admissions, releases, waits and give-ups: a waiter is
    woken at most once, only when a call of its own group ends, and nothing is left
    behind once everyone is done."""
    rng = random.Random(seed)
    shedder = FairShedder(ceiling=1000, limit=1000)
    groups = [f"peer:10.0.0.{i}" for i in range(4)]
    held: dict[str, list[Ticket]] = {g: [] for g in groups}
    waiting: list[tuple[str, Callable[[], None]]] = []
    wakes: list[tuple[int, str, str]] = []  # (waiter, its group, the group that woke it)
    ending: list[str] = []  # the group whose call is ending now

    def release(group: str, ticket: Ticket) -> None:
        ending.append(group)
        ticket.release()
        ending.pop()

    for n in range(400):
        group = rng.choice(groups)
        action = rng.random()
        if action < 0.35:
            t = shedder.admit(group, "")
            assert isinstance(t, Ticket)
            held[group].append(t)
        elif action < 0.65 and held[group]:
            release(group, held[group].pop(rng.randrange(len(held[group]))))
        elif action < 0.85 and held[group]:

            def wake(n: int = n, group: str = group) -> None:
                wakes.append((n, group, ending[-1]))

            shedder.wait(group, wake)
            waiting.append((group, wake))
        elif waiting:
            g, gone = waiting.pop(rng.randrange(len(waiting)))
            shedder.unwait(g, gone)
    for group in groups:
        for t in held[group]:
            release(group, t)
    for g, gone in waiting:
        shedder.unwait(g, gone)
    assert shedder.waiters() == 0 and shedder.in_flight == 0 and len(shedder) == 0
    assert wakes, "the generated run woke nobody"
    assert all(mine == by for _, mine, by in wakes), wakes
    woken = [n for n, _, _ in wakes]
    assert len(woken) == len(set(woken))


# ---- CallerIdentity -------------------------------------------------------------------------

LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"),)


def test_address_is_the_peer_and_a_client_id_is_a_key_inside_it() -> None:
    ident = CallerIdentity()
    assert ident({}, "ipv4:10.0.0.1:5555") == ("peer:10.0.0.1", "", None, None)
    group, key, _, _ = ident({"x-client-id": "app"}, "ipv4:10.0.0.1:5555")
    assert (group, key) == ("peer:10.0.0.1", "client:app")


def test_the_edge_header_is_believed_only_from_the_edge_with_its_secret() -> None:
    ident = CallerIdentity(
        address_header="x-envoy-external-address", trusted_edges=LOOPBACK, edge_secret=b"s3"
    )
    forwarded = {"x-envoy-external-address": "203.0.113.7"}
    assert ident(forwarded, "ipv4:127.0.0.1:1")[0] == "peer:127.0.0.1"  # no secret
    assert ident({**forwarded, "x-aiproxy-edge": "s3"}, "ipv4:127.0.0.1:1")[0] == (
        "peer:203.0.113.7"
    )
    assert ident({**forwarded, "x-aiproxy-edge": "s3"}, "ipv4:10.1.1.1:1")[0] == "peer:10.1.1.1"


def test_a_bearer_token_is_a_key_in_its_address_until_verified_then_its_identity() -> None:
    ident = CallerIdentity(caller_classes={"sub:alice": "interactive"})
    headers = {"authorization": "Bearer abc.def.ghi"}
    group, key, cred, cls = ident(headers, "ipv4:10.0.0.1:1")
    assert group == "peer:10.0.0.1" and key.startswith("cred:") and cred and cls is None
    assert "abc" not in key  # never the credential itself
    ident.learn(cred, "sub:alice", "")
    assert ident(headers, "ipv4:10.0.0.9:1") == ("sub:alice", "", cred, "interactive")
    # Another token is another credential: unverified, inside its address.
    assert ident({"authorization": "Bearer forged"}, "ipv4:10.0.0.1:1")[0] == "peer:10.0.0.1"


def test_a_tenant_class_applies_once_the_token_is_verified() -> None:
    ident = CallerIdentity(caller_classes={"tenant:acme": "batch"})
    _, _, cred, _ = ident({"authorization": "Bearer t"}, "ipv4:10.0.0.1:1")
    assert cred is not None
    ident.learn(cred, "sub:bob", "acme")
    assert ident({"authorization": "Bearer t"}, "ipv4:10.0.0.1:1")[3] == "batch"


def test_a_configured_api_key_is_verified_by_its_hash_and_gets_its_class() -> None:
    raw = "k" * 40
    ident = CallerIdentity(
        api_keys={hash_api_key(raw): "reports"}, caller_classes={"apikey:reports": "batch"}
    )
    assert ident({"x-api-key": raw}, "ipv4:10.0.0.1:1") == (
        f"key:{hash_api_key(raw)}",
        "",
        None,
        "batch",
    )
    group, key, _, cls = ident({"x-api-key": "unknown"}, "ipv4:10.0.0.1:1")
    assert (group, cls) == ("peer:10.0.0.1", None) and key.startswith("cred:")


def test_address_ranges_get_their_class_and_a_header_never_does() -> None:
    ident = CallerIdentity(caller_classes={"cidr:10.2.0.0/16": "interactive"})
    assert ident({}, "ipv4:10.2.3.4:1")[3] == "interactive"
    assert ident({}, "ipv4:10.3.3.4:1")[3] is None
    assert (
        ident({"x-aiproxy-class": "interactive", "x-priority": "0"}, "ipv4:10.3.3.4:1")[3] is None
    )


# ---- FirstChunkEstimate ----------------------------------------------------------------------


def test_first_chunk_estimate_is_a_recent_p90_and_forgets_old_samples() -> None:
    now = [0.0]
    est = FirstChunkEstimate(size=20, horizon_s=10, min_samples=5, clock=lambda: now[0])
    for _ in range(4):
        est.sample(1.0)
    assert est.p90() == 0.0  # too few
    for s in (0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 2.0):
        est.sample(s)
    assert est.p90() == 1.0
    now[0] = 11.0
    est.sample(0.2)
    assert est.p90() == 0.0  # the old samples are past the horizon


# ---- settings ------------------------------------------------------------------------------


def test_overload_settings_refuse_unknown_classes_and_bad_keys() -> None:
    with pytest.raises(ValueError, match="no class"):
        Settings(overload={"callers": {"sub:x": "gold"}})
    with pytest.raises(ValueError, match="apikey:NAME"):
        Settings(overload={"callers": {"ip:1.2.3.4": "batch"}})
    with pytest.raises(ValueError, match="has no method"):
        Settings(overload={"methods": {"Nope": "batch"}})
    s = Settings(
        overload={
            "methods": {"BatchGenerate": "batch"},
            "callers": {"cidr:10.0.0.0/8": "interactive"},
        }
    )
    assert s.overload.policy == "fair"


def test_first_chunk_excess_is_measured_against_the_usual_not_an_absolute() -> None:
    slow_model = FirstChunkEstimate(size=20, min_samples=5, clock=lambda: 0.0)
    for _ in range(20):
        slow_model.sample(2.0)  # a model that takes 2 s to its first token
    assert slow_model.excess() == 0.0
    proxy = FirstChunkEstimate(size=20, min_samples=5, clock=lambda: 0.0)
    for _ in range(20):
        proxy.sample(0.05)
    assert proxy.excess() == 0.0 and proxy.floor == 0.05
    for _ in range(20):
        proxy.sample(1.0)  # the same streams now start 20x slower: the proxy is behind
    assert proxy.excess() > 0.25


def test_a_queue_in_distress_gets_no_exemption_past_the_limit() -> None:
    shedder = FairShedder(ceiling=100, limit=10, min_share=2)
    fill(shedder, "peer:heavy", "", 10)
    assert isinstance(shedder.admit("peer:light", ""), Ticket)  # exempt: holds nothing
    assert shedder.admit("peer:light", "", strict=True) == "queue"


# ---- Streams in flight: lateness by their own cadence ----------------------------------------


def _stream(shedder: FairShedder, at: float, gaps: list[float]) -> Ticket:
    """A stream admitted at `at` whose chunks came after `gaps` (the first: its time to
    first chunk), as the pipeline writes them on its ticket."""
    t = shedder.admit("peer:a", "")
    assert isinstance(t, Ticket)
    shedder.track(t, at)
    now = at
    for i, gap in enumerate(gaps):
        now += gap
        if i == 0:
            t.first_at = now
        t.last_at, t.chunks = now, i + 1
    return t


def test_a_steady_stream_is_never_late_however_long_or_slow() -> None:
    """Generated cadences from 1 ms to 5 s: a stream whose silence is within factor x its
    own cadence (and the grace) is on time, after 5 chunks or 5,000."""
    rng = random.Random(23)
    shedder = FairShedder(ceiling=100_000)
    for _ in range(500):
        cadence = 10 ** rng.uniform(-3, 0.7)
        chunks = rng.choice((2, 5, 50, 5000))
        gaps = [cadence * rng.uniform(0.8, 1.2) for _ in range(chunks)]
        t = _stream(shedder, 0.0, gaps)
        mean = (t.last_at - t.first_at) / (chunks - 1)
        silence = rng.uniform(0, 3.9 * mean)  # under factor 4 x its own mean gap
        assert lateness(t.last_at + silence, t, 4.0, 0.5, 0.1) == 0.0
        assert lateness(t.last_at + 0.49, t, 4.0, 0.5, 0.1) == 0.0  # the grace


def test_a_stream_silent_past_its_cadence_is_late_by_the_excess() -> None:
    rng = random.Random(7)
    shedder = FairShedder(ceiling=100_000)
    for _ in range(500):
        cadence = 10 ** rng.uniform(-3, 0)
        t = _stream(shedder, 0.0, [cadence] * rng.randint(2, 200))
        expected = max(4.0 * cadence, 0.5)
        extra = rng.uniform(0.001, 10)
        late = lateness(t.last_at + expected + extra, t, 4.0, 0.5, 0.1)
        assert abs(late - extra) < 1e-6


def test_before_its_first_chunk_a_stream_is_judged_by_the_usual_first_chunk() -> None:
    shedder = FairShedder(ceiling=10)
    t = _stream(shedder, 10.0, [])
    assert lateness(99.0, t, 4.0, 0.5, 0.0) == 0.0  # the usual is not known yet
    assert lateness(10.0 + 0.79, t, 4.0, 0.5, 0.2) == 0.0  # 4 x 0.2 s not passed
    assert abs(lateness(10.0 + 1.3, t, 4.0, 0.5, 0.2) - 0.5) < 1e-9
    # One chunk, no gap seen yet: a fast first token followed by 1 s gaps is on time; only
    # a silence past factor x grace (2 s) is late.
    one = _stream(shedder, 0.0, [0.04])
    assert lateness(0.04 + 1.0, one, 4.0, 0.5, 0.05) == 0.0
    assert lateness(0.04 + 1.99, one, 4.0, 0.5, 0.05) == 0.0
    assert abs(lateness(0.04 + 2.5, one, 4.0, 0.5, 0.05) - 0.5) < 1e-9


def test_late_p90_needs_one_stream_in_ten_not_a_stuck_few() -> None:
    rng = random.Random(1)
    for _ in range(200):
        n = rng.randint(8, 300)
        stuck = rng.randint(0, n // 10 - 1) if n >= 20 else 0
        values = [0.0] * (n - stuck) + [rng.uniform(1, 100) for _ in range(stuck)]
        rng.shuffle(values)
        assert late_p90(values) == 0.0
        many = [rng.uniform(1, 2) for _ in range(n // 5 + 1)] + [0.0] * (n - n // 5 - 1)
        assert late_p90(many) >= 1.0
    assert late_p90([5.0] * 7) == 0.0  # too few streams to judge


def test_tracked_streams_come_and_go_in_constant_time_whatever_the_order() -> None:
    rng = random.Random(3)
    shedder = FairShedder(ceiling=10_000)
    live: list[Ticket] = []
    for _ in range(3000):
        if live and rng.random() < 0.45:
            t = live.pop(rng.randrange(len(live)))
            t.release()
            t.release()
        else:
            t = shedder.admit("peer:a", "")
            assert isinstance(t, Ticket)
            shedder.track(t, 0.0)
            live.append(t)
        assert len(shedder.streams) == len(live) == shedder.in_flight
        assert all(shedder.streams[t.slot] is t for t in live)
    for t in live:
        t.release()
    assert shedder.streams == [] and shedder.in_flight == 0


def test_the_gate_samples_a_rotating_window_of_streams() -> None:
    now = [100.0]
    gate = OverloadGate(active=lambda: 0, capacity=10_000, clock=lambda: now[0])
    shedder = gate.shedder
    # 50 chunks 10 ms apart, the last 10 ms ago (healthy) or 3 s ago (stuck).
    for _ in range(300):
        _stream(shedder, now[0] - 0.51, [0.01] * 50)
    assert gate.stream_lateness() == 0.0
    stuck = [_stream(shedder, now[0] - 3.5, [0.01] * 50) for _ in range(300)]
    seen = [gate.stream_lateness() for _ in range(3)]  # 600 streams, 256 a sample
    assert max(seen) > 2.0 and gate.late_s == seen[-1]
    for t in stuck:
        t.release()
    assert gate.stream_lateness() == 0.0


def test_as_peer_gives_an_edge_address_in_grpc_peer_format() -> None:
    assert as_peer(" 10.1.2.3 ") == "ipv4:10.1.2.3:0"
    assert as_peer("2001:db8::1") == "ipv6:[2001:db8::1]:0"
    assert as_peer("not an address") is None and as_peer("10.0.0.1:80") is None
    assert peer_host(as_peer("10.1.2.3") or "") == "10.1.2.3"
