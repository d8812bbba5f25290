"""Settings: embedded defaults, then a YAML file, then AIPROXY_* environment, then flags.

pydantic-settings does the merging and gives error messages that name the bad key; the
defaults alone run the demo. Every key is documented once, in its `Field(description=...)`:
docs/configuration.md and config.example.yaml are generated from them. Nested keys map to environment variables with `__`, e.g.
`upstream.endpoints` <- AIPROXY_UPSTREAM__ENDPOINTS='["10.0.0.1:50052"]'.
"""

from __future__ import annotations

import contextvars
import ipaddress
import pathlib
from typing import Any, Final, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from aiproxy.core.contract import MAX_ID_CHARS, MAX_STEPS, MAX_STOP_SEQUENCES, MAX_TOOLS
from aiproxy.core.service import SERVICE_NAME, agent_service

ENV_PREFIX = "AIPROXY_"


def parse_hostport(value: str) -> tuple[str, int]:
    """Split 'HOST:PORT' ('[::1]:PORT' for IPv6); the port may be 0 (pick a free one)."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]"), int(port)


def _check_address(value: str) -> str:
    parse_hostport(value)
    return value


class _Section(BaseModel):
    # Unknown keys are typos: refuse them instead of silently running on defaults.
    model_config = ConfigDict(extra="forbid")


class ServerSettings(_Section):
    """The proxy's gRPC listener, its shutdown and the transport bounds on callers."""

    listen: str = Field(
        default="127.0.0.1:50051",
        description="HOST:PORT of the gRPC listener (containers: 0.0.0.0:50051); port 0 "
        "picks a free one, reported in the ready line.",
    )
    grace_period_s: float = Field(
        default=30.0,
        ge=0,
        description="SIGTERM: report NOT_SERVING, wait `drain_delay_s` for balancers to notice, "
        "stop accepting, let calls in flight finish for this long, then cancel what is left.",
    )
    drain_delay_s: float = Field(
        default=0.0,
        ge=0,
        description="After NOT_SERVING and before the listener stops, so balancers notice.",
    )
    max_pending_requests: int = Field(
        default=20_000,
        ge=1,
        description="grpc.aio's queue of new calls: it cancels bursts past it (grpc's default "
        "is 1000). Admission is the limiters' job, so this is set far above any real burst.",
    )
    max_active_calls: int = Field(
        default=2000,
        ge=0,
        description="Calls being forwarded past which new API calls are refused at once, before "
        "any other work (RESOURCE_EXHAUSTED, OVERLOADED, RetryInfo; "
        "interceptors/overload.py). 0 = no gate (`limits.max_concurrent_calls` still applies "
        "further in). The smallest of three bounds measured on the 2-core bench box "
        "(docs/overload.md): streams held with none lost (10,000 slow ones), chunks a "
        "process can forward (~3,300/s a core: 2,000 streams at a chunk every 0.6 s), and "
        "streams started per second within the first-chunk target (50-100/s) times a long "
        "answer's 20-40 s. Re-derive it on other hardware with `python -m bench.run --only "
        "streams,burst`.",
    )
    overload_wait_target_ms: float = Field(
        default=250.0,
        ge=0,
        description="While new calls wait longer than this to be taken (measured by a probe to "
        "the proxy's own listener, server/pool/backlog.py), the gate's limit drops until the "
        "queue drains, never below `overload_min_active_calls`. 0 = fixed limit only; also "
        "off with TLS.",
    )
    overload_min_active_calls: int = Field(
        default=16, ge=1, description="The lowest the overload gate's limit drops to."
    )
    max_concurrent_streams_per_connection: int = Field(
        default=10_000, ge=1, description="HTTP/2 streams (calls) open at once on one connection."
    )
    max_receive_message_bytes: int = Field(
        default=4 * 1024 * 1024,
        ge=1024,
        description="Larger requests are refused by grpc itself (RESOURCE_EXHAUSTED).",
    )
    max_send_message_bytes: int = Field(
        default=16 * 1024 * 1024, ge=1024, description="The largest message sent to a caller."
    )
    max_metadata_bytes: int = Field(
        default=16 * 1024,
        ge=1024,
        description="Request metadata (headers) larger than this is refused by grpc itself "
        "(RESOURCE_EXHAUSTED; soft and hard limit alike, so the answer is deterministic). "
        "Envoy allows 60 KiB; JWTs are ~1 KiB.",
    )
    max_connection_idle_s: float = Field(
        default=300.0,
        ge=0,
        description="A connection with no call for this long is closed with GOAWAY (0 = never).",
    )
    max_connection_age_s: float = Field(
        default=0.0,
        ge=0,
        description="Connections are recycled after this long (0 = never), so new replicas of "
        "the proxy behind an L4 balancer get traffic.",
    )
    max_connection_age_grace_s: float = Field(
        default=330.0,
        ge=0,
        description="Calls in flight on a recycled connection get this long to finish.",
    )
    workers: int = Field(
        default=1,
        ge=1,
        le=64,
        description="Processes serving the one port (SO_REUSEPORT; the kernel spreads "
        "connections), so a machine's cores are all used: `aiproxy serve --workers N`. "
        "1: this process alone.",
    )
    extra_interceptors: list[str] = Field(
        default_factory=list,
        description="The deployment's own grpc.aio.ServerInterceptors, `module:attribute` (a "
        "class or a factory called with no arguments, an instance, or a list): outermost, "
        "after tracing, in this order (server/chain.py; docs/interceptors.md). Empty: the "
        "server runs no interceptor for them at all.",
    )

    _v_listen = field_validator("listen")(classmethod(lambda cls, v: _check_address(v)))
    _v_extra = field_validator("extra_interceptors")(
        classmethod(lambda cls, v: [_check_import_path(p) for p in v])
    )


def _check_import_path(value: str) -> str:
    module, sep, attribute = value.partition(":")
    if (
        not sep
        or not module
        or not attribute
        or not all(part.isidentifier() for part in (*module.split("."), *attribute.split(".")))
    ):
        raise ValueError(
            f"expected module:attribute (e.g. mypkg.grpc:AuditInterceptor), got {value!r}"
        )
    return value


class AffinitySettings(_Section):
    """Routing that follows the conversation (server/pool/balancer.py). A call with a key
    (its `session_id`, or the caller's `x-aiproxy-affinity` header), scoped by the
    caller's verified identity, goes to the key's first choice among the usable endpoints
    by rendezvous hashing: the same key, the same replica, from every proxy process that
    sees the same endpoints. Calls without a key: P2C."""

    enabled: bool = Field(
        default=True,
        description="Route a session's calls (and calls naming x-aiproxy-affinity) to one "
        "replica; false: every call by P2C.",
    )
    load_factor: float = Field(
        default=1.25,
        ge=1.0,
        le=10.0,
        description="Bounded load: an endpoint with more calls in flight than this x the "
        "mean over the usable endpoints (counting the new call) takes no more keyed calls; "
        "they spill to the key's next choice.",
    )
    min_spill_in_flight: int = Field(
        default=8,
        ge=1,
        description="An endpoint with fewer calls in flight than this never spills: at a "
        "handful of calls, evening the load out is not worth a conversation's cached prefix.",
    )


class ShedClassSettings(_Section):
    """A class of callers or methods for the overload gate (core/shedding.py)."""

    name: str = Field(
        min_length=1,
        max_length=32,
        pattern=r"^[a-z][a-z0-9_-]*$",
        description="The class's name, as `overload.callers` and `overload.methods` use it.",
    )
    sheds_at: float = Field(
        gt=0,
        le=2,
        description="Past this fraction of the gate's limit, the class's callers are held to "
        "their fair share: below 1 it is shed earlier than the default (batch), above 1 later "
        "(interactive).",
    )


