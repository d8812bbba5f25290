"""TLS credentials from configured PEM files, read once at start-up.

- The listener: `server_credentials` -> TLS, or mutual TLS when a client CA is set
  (grpc then refuses the handshake of a caller without a certificate signed by it).
- Towards upstreams: `channel_credentials` -> TLS with the given roots (system roots
  when none), plus the proxy's client certificate for mutual TLS; `channel_options`
  adds the name the upstreams' certificates must carry: `server_name`, or the DNS name
  of the endpoints (discovery dials the IPs it resolves to).

Plaintext stays the default: with nothing configured both return None.
"""

from __future__ import annotations

import ipaddress
import pathlib
from collections.abc import Sequence
from typing import Any

import grpc

from aiproxy.core.settings import ServerTlsSettings, UpstreamTlsSettings, parse_hostport


def _read(path: str | None) -> bytes | None:
    return None if path is None else pathlib.Path(path).read_bytes()


def server_credentials(settings: ServerTlsSettings) -> grpc.ServerCredentials | None:
    """The listener's credentials, or None for plaintext."""
    if not settings.enabled:
        return None
    key, cert = _read(settings.key_file), _read(settings.cert_file)
    assert key is not None and cert is not None  # the config validator pairs them
    client_ca = _read(settings.client_ca_file)
    return grpc.ssl_server_credentials(
        [(key, cert)],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


def channel_credentials(settings: UpstreamTlsSettings) -> grpc.ChannelCredentials | None:
    """Credentials for the upstream channels, or None for plaintext."""
    if not settings.active:
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=_read(settings.ca_file),
        private_key=_read(settings.key_file),
        certificate_chain=_read(settings.cert_file),
    )


def expected_server_name(
    settings: UpstreamTlsSettings, endpoints: Sequence[str] = ()
) -> str | None:
    """The name the upstreams' certificates must carry, if not the address dialled.

    Discovery dials the IP addresses a DNS name resolves to, so without an explicit
    `server_name` the certificate is checked against that name -- when all endpoints
    share one (`agents.internal:50052`). With IP literals, or several names, it is None:
    the dialled address is checked (set `server_name` when the certificates say otherwise).
    """
    if settings.server_name:
        return settings.server_name
    names = set()
    for endpoint in endpoints:
        if endpoint.startswith(("consul://", "srv://")):
            return None  # Consul's instances carry addresses: set server_name
        host, _ = parse_hostport(endpoint)
        try:
            ipaddress.ip_address(host)
        except ValueError:
            names.add(host)
    return names.pop() if len(names) == 1 else None


def channel_options(
    settings: UpstreamTlsSettings, endpoints: Sequence[str] = ()
) -> list[tuple[str, Any]]:
    """Channel options TLS needs: the expected server name (see expected_server_name)."""
    if not settings.active:
        return []
    name = expected_server_name(settings, endpoints)
    return [("grpc.ssl_target_name_override", name)] if name else []
