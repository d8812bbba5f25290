"""`aiproxy token` and `aiproxy api-key`: credentials for development and the demo.

    aiproxy token --sub alice [--scope "agent:execute"] [--ttl 3600] [--aud A] [--iss I]
                  [--secret S | --private-key FILE [--alg RS256] [--kid K]]
        prints a signed JWT. The HS256 secret defaults to $AIPROXY_AUTH__JWT_SECRET, the
        variable that turns auth on in the proxy, so the token matches the proxy started
        from the same environment.

    aiproxy api-key --name ci-bot [--key RAW]
        prints a new (or the given) API key and the config entry holding its hash.

Production tokens come from an identity provider; these commands never read or write
files other than the private key named on the command line.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import secrets
import sys
import time
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from aiproxy.core.ratelimit import hash_api_key

SECRET_ENV = "AIPROXY_AUTH__JWT_SECRET"

TOKEN_EPILOG = f"""\
Use it with the proxy started with auth on (e.g. {SECRET_ENV} set to the same secret):
  export {SECRET_ENV}=$(python -c 'import secrets; print(secrets.token_urlsafe(32))')
  aiproxy serve ... &
  TOKEN=$(aiproxy token --sub alice --scope agent:execute)
  grpcurl -plaintext -H "authorization: Bearer $TOKEN" -d '{{"prompt":"hi"}}' \\
    localhost:50051 ai.agent.v1.AgentService/Generate
Through Envoy, send the same header; without it the answer is 401.
"""


def add_token_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--sub", required=True, help="the subject: the caller's identity and rate-limit key"
    )
    parser.add_argument("--scope", default="", help='space-separated scopes, e.g. "agent:execute"')
    parser.add_argument(
        "--ttl", type=int, default=3600, metavar="SECONDS", help="lifetime (default 3600)"
    )
    parser.add_argument("--aud", action="append", default=[], help="audience (repeatable)")
    parser.add_argument("--iss", help="issuer")
    parser.add_argument("--secret", help=f"HS256 secret (default: ${SECRET_ENV})")
    parser.add_argument(
        "--private-key", metavar="FILE", help="PEM private key: sign with --alg instead"
    )
    parser.add_argument(
        "--alg", default=None, help="algorithm (default HS256, or RS256/ES256 by key type)"
    )
    parser.add_argument("--kid", help="key id header (matches a key of the proxy's JWKS file)")


def run_token(args: argparse.Namespace) -> int:
    now = int(time.time())
    if args.ttl <= 0:
        print("aiproxy token: --ttl must be positive", file=sys.stderr)
        return 2
    claims: dict[str, Any] = {"sub": args.sub, "iat": now, "nbf": now, "exp": now + args.ttl}
    if args.scope:
        claims["scope"] = " ".join(args.scope.split())
    if args.aud:
        claims["aud"] = args.aud[0] if len(args.aud) == 1 else args.aud
    if args.iss:
        claims["iss"] = args.iss
    headers = {"kid": args.kid} if args.kid else None
    if args.private_key:
        key: Any = serialization.load_pem_private_key(
            pathlib.Path(args.private_key).read_bytes(), password=None
        )
        alg = args.alg or _default_alg(key)
    else:
        secret = args.secret or os.environ.get(SECRET_ENV)
        if not secret:
            print(
                f"aiproxy token: give --secret, --private-key, or set {SECRET_ENV}", file=sys.stderr
            )
            return 2
        key, alg = secret, args.alg or "HS256"
    try:
        token = jwt.encode(claims, key, algorithm=alg, headers=headers)
    except (jwt.PyJWTError, NotImplementedError, ValueError, TypeError) as exc:
        print(f"aiproxy token: cannot sign: {exc}", file=sys.stderr)
        return 2
    print(token)
    return 0


def _default_alg(key: Any) -> str:
    if isinstance(key, rsa.RSAPrivateKey):
        return "RS256"
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return {"secp384r1": "ES384", "secp521r1": "ES512"}.get(key.curve.name, "ES256")
    return "EdDSA"


def add_api_key_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--name", required=True, help="a name for the key (config only)")
    parser.add_argument("--key", help="hash this key instead of generating one")
    parser.add_argument(
        "--scope", action="append", default=[], help="scope the key grants (repeatable)"
    )


def run_api_key(args: argparse.Namespace) -> int:
    raw = args.key or secrets.token_urlsafe(32)
    entry = {"name": args.name, "key_hash": hash_api_key(raw), "scopes": args.scope}
    print(f"key: {raw}")
    print("config (auth.api_keys entry; the proxy keeps only the hash):")
    print(f"  AIPROXY_AUTH__API_KEYS='{json.dumps([entry])}'")
    return 0


def demo_hint() -> str:
    """The demo banner's line about auth: empty unless the environment turns auth on."""
    if not os.environ.get(SECRET_ENV):
        return ""
    return (
        f"Auth is on ({SECRET_ENV} is set): add\n"
        '  -H "authorization: Bearer $(aiproxy token --sub you --scope agent:execute)"\n'
        "to each grpcurl call above (health and reflection need none).\n"
    )