def _default_shed_classes() -> list[ShedClassSettings]:
    return [
        ShedClassSettings(name="interactive", sheds_at=1.1),
        ShedClassSettings(name="default", sheds_at=1.0),
        ShedClassSettings(name="batch", sheds_at=0.7),
    ]


class OverloadSettings(_Section):
    """Who the overload gate refuses when it must (interceptors/overload.py, core/shedding.py;
    docs/overload.md). The gate's size is server.max_active_calls and its adaptive limit
    server.overload_wait_target_ms; this section says whom it refuses."""

    policy: Literal["fair", "blind"] = Field(
        default="fair",
        description="fair: past the limit, refuse only callers holding their fair share or "
        "more (per verified identity, else per address; inside an address per credential or "
        "client id). blind: the old gate, every new call past the limit refused (to compare).",
    )
    reserve: float = Field(
        default=0.1,
        ge=0,
        lt=1,
        description="The part of `server.max_active_calls` the adaptive limit never uses: room "
        "for callers under their share and for classes that shed later, before the ceiling.",
    )
    min_share: int = Field(
        default=4,
        ge=1,
        description="Past the limit, a caller holding fewer calls than this is admitted "
        "whatever its share (up to `server.max_active_calls`): many callers dividing a low "
        "limit never refuse a light one, even when its calls reach the gate together (held "
        "behind a burst in Envoy or on a shared connection). A method whose queue is in "
        "distress (`distress_wait_ms`) gives no such exemption.",
    )
    share_wait_ms: float = Field(
        default=1000.0,
        ge=0,
        description="Past the limit, a call over its caller's share, from a caller holding "
        "fewer than 2 x `min_share` calls, waits up to this long "
        "(and half of what is left of its deadline) for one of that caller's own calls to "
        "end, then is "
        "admitted if it is under its share by then, else refused (`over_share`). Calls "
        "that reach the gate together (held behind a burst in Envoy or on a shared "
        "connection) take their caller's own slots in turn instead of being refused; a "
        "caller only ever waits on itself; at most 4 x `min_share` calls of one caller and "
        "server.max_active_calls in all wait at once. 0 = refuse at once.",
    )
    distress_wait_ms: float = Field(
        default=1000.0,
        ge=0,
        description="While a method's new calls wait longer than this to be taken, its calls "
        "past the limit are refused whoever sends them (cause `queue`, CoDel's idea): they "
        "already waited, and grpc-core cancels what it holds for 30 s. Other methods keep "
        "fair shedding. 0 = never.",
    )
    gap_factor: float = Field(
        default=4.0,
        gt=0,
        description="A stream in flight is late once it has sent nothing for this many times "
        "its own mean gap between chunks so far (its time to first chunk after one chunk; "
        "before its first chunk, this many times the usual time to first chunk). When one "
        "stream in ten is late by more than server.overload_wait_target_ms, the gate's "
        "limit drops as it does for a long queue: a steady slow stream is never late.",
    )
    gap_grace_ms: float = Field(
        default=500.0,
        ge=0,
        description="No silence shorter than this makes a stream late, whatever its cadence.",
    )
    classes: list[ShedClassSettings] = Field(
        default_factory=_default_shed_classes,
        min_length=1,
        description="Classes, most important first; one must be `default`. Health, "
        "reflection and admin never meet the gate.",
    )
    callers: dict[str, str] = Field(
        default_factory=dict,
        description="Operator-marked callers -> class: `apikey:<auth.api_keys name>`, "
        "`sub:<JWT subject>`, `tenant:<limits.tenant_claim value>`, `cidr:<network>`. A JWT "
        "caller's class applies once the proxy has verified its token (its first call).",
    )
    methods: dict[str, str] = Field(
        default_factory=dict,
        description="Methods (`BatchGenerate` or the full path) -> class; a marked caller's "
        "class wins.",
    )
    refuse_doomed_streams: bool = Field(
        default=True,
        description="A stream whose deadline ends before streams lately took to their first "
        "chunk (p90) is refused at the door (cause `deadline`) instead of admitted to time out.",
    )

    @model_validator(mode="after")
    def _v_classes(self) -> OverloadSettings:
        names = [c.name for c in self.classes]
        if len(set(names)) != len(names):
            raise ValueError("overload.classes names must be unique")
        if "default" not in names:
            raise ValueError("overload.classes must have a class named 'default'")
        for where, mapping in (("callers", self.callers), ("methods", self.methods)):
            for key, cls in mapping.items():
                if cls not in names:
                    raise ValueError(f"overload.{where}[{key!r}]: no class {cls!r} ({names})")
        for key in self.callers:
            kind, sep, value = key.partition(":")
            if not sep or not value or kind not in ("apikey", "sub", "tenant", "cidr"):
                raise ValueError(
                    f"overload.callers key {key!r}: apikey:NAME, sub:SUBJECT, tenant:VALUE or cidr:NET"
                )
            if kind == "cidr":
                try:
                    ipaddress.ip_network(value, strict=False)
                except ValueError as err:
                    raise ValueError(f"overload.callers key {key!r}: {err}") from None
        known = agent_service().by_name
        for method in self.methods:
            if not method.startswith("/") and method not in known:
                raise ValueError(f"overload.methods: {SERVICE_NAME} has no method {method!r}")
        return self


class UpstreamSettings(_Section):
    """The agent replicas the proxy forwards to."""

    endpoints: list[str] = Field(
        default_factory=lambda: ["127.0.0.1:50052"],
        min_length=1,
        description="HOST:PORT of each agent replica: IPs, or DNS names re-resolved every "
        "`dns_refresh_s` (one endpoint per address in the answer); or "
        "`consul://HOST:PORT/SERVICE[?tag=T&dc=D]` (Consul's healthy instances, followed with "
        "blocking queries; the ACL token from $CONSUL_HTTP_TOKEN only); or "
        "`srv://_SERVICE._PROTO.NAME[?nameserver=HOST:PORT]` (DNS SRV, re-resolved like "
        "names). docs/discovery.md.",
    )
    startup_wait_s: float = Field(
        default=5.0,
        ge=0,
        description="Start-up waits this long for a usable endpoint before it reports ready.",
    )
    dns_refresh_s: float = Field(
        default=5.0,
        gt=0,
        description="Names (not IP literals) are re-resolved this often; the pool follows the "
        "answer.",
    )
    consul_wait_s: float = Field(
        default=300.0,
        gt=0,
        le=600,
        description="The `wait` of Consul's blocking queries (Consul caps it at 10 minutes): how "
        "long Consul may hold a query when nothing changes; changes come back at once.",
    )
    channels_per_endpoint: int = Field(
        default=2,
        ge=1,
        le=64,
        description="HTTP/2 connections per endpoint, so HTTP/2 stream limits never queue "
        "thousands of concurrent streams behind one connection; calls take them in turn.",
    )
    health_service: str = Field(
        default=SERVICE_NAME,
        description='grpc.health.v1 service name watched on each endpoint ("" = the server '
        "as a whole).",
    )
    health_check_interval_s: float = Field(
        default=2.0,
        gt=0,
        description="Polling interval, used only when an endpoint does not implement Health/Watch.",
    )
    keepalive_time_s: float = Field(
        default=10.0,
        gt=0,
        description="A hung (SIGSTOPped) or silently dead endpoint is taken out (new calls "
        "avoided, its calls in flight failed with UNAVAILABLE) within keepalive_time_s + "
        "keepalive_timeout_s: HTTP/2 keepalive pings with that ack timeout, and a health "
        "Check with that deadline every keepalive_time_s on a separate connection "
        "(server/pool/health.py).",
    )
    keepalive_timeout_s: float = Field(
        default=5.0,
        gt=0,
        description="The ack timeout of the keepalive ping and the deadline of the liveness "
        "Check (see `keepalive_time_s`).",
    )
    reconnect_backoff_max_s: float = Field(
        default=2.0, gt=0, description="The longest wait between reconnection attempts."
    )
    drop_metadata: list[str] = Field(
        default_factory=lambda: ["authorization", "cookie", "x-api-key"],
        description="Metadata never forwarded upstream (credentials the agent has no business "
        "seeing), besides every header whose name carries a credential word "
        "(core/headers.is_credential). The proxy's own headers (core/headers.py) are never "
        "forwarded either.",
    )
    affinity: AffinitySettings = Field(
        default_factory=AffinitySettings,
        description="Which replica takes a session's calls (and calls naming x-aiproxy-affinity).",
    )
    reply_metadata: list[str] = Field(
        default_factory=lambda: ["x-agent-replica"],
        description="Response metadata of the upstream passed on to the caller with the "
        "proxy's reply metadata (response headers; a native gRPC unary answer's trailers, "
        "docs/protection.md), from the agent's initial metadata and a unary call's "
        "trailing metadata: by default the name of the replica that answered. [] relays "
        "nothing.",
    )
    extra_interceptors: list[str] = Field(
        default_factory=list,
        description="The deployment's own grpc.aio.ClientInterceptors on every endpoint's "
        "channels, `module:attribute` like `server.extra_interceptors`: innermost, once per "
        "attempt (server/chain.py; docs/interceptors.md).",
    )

    _v_extra = field_validator("extra_interceptors")(
        classmethod(lambda cls, v: [_check_import_path(p) for p in v])
    )

    @field_validator("endpoints")
    @classmethod
    def _v_endpoints(cls, value: list[str]) -> list[str]:
        # consul://... and srv://... are checked by server/pool/consul.py and srv.py at
        # start-up (core/ does not know the discovery sources' grammar).
        return [v if v.startswith(("consul://", "srv://")) else _check_address(v) for v in value]


