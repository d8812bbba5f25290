"""Test-time key material, generated fresh in a temporary directory (nothing committed).

`make_pki(dir)`: a CA, a server certificate for localhost/127.0.0.1 and a client
certificate, all signed by the CA, plus a second CA (and a client certificate signed by
it) that the servers do not trust. `make_signing_keys(dir)`: RSA and EC key pairs and a
JWKS file for JWT tests.
"""

from __future__ import annotations

import dataclasses
import datetime
import ipaddress
import json
import pathlib
from typing import Any

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclasses.dataclass(frozen=True)
class Pki:
    ca: pathlib.Path
    server_cert: pathlib.Path
    server_key: pathlib.Path
    client_cert: pathlib.Path
    client_key: pathlib.Path
    # A client certificate from a CA nobody trusts.
    rogue_client_cert: pathlib.Path
    rogue_client_key: pathlib.Path

    def read(self, name: str) -> bytes:
        return pathlib.Path(getattr(self, name)).read_bytes()


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key: Any) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _ca(cn: str) -> tuple[Any, x509.Certificate]:
    key = _key()
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _leaf(
    ca_key: Any, ca_cert: x509.Certificate, cn: str, *, server: bool, ip_san: bool = True
) -> tuple[Any, x509.Certificate]:
    key = _key()
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.DNSName(cn)]
                + ([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))] if ip_san else [])
            ),
            critical=False,
        )
    return key, builder.sign(ca_key, hashes.SHA256())


def make_pki(
    directory: pathlib.Path, server_name: str = "aiproxy.test", *, ip_san: bool = True
) -> Pki:
    """CA, server (SAN localhost, `server_name`, and 127.0.0.1 if `ip_san`) and client
    certificates. Without the IP, a client dialling 127.0.0.1 must be told the name."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = _ca("aiproxy test CA")
    server_key, server_cert = _leaf(ca_key, ca_cert, server_name, server=True, ip_san=ip_san)
    client_key, client_cert = _leaf(ca_key, ca_cert, "aiproxy test client", server=False)
    rogue_ca_key, rogue_ca_cert = _ca("untrusted CA")
    rogue_key, rogue_cert = _leaf(rogue_ca_key, rogue_ca_cert, "rogue client", server=False)
    files = {
        "ca.pem": ca_cert.public_bytes(serialization.Encoding.PEM),
        "server.pem": server_cert.public_bytes(serialization.Encoding.PEM),
        "server.key": _pem_key(server_key),
        "client.pem": client_cert.public_bytes(serialization.Encoding.PEM),
        "client.key": _pem_key(client_key),
        "rogue.pem": rogue_cert.public_bytes(serialization.Encoding.PEM),
        "rogue.key": _pem_key(rogue_key),
    }
    for name, data in files.items():
        (directory / name).write_bytes(data)
    return Pki(
        ca=directory / "ca.pem",
        server_cert=directory / "server.pem",
        server_key=directory / "server.key",
        client_cert=directory / "client.pem",
        client_key=directory / "client.key",
        rogue_client_cert=directory / "rogue.pem",
        rogue_client_key=directory / "rogue.key",
    )


@dataclasses.dataclass(frozen=True)
class SigningKeys:
    rsa_private: Any
    rsa_public_pem: pathlib.Path
    ec_private: Any
    other_ec_private: Any  # not in the JWKS
    jwks: pathlib.Path  # the EC public key (kid "ec-1") and the RSA one (kid "rsa-1")


def make_signing_keys(directory: pathlib.Path) -> SigningKeys:
    directory.mkdir(parents=True, exist_ok=True)
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    pem = rsa_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    (directory / "jwt-rsa.pub.pem").write_bytes(pem)
    ec_jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(ec_key.public_key()))
    ec_jwk.update(kid="ec-1", use="sig", alg="ES256")
    rsa_jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(rsa_key.public_key()))
    rsa_jwk.update(kid="rsa-1")
    (directory / "jwks.json").write_text(json.dumps({"keys": [ec_jwk, rsa_jwk]}))
    return SigningKeys(
        rsa_private=rsa_key,
        rsa_public_pem=directory / "jwt-rsa.pub.pem",
        ec_private=ec_key,
        other_ec_private=ec.generate_private_key(ec.SECP256R1()),
        jwks=directory / "jwks.json",
    )
