"""The rendered Envoy configuration: the settings this edge depends on are in it, and
Envoy itself accepts it (`envoy --mode validate`, no sockets opened)."""

from __future__ import annotations

import base64
import json
import pathlib
from typing import Any

import pytest
import yaml
from google.rpc import error_details_pb2, status_pb2

from aiproxy.core.errors import DOMAIN
from aiproxy.server.edge.cli import parse, settings_from_args
from aiproxy.server.edge.config import DESCRIPTOR, EdgeError, EdgeSettings, http_bindings, render
from aiproxy.server.edge.process import validate

needs_descriptor = pytest.mark.skipif(not DESCRIPTOR.exists(), reason="run `make gen` first")


def _config(**kwargs: Any) -> dict[str, Any]:
    return yaml.safe_load(render(EdgeSettings(**kwargs)))


def _hcm(config: dict[str, Any]) -> dict[str, Any]:
    return config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0][
        "typed_config"
    ]


def _filter(config: dict[str, Any], name: str) -> dict[str, Any]:
    return next(f["typed_config"] for f in _hcm(config)["http_filters"] if f["name"] == name)


@needs_descriptor
def test_listener_replicas_and_origins_are_rendered() -> None:
    config = _config(
        listen="0.0.0.0:8080",
        proxies=("10.0.0.1:50051", "proxy-b.internal:50051"),
        cors_origins=("https://a.example", "*"),
    )
    assert config["static_resources"]["listeners"][0]["address"]["socket_address"] == {
        "address": "0.0.0.0",
        "port_value": 8080,
    }
    assert config["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"
    cluster = config["static_resources"]["clusters"][0]
    endpoints = [
        e["endpoint"]["address"]["socket_address"]
        for e in cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
    ]
    assert endpoints == [
        {"address": "10.0.0.1", "port_value": 50051},
        {"address": "proxy-b.internal", "port_value": 50051},
    ]
    cors = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0][
        "typed_config"
    ]["route_config"]["virtual_hosts"][0]["typed_per_filter_config"]["envoy.filters.http.cors"]
    assert cors["allow_origin_string_match"] == [
        {"exact": "https://a.example"},
        {"safe_regex": {"regex": ".*"}},
    ]
    assert {"authorization", "x-request-id", "last-event-id"} <= {
        h.strip() for h in cors["allow_headers"].split(",")
    }


@needs_descriptor
def test_what_the_edge_depends_on_is_configured() -> None:
    config = _config()
    transcoder = _filter(config, "envoy.filters.http.grpc_json_transcoder")
    assert transcoder["print_options"] == {
        "add_whitespace": False,
        "always_print_primitive_fields": True,
        "always_print_enums_as_ints": False,
        "preserve_proto_field_names": False,
        "stream_sse_style_delimited": True,
    }
    assert transcoder["convert_grpc_status"] is True
    assert transcoder["request_validation_options"]["reject_unknown_method"] is True
    assert transcoder["request_validation_options"]["reject_unknown_query_parameters"] is True
    assert pathlib.Path(transcoder["proto_descriptor"]) == DESCRIPTOR.resolve()

    # sse_to_metadata must come before the transcoder (responses pass filters in reverse).
    names = [f["name"] for f in _hcm(config)["http_filters"]]
    assert names.index("envoy.filters.http.sse_to_metadata") < names.index(
        "envoy.filters.http.grpc_json_transcoder"
    )
    assert names[-1] == "envoy.filters.http.router"

    routes = _hcm(config)["route_config"]["virtual_hosts"][0]["routes"]
    to_cluster = [r for r in routes if "route" in r]
    assert to_cluster and all(r["route"]["timeout"] == "0s" for r in to_cluster)

    cluster = config["static_resources"]["clusters"][0]
    assert cluster["common_lb_config"]["healthy_panic_threshold"] == {"value": 0}
    assert cluster["common_lb_config"]["update_merge_window"] == "0s"
    assert cluster["health_checks"][0]["grpc_health_check"] == {
        "service_name": "ai.agent.v1.AgentService"
    }
    assert cluster["outlier_detection"]["split_external_local_origin_errors"] is True
    assert cluster["circuit_breakers"]["thresholds"][0]["max_requests"] >= 10_000
    http2 = cluster["typed_extension_protocol_options"][
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
    ]
    assert (
        http2["explicit_http_config"]["http2_protocol_options"]["max_concurrent_streams"] >= 10_000
    )