class ResumeSettings(_Section):
    """Resumable streams (server/request/resume.py; docs/streaming.md). A resumable stream
    gets an id (x-aiproxy-stream-id), its chunks are kept in the stream buffer, and a
    caller that lost its connection resumes it (x-aiproxy-resume + last-event-id) instead
    of paying for the generation again."""

    backend: Literal["memory", "redis"] | None = Field(
        default=None,
        description="Where chunks are kept: memory (this process: resume on the same replica "
        "only) or redis (`redis.url`, shared by every replica). null: the same as "
        "`limits.backend`.",
    )
    default: bool = Field(
        default=False,
        description="Every stream is resumable without the caller asking "
        "(`x-aiproxy-resumable: 1`); the caller's `x-aiproxy-resumable: 0` still opts out.",
    )
    methods: list[str] = Field(
        default_factory=list,
        description='Or only these methods are resumable by default ("StreamGenerate" or the '
        "full path), e.g. [StreamGenerate].",
    )
    grace_s: float = Field(
        default=5.0,
        ge=0,
        le=600,
        description="How long the upstream generation continues after its caller dropped, "
        "waiting for a resume (longer while someone reads it); then it is cancelled (the "
        "cancellation reaches the agent, only later).",
    )
    max_bytes: int = Field(
        default=1 << 20,
        ge=1024,
        le=64 << 20,
        description="Chunk payload bytes kept per stream: the oldest chunks are dropped past "
        "it (a resume from before them is STREAM_EXPIRED).",
    )
    ttl_s: float = Field(
        default=300.0,
        gt=0,
        le=86_400,
        description="A stream is kept this long after its last write (then a resume is "
        "STREAM_NOT_FOUND).",
    )
    owner_lease_s: float = Field(
        default=3.0,
        ge=1.0,
        le=60,
        description="The owner replica's lease on each stream it generates, renewed every "
        "0.25 s apart from the chunks (a slow generation keeps it). A resumer of a stream "
        "whose lease lapsed before its final chunk (the replica died) gets the stored chunks, "
        "then UNAVAILABLE STREAM_ORIGIN_LOST, within about owner_lease_s + 1 s of the death.",
    )
    max_streams: int = Field(
        default=10_000, ge=1, description="memory backend: streams held per process."
    )
    max_streams_per_caller: int = Field(
        default=256,
        ge=1,
        description="memory backend: streams held per caller; past it the caller loses its "
        "own oldest stream, never another's.",
    )
    max_detached_per_caller: int = Field(
        default=8,
        ge=0,
        description="Generations kept running after their caller dropped (in their grace), per "
        "caller: past it the oldest is stopped at once. Without it a caller could open "
        "streams, drop them, and keep any number of generations running (its open-stream "
        "limit counts connected streams only).",
    )
    max_detached: int = Field(
        default=1000,
        ge=0,
        description="The same bound per process: past it the oldest detached generation is "
        "stopped at once.",
    )
    key_prefix: str = Field(
        default="aiproxy:streams:",
        min_length=1,
        max_length=128,
        description="Every Redis key of the stream buffer starts with this.",
    )


class StreamSettings(_Section):
    """How server streams are pumped from the upstream to the caller (docs/streaming.md)."""

    resume: ResumeSettings = Field(default_factory=ResumeSettings, description="Resumable streams.")
    buffer_chunks: int = Field(
        default=100,
        ge=1,
        description="Chunks read ahead of a slow caller; past it the upstream read waits "
        "(backpressure).",
    )
    heartbeat_interval_s: float = Field(
        default=15.0,
        gt=0,
        description="A heartbeat chunk after this long without one, so idle connections stay open.",
    )
    idle_timeout_s: float = Field(
        default=60.0,
        gt=0,
        description="An upstream that sends nothing for this long ends the stream with "
        "DEADLINE_EXCEEDED.",
    )
    coalesce: bool = Field(
        default=True,
        description="Merge chunks that queued up behind a slow caller into one (never delays "
        "a chunk).",
    )
    coalesce_window_ms: float = Field(
        default=0.0,
        ge=0,
        le=1000,
        description="Opt-in: at most one push per this many ms after the first chunk (the "
        "first chunk is never held back); deltas arriving meanwhile go out merged. Fewer, "
        "larger messages are what a Python proxy's CPU is spent on (docs/performance.md). "
        "0 = off. Off here for native gRPC callers; the edge sends 50 for HTTP/JSON (SSE) "
        "callers (`aiproxy envoy --sse-coalesce-ms`, docs/streaming.md).",
    )
    coalesce_window_ms_per_method: dict[str, float] = Field(
        default_factory=dict,
        description='The window per method (bare method name, e.g. {"StreamGenerate": 50}), '
        "overriding `coalesce_window_ms`. A caller chooses its own with the "
        "`x-aiproxy-coalesce-ms` request header (0 = off, at most 1000).",
    )

    @model_validator(mode="after")
    def _v_windows(self) -> StreamSettings:
        unknown = set(self.coalesce_window_ms_per_method) - _method_names()
        if unknown:
            raise ValueError(
                f"coalesce_window_ms_per_method names unknown methods {sorted(unknown)}"
            )
        bad = {k: v for k, v in self.coalesce_window_ms_per_method.items() if not 0 <= v <= 1000}
        if bad:
            raise ValueError(f"coalesce windows must be within 0..1000 ms: {bad}")
        return self


class DeadlineOverride(_Section):
    """One method's deadlines (`deadlines.per_method`), in seconds."""

    default_s: float = Field(gt=0, description="The deadline when the caller sets none.")
    max_s: float = Field(gt=0, description="The most a caller's deadline may be.")

    @model_validator(mode="after")
    def _v_order(self) -> DeadlineOverride:
        if self.default_s > self.max_s:
            raise ValueError(f"default_s ({self.default_s}) must not exceed max_s ({self.max_s})")
        return self


