"""Who is refused when the proxy must refuse: fair shares between callers, operator classes.

Pure logic (no gRPC): the overload gate (interceptors/overload.py) asks `admit(...)` with
the caller's group, key and class before anything is decoded, and `release(ticket)` when
the call ends. Single-threaded by design (one asyncio loop); nothing here awaits or locks.

Callers are counted in two levels, so that what a caller can mint buys it nothing:
- the GROUP is who the caller verifiably is: its address (behind the edge, the client
  address Envoy puts in the trusted header), or, once the auth stage has verified its
  credential, the identity behind it ("sub:<JWT subject>", "key:<API key hash>"), which
  then counts on its own whatever address it calls from;
- the KEY is the caller within its group: an unverified credential (a keyed hash of the
  bearer token or API key) or x-client-id. Minting keys splits the group's share, never
  adds to it.

The rule, with n calls in flight, `limit` the gate's current limit and `ceiling` the hard
cap (server.max_active_calls):
- while n < limit x the class's `sheds_at`, every call is admitted;
- past it, a call is admitted if its group holds fewer than `min_share` calls (a light
  caller is never refused because many callers divide a low limit) or less than its fair
  share: the larger of limit x sheds_at / groups in flight (its own counted) and, when
  calls admitted before the limit fell are still open, what the other groups hold on
  average (x sheds_at), so a caller holding fewer than the others is admitted while the
  ones holding the most are refused; in a group
  holding its share, only a key under share(group) / keys in flight in that group is
  admitted; refusals therefore come from the callers using the most, never first from one
  far under its share;
- never at or past the ceiling, whoever asks (the reserve between limit and ceiling is
  what callers under their share are admitted into).
A call refused over its share from a group holding only a handful of calls (fewer than
2 x min_share) may wait for one of its own group's calls to end (`wait`; the gate bounds
the wait, `overload.share_wait_ms`): calls that reach the gate together (held behind a
burst in Envoy or on a shared connection) then take their group's own slots in turn. A
group holding more is refused at once: its calls are no bunch, and a heavy caller's
streams would rarely end within the wait. A group only ever waits on itself, so what one
caller holds never delays another (the gate also caps each group's waiters).
A class with `sheds_at` < 1 (batch) is shed earlier than the default, one above 1
(interactive) later: priority comes from the operator's configuration only (a caller's
own header never raises it).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

DEFAULT_CLASS: Final = "default"

# Why a call was refused (the `cause` in its ErrorInfo metadata and the metric label).
OVER_SHARE: Final = "over_share"  # past the limit, and this caller holds its share or more
FULL: Final = "full"  # the hard ceiling: nobody is admitted
DEADLINE: Final = "deadline"  # its deadline ends before a first chunk could come
QUEUE: Final = "queue"  # past the limit while its method's queue is long: no exemptions
BLIND: Final = "limit"  # the old blind gate (server.overload_policy: blind)


@dataclass(frozen=True, slots=True)
class ShedClass:
    """An operator-defined class of callers or methods. `sheds_at`: the fraction of the
    gate's limit past which its callers are held to their fair share; `rank`: its order
    (0 first), for metrics and docs."""

    name: str
    sheds_at: float
    rank: int


class Ticket:
    """One admitted call's place in the counts; `release()` frees it, once.

    A stream's ticket also carries its cadence, for the gate's sampler (`lateness`):
    when it was admitted (`at`), its first and last chunk times and its chunk count. The
    stream's own loop writes `first_at`, `last_at` and `chunks` as chunks go out (plain
    attribute stores: no lock, no allocation on the chunk path); the sampler reads them."""

    __slots__ = (
        "_shedder", "at", "chunks", "cred", "first_at", "group", "key", "last_at", "released",
        "slot",
    )  # fmt: skip

    def __init__(self, shedder: FairShedder, group: str, key: str) -> None:
        self._shedder, self.group, self.key = shedder, group, key
        self.released = False
        # The gate's id of the caller's bearer token, to learn its verified identity.
        self.cred: str | None = None
        self.at = self.first_at = self.last_at = 0.0
        self.chunks = 0
        self.slot = -1  # its index in FairShedder.streams while tracked

    def release(self) -> None:
        if not self.released:
            self.released = True
            self._shedder._release(self.group, self.key)
            if self.slot >= 0:
                self._shedder._untrack(self)


class FairShedder:
    """The counts and the rule (see the module docstring). `limit` is set by the gate's
    controller; `ceiling` is fixed."""

    def __init__(self, ceiling: int, limit: int | None = None, min_share: int = 1) -> None:
        if ceiling < 1:
            raise ValueError(f"ceiling must be at least 1, got {ceiling}")
        self.ceiling = ceiling
        self.min_share = max(1, min_share)
        self.limit = ceiling if limit is None else min(limit, ceiling)
        self.in_flight = 0
        self._groups: dict[str, int] = {}  # calls in flight per group
        self._keys: dict[str, int] = {}  # calls in flight per key (group-qualified)
        self._keys_in: dict[str, int] = {}  # keys in flight per group
        # Admitted streams in flight (tracked), in no order: add and remove are O(1)
        # (a removed ticket's place is taken by the last one), the sampler reads a window.
        self.streams: list[Ticket] = []
        # Calls over their share waiting for one of their group's own calls to end:
        # group -> wake-up callbacks, oldest first (`wait`); `waiting` counts them all.
        self._waiting: dict[str, deque[Callable[[], None]]] = {}
        self.waiting = 0

    def __len__(self) -> int:
        """Groups with a call in flight."""
        return len(self._groups)

    def usage(self, group: str, key: str = "") -> int:
        return self._keys.get(_qualified(group, key), 0)

    def held(self, group: str) -> int:
        """Calls in flight of `group` (all its keys)."""
        return self._groups.get(group, 0)

    def share(self, group: str, key: str = "", sheds_at: float = 1.0) -> tuple[float, float]:
        """The fair shares (of its group, of its key) a call of `key` in `group` would have
        if it asked now past the limit, in a class that sheds at `sheds_at`.

        The group's: its part of the limit, or what the other groups hold on average when
        that is more (calls admitted before the limit fell may still be open: a group
        holding fewer than the others is under its share whatever the limit, so refusals
        come from the callers holding the most; the others' mean, not everyone's, so a
        group's own calls never raise its share). The key's: its part of the group's part
        of the limit, so minting keys never adds to a group."""
        groups = len(self._groups) + (group not in self._groups)
        limit_share = self.limit * sheds_at / groups
        group_share = limit_share
        held = self._groups.get(group, 0)
        others = groups - 1
        if others:
            group_share = max(limit_share, (self.in_flight - held) * sheds_at / others)
        keys = self._keys_in.get(group, 0) + (_qualified(group, key) not in self._keys)
        return group_share, limit_share / keys

    def admit(
        self, group: str, key: str, sheds_at: float = 1.0, busy: int = 0, strict: bool = False
    ) -> Ticket | str:
        """A Ticket, or the cause of the refusal (OVER_SHARE, FULL, QUEUE). `busy`: calls in
        flight as someone else counts them, when that is more (the forwarder's). `strict`:
        the call's queue is in distress (CoDel's idea: calls that waited that long are
        refused until it drains), past the limit nobody is admitted."""
        n = max(self.in_flight, busy)
        if n >= self.ceiling:
            return FULL
        if n >= self.limit * sheds_at:
            if strict:
                return QUEUE
            held = self._groups.get(group, 0)
            group_share, key_share = self.share(group, key, sheds_at)
            # A group holding fewer than `min_share` calls, or less than its share, is
            # admitted: many groups dividing a low limit never refuse a light one. Inside
            # a group holding its share, its keys split that share: minting keys (client
            # ids, made-up credentials) buys nothing.
            if (
                held >= self.min_share
                and held + 1 > group_share
                and self._keys.get(_qualified(group, key), 0) + 1 > key_share
            ):
                return OVER_SHARE
        self._take(group, key)
        return Ticket(self, group, key)

    def wait(self, group: str, wake: Callable[[], None]) -> None:
        """Call `wake()` once, when one of `group`'s calls ends (oldest waiter first),
        unless `unwait` comes first. A group holding nothing is never over its share, so
        a waiting group always has a call of its own that will end."""
        waiting = self._waiting.get(group)
        if waiting is None:
            waiting = self._waiting[group] = deque()
        waiting.append(wake)
        self.waiting += 1

    def unwait(self, group: str, wake: Callable[[], None]) -> None:
        """Forget a waiter (woken, timed out or gone); a no-op when it is not waiting."""
        waiting = self._waiting.get(group)
        if waiting is None:
            return
        try:
            waiting.remove(wake)
        except ValueError:
            return
        self.waiting -= 1
        if not waiting:
            del self._waiting[group]

    def waiters(self, group: str | None = None) -> int:
        """Calls waiting on `group`'s own calls (on any group's, with None)."""
        if group is None:
            return self.waiting
        waiting = self._waiting.get(group)
        return 0 if waiting is None else len(waiting)

    def take(self, group: str, key: str) -> Ticket:
        """Count a call admitted without the rule (the blind policy still counts callers)."""
        self._take(group, key)
        return Ticket(self, group, key)

    def track(self, ticket: Ticket, now: float) -> None:
        """Follow an admitted stream's cadence until its ticket is released."""
        if ticket.slot < 0 and not ticket.released:
            ticket.at = now
            ticket.slot = len(self.streams)
            self.streams.append(ticket)

    def _untrack(self, ticket: Ticket) -> None:
        streams, slot = self.streams, ticket.slot
        moved = streams.pop()
        if moved is not ticket:
            streams[slot] = moved
            moved.slot = slot
        ticket.slot = -1

    def _take(self, group: str, key: str) -> None:
        self.in_flight += 1
        groups = self._groups
        groups[group] = groups.get(group, 0) + 1
        qualified = _qualified(group, key)
        keys = self._keys
        count = keys.get(qualified, 0)
        if not count:
            self._keys_in[group] = self._keys_in.get(group, 0) + 1
        keys[qualified] = count + 1

    def _release(self, group: str, key: str) -> None:
        self.in_flight -= 1
        qualified = _qualified(group, key)
        count = self._keys[qualified] - 1
        if count:
            self._keys[qualified] = count
        else:
            del self._keys[qualified]
            left = self._keys_in[group] - 1
            if left:
                self._keys_in[group] = left
            else:
                del self._keys_in[group]
        count = self._groups[group] - 1
        if count:
            self._groups[group] = count
        else:
            del self._groups[group]
        if self._waiting:
            waiting = self._waiting.get(group)
            if waiting:
                wake = waiting.popleft()
                self.waiting -= 1
                if not waiting:
                    del self._waiting[group]
                wake()