def test_bad_settings_are_refused(tmp_path: pathlib.Path) -> None:
    with pytest.raises(EdgeError):
        EdgeSettings(proxies=())
    with pytest.raises(ValueError):
        EdgeSettings(proxies=("no-port",))
    with pytest.raises(EdgeError, match="make gen"):
        render(EdgeSettings(descriptor=tmp_path / "missing.pb"))
    with pytest.raises(EdgeError, match="coalescing"):
        EdgeSettings(sse_coalesce_ms=1001)


@needs_descriptor
def test_http_callers_get_the_sse_coalescing_window_by_default() -> None:
    def guard(config: dict[str, Any]) -> str:
        source: str = _hcm(config)["http_filters"][0]["typed_config"]["default_source_code"][
            "inline_string"
        ]
        return source

    # The streaming spec's window, added only where the caller sent none (a caller's own
    # x-aiproxy-coalesce-ms, 0 included, wins), and only for HTTP/JSON callers.
    assert "local SSE_COALESCE_MS = 50\n" in guard(_config())
    assert 'not headers:get("x-aiproxy-coalesce-ms")' in guard(_config())
    assert "local SSE_COALESCE_MS = 0\n" in guard(_config(sse_coalesce_ms=0))
    args = parse(["--sse-coalesce-ms", "20"])
    assert settings_from_args(args).sse_coalesce_ms == 20


@pytest.mark.envoy
@needs_descriptor
def test_envoy_accepts_the_rendered_configuration() -> None:
    validate(
        EdgeSettings(
            listen="127.0.0.1:0", proxies=("127.0.0.1:1", "localhost:2"), cors_origins=("*",)
        )
    )


@needs_descriptor
def test_each_connection_takes_turns_on_a_worker_unless_switched_off() -> None:
    """http.max_requests_per_io_cycle (docs/overload.md, "Through Envoy"): 1 by default,
    from the command line too; 0 leaves Envoy's default (no limit)."""

    def static_layer(config: dict[str, Any]) -> dict[str, Any]:
        (layer,) = config["layered_runtime"]["layers"]
        return dict(layer["static_layer"])

    assert static_layer(_config()) == {"http.max_requests_per_io_cycle": 1}
    assert static_layer(_config(max_requests_per_io_cycle=4)) == {
        "http.max_requests_per_io_cycle": 4
    }
    assert static_layer(_config(max_requests_per_io_cycle=0)) == {}
    args = parse(["--max-requests-per-io-cycle", "0"])
    assert settings_from_args(args).max_requests_per_io_cycle == 0
    assert settings_from_args(parse([])).max_requests_per_io_cycle == 1


@pytest.mark.envoy
@needs_descriptor
def test_envoy_accepts_the_rendered_configuration_without_the_turn_limit() -> None:
    validate(EdgeSettings(listen="127.0.0.1:0", max_requests_per_io_cycle=0))


@pytest.mark.envoy
@needs_descriptor
def test_envoy_rejects_a_broken_template(tmp_path: pathlib.Path) -> None:
    broken = tmp_path / "envoy.yaml.tmpl"
    broken.write_text(
        pathlib.Path(EdgeSettings().template)
        .read_text()
        .replace("healthy_panic_threshold", "healthy_panic_treshold")
    )
    with pytest.raises(EdgeError, match="healthy_panic_treshold"):
        validate(EdgeSettings(template=broken))


# ---- the guard, Envoy's own answers, the access log, the edge secret -----------------------


@needs_descriptor
def test_the_guard_runs_first_and_knows_the_api_paths() -> None:
    config = _config()
    filters = _hcm(config)["http_filters"]
    assert filters[0]["name"] == "envoy.filters.http.lua"
    source = filters[0]["typed_config"]["default_source_code"]["inline_string"]
    # The methods each HTTP path allows come from the descriptor set (google.api.http).
    assert '["/api/v1/ai/generate"] = "POST, OPTIONS"' in source
    assert '["/api/v1/ai/generate/stream"] = "GET, POST, OPTIONS"' in source
    # A path with a {variable} is an anchored pattern, one segment per variable.
    assert '{"^/api/v1/ai/sessions/[^/]+$", "DELETE, GET, OPTIONS"}' in source
    assert '["/api/v1/ai/sessions"] = "POST, OPTIONS"' in source
    # The spec's grpc-timeout grammar: 1-8 digits, one unit; "$$" rendered to "$".
    assert 'local TIMEOUT = "^%d%d?%d?%d?%d?%d?%d?%d?[HMSmun]$"' in source
    assert "$$" not in source
    assert _hcm(config)["max_request_headers_kb"] > EdgeSettings().max_header_kb