def _method_names() -> set[str]:
    return set(agent_service().by_name)


class DeadlineSettings(_Section):
    """Per-kind default and maximum deadlines, in seconds: 30 s for a unary call, 2 min
    for a stream, 5 min for an agent run (see interceptors/deadline.py). The effective
    deadline is the tighter of the caller's and the maximum, the default when the caller
    sets none."""

    unary_default_s: float = Field(
        default=30.0, gt=0, description="Unary calls, when the caller sets no deadline."
    )
    unary_max_s: float = Field(
        default=30.0, gt=0, description="Unary calls: the most a caller's deadline may be."
    )
    stream_default_s: float = Field(
        default=120.0, gt=0, description="Server streams, when the caller sets no deadline."
    )
    stream_max_s: float = Field(
        default=120.0, gt=0, description="Server streams: the most a caller's deadline may be."
    )
    agent_default_s: float = Field(
        default=300.0,
        gt=0,
        description="ExecuteAgent and StreamExecuteAgent, when the caller sets no deadline.",
    )
    agent_max_s: float = Field(
        default=300.0,
        gt=0,
        description="ExecuteAgent and StreamExecuteAgent: the most a caller's deadline may be.",
    )
    per_method: dict[str, DeadlineOverride] = Field(
        default_factory=dict,
        description='By bare method name, e.g. {"BatchGenerate": {"default_s": 60, "max_s": 90}}.',
    )
    end_margin_ratio: float = Field(
        default=0.05,
        ge=0,
        le=0.5,
        description="When the caller's own deadline is the binding one, the proxy ends the call "
        "this share of the caller's remaining time early (clamped to [`end_margin_min_s`, "
        "`end_margin_max_s`] and to half of it), so the caller gets DEADLINE_EXCEEDED with "
        "ErrorInfo, and a stream its final in-band error chunk, instead of its deadline "
        "cutting the call off silently.",
    )
    end_margin_min_s: float = Field(
        default=0.02, ge=0, description="The smallest end margin (see `end_margin_ratio`)."
    )
    end_margin_max_s: float = Field(
        default=1.0, ge=0, description="The largest end margin (see `end_margin_ratio`)."
    )

    @model_validator(mode="after")
    def _v_order(self) -> DeadlineSettings:
        for kind in ("unary", "stream", "agent"):
            default, maximum = getattr(self, f"{kind}_default_s"), getattr(self, f"{kind}_max_s")
            if default > maximum:
                raise ValueError(
                    f"{kind}_default_s ({default}) must not exceed {kind}_max_s ({maximum})"
                )
        unknown = set(self.per_method) - _method_names()
        if unknown:
            raise ValueError(f"per_method names unknown methods {sorted(unknown)}")
        return self


class BreakerSettings(_Section):
    """One circuit breaker per upstream endpoint (client side). It opens only on a failure
    many callers share (core/breaker.py says why each rule is there)."""

    enabled: bool = Field(default=True, description="Breakers on or off.")
    failure_ratio: float = Field(
        default=0.5, gt=0, le=1, description="It opens when this share of calls failed ..."
    )
    window_s: float = Field(default=10.0, gt=0, description="... over this rolling window ...")
    min_volume: int = Field(
        default=20, ge=1, description="... once the window holds this many calls ..."
    )
    min_failing_callers: int = Field(
        default=3,
        ge=1,
        le=64,
        description="... and the failures came from this many distinct callers (one caller "
        "never opens it).",
    )
    failure_codes: list[str] = Field(
        default_factory=lambda: ["UNAVAILABLE"],
        min_length=1,
        description="gRPC code names that count as the endpoint's failure; INTERNAL/UNKNOWN are "
        "the request's, DEADLINE_EXCEEDED the caller's deadline: not counted by default.",
    )
    reset_timeout_s: float = Field(
        default=30.0, gt=0, description="Open -> half-open after this long."
    )
    half_open_max_probes: int = Field(
        default=1, ge=1, description="Calls let through while half-open."
    )
    success_threshold: int = Field(
        default=1, ge=1, description="Probe successes that close it again."
    )

    @field_validator("failure_codes")
    @classmethod
    def _v_codes(cls, value: list[str]) -> list[str]:
        return _code_names(value)


class RetrySettings(_Section):
    """Retries of upstream calls: unary calls, and streams before their first chunk, on
    another endpoint, within the caller's deadline (core/retry.py)."""

    max_attempts: int = Field(default=3, ge=1, description="Attempts, the first call included.")
    initial_backoff_s: float = Field(
        default=0.05,
        ge=0,
        description="Full jitter: before attempt n+1 sleep uniform(0, min(max_backoff_s, "
        "initial_backoff_s * multiplier^n)).",
    )
    max_backoff_s: float = Field(default=1.0, ge=0, description="The backoff's cap.")
    multiplier: float = Field(default=2.0, ge=1, description="The backoff's growth per attempt.")
    retryable_codes: list[str] = Field(
        default_factory=lambda: ["UNAVAILABLE"],
        description="gRPC code names worth another attempt on another endpoint.",
    )

    @field_validator("retryable_codes")
    @classmethod
    def _v_codes(cls, value: list[str]) -> list[str]:
        return _code_names(value)


def _code_names(value: list[str]) -> list[str]:
    import grpc

    names = {code.name for code in grpc.StatusCode}
    bad = [v for v in value if v.upper() not in names or v.upper() == "OK"]
    if bad:
        raise ValueError(f"not gRPC error code names: {bad}")
    return [v.upper() for v in value]


# The kinds of key a limits override may name (interceptors/limits.py derives the first
# four from the call; the last two group callers): "sub:<jwt sub>", "key:<api key hash>",
# "client:<x-client-id>", "peer:<ip>", "apikey:<auth.api_keys name>", "tenant:<claim value>".
OVERRIDE_KINDS = ("sub", "key", "client", "peer", "apikey", "tenant")


def _off_if_zero(value: int | None) -> int | None:
    return None if value == 0 else value


class RateLimitOverride(_Section):
    """A caller's (or a group's: `apikey:NAME`, `tenant:VALUE`) own limits, replacing the
    defaults. A key left out is inherited from the defaults (filled in when loaded)."""

    rate_per_s: float | None = Field(default=None, gt=0, description="Sustained calls per second.")
    burst: int | None = Field(default=None, ge=1, description="Bucket size.")
    max_streams: int | None = Field(default=None, ge=1, description="Open streams at once.")
    tokens_per_minute: int | None = Field(
        default=None, ge=0, description="LLM tokens per minute; 0: not enforced for this key."
    )
    tokens_per_day: int | None = Field(
        default=None, ge=0, description="LLM tokens per UTC day; 0: not enforced for this key."
    )


