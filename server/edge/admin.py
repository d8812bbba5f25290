"""Envoy's admin API, read over loopback: listeners, host health, requests in flight."""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from aiproxy.server.edge.config import CLUSTER


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