@needs_descriptor
def test_every_answer_envoy_makes_itself_has_error_info() -> None:
    mappers = _hcm(_config())["local_reply_config"]["mappers"]
    http = {}
    grpc_bins = {}
    # The first mapper leaves the guard's answers to Connect callers as they are (already
    # Connect's error JSON, with the ErrorInfo: test_connect_errors_of_the_guard).
    assert "body_format_override" not in mappers[0] and "headers_to_add" not in mappers[0]
    for mapper in mappers[1:]:
        flt = mapper["filter"]
        if "error" in mapper["body_format_override"].get("json_format", {}):
            continue  # the OpenAI API's shape (test_the_openai_api_is_transcoded_...)
        if "and_filter" in flt:
            status = flt["and_filter"]["filters"][0]["status_code_filter"]["comparison"]["value"][
                "default_value"
            ]
            grpc_bins[status] = (
                mapper["headers_to_add"][0]["header"]["value"],
                mapper["body_format_override"]["text_format_source"]["inline_string"],
            )
        else:
            http[flt["status_code_filter"]["comparison"]["value"]["default_value"]] = mapper[
                "body_format_override"
            ]["json_format"]
    assert {400, 403, 404, 405, 413, 429, 431, 500, 502, 503, 504} <= set(http)
    for status, body in http.items():
        info = body["details"][0]
        assert (
            info["@type"].endswith("google.rpc.ErrorInfo")
            and info["reason"]
            and info["domain"] == DOMAIN
        ), status
    for status in (429, 502, 503):
        assert http[status]["details"][1] == {
            "@type": "type.googleapis.com/google.rpc.RetryInfo",
            "retryDelay": "1s",
        }
    # A gRPC caller gets the same Status as grpc-status-details-bin, its message equal to
    # grpc-message (grpc's rpc_status.from_call refuses a mismatch).
    for status, (value, message) in grpc_bins.items():
        decoded = status_pb2.Status.FromString(base64.b64decode(value))
        assert decoded.message == message and decoded.code == http[status]["code"], status


def test_http_bindings_come_from_the_descriptor() -> None:
    if not DESCRIPTOR.exists():
        pytest.skip("run `make gen` first")
    bindings = http_bindings(DESCRIPTOR)
    assert bindings["/api/v1/ai/chat"] == {"POST"}
    assert bindings["/api/v1/ai/chat/stream"] == {"GET", "POST"}


@needs_descriptor
def test_access_log_has_the_callers_method_and_no_query() -> None:
    fmt = _hcm(_config())["access_log"][0]["typed_config"]["log_format"]
    fields = fmt["json_format"]
    assert fields["method"] == "%DYNAMIC_METADATA(aiproxy.edge:method)%"
    assert fields["path"] == "%DYNAMIC_METADATA(aiproxy.edge:path)%"
    assert fields["grpc_method"] == "%REQ_WITHOUT_QUERY(:PATH)%"
    assert not any(v == "%REQ(:PATH)%" or "ORIGINAL-PATH" in str(v) for v in fields.values())
    assert fmt["formatters"][0]["name"] == "envoy.formatter.req_without_query"


@needs_descriptor
def test_the_edge_secret_is_added_but_never_printed(monkeypatch: pytest.MonkeyPatch) -> None:
    def vhost(text: str) -> dict:
        listener = yaml.safe_load(text)["static_resources"]["listeners"][0]
        http = listener["filter_chains"][0]["filters"][0]["typed_config"]
        return http["route_config"]["virtual_hosts"][0]

    settings = EdgeSettings(edge_secret="s3cret-value")
    added = {
        h["header"]["key"]: h["header"]["value"]
        for h in vhost(render(settings))["request_headers_to_add"]
    }
    assert added == {
        "x-envoy-external-address": "%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%",
        "x-aiproxy-edge": "s3cret-value",
    }
    assert "s3cret-value" not in render(settings, reveal_secret=False)
    assert "s3cret-value" not in repr(settings)
    assert {
        h["header"]["key"] for h in vhost(render(EdgeSettings()))["request_headers_to_add"]
    } == {"x-envoy-external-address"}
    monkeypatch.setenv("AIPROXY_LIMITS__EDGE_SECRET", "from-env")
    assert settings_from_args(parse([])).edge_secret == "from-env"