class LimitSettings(_Section):
    """Admission control on calls into the proxy (server side; docs/limits.md).

    Callers are keyed by who they are: authenticated subject or API key (hashed), else
    peer address ("sub:alice", "key:<sha256/128>", "peer:10.0.0.7"). An id the caller
    declares (x-client-id; x-api-key while auth is off) only gets a sub-bucket inside
    that key's ("client:web-42@peer:10.0.0.7"): it splits the budget, never multiplies it
    (interceptors/limits.py). Overrides are keyed "sub:", "key:", "peer:", "client:<id>"
    (a declared id's share: it can only narrow), "apikey:<name>", "tenant:<value>".
    """

    enabled: bool = Field(default=True, description="Limits on or off.")
    backend: Literal["memory", "redis"] = Field(
        default="memory",
        description="Where limit state lives. memory: in each process (nothing to run; limits "
        "multiply by workers and replicas). redis: one Redis (`redis.url`) shared by every "
        "worker and replica, so N processes admit what one would.",
    )
    failure_policy: Literal["fail_open", "fail_closed"] = Field(
        default="fail_open",
        description="With redis, when Redis does not answer within `redis.timeout_ms`: "
        "fail_open limits each process from its own memory at limit / "
        "`expected_processes`; fail_closed refuses the call (UNAVAILABLE, reason "
        "LIMITS_UNAVAILABLE, RetryInfo). Recovery is automatic.",
    )
    expected_processes: int = Field(
        default=1,
        ge=1,
        le=4096,
        description="How many proxy processes share the limits (workers x replicas): under "
        "fail_open each one allows limit/N (rounded up), so the fleet stays near the limit "
        "while Redis is away.",
    )
    rate_per_s: float = Field(
        default=100.0, gt=0, description="Token bucket per caller: sustained calls per second."
    )
    burst: int = Field(default=100, ge=1, description="Token bucket per caller: its size.")
    max_streams_per_caller: int = Field(
        default=100,
        ge=1,
        description="Open streams per caller: long generations are what really load an LLM.",
    )
    max_concurrent_calls: int = Field(
        default=10_000,
        ge=1,
        description="Every call in flight through this proxy process; past it "
        "RESOURCE_EXHAUSTED (OVERLOADED) at once instead of a queue that grows.",
    )
    max_tracked_callers: int = Field(
        default=100_000,
        ge=1,
        description="Buckets kept at most (least recently used dropped first): memory stays "
        "bounded.",
    )
    tokens_per_minute: int | None = Field(
        default=None,
        ge=0,
        description="LLM tokens per caller, a bucket refilled over a minute (reserved at "
        "admission from max_tokens or an estimate, settled with the usage the agent "
        "reports). null or 0: not enforced.",
    )
    tokens_per_day: int | None = Field(
        default=None,
        ge=0,
        description="LLM tokens per UTC day, per caller or per tenant. null or 0: not enforced.",
    )
    tenant_claim: str | None = Field(
        default=None,
        min_length=1,
        max_length=64,
        description='A JWT claim naming the caller\'s tenant (e.g. "tenant"): callers whose '
        "tokens carry the same value share a `tenant:<value>` override and its daily token "
        "budget. null: no tenants.",
    )
    overrides: dict[str, RateLimitOverride] = Field(
        default_factory=dict,
        description='Keyed "<kind>:<value>", kind one of sub, key, client, peer, apikey, '
        "tenant (client:<id> is a declared id's share inside its owner's, and can only "
        "narrow); the most specific key wins: the caller's own (sub/key/client/peer), then "
        'apikey:<name>, then tenant:<value>. E.g. {"sub:batch-service": {"rate_per_s": 500, '
        '"burst": 1000, "max_streams": 400}, "tenant:acme": {"tokens_per_day": 2000000}}.',
    )
    client_address_header: str = Field(
        default="x-envoy-external-address",
        description="Behind the edge every caller has Envoy's address: the header that the "
        "project's Envoy sets to the caller's address (it overwrites whatever a caller "
        'sent). "": always the peer address of the connection.',
    )
    trusted_edges: list[str] = Field(
        default_factory=lambda: ["127.0.0.0/8", "::1/128"],
        description="The networks whose peers are believed when they send "
        "`client_address_header` (interceptors/limits.py says why). Anyone else who sends the "
        "header is keyed by their own peer address.",
    )
    edge_secret: SecretStr | None = Field(
        default=None,
        description="When set, the header is believed only from calls that also carry this "
        "secret in x-aiproxy-edge (`aiproxy envoy` adds it when it finds the same "
        "AIPROXY_LIMITS__EDGE_SECRET in its environment).",
    )

    @field_validator("trusted_edges")
    @classmethod
    def _v_edges(cls, value: list[str]) -> list[str]:
        for net in value:
            ipaddress.ip_network(net, strict=False)  # ValueError names the bad one
        return value

    @field_validator("edge_secret")
    @classmethod
    def _v_edge_secret(cls, value: SecretStr | None) -> SecretStr | None:
        return value if value is not None and value.get_secret_value() else None

    _v_tokens = field_validator("tokens_per_minute", "tokens_per_day")(
        classmethod(lambda cls, v: _off_if_zero(v))
    )

    @field_validator("tenant_claim")
    @classmethod
    def _v_tenant_claim(cls, value: str | None) -> str | None:
        if value is not None and value in _RESERVED_CLAIMS:
            raise ValueError(f"{value!r} is a registered JWT claim, not a tenant name")
        return value

    @model_validator(mode="after")
    def _v_overrides(self) -> LimitSettings:
        for key, override in self.overrides.items():
            kind, sep, value = key.partition(":")
            if not sep or not value or kind not in OVERRIDE_KINDS:
                raise ValueError(
                    f"override key {key!r} must be '<kind>:<value>' with kind one of "
                    f"{', '.join(OVERRIDE_KINDS)}"
                )
            if kind == "tenant" and self.tenant_claim is None:
                raise ValueError(f"override {key!r} needs limits.tenant_claim (e.g. 'tenant')")
            # Inherit what the override leaves out, so every override is complete.
            if override.rate_per_s is None:
                override.rate_per_s = self.rate_per_s
            if override.burst is None:
                override.burst = self.burst
        return self

    def override_for(self, *keys: str | None) -> RateLimitOverride | None:
        """The first override among `keys` (most specific first; None entries skipped)."""
        for key in keys:
            if key is not None and (found := self.overrides.get(key)) is not None:
                return found
        return None

    def token_quotas(self, override: RateLimitOverride | None) -> tuple[int | None, int | None]:
        """(tokens per minute, tokens per day) for a caller with `override`; None = off."""
        per_minute, per_day = self.tokens_per_minute, self.tokens_per_day
        if override is not None:
            if override.tokens_per_minute is not None:
                per_minute = _off_if_zero(override.tokens_per_minute)
            if override.tokens_per_day is not None:
                per_day = _off_if_zero(override.tokens_per_day)
        return per_minute, per_day


# Registered JWT claims (RFC 7519 4.1) and the ones auth reads for scopes: never a tenant.
_RESERVED_CLAIMS = frozenset({"iss", "sub", "aud", "exp", "nbf", "iat", "jti", "scope", "scp"})


class ValidationSettings(_Section):
    """Request checks made before a call costs anything upstream (interceptors/validation.py).
    The counts default to the request contract's (core/contract.py); the operator may set
    others (the reference agent still enforces the contract's own)."""

    enabled: bool = Field(default=True, description="Validation on or off.")
    max_prompt_chars: int = Field(
        default=32_000, ge=1, description="A prompt, RAG query or agent task, in characters."
    )
    max_messages: int = Field(default=200, ge=1, description="Messages in one chat request.")
    max_message_chars: int = Field(
        default=32_000, ge=1, description="One chat message, in characters."
    )
    max_total_chars: int = Field(
        default=200_000, ge=1, description="All text fields of one request together."
    )
    max_tokens: int = Field(default=4096, ge=1, description="The largest `options.max_tokens`.")
    max_stop_sequences: int = Field(
        default=MAX_STOP_SEQUENCES, ge=0, description="Entries of `options.stop`."
    )
    max_batch_prompts: int = Field(default=64, ge=1, description="Prompts in one BatchGenerate.")
    max_top_k: int = Field(default=50, ge=1, description="The largest RAG `top_k`.")
    max_filters: int = Field(default=16, ge=0, description="RAG filters in one request.")
    max_tools: int = Field(default=MAX_TOOLS, ge=0, description="Tools named in one agent run.")
    max_steps: int = Field(
        default=MAX_STEPS, ge=1, description="The largest `max_steps` of an agent run."
    )
    max_context_bytes: int = Field(
        default=64 * 1024, ge=0, description="An agent run's context, serialized."
    )
    max_id_chars: int = Field(
        default=MAX_ID_CHARS,
        ge=1,
        description="Model, session id, tool and filter names, stop sequences.",
    )


