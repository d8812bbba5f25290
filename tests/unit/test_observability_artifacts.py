"""The alert rules and the Grafana dashboard shipped in deploy/ only name series the proxy
really exports (a renamed metric would otherwise silently empty a panel or an alert)."""

from __future__ import annotations

import json
import pathlib
import re

import yaml

from aiproxy.core.settings import load_settings
from aiproxy.server.telemetry import Telemetry

ROOT = pathlib.Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "prometheus" / "aiproxy-alerts.yaml"
DASHBOARD = ROOT / "deploy" / "grafana" / "aiproxy-dashboard.json"
SERIES = re.compile(r"\b((?:ai_proxy|grpc_(?:server|client)|gen_ai_(?:server|client))_[a-z_]+)\b")


def exported_series() -> set[str]:
    telemetry = Telemetry(load_settings(metrics={"enabled": False}))
    names: set[str] = set()
    for family in telemetry.registry.collect():
        if family.type == "counter":
            names.add(family.name + "_total")
        elif family.type == "histogram":
            names.update(family.name + suffix for suffix in ("_bucket", "_sum", "_count"))
        else:
            names.add(family.name)
    return names


def test_alert_rules_name_exported_series_and_the_documented_thresholds() -> None:
    rules = yaml.safe_load(RULES.read_text())
    exported = exported_series()
    alerts = {}
    for group in rules["groups"]:
        for rule in group["rules"]:
            assert {"alert", "expr", "labels", "annotations"} <= set(rule), rule
            used = set(SERIES.findall(rule["expr"]))
            assert used and used <= exported, (rule["alert"], used - exported)
            alerts[rule["alert"]] = rule["expr"]
    # The streaming thresholds the source documents give.
    assert re.search(r"\)\s*>\s*1\s*$", alerts["AiProxyFirstChunkSlow"].strip())
    assert alerts["AiProxyChunkIntervalSlow"].strip().endswith("> 0.2")
    assert alerts["AiProxyStreamSuccessLow"].strip().endswith("< 0.95")


def test_dashboard_panels_query_exported_series() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exported = exported_series()
    queried: set[str] = set()
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            used = set(SERIES.findall(target["expr"]))
            assert used <= exported, (panel["title"], used - exported)
            queried |= used
    # Every proxy metric, and every GenAI conventions' one, has a panel.
    own = {name for name in exported if name.startswith(("ai_proxy_", "gen_ai_"))}
    families = {re.sub(r"_(bucket|sum|count)$", "", n) for n in own}
    covered = {re.sub(r"_(bucket|sum|count)$", "", n) for n in queried}
    assert families <= covered, families - covered


def test_exporter_is_chosen_by_configuration() -> None:
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace.export import ConsoleSpanExporter

    from aiproxy.server.telemetry import build_tracer_provider

    def exporter_of(**tracing: object) -> object:
        provider = build_tracer_provider(load_settings(tracing=tracing).tracing)
        if provider is None:
            return None
        try:
            (processor,) = provider._active_span_processor._span_processors
            return processor.span_exporter
        finally:
            provider.shutdown()

    assert exporter_of() is None  # none by default: no spans made at all
    assert isinstance(exporter_of(exporter="console"), ConsoleSpanExporter)
    assert isinstance(
        exporter_of(exporter="otlp", otlp_endpoint="http://127.0.0.1:4317"), OTLPSpanExporter
    )
    assert Telemetry(load_settings(metrics={"enabled": False})).tracing is False
