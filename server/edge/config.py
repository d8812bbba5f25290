"""The edge's configuration: Envoy's YAML rendered from envoy/envoy.yaml.tmpl.

The template (annotated there) is rendered with the listener, the proxy replicas, the
CORS origins and the paths of the descriptor set and the browser page. Rendered from
Python rather than written in the template: the local reply mappers (one table,
LOCAL_REPLIES, so an HTTP body and a gRPC caller's grpc-status-details-bin say the same),
the guard's messages and the API's HTTP paths with their methods (read from the
descriptor set), and the headers Envoy adds for the proxy's caller keying (the edge
secret from AIPROXY_LIMITS__EDGE_SECRET or --edge-secret-file; masked by --print-config).

The rest of `aiproxy envoy` lives beside this module: process.py runs Envoy, admin.py
reads its admin API, cli.py is the command line.
"""

from __future__ import annotations

import base64
import json
import pathlib
import re
import string
import sys
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2

from aiproxy.core import headers
from aiproxy.core.errors import DOMAIN
from aiproxy.core.settings import parse_hostport

# The checkout (server/edge/ is two folders below it); in a wheel this is site-packages/.
ROOT = pathlib.Path(__file__).resolve().parents[2]


def _envoy_dir() -> pathlib.Path:
    """envoy/ of the checkout, or where a wheel installs it (pyproject's data-files)."""
    checkout = ROOT / "envoy"
    if (checkout / "envoy.yaml.tmpl").is_file():
        return checkout
    return pathlib.Path(sys.prefix) / "share" / "aiproxy" / "envoy"


ENVOY_DIR = _envoy_dir()
TEMPLATE = ENVOY_DIR / "envoy.yaml.tmpl"
PAGE = ENVOY_DIR / "page" / "index.html"
ADMIN_PAGE = ENVOY_DIR / "page" / "admin.html"


def _descriptor() -> pathlib.Path:
    """build/descriptors/ of the checkout, or the copy in the generated `aiproxy.ai` package
    (what a wheel, e.g. the container image, has)."""
    checkout = ROOT / "build" / "descriptors" / "aiproxy.pb"
    if checkout.is_file():
        return checkout
    import aiproxy.ai

    return pathlib.Path(aiproxy.ai.__file__).resolve().parent / "aiproxy.pb"


DESCRIPTOR = _descriptor()

DEFAULT_LISTEN = "127.0.0.1:8080"
DEFAULT_PROXY = "127.0.0.1:50051"
# Front ends served from another origin that may call the API (a local dev server).
DEFAULT_CORS_ORIGINS = ("http://localhost:3000", "http://127.0.0.1:3000")
CLUSTER = "aiproxy"
# The services the transcoder maps HTTP onto (the template's `services:`).
AGENT_SERVICE = "ai.agent.v1.AgentService"
OPENAI_SERVICE = "ai.openai.v1.OpenAIService"  # the OpenAI-compatible API (docs/openai.md)

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
    "connect-timeout-ms": "malformed connect-timeout-ms header: 1 to 10 digits expected",
    "connect-content-encoding": "unsupported connect-content-encoding header: identity, gzip or deflate expected",
    "connect-accept-encoding": "malformed connect-accept-encoding header: content-coding names expected",
    "connect-get": "Connect GET requests are not supported (no method of this API is free of side effects): use POST",
    "connect-codec": "Connect with the binary codec only: content-type application/proto (unary) or application/connect+proto (streams)",
}
# The google.rpc.Code of the guard's answer where it is not INVALID_ARGUMENT: Connect's
# JSON codec (HTTP 415, as the Connect protocol says) and Connect GET (405) are not
# implemented.
GUARD_CODES: dict[str, int] = {"connect-codec": 12, "connect-get": 12}
BODY_TOO_LARGE = "request body too large"
ADMIN_NOT_EXPOSED = "not available through the edge"
ADMIN_VIEW_OFF = "the live view is off (aiproxy envoy --admin-view turns it on)"
ADMIN_SERVICE = "ai.proxy.v1.ProxyAdminService"

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
    reason: str  # ErrorInfo.reason: stable, part of the API (docs/http.md: "Errors over HTTP")
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