class ApiKeySettings(_Section):
    """A static API key, known by its hash only (`aiproxy api-key` makes one)."""

    name: str = Field(
        min_length=1,
        max_length=64,
        description="Shown nowhere but the config and `apikey:<name>` limit overrides: the "
        'caller identity is "key:<key_hash>", the same key the rate limiter derives from '
        "x-api-key.",
    )
    key_hash: str = Field(
        pattern=r"^[0-9a-f]{32}$",
        description="core.ratelimit.hash_api_key(raw key): 32 lowercase hex characters.",
    )
    scopes: list[str] = Field(
        default_factory=list, description="What the key may do (`auth.method_scopes`)."
    )


# Signature algorithms a token may use; "none" is never one of them.
HMAC_ALGORITHMS = frozenset({"HS256", "HS384", "HS512"})
RSA_ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
EC_ALGORITHMS = frozenset({"ES256", "ES384", "ES512"})
OKP_ALGORITHMS = frozenset({"EdDSA"})
ASYMMETRIC_ALGORITHMS = RSA_ALGORITHMS | EC_ALGORITHMS | OKP_ALGORITHMS


def _check_file(value: str | None) -> str | None:
    if value is not None and not pathlib.Path(value).is_file():
        raise ValueError(f"file not found: {value}")
    return value


# The scope the admin service needs by default (auth.admin_scopes).
ADMIN_SCOPE: Final = "aiproxy.admin"
# The proxy's own admin service (proto/ai/proxy/v1): every method of it needs admin_scopes.
ADMIN_SERVICE_NAME: Final = "ai.proxy.v1.ProxyAdminService"


class AuthSettings(_Section):
    """Who may call (interceptors/auth.py; docs/security.md). Off unless a credential source
    is configured: setting jwt_secret (AIPROXY_AUTH__JWT_SECRET), a key file, a JWKS file or
    an API key turns it on; `enabled: false` turns it off explicitly, `enabled: true`
    without any source is an error. Health and reflection are always open."""

    enabled: bool | None = Field(
        default=None,
        description="null: on iff jwt_secret, jwt_public_key_file, jwks_file or api_keys is "
        "set; false: off even then; true: on (an error without a credential source).",
    )
    jwt_secret: SecretStr | None = Field(
        default=None,
        description="HS256/384/512 shared secret, at least 32 bytes (RFC 7518 3.2: as long as "
        "the hash). Better from the environment: AIPROXY_AUTH__JWT_SECRET.",
    )
    jwt_public_key_file: str | None = Field(
        default=None,
        description="PEM public key (or certificate) for RS*/PS*/ES*/EdDSA tokens.",
    )
    jwks_file: str | None = Field(
        default=None,
        description="JSON Web Key Set file (the identity provider's jwks.json); tokens pick "
        "their key by `kid`.",
    )
    algorithms: list[str] = Field(
        default_factory=list,
        description="Allowed `alg` values; empty: every algorithm the configured keys can "
        'verify; never "none".',
    )
    issuer: str | None = Field(default=None, description="When set, tokens must carry this `iss`.")
    audience: list[str] = Field(
        default_factory=list,
        description="Accepted `aud` values. Empty: tokens that carry an `aud` are refused "
        "(they were meant for someone else).",
    )
    leeway_s: float = Field(
        default=30.0, ge=0, le=300, description="Clock skew allowed on exp/nbf/iat."
    )
    required_claims: list[str] = Field(
        default_factory=lambda: ["exp", "sub"],
        description="Claims a token must carry; `sub` is always required: it is the caller's "
        "identity.",
    )
    api_keys: list[ApiKeySettings] = Field(
        default_factory=list,
        description='Static API keys, e.g. [{"name": "ci", "key_hash": "<aiproxy api-key>", '
        '"scopes": ["agent:execute"]}].',
    )
    method_scopes: dict[str, list[str]] = Field(
        default_factory=dict,
        description='Method ("ExecuteAgent" or "/ai.agent.v1.AgentService/ExecuteAgent") -> '
        "scopes the caller must all have (JWT `scope`, space-separated, or `scp` list; API "
        'key scopes), e.g. {"ExecuteAgent": ["agent:execute"]}.',
    )
    admin_scopes: list[str] = Field(
        default_factory=lambda: [ADMIN_SCOPE],
        description="Scopes a caller must all have to call the proxy's own admin service "
        "(ai.proxy.v1.ProxyAdminService: the pool, its addresses and health). "
        "Authenticating is not enough: a token minted for the AI API must not read the "
        "deployment. [] lets any authenticated caller in (not recommended).",
    )

    _v_files = field_validator("jwt_public_key_file", "jwks_file")(
        classmethod(lambda cls, v: _check_file(v))
    )

    @field_validator("jwt_secret")
    @classmethod
    def _v_secret(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value().encode()) < 32:
            raise ValueError("must be at least 32 bytes (256 bits) for HS256")
        return value

    @field_validator("algorithms")
    @classmethod
    def _v_algorithms(cls, value: list[str]) -> list[str]:
        known = HMAC_ALGORITHMS | ASYMMETRIC_ALGORITHMS
        bad = [v for v in value if v not in known]
        if bad:
            raise ValueError(
                f"unsupported algorithms {bad} (allowed: {sorted(known)}; never 'none')"
            )
        return value

    @field_validator("method_scopes")
    @classmethod
    def _v_method_scopes(cls, value: dict[str, list[str]]) -> dict[str, list[str]]:
        for method in value:
            if method.startswith("/"):
                if method.count("/") != 2 or not method.rsplit("/", 1)[-1]:
                    raise ValueError(f"not a method path: {method!r} (use '/pkg.Service/Method')")
                continue
            known = agent_service().by_name
            if method not in known:
                raise ValueError(
                    f"{SERVICE_NAME} has no method {method!r} (known: {sorted(known)})"
                )
        return value

    @property
    def active(self) -> bool:
        if self.enabled is not None:
            return self.enabled
        return self.has_credentials

    @property
    def has_credentials(self) -> bool:
        return bool(self.jwt_secret or self.jwt_public_key_file or self.jwks_file or self.api_keys)

    @model_validator(mode="after")
    def _v_consistent(self) -> AuthSettings:
        if self.enabled and not self.has_credentials:
            raise ValueError(
                "auth is enabled but no jwt_secret, jwt_public_key_file, jwks_file or api_keys is set"
            )
        algs = set(self.algorithms)
        if algs & HMAC_ALGORITHMS and not self.jwt_secret:
            raise ValueError(f"algorithms {sorted(algs & HMAC_ALGORITHMS)} need jwt_secret")
        if algs & ASYMMETRIC_ALGORITHMS and not (self.jwt_public_key_file or self.jwks_file):
            raise ValueError(
                f"algorithms {sorted(algs & ASYMMETRIC_ALGORITHMS)} need jwt_public_key_file or jwks_file"
            )
        if self.jwt_secret is not None:
            secret_len = len(self.jwt_secret.get_secret_value().encode())
            for alg in sorted(algs & HMAC_ALGORITHMS):
                if secret_len < int(alg[2:]) // 8:
                    raise ValueError(
                        f"{alg} needs a jwt_secret of at least {int(alg[2:]) // 8} bytes"
                    )
        names = [k.name for k in self.api_keys]
        if len(set(names)) != len(names):
            raise ValueError("api_keys names must be unique")
        return self