@needs_descriptor
def test_sse_ids_filter_streams_and_sits_before_the_transcoder() -> None:
    """aiproxy.sse_ids (issue 16): listed before sse_to_metadata and the transcoder (so it
    sees the transcoder's SSE text last on the way out and strips the resume query before
    the transcoder validates it), rewrites chunk by chunk (bodyChunks, never body(), which
    would buffer the whole stream), and CORS lets front ends send and read the headers."""
    config = _config()
    names = [f["name"] for f in _hcm(config)["http_filters"]]
    assert names[0] == "envoy.filters.http.lua"  # the guard still runs first
    assert (
        names.index("aiproxy.sse_ids")
        < names.index("envoy.filters.http.sse_to_metadata")
        < names.index("envoy.filters.http.grpc_json_transcoder")
    )
    source = _filter(config, "aiproxy.sse_ids")["default_source_code"]["inline_string"]
    assert "bodyChunks()" in source and ":body(" not in source
    assert '"id: " .. prefix .. seq' in source
    assert 'headers:get("x-aiproxy-stream-id")' in source
    assert "$$" not in source
    cors = _hcm(config)["route_config"]["virtual_hosts"][0]["typed_per_filter_config"][
        "envoy.filters.http.cors"
    ]
    for header in ("x-aiproxy-resume", "x-aiproxy-resumable", "last-event-id", "cache-control"):
        assert header in cors["allow_headers"]
    for header in ("x-aiproxy-stream-id", "x-aiproxy-cache"):
        assert header in cors["expose_headers"]


@needs_descriptor
def test_the_openai_api_is_transcoded_with_its_own_response_code_and_error_shape() -> None:
    config = _config()
    transcoder = _filter(config, "envoy.filters.http.grpc_json_transcoder")
    assert "ai.openai.v1.OpenAIService" in transcoder["services"]
    assert http_bindings(DESCRIPTOR, "ai.openai.v1.OpenAIService") == {
        "/v1/models": {"GET"},
        "/v1/models/{model=**}": {"GET"},
        "/v1/chat/completions": {"POST"},
    }
    vhost = _hcm(config)["route_config"]["virtual_hosts"][0]
    route = next(
        r for r in vhost["routes"] if r["match"] == {"prefix": "/ai.openai.v1.OpenAIService/"}
    )
    code = route["typed_per_filter_config"]["aiproxy.sse_ids"]["source_code"]["inline_string"]
    assert 'headers:get("x-aiproxy-http-status")' in code and '":status"' in code
    assert route["route"]["timeout"] == "0s"
    guard = _filter(config, "envoy.filters.http.lua")["default_source_code"]["inline_string"]
    assert '["/v1/chat/completions"] = "POST, OPTIONS"' in guard
    openai_503 = next(
        m
        for m in _hcm(config)["local_reply_config"]["mappers"]
        if "error" in m.get("body_format_override", {}).get("json_format", {})
        and "503" in str(m["filter"])
    )
    assert openai_503["body_format_override"]["json_format"]["error"]["type"] == "server_error"
    assert {h["header"]["key"] for h in openai_503["headers_to_add"]} == {
        "retry-after",
        "retry-after-ms",
    }


@needs_descriptor
def test_connect_errors_of_the_guard() -> None:
    """The guard answers a Connect caller with Connect's error JSON: the code's name, the
    guard's message, the ErrorInfo as {"type", "value": unpadded base64 of its bytes}."""
    from aiproxy.server.edge.config import GUARD_MESSAGES, connect_error

    error = json.loads(connect_error(3, GUARD_MESSAGES["-bin"], "INVALID_ARGUMENT"))
    assert error["code"] == "invalid_argument" and error["message"] == GUARD_MESSAGES["-bin"]
    (detail,) = error["details"]
    assert detail["type"] == "google.rpc.ErrorInfo" and not detail["value"].endswith("=")
    value = detail["value"] + "=" * (-len(detail["value"]) % 4)
    info = error_details_pb2.ErrorInfo.FromString(base64.b64decode(value))
    assert info.reason == "INVALID_ARGUMENT" and info.domain == DOMAIN
    assert json.loads(connect_error(12, "x", "UNSUPPORTED_MEDIA_TYPE"))["code"] == "unimplemented"
    source = _hcm(_config())["http_filters"][0]["typed_config"]["default_source_code"][
        "inline_string"
    ]
    assert '["connect-codec"] = "{\\"code\\":\\"unimplemented\\"' in source


def test_path_templates_as_lua_patterns() -> None:
    from aiproxy.server.edge.config import _lua_path_pattern

    assert _lua_path_pattern("/api/v1/ai/sessions/{session_id}") == "^/api/v1/ai/sessions/[^/]+$"
    # A rest-of-path variable: model ids such as meta-llama/Llama-3 have slashes.
    assert _lua_path_pattern("/v1/models/{model=**}") == "^/v1/models/.+$"
