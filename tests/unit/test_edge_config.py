"""The rendered Envoy configuration: the settings this edge depends on are in it, and
Envoy itself accepts it (`envoy --mode validate`, no sockets opened)."""

from __future__ import annotations

import pathlib
from typing import Any

import pytest
import yaml

from server.edge import DESCRIPTOR, EdgeError, EdgeSettings, render, validate

needs_descriptor = pytest.mark.skipif(not DESCRIPTOR.exists(), reason="run `make gen` first")


def _config(**kwargs: Any) -> dict[str, Any]:
    return yaml.safe_load(render(EdgeSettings(**kwargs)))


def _hcm(config: dict[str, Any]) -> dict[str, Any]:
    return config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]


def _filter(config: dict[str, Any], name: str) -> dict[str, Any]:
    return next(f["typed_config"] for f in _hcm(config)["http_filters"] if f["name"] == name)


@needs_descriptor
def test_listener_replicas_and_origins_are_rendered() -> None:
    config = _config(listen="0.0.0.0:8080", proxies=("10.0.0.1:50051", "proxy-b.internal:50051"), cors_origins=("https://a.example", "*"))
    assert config["static_resources"]["listeners"][0]["address"]["socket_address"] == {"address": "0.0.0.0", "port_value": 8080}
    assert config["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"
    cluster = config["static_resources"]["clusters"][0]
    endpoints = [e["endpoint"]["address"]["socket_address"] for e in cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]]
    assert endpoints == [{"address": "10.0.0.1", "port_value": 50051}, {"address": "proxy-b.internal", "port_value": 50051}]
    cors = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]["route_config"]["virtual_hosts"][0]["typed_per_filter_config"]["envoy.filters.http.cors"]
    assert cors["allow_origin_string_match"] == [{"exact": "https://a.example"}, {"safe_regex": {"regex": ".*"}}]
    assert {"authorization", "x-request-id", "last-event-id"} <= {h.strip() for h in cors["allow_headers"].split(",")}


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
    assert names.index("envoy.filters.http.sse_to_metadata") < names.index("envoy.filters.http.grpc_json_transcoder")
    assert names[-1] == "envoy.filters.http.router"

    routes = _hcm(config)["route_config"]["virtual_hosts"][0]["routes"]
    to_cluster = [r for r in routes if "route" in r]
    assert to_cluster and all(r["route"]["timeout"] == "0s" for r in to_cluster)

    cluster = config["static_resources"]["clusters"][0]
    assert cluster["common_lb_config"]["healthy_panic_threshold"] == {"value": 0}
    assert cluster["common_lb_config"]["update_merge_window"] == "0s"
    assert cluster["health_checks"][0]["grpc_health_check"] == {"service_name": "ai.agent.v1.AgentService"}
    assert cluster["outlier_detection"]["split_external_local_origin_errors"] is True
    assert cluster["circuit_breakers"]["thresholds"][0]["max_requests"] >= 10_000
    http2 = cluster["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    assert http2["explicit_http_config"]["http2_protocol_options"]["max_concurrent_streams"] >= 10_000


def test_bad_settings_are_refused(tmp_path: pathlib.Path) -> None:
    with pytest.raises(EdgeError):
        EdgeSettings(proxies=())
    with pytest.raises(ValueError):
        EdgeSettings(proxies=("no-port",))
    with pytest.raises(EdgeError, match="make gen"):
        render(EdgeSettings(descriptor=tmp_path / "missing.pb"))


@pytest.mark.envoy
@needs_descriptor
def test_envoy_accepts_the_rendered_configuration() -> None:
    validate(EdgeSettings(listen="127.0.0.1:0", proxies=("127.0.0.1:1", "localhost:2"), cors_origins=("*",)))


@pytest.mark.envoy
@needs_descriptor
def test_envoy_rejects_a_broken_template(tmp_path: pathlib.Path) -> None:
    broken = tmp_path / "envoy.yaml.tmpl"
    broken.write_text(pathlib.Path(EdgeSettings().template).read_text().replace("healthy_panic_threshold", "healthy_panic_treshold"))
    with pytest.raises(EdgeError, match="healthy_panic_treshold"):
        validate(EdgeSettings(template=broken))