class ServerTlsSettings(_Section):
    """TLS on the proxy's listener. Both files set: TLS; client_ca_file too: mutual TLS
    (callers must present a certificate signed by that CA). Neither: plaintext."""

    cert_file: str | None = Field(default=None, description="PEM certificate chain.")
    key_file: str | None = Field(default=None, description="PEM private key.")
    client_ca_file: str | None = Field(
        default=None,
        description="Set: callers must present a certificate this CA signed (mutual TLS).",
    )

    _v_files = field_validator("cert_file", "key_file", "client_ca_file")(
        classmethod(lambda cls, v: _check_file(v))
    )

    @property
    def enabled(self) -> bool:
        return self.cert_file is not None

    @model_validator(mode="after")
    def _v_pair(self) -> ServerTlsSettings:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together")
        if self.client_ca_file and not self.cert_file:
            raise ValueError("client_ca_file (mutual TLS) needs cert_file and key_file")
        return self


class UpstreamTlsSettings(_Section):
    """TLS towards the agent replicas. Any file set (or enabled: true) turns it on;
    cert_file + key_file present a client certificate (mutual TLS)."""

    enabled: bool | None = Field(
        default=None, description="null: on iff ca_file, cert_file or server_name is set."
    )
    ca_file: str | None = Field(
        default=None,
        description="PEM roots that sign the agents' certificates; default: the system roots.",
    )
    cert_file: str | None = Field(
        default=None, description="The proxy's client certificate (mutual TLS)."
    )
    key_file: str | None = Field(default=None, description="... and its key.")
    server_name: str | None = Field(
        default=None,
        description="The name the agents' certificates must carry. Default: the endpoints' DNS "
        "name when they share one (discovery dials the resolved IPs), else the address "
        "dialled.",
    )

    _v_files = field_validator("ca_file", "cert_file", "key_file")(
        classmethod(lambda cls, v: _check_file(v))
    )

    @property
    def active(self) -> bool:
        if self.enabled is not None:
            return self.enabled
        return bool(self.ca_file or self.cert_file or self.server_name)

    @model_validator(mode="after")
    def _v_pair(self) -> UpstreamTlsSettings:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together")
        if self.enabled is False and (self.ca_file or self.cert_file):
            raise ValueError("enabled is false but TLS files are set")
        return self


class TlsSettings(_Section):
    """TLS for the listener and towards upstreams (server/tls.py); plaintext by default."""

    server: ServerTlsSettings = Field(
        default_factory=ServerTlsSettings, description="The proxy's listener."
    )
    upstream: UpstreamTlsSettings = Field(
        default_factory=UpstreamTlsSettings, description="Towards the agents."
    )