# The guard's own answer to a Connect unary call it refused: already Connect's JSON error
# (the guard writes it), which the HTTP mappers would wrap in a Status. Not a request no
# filter has seen (the codec's 431): Envoy's default, match_if_key_not_found true, would
# take one for a Connect caller.
_CONNECT_REFUSED = {
    "and_filter": {
        "filters": [
            {
                "metadata_filter": {
                    "matcher": {
                        "filter": "aiproxy.edge",
                        "path": [{"key": "protocol"}],
                        "value": {"string_match": {"exact": "connect"}},
                    },
                    "match_if_key_not_found": False,
                }
            },
            {
                "metadata_filter": {
                    "matcher": {
                        "filter": "aiproxy.edge",
                        "path": [{"key": "rejected"}],
                        "value": {"present_match": True},
                    },
                    "match_if_key_not_found": False,
                }
            },
        ]
    }
}


# A caller of the OpenAI-compatible API (/v1/...), as the guard recorded its path: Envoy's
# own answers to it take OpenAI's error shape, which its SDKs read. A request no filter has
# seen (the codec's 431) has no path: not one.
_OPENAI_REQUEST = {
    "metadata_filter": {
        "matcher": {
            "filter": "aiproxy.edge",
            "path": [{"key": "path"}],
            "value": {"string_match": {"prefix": "/v1/"}},
        },
        "match_if_key_not_found": False,
    }
}


def _openai_type(http_status: int) -> str:
    if http_status == 429:
        return "requests"
    return "server_error" if http_status >= 500 else "invalid_request_error"


def _openai_mapper(reply: LocalReply) -> dict[str, Any]:
    """Envoy's answer to an OpenAI API caller: `{"error": {message, type, param, code}}`,
    and retry-after / retry-after-ms where a retry helps (server/request/openai_api.py
    gives the proxy's own answers the same shape)."""
    message = reply.message if reply.message is not None else "%LOCAL_REPLY_BODY%"
    body = {
        "error": {
            "message": message,
            "type": _openai_type(reply.http_status),
            "param": None,
            "code": reply.reason.lower(),
        }
    }
    mapper: dict[str, Any] = {
        "filter": {"and_filter": {"filters": [_status_filter(reply.http_status), _OPENAI_REQUEST]}},
        "body_format_override": {"json_format": body},
    }
    if reply.retry_delay_s is not None:
        mapper["headers_to_add"] = [
            {
                "header": {"key": key, "value": value},
                "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
            }
            for key, value in (
                ("retry-after", str(reply.retry_delay_s)),
                ("retry-after-ms", str(reply.retry_delay_s * 1000)),
            )
        ]
    return mapper


def local_reply_mappers() -> list[dict[str, Any]]:
    """local_reply_config mappers: first the guard's answers to Connect unary calls, left
    as they are; then per status, one for native gRPC callers (the Status as
    grpc-status-details-bin, grpc-message fixed to match it; gRPC-Web and Connect callers
    are gRPC callers by then, and their filters translate it) and one for HTTP callers
    (the Status as the JSON body), callers of the OpenAI API (/v1/...) getting OpenAI's
    error body instead. Only the first matching mapper applies."""
    mappers: list[dict[str, Any]] = [{"filter": _CONNECT_REFUSED}]
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
        mappers.append(_openai_mapper(reply))
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


# The Connect protocol's names of the google.rpc.Code values (connectrpc.com/docs/protocol).
CONNECT_CODES = (
    "ok", "canceled", "unknown", "invalid_argument", "deadline_exceeded", "not_found",
    "already_exists", "permission_denied", "resource_exhausted", "failed_precondition",
    "aborted", "out_of_range", "unimplemented", "internal", "unavailable", "data_loss",
    "unauthenticated",
)  # fmt: skip