def _qualified(group: str, key: str) -> str:
    return f"{group}\x00{key}" if key else group


def lateness(
    now: float,
    ticket: Ticket,
    factor: float,
    grace_s: float,
    usual_first_s: float,
) -> float:
    """Seconds a stream in flight is late by its own cadence (0: on time).

    A stream is judged against itself, so a long, healthy stream is never late however
    long it lasts, and a slow model's steady cadence is not distress: its silence since its
    last chunk is late past `factor` x its mean gap so far, and never before `grace_s`
    (after one chunk, with no gap seen yet, past `factor` x `grace_s`). A stream still waiting for its first
    chunk is late past `factor` x the usual time to first chunk (`usual_first_s`, the
    gate's slow floor of the median; 0: not known yet, no judgement), also never before
    `grace_s`."""
    chunks = ticket.chunks
    if chunks == 0:
        if usual_first_s <= 0.0:
            return 0.0
        late = now - ticket.at - max(factor * usual_first_s, grace_s)
    elif chunks == 1:
        # No gap seen yet, and its time to first chunk says nothing about its gaps (a
        # model sends its first token at once and the next a second later): only a long
        # silence counts, `factor` x the grace.
        late = now - ticket.last_at - factor * grace_s
    else:
        last_at = ticket.last_at
        cadence = (last_at - ticket.first_at) / (chunks - 1)  # its mean gap so far
        late = now - last_at - max(factor * cadence, grace_s)
    return late if late > 0.0 else 0.0


def late_p90(latenesses: list[float], min_samples: int = 8) -> float:
    """The 90th percentile of streams' lateness (0 with fewer than `min_samples`
    streams): a stuck stream or a few do not move the limit, one stream in ten late does."""
    n = len(latenesses)
    if n < min_samples:
        return 0.0
    return sorted(latenesses)[int(0.9 * (n - 1))]