class RedisSettings(_Section):
    """The Redis that holds shared state when limits.backend, stream.resume.backend or
    cache.backend is redis (server/stores/; docs/limits.md). One Redis, not a Cluster: a
    token reservation touches a caller's bucket and its tenant's budget in one script."""

    url: str | None = Field(
        default=None,
        description="redis://HOST:PORT/DB, rediss:// (TLS) or unix:///path.sock. No password "
        "in it (the URL is shown by check-config and logs): put it in `redis.password`.",
    )
    password: SecretStr | None = Field(
        default=None, description="Better from the environment: AIPROXY_REDIS__PASSWORD."
    )
    key_prefix: str = Field(
        default="aiproxy:limits:",
        min_length=1,
        max_length=128,
        description="Every limits key starts with this, so several proxies (or environments) "
        "can share a Redis.",
    )
    timeout_ms: float = Field(
        default=20.0,
        gt=0,
        le=5000,
        description="The bounded wait for one Redis call; past it the call goes to "
        "`limits.failure_policy`. Event-loop lag counts against it: 10-25 ms suits a loaded "
        "2-core box.",
    )
    connect_timeout_s: float = Field(
        default=1.0, gt=0, le=60, description="The wait for a new connection to Redis."
    )
    probe_interval_s: float = Field(
        default=0.5,
        gt=0,
        le=60,
        description="While degraded, Redis is PINGed this often; the first answer restores it.",
    )
    lease_ttl_s: float = Field(
        default=10.0,
        ge=1,
        le=3600,
        description="A stream's lease lapses this long after its process stops renewing it "
        "(it died), so a dead replica's callers get their stream slots back: renewed every "
        "lease_ttl_s / 3, in one batch per process.",
    )
    reservation_ttl_s: float = Field(
        default=3600.0,
        ge=60,
        le=7 * 86_400,
        description="A token reservation whose process died before settling is forgotten "
        "after this.",
    )

    @field_validator("url")
    @classmethod
    def _v_url(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        import urllib.parse

        parts = urllib.parse.urlsplit(value)
        if parts.scheme not in ("redis", "rediss", "unix"):
            raise ValueError(f"must be a redis://, rediss:// or unix:// URL, not {parts.scheme}://")
        if parts.password:
            raise ValueError("must not carry a password: set redis.password instead")
        if parts.scheme != "unix" and not parts.hostname:
            raise ValueError("names no host (redis://HOST:PORT/DB)")
        return value


class CacheSettings(_Section):
    """The response cache (server/request/caching.py; docs/streaming.md): exact-match
    answers, L1 in this process (LRU bounded in bytes), L2 the shared backend. A call
    opts in with `cache-control: max-age=N`; the operator per method with a TTL."""

    enabled: bool = Field(default=True, description="The cache on or off.")
    backend: Literal["memory", "redis"] | None = Field(
        default=None,
        description="L2: memory (none: L1 only) or redis (`redis.url`, shared by replicas). "
        "null: the same as `limits.backend`.",
    )
    methods: dict[str, int] = Field(
        default_factory=dict,
        description='Method name ("SearchRag") or full path -> TTL in seconds: cached without '
        "the caller asking (cache-control: no-store / no-cache still bypass), e.g. "
        '{"SearchRag": 300}.',
    )
    max_ttl_s: int = Field(
        default=3600, ge=1, le=7 * 86_400, description="A caller's max-age is capped to this."
    )
    l1_max_bytes: int = Field(
        default=64 << 20, ge=1024, description="The in-process LRU's bound, in bytes."
    )
    max_entry_bytes: int = Field(
        default=1 << 20,
        ge=256,
        description="The largest answer kept (in L1 and sent to L2); larger ones are not cached.",
    )
    shared_across_tenants: bool = Field(
        default=False,
        description="Answers are keyed by the caller's tenant (else the caller): never served "
        "across tenants. true shares answers between every caller (public, non-personal "
        "prompts only).",
    )
    key_prefix: str = Field(
        default="aiproxy:cache:",
        min_length=1,
        max_length=128,
        description="Every Redis key of the cache starts with this.",
    )


class OpenAIModel(_Section):
    """One model of the OpenAI-compatible API (GET /v1/models, a request's `model`)."""

    id: str = Field(
        min_length=1,
        max_length=128,
        pattern=r"^[\x21-\x7e]+$",
        description="The id callers name: `model` in a request, `id` in GET /v1/models.",
    )
    upstream: str | None = Field(
        default=None,
        min_length=1,
        max_length=128,
        description="The model the agents are asked for (ChatRequest.model); null: the id.",
    )
    owned_by: str = Field(
        default="aiproxy",
        min_length=1,
        max_length=64,
        description="`owned_by` in the model list.",
    )


class OpenAISettings(_Section):
    """The OpenAI-compatible HTTP API through the edge (docs/openai.md): /v1/chat/completions
    and /v1/models, mapped onto Chat / StreamChat through the same pipeline as native calls
    (server/request/openai_front.py)."""

    enabled: bool = Field(
        default=True,
        description="Serve ai.openai.v1.OpenAIService (the edge routes /v1/chat/completions "
        "and /v1/models to it).",
    )
    models: list[OpenAIModel] = Field(
        default_factory=lambda: [OpenAIModel(id="ref-model-1")],
        min_length=1,
        description="What GET /v1/models lists and a request's `model` may name; any other "
        "model is 404 model_not_found. The operator says, because the agents cannot: "
        "AgentService has no model list and the reference agent answers any name.",
    )

    @field_validator("models")
    @classmethod
    def _v_models(cls, value: list[OpenAIModel]) -> list[OpenAIModel]:
        ids = [m.id for m in value]
        if len(set(ids)) != len(ids):
            raise ValueError("model ids must be unique")
        return value


class LogSettings(_Section):
    """JSON lines on stderr (docs/operations.md)."""

    level: str = Field(default="INFO", description="DEBUG, INFO, WARNING or ERROR.")
    access: bool = Field(
        default=True,
        description='One JSON "access" line per call (ids, method, status, timings, tokens; '
        "never prompts, never credentials).",
    )

    @field_validator("level")
    @classmethod
    def _v_level(cls, value: str) -> str:
        value = value.upper()
        if value not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
            raise ValueError("must be one of DEBUG, INFO, WARNING, ERROR")
        return value


class MetricsSettings(_Section):
    """The Prometheus scrape endpoint (`/metrics`), see server/telemetry.py."""

    enabled: bool = Field(default=True, description="The endpoint on or off.")
    listen: str = Field(
        default="127.0.0.1:9091",
        description="HOST:PORT of the HTTP listener (containers: 0.0.0.0:9091); port 0 picks a "
        "free one (reported in the ready line).",
    )
    gen_ai_provider_name: str = Field(
        default="aiproxy.agent",
        min_length=1,
        max_length=64,
        description="The gen_ai.provider.name of the OpenTelemetry GenAI series (gen_ai_*): who "
        "serves the models behind the agents, one of the spec's well-known values (openai, "
        "anthropic, aws.bedrock, ...) when it applies; the default names the agent service "
        "itself (docs/genai-metrics.md).",
    )

    _v_listen = field_validator("listen")(classmethod(lambda cls, v: _check_address(v)))


class TracingSettings(_Section):
    """OpenTelemetry traces (W3C trace context in and out), see server/telemetry.py."""

    exporter: str = Field(
        default="none",
        description="none: no spans are made (the caller's traceparent still passes through "
        "untouched); console: one JSON line per span on stderr (stdout is for the ready "
        "line); otlp: OTLP/gRPC to `otlp_endpoint`.",
    )
    otlp_endpoint: str = Field(
        default="http://127.0.0.1:4317", description="The OTLP/gRPC collector."
    )
    service_name: str = Field(default="aiproxy", description="The spans' service.name.")
    sample_ratio: float = Field(
        default=1.0,
        ge=0,
        le=1,
        description="Share of new traces recorded (a caller's sampled flag is honoured: "
        "parent-based).",
    )

    @field_validator("exporter")
    @classmethod
    def _v_exporter(cls, value: str) -> str:
        value = value.lower()
        if value not in {"none", "console", "otlp"}:
            raise ValueError("must be one of none, console, otlp")
        return value


# The YAML file for the load in progress (sources are built by pydantic-settings, which
# gives them no arguments of ours).
_yaml_file: contextvars.ContextVar[pathlib.Path | None] = contextvars.ContextVar(
    "_yaml_file", default=None
)


class Settings(BaseSettings):
    """Everything the proxy can be told.

    This model is the one source of the configuration reference: each section's docstring
    and each field's `description` are what scripts/gen_config_docs.py writes into
    docs/configuration.md and config.example.yaml (`make docs`; a unit test fails when
    they are out of step). Document a new key here, nowhere else."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        validate_default=True,
    )

    server: ServerSettings = Field(default_factory=ServerSettings)
    upstream: UpstreamSettings = Field(default_factory=UpstreamSettings)
    stream: StreamSettings = Field(default_factory=StreamSettings)
    deadlines: DeadlineSettings = Field(default_factory=DeadlineSettings)
    breaker: BreakerSettings = Field(default_factory=BreakerSettings)
    retry: RetrySettings = Field(default_factory=RetrySettings)
    limits: LimitSettings = Field(default_factory=LimitSettings)
    redis: RedisSettings = Field(default_factory=RedisSettings)
    cache: CacheSettings = Field(default_factory=CacheSettings)
    validation: ValidationSettings = Field(default_factory=ValidationSettings)
    log: LogSettings = Field(default_factory=LogSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    tracing: TracingSettings = Field(default_factory=TracingSettings)
    auth: AuthSettings = Field(default_factory=AuthSettings)
    tls: TlsSettings = Field(default_factory=TlsSettings)
    openai: OpenAISettings = Field(default_factory=OpenAISettings)
    overload: OverloadSettings = Field(default_factory=OverloadSettings)

    @model_validator(mode="after")
    def _v_cross_sections(self) -> Settings:
        if self.limits.backend == "redis" and self.redis.url is None:
            raise ValueError(
                "limits.backend is redis but redis.url is not set "
                "(e.g. AIPROXY_REDIS__URL=redis://host:6379/0)"
            )
        for name, backend in (
            ("stream.resume.backend", self.stream.resume.backend),
            ("cache.backend", self.cache.backend),
        ):
            if backend == "redis" and self.redis.url is None:
                raise ValueError(f"{name} is redis but redis.url is not set")
        names = {k.name for k in self.auth.api_keys}
        unknown = sorted(
            k for k in self.limits.overrides if k.startswith("apikey:") and k[7:] not in names
        )
        if unknown:
            raise ValueError(f"limits.overrides {unknown} name no auth.api_keys entry")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        path = _yaml_file.get()
        if path is not None:
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=path))
        return tuple(sources)


class ConfigError(Exception):
    """A configuration that cannot run, with a message naming every bad key."""


def load_settings(config_file: str | pathlib.Path | None = None, **overrides: Any) -> Settings:
    """Defaults < YAML file < AIPROXY_* environment < overrides (command-line flags).

    `overrides` are nested dicts, e.g. upstream={"endpoints": [...]}; they are merged
    into, not substituted for, what the file and environment say.
    """
    path = pathlib.Path(config_file) if config_file else None
    if path is not None and not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    token = _yaml_file.set(path)
    try:
        base = Settings()
        if not overrides:
            return base
        merged = _deep_merge(base.model_dump(), overrides)
        return Settings.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, path)) from None
    except (OSError, ValueError) as exc:  # unreadable file, YAML syntax error
        raise ConfigError(f"cannot read configuration from {path}: {exc}") from None
    finally:
        _yaml_file.reset(token)


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _describe(exc: ValidationError, path: pathlib.Path | None) -> str:
    where = (
        f" (file {path}, or environment {ENV_PREFIX}*)" if path else f" (environment {ENV_PREFIX}*)"
    )
    lines = [f"invalid configuration{where}:"]
    for err in exc.errors():
        key = ".".join(str(part) for part in err["loc"])
        env = ENV_PREFIX + "__".join(str(p).upper() for p in err["loc"] if not isinstance(p, int))
        # Secrets (auth.jwt_secret, redis.password) are never echoed, not even when wrong.
        # A URL may carry a password: shown nowhere either.
        hidden = "secret" in key or "password" in key or key.endswith("url")
        shown = "<redacted>" if hidden else repr(err.get("input"))
        lines.append(f"  {key}: {err['msg']} (input: {shown}; env: {env})")
    return "\n".join(lines)