def connect_error(code: int, message: str, reason: str) -> str:
    """A Connect error as JSON (what a Connect unary call's body or its stream's end
    message holds): the code's name, the message and the ErrorInfo as a detail (its type
    name and its bytes in unpadded base64)."""
    info = error_details_pb2.ErrorInfo(reason=reason, domain=DOMAIN).SerializeToString()
    detail = {"type": "google.rpc.ErrorInfo", "value": base64.b64encode(info).decode().rstrip("=")}
    body = {"code": CONNECT_CODES[code], "message": message, "details": [detail]}
    return json.dumps(body, separators=(",", ":"))


def _guard_reason(key: str) -> str:
    if key == "size":
        return "HEADERS_TOO_LARGE"
    if key == "connect-get":
        return "METHOD_NOT_ALLOWED"
    return "UNSUPPORTED_MEDIA_TYPE" if key == "connect-codec" else "INVALID_ARGUMENT"


def _guard_tables(descriptor: pathlib.Path) -> dict[str, str]:
    messages = {
        **GUARD_MESSAGES,
        "body": BODY_TOO_LARGE,
        "not-allowed": "method not allowed",
        "admin": ADMIN_NOT_EXPOSED,
    }
    details = {
        key: status_bin(GUARD_CODES.get(key, 3), message, _guard_reason(key))
        for key, message in GUARD_MESSAGES.items()
    }
    connect_errors = {
        key: connect_error(GUARD_CODES.get(key, 3), message, _guard_reason(key))
        for key, message in GUARD_MESSAGES.items()
    }
    details["admin"] = status_bin(7, ADMIN_NOT_EXPOSED, "PERMISSION_DENIED")
    connect_errors["admin"] = connect_error(7, ADMIN_NOT_EXPOSED, "PERMISSION_DENIED")
    rules = http_bindings(descriptor)
    for path, verbs in http_bindings(descriptor, OPENAI_SERVICE).items():
        rules.setdefault(path, set()).update(verbs)
    bindings = {path: ", ".join([*sorted(verbs), "OPTIONS"]) for path, verbs in rules.items()}
    allow = {path: verbs for path, verbs in bindings.items() if "{" not in path}
    # Paths with {variables} (/api/v1/ai/sessions/{session_id}) as anchored Lua patterns,
    # a variable matching one path segment, tried after the exact paths.
    patterns = [
        f"{{{json.dumps(_lua_path_pattern(path))}, {json.dumps(verbs)}}}"
        for path, verbs in sorted(bindings.items())
        if "{" in path
    ]
    return {
        "lua_messages": _lua_table(messages),
        "lua_grpc_details": _lua_table(details),
        "lua_connect_errors": _lua_table(connect_errors),
        "lua_allow": _lua_table(allow),
        "lua_allow_patterns": "{" + ", ".join(patterns) + "}",
    }


