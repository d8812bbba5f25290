"""TLS credentials from configured PEM files, read once at start-up.

- The listener: `server_credentials` -> TLS, or mutual TLS when a client CA is set
  (grpc then refuses the handshake of a caller without a certificate signed by it).
- Towards upstreams: `channel_credentials` -> TLS with the given roots (system roots
  when none), plus the proxy's client certificate for mutual TLS; `channel_options`
  adds the server-name override when the upstreams' certificates carry a name other
  than the address the proxy dials.

Plaintext stays the default: with nothing configured both return None.
"""

from __future__ import annotations

import pathlib
from typing import Any

import grpc

from server.config import ServerTlsSettings, UpstreamTlsSettings


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


def channel_options(settings: UpstreamTlsSettings) -> list[tuple[str, Any]]:
    """Channel options TLS needs: the expected server name, when overridden."""
    if settings.active and settings.server_name:
        return [("grpc.ssl_target_name_override", settings.server_name)]
    return []