def _lua_path_pattern(path: str) -> str:
    """An HTTP rule's path template as an anchored Lua pattern: `{name}` (one segment)
    becomes `[^/]+`, `{name=**}` (the rest of the path: /v1/models/{model=**}) `.+`, every
    other character is literal (Lua's magic ones escaped)."""
    out = []
    for literal, variable in re.findall(r"([^{]*)(\{[^}]*\})?", path):
        out.append(re.sub(r"([%^$().\[\]*+\-?])", r"%\1", literal))
        if variable:
            out.append(".+" if variable.endswith("=**}") else "[^/]+")
    return "^" + "".join(out) + "$"


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
    # Envoy's runtime key http.max_requests_per_io_cycle: at most this many new requests
    # from one downstream connection per I/O cycle of a worker, the rest in the next ones
    # (Envoy 1.27.1 release notes: "mitigates CPU starvation by connections that
    # simultaneously send high number of requests"). 1: a caller's burst of thousands of
    # streams on a few connections takes turns with every other connection on the worker
    # instead of being decoded, filtered and forwarded whole first while a light caller's
    # request sits unread (docs/overload.md, "Through Envoy"). 0 = Envoy's default (no
    # limit).
    max_requests_per_io_cycle: int = 1
    max_request_body_bytes: int = 1024 * 1024
    # Request headers the guard accepts. Below the proxy's server.max_metadata_bytes
    # (16 KiB, refused there as RESOURCE_EXHAUSTED, which an HTTP caller would read as
    # 429), with room for what Envoy adds (x-forwarded-for, x-request-id, ...); and at
    # grpc's default soft limit (8 KiB), which agents without their own setting apply to
    # the metadata the proxy forwards. nginx's default line buffer is 8 KiB too.
    max_header_kb: int = 8
    max_header_count: int = 100
    # HTTP/JSON callers (the SSE routes: browsers, EventSource) get this stream coalescing
    # window unless they send their own x-aiproxy-coalesce-ms: at most one SSE event per
    # window after the first, which is never held back (the streaming spec's "at most one
    # push per 50 ms"). Each event costs the proxy a message and Envoy a transcoded frame
    # and a pass of the Lua filter (docs/performance.md). 0 = none added (every chunk as it
    # comes, unless the proxy's own stream.coalesce_window_ms says otherwise).
    sse_coalesce_ms: int = 50
    # Added to every forwarded request as x-aiproxy-edge: the proxy believes the
    # client-address header only with it (when its limits.edge_secret is set).
    edge_secret: str | None = field(default=None, repr=False)
    # Response compression (brotli, gzip) of JSON answers and pages at least this large;
    # SSE streams only with compress_sse (see the template).
    compression: bool = True
    compress_min_bytes: int = 1024
    compress_sse: bool = False
    # The operators' live view at /admin/ and its GET /admin/v1/overview (ProxyAdminService
    # through the transcoder; an admin scope when the proxy's auth is on).
    admin_view: bool = False
    admin_page: pathlib.Path = ADMIN_PAGE
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
        if not 0 <= self.sse_coalesce_ms <= 1000:
            raise EdgeError("the SSE coalescing window must be within 0..1000 ms")
        if not 0 <= self.compress_min_bytes <= 1 << 20:
            raise EdgeError("--compress-min-bytes must be between 0 and 1 MiB")
        if self.health_interval_s <= 0 or self.stream_idle_timeout_s <= 0:
            raise EdgeError("intervals and timeouts must be positive")


# What the edge compresses: the transcoder's JSON answers and errors, the pages.
COMPRESSED_TYPES = ("application/json", "text/html", "application/javascript", "text/css")
SSE_TYPE = "text/event-stream"


def compress_content_types(settings: EdgeSettings) -> list[str]:
    return [*COMPRESSED_TYPES, *((SSE_TYPE,) if settings.compress_sse else ())]


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
        ("admin page", settings.admin_page),
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
        "runtime": json.dumps(
            {"http.max_requests_per_io_cycle": settings.max_requests_per_io_cycle}
            if settings.max_requests_per_io_cycle > 0
            else {}
        ),
        "max_request_body_bytes": settings.max_request_body_bytes,
        "max_header_kb": settings.max_header_kb,
        "max_header_count": settings.max_header_count,
        "sse_coalesce_ms": settings.sse_coalesce_ms,
        # The codec's own limits, well above: past them HTTP/2 callers get GOAWAY.
        "codec_header_kb": max(96, 4 * settings.max_header_kb),
        "codec_header_count": max(200, 4 * settings.max_header_count),
        "descriptor_path": json.dumps(str(settings.descriptor.resolve())),
        "page_path": json.dumps(str(settings.page.resolve())),
        "local_reply_mappers": json.dumps(local_reply_mappers()),
        "transcoder_services": json.dumps(
            [AGENT_SERVICE, OPENAI_SERVICE, *((ADMIN_SERVICE,) if settings.admin_view else ())]
        ),
        "admin_page_response": json.dumps(
            {"status": 200, "body": {"filename": str(settings.admin_page.resolve())}}
            if settings.admin_view
            else {"status": 404, "body": {"inline_string": ADMIN_VIEW_OFF}}
        ),
        "compress_enabled": json.dumps(settings.compression),
        "compress_min_bytes": settings.compress_min_bytes,
        "compress_content_types": json.dumps(compress_content_types(settings)),
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
