"""Stage: who may call. JWT bearer tokens and static API keys.

Credentials, in this order:

  authorization: Bearer <JWT>     verified with PyJWT: the signature (HS* with the shared
                                  secret; RS*/PS*/ES*/EdDSA with the PEM public key or the
                                  JWKS file, chosen by `kid`), exp/nbf/iat with a small
                                  leeway, iss and aud when configured, the required claims.
  authorization: ApiKey <key>     a static API key (for clients that can only set
  x-api-key: <key>                `authorization`); known by its hash only.

The caller's identity goes into `CallInfo.caller`: "sub:<JWT subject>" or
"key:<hash of the API key>" -- exactly what `core.ratelimit.caller_key` gives
for the same credentials, so the rate limiter (call.caller or caller_key(...)), the
access log and the auth check agree on who the caller is. With `limits.tenant_claim`
set, the value of that claim in a verified token (a short printable string or number;
anything else is ignored) goes into `CallInfo.tenant`: the caller's `tenant:<value>`
overrides and shared daily token budget (core/limitpolicy.py). API key callers are
matched to their configured name (`apikey:<name>` overrides) by the limit policy, from
the key's hash. Only a verified token names a tenant: a header never does. Scopes (JWT `scope`
space-separated or `scp` list; an API key's configured scopes) are checked against
`auth.method_scopes`; every method of the proxy's admin service needs `auth.admin_scopes`
as well (default `aiproxy.admin`): being authenticated for the AI API is not enough to
read the deployment.

Failures raise Unauthenticated (no, bad, or expired credentials) or PermissionDenied
(a scope this caller lacks); the pipeline turns them into the one error shape.
ErrorInfo.metadata["cause"] says what was wrong (see `Cause`). Neither the token nor the
key ever reaches a log line, an error message or the upstream (forwarding drops
`authorization` and `x-api-key`). The admin service, beside the pipeline, is behind the
same check (`AuthStage.guard`).

Health and reflection stay open: they are registered beside the pipeline and never
reach this stage.
Everything the verifier needs (keys, JWKS, hashes) is loaded once, at start-up; a
verified token is cached until it expires, so a caller reusing its token costs a dict
lookup and a clock read per call instead of a signature verification.
"""

from __future__ import annotations

import enum
import json
import logging
import math
import pathlib
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

from aiproxy.core.callinfo import CallInfo
from aiproxy.core.errors import PermissionDenied, Unauthenticated
from aiproxy.core.limitpolicy import tenant_from_claims
from aiproxy.core.logs import log_event
from aiproxy.core.ratelimit import API_KEY_HEADER, caller_key, hash_api_key
from aiproxy.core.service import SERVICE_NAME, Method
from aiproxy.core.settings import (
    ADMIN_SERVICE_NAME,
    HMAC_ALGORITHMS,
    OKP_ALGORITHMS,
    RSA_ALGORITHMS,
    AuthSettings,
)
from aiproxy.core.types import Clock, Context

log = logging.getLogger("aiproxy.auth")

AUTHORIZATION: Final = "authorization"
# Methods that never need credentials: probes and grpcurl discovery.
OPEN_METHOD_PREFIXES: Final = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)
_ADMIN_PREFIX: Final = f"/{ADMIN_SERVICE_NAME}/"
# Longer credentials are refused before any parsing (a JWT is typically ~1 KiB).
MAX_TOKEN_LEN: Final = 8192
MAX_API_KEY_LEN: Final = 512
MAX_SUBJECT_LEN: Final = 256
# Verified tokens remembered (per process); the least recently used are dropped.
TOKEN_CACHE_SIZE: Final = 4096


class Cause(enum.StrEnum):
    """ErrorInfo.metadata["cause"] of an auth failure: stable, part of the API."""

    MISSING_CREDENTIALS = "missing_credentials"  # no authorization / x-api-key
    AMBIGUOUS_CREDENTIALS = "ambiguous_credentials"  # the header appears more than once
    UNSUPPORTED_SCHEME = "unsupported_scheme"  # authorization is not Bearer / ApiKey
    MALFORMED_TOKEN = "malformed_token"  # not a JWT (segments, base64, JSON)
    ALGORITHM_NOT_ALLOWED = "algorithm_not_allowed"  # alg "none", or not in the allowlist
    UNKNOWN_KEY = "unknown_key"  # no configured key for this alg / kid
    INVALID_KEY = "invalid_key"  # a configured key unfit for the token (e.g. too short)
    BAD_SIGNATURE = "bad_signature"  # signed with another key, or tampered with
    TOKEN_EXPIRED = "token_expired"  # exp (plus leeway) has passed
    TOKEN_NOT_YET_VALID = "token_not_yet_valid"  # nbf (minus leeway) still ahead
    WRONG_AUDIENCE = "wrong_audience"  # aud is not ours (or present when none configured)
    WRONG_ISSUER = "wrong_issuer"
    MISSING_CLAIM = "missing_claim"  # a required claim is absent (metadata "claim")
    INVALID_CLAIMS = "invalid_claims"  # iat in the future, sub not a usable string...
    UNKNOWN_API_KEY = "unknown_api_key"
    MISSING_SCOPE = "missing_scope"  # PERMISSION_DENIED (metadata "scope")


def _unauthenticated(cause: Cause, message: str, **extra: str) -> Unauthenticated:
    return Unauthenticated(message, metadata={"cause": cause.value, **extra})


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller."""

    caller: str  # "sub:<subject>" or "key:<hash>": the rate-limit key and the log identity
    scopes: frozenset[str]
    kind: str  # "jwt" or "api_key"
    tenant: str = ""  # the token's tenant claim (limits.tenant_claim), "" when none


@dataclass(frozen=True, slots=True)
class _VerificationKey:
    key: Any  # bytes (HMAC secret) or a cryptography public key
    algorithms: frozenset[str]  # the allowed algorithms this key may verify
    kid: str | None  # None: used for any kid (the PEM key, the secret)


def _family(public_key: Any) -> frozenset[str]:
    if isinstance(public_key, rsa.RSAPublicKey):
        return RSA_ALGORITHMS
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        # An EC key verifies exactly one ES* algorithm: its curve decides which.
        by_curve = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}
        alg = by_curve.get(public_key.curve.name)
        return frozenset({alg}) if alg else frozenset()
    if isinstance(public_key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        return OKP_ALGORITHMS
    return frozenset()


# What `algorithms: []` allows: the customary algorithm of each configured key.
_DEFAULT_ALGORITHMS: Final = frozenset({"HS256", "RS256", "ES256", "ES384", "ES512", "EdDSA"})


def load_public_key_file(path: str | pathlib.Path) -> Any:
    """A PEM public key, or the public key of a PEM certificate."""
    data = pathlib.Path(path).read_bytes()
    if b"BEGIN CERTIFICATE" in data:
        return x509.load_pem_x509_certificate(data).public_key()
    return serialization.load_pem_public_key(data)


def load_jwks_file(path: str | pathlib.Path) -> list[tuple[Any, str | None, str | None]]:
    """(public key, kid, alg) of each usable signing key in a JWKS file.

    Symmetric ("oct") and encryption-only ("use": "enc") keys are skipped: a JWKS is an
    identity provider's published verification keys. An unusable file is an error.
    """
    document = json.loads(pathlib.Path(path).read_text())
    raw_keys = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(raw_keys, list):
        raise ValueError(f"{path}: not a JWK Set (no 'keys' list)")
    out = []
    for raw in raw_keys:
        if not isinstance(raw, dict) or raw.get("kty") == "oct" or raw.get("use", "sig") != "sig":
            continue
        try:
            jwk = jwt.PyJWK(raw)
        except jwt.PyJWTError:
            continue  # a key type this build cannot use
        alg = raw.get("alg")
        out.append((jwk.key, jwk.key_id, alg if isinstance(alg, str) else None))
    if not out:
        raise ValueError(f"{path}: no usable signing keys")
    return out


class Authenticator:
    """Checks one call's credentials and scopes. Pure logic, no I/O after __init__."""

    def __init__(
        self, settings: AuthSettings, *, clock: Clock = time.time, tenant_claim: str | None = None
    ) -> None:
        """`tenant_claim`: limits.tenant_claim, the JWT claim naming the caller's tenant."""
        self._settings = settings
        self._clock = clock
        self._tenant_claim = tenant_claim
        keys: list[_VerificationKey] = []
        configured = frozenset(settings.algorithms) or None
        if settings.jwt_secret is not None:
            allowed = (configured or frozenset({"HS256"})) & HMAC_ALGORITHMS
            keys.append(
                _VerificationKey(settings.jwt_secret.get_secret_value().encode(), allowed, None)
            )
        public: list[tuple[Any, str | None, str | None]] = []
        if settings.jwt_public_key_file:
            public.append((load_public_key_file(settings.jwt_public_key_file), None, None))
        if settings.jwks_file:
            public.extend(load_jwks_file(settings.jwks_file))
        for key, kid, jwk_alg in public:
            allowed = _family(key) & (
                configured or _DEFAULT_ALGORITHMS | ({jwk_alg} if jwk_alg else set())
            )
            if jwk_alg:  # a JWK that names its algorithm verifies only that one
                allowed &= {jwk_alg}
            if allowed:
                keys.append(_VerificationKey(key, allowed, kid))
        self._keys = tuple(keys)
        self.algorithms = frozenset().union(*(k.algorithms for k in keys)) if keys else frozenset()
        if (settings.jwt_secret or public) and not self.algorithms:
            raise ValueError("no configured JWT key can verify any of the allowed algorithms")
        self._api_keys = {k.key_hash: frozenset(k.scopes) for k in settings.api_keys}
        self._required = sorted({*settings.required_claims, "sub"})
        self._audience = list(settings.audience) or None
        self._jwt = jwt.PyJWT(options={"enforce_minimum_key_length": True})
        self._method_scopes = {
            (m if m.startswith("/") else f"/{SERVICE_NAME}/{m}"): frozenset(scopes)
            for m, scopes in settings.method_scopes.items()
        }
        self._admin_scopes = frozenset(settings.admin_scopes)
        # token -> (principal, valid from, valid until): both bounds already include leeway.
        self._cache: OrderedDict[str, tuple[Principal, float, float]] = OrderedDict()

    # -- authentication ----------------------------------------------------------------

    def authenticate(
        self, metadata: Sequence[tuple[str, str | bytes]] | None, peer: str = ""
    ) -> Principal:
        """The caller behind `metadata`, or Unauthenticated."""
        headers: dict[str, str | bytes] = {}
        repeated: set[str] = set()
        for key, value in metadata or ():
            if key in (AUTHORIZATION, API_KEY_HEADER):
                if key in headers:
                    repeated.add(key)
                headers.setdefault(key, value)
        return self.authenticate_headers(headers, frozenset(repeated), peer)

    def authenticate_headers(
        self, headers: Mapping[str, str | bytes], repeated: frozenset[str], peer: str = ""
    ) -> Principal:
        """As `authenticate`, from metadata already read into a dict (`repeated`: the
        keys that appeared more than once)."""
        if AUTHORIZATION in repeated:
            raise _unauthenticated(
                Cause.AMBIGUOUS_CREDENTIALS, "more than one authorization header"
            )
        if API_KEY_HEADER in repeated:
            raise _unauthenticated(Cause.AMBIGUOUS_CREDENTIALS, "more than one x-api-key header")
        raw_authorization = headers.get(AUTHORIZATION)
        raw_api_key = headers.get(API_KEY_HEADER)
        if raw_authorization is not None:
            authorization = raw_authorization if isinstance(raw_authorization, str) else ""
            scheme, _, credential = authorization.strip().partition(" ")
            scheme = scheme.lower()
            if scheme == "bearer":
                return self._from_token(credential.strip())
            if scheme == "apikey":
                return self._from_api_key(credential.strip(), peer)
            raise _unauthenticated(
                Cause.UNSUPPORTED_SCHEME, "authorization must be 'Bearer <token>' or 'ApiKey <key>'"
            )
        if raw_api_key is not None:
            api_key = raw_api_key if isinstance(raw_api_key, str) else ""
            return self._from_api_key(api_key.strip(), peer)
        raise _unauthenticated(
            Cause.MISSING_CREDENTIALS,
            "credentials required: authorization: Bearer <token>, or x-api-key",
        )

    def _from_api_key(self, raw: str, peer: str) -> Principal:
        if not raw or len(raw) > MAX_API_KEY_LEN:
            raise _unauthenticated(Cause.UNKNOWN_API_KEY, "invalid API key")
        scopes = self._api_keys.get(hash_api_key(raw))
        if scopes is None:
            raise _unauthenticated(Cause.UNKNOWN_API_KEY, "invalid API key")
        return Principal(caller_key({API_KEY_HEADER: raw}, peer), scopes, "api_key")

    def _from_token(self, token: str) -> Principal:
        if not self._keys:
            raise _unauthenticated(
                Cause.UNSUPPORTED_SCHEME, "bearer tokens are not accepted here; use an API key"
            )
        if not token or len(token) > MAX_TOKEN_LEN:
            raise _unauthenticated(Cause.MALFORMED_TOKEN, "malformed token")
        now = self._clock()
        cached = self._cache.get(token)
        if cached is not None:
            principal, valid_from, valid_until = cached
            if valid_from <= now < valid_until:
                self._cache.move_to_end(token)
                return principal
            del self._cache[token]
        principal, valid_from, valid_until = self._verify(token)
        # PyJWT checked exp/nbf against its own clock; the same bounds (the same parse of
        # the same claims) are enforced here on this authenticator's clock, so a fresh
        # token and a cached one expire at one instant.
        if now >= valid_until:
            raise _unauthenticated(Cause.TOKEN_EXPIRED, "token expired")
        if now < valid_from:
            raise _unauthenticated(Cause.TOKEN_NOT_YET_VALID, "token not yet valid")
        self._cache[token] = (principal, valid_from, valid_until)
        if len(self._cache) > TOKEN_CACHE_SIZE:
            self._cache.popitem(last=False)
        return principal

    def _verify(self, token: str) -> tuple[Principal, float, float]:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise _unauthenticated(Cause.MALFORMED_TOKEN, "malformed token") from None
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self.algorithms:
            # "none" is never in the allowlist, so unsigned tokens end here.
            raise _unauthenticated(Cause.ALGORITHM_NOT_ALLOWED, "token algorithm not allowed")
        kid = header.get("kid")
        candidates = [
            k
            for k in self._keys
            if alg in k.algorithms and (k.kid is None or kid is None or k.kid == kid)
        ]
        if not candidates:
            raise _unauthenticated(Cause.UNKNOWN_KEY, "no key for this token")
        claims: dict[str, Any] | None = None
        for key in candidates:
            try:
                claims = self._jwt.decode(
                    token,
                    key.key,
                    algorithms=sorted(key.algorithms),
                    audience=self._audience,
                    issuer=self._settings.issuer,
                    leeway=self._settings.leeway_s,
                    options={"require": self._required},
                )
                break
            except jwt.InvalidSignatureError:
                continue  # maybe the next key (key rotation without kid)
            except jwt.PyJWTError as exc:
                raise _claims_error(exc) from None
        if claims is None:
            raise _unauthenticated(Cause.BAD_SIGNATURE, "token signature does not verify")
        subject = claims.get("sub")
        usable = (
            isinstance(subject, str)
            and 0 < len(subject) <= MAX_SUBJECT_LEN
            and subject.isprintable()
        )
        if not usable:
            raise _unauthenticated(Cause.INVALID_CLAIMS, "token subject is not usable")
        leeway = self._settings.leeway_s
        valid_from = _time_claim(claims, "nbf", -math.inf) - leeway
        valid_until = _time_claim(claims, "exp", math.inf) + leeway
        return (
            Principal(
                caller_key({}, "", subject=subject),
                _scopes(claims),
                "jwt",
                tenant_from_claims(claims, self._tenant_claim) or "",
            ),
            valid_from,
            valid_until,
        )

    # -- authorization -----------------------------------------------------------------

    def required_scopes(self, method: str) -> frozenset[str]:
        """The scopes `method` needs: its `method_scopes`, and for every method of the
        admin service, `admin_scopes` too."""
        scopes = self._method_scopes.get(method, frozenset())
        if method.startswith(_ADMIN_PREFIX):
            scopes |= self._admin_scopes
        return scopes

    def authorize(self, principal: Principal, method: str) -> None:
        """PermissionDenied unless `principal` has every scope `method` requires."""
        missing = self.required_scopes(method) - principal.scopes
        if missing:
            scope = min(missing)
            raise PermissionDenied(
                f"this call needs the scope {scope!r}",
                metadata={"cause": Cause.MISSING_SCOPE.value, "scope": scope},
            )


def _time_claim(claims: Mapping[str, Any], name: str, default: float) -> float:
    """A time claim (exp, nbf) read exactly as PyJWT read it when it checked it:
    `int(value)` (so "1700000000" and 1.7e9 count, as they did for PyJWT), a time past
    what a float holds being never/always, `default` when absent. PyJWT refused the
    token if `int()` failed, so it cannot fail here."""
    if name not in claims:
        return default
    value = int(claims[name])
    try:
        return float(value)
    except OverflowError:
        return math.inf if value > 0 else -math.inf


def _scopes(claims: Mapping[str, Any]) -> frozenset[str]:
    """OAuth 2 `scope` (space-separated, RFC 8693) and/or `scp` (a list, or a string)."""
    out: set[str] = set()
    for name in ("scope", "scp"):
        value = claims.get(name)
        if isinstance(value, str):
            out.update(value.split())
        elif isinstance(value, list):
            out.update(v for v in value if isinstance(v, str))
    return frozenset(out)


def _claims_error(exc: Exception) -> Unauthenticated:
    """A PyJWT failure (other than a bad signature) as the caller's error."""
    if isinstance(exc, jwt.ExpiredSignatureError):
        return _unauthenticated(Cause.TOKEN_EXPIRED, "token expired")
    if isinstance(exc, jwt.ImmatureSignatureError):
        return _unauthenticated(Cause.TOKEN_NOT_YET_VALID, "token not yet valid")
    if isinstance(exc, jwt.InvalidAudienceError):
        return _unauthenticated(Cause.WRONG_AUDIENCE, "token audience not accepted")
    if isinstance(exc, jwt.InvalidIssuerError):
        return _unauthenticated(Cause.WRONG_ISSUER, "token issuer not accepted")
    if isinstance(exc, jwt.MissingRequiredClaimError):
        return _unauthenticated(
            Cause.MISSING_CLAIM, "token lacks a required claim", claim=str(exc.claim)
        )
    if isinstance(exc, jwt.InvalidAlgorithmError):
        return _unauthenticated(Cause.ALGORITHM_NOT_ALLOWED, "token algorithm not allowed")
    if isinstance(exc, jwt.InvalidKeyError):
        return _unauthenticated(Cause.INVALID_KEY, "token cannot be verified")
    if isinstance(exc, jwt.DecodeError):
        return _unauthenticated(Cause.MALFORMED_TOKEN, "malformed token")
    return _unauthenticated(Cause.INVALID_CLAIMS, "token claims not accepted")


def bearer_as_api_key(authorization: str) -> str | None:
    """`authorization: Bearer <key>` as OpenAI's SDKs send an API key, in the form this
    stage reads an API key from (`ApiKey <key>`); None when it stays as it is.

    Only the OpenAI API's front (server/request/openai_front.py) applies it, to its own
    calls: there an aiproxy API key works as a Bearer key. A JWT still goes through as
    one: a credential in JWS compact form (three dot-separated parts) is left alone.
    """
    scheme, _, credential = authorization.strip().partition(" ")
    credential = credential.strip()
    if scheme.lower() != "bearer" or not credential or credential.count(".") == 2:
        return None
    return f"ApiKey {credential}"


def is_open_method(method: str) -> bool:
    return method.startswith(OPEN_METHOD_PREFIXES)


class _Bound:
    __slots__ = ("_auth", "_path", "_scopes")
    exit = None

    def __init__(self, auth: Authenticator, path: str) -> None:
        self._auth, self._path = auth, path
        self._scopes = auth.required_scopes(path)

    async def enter(self, call: CallInfo, request: Any, context: Context) -> None:
        auth = self._auth
        try:
            principal = auth.authenticate_headers(call.metadata, call.repeated, call.peer)
            # Verified: both the limits key and the breaker's unforgeable identity.
            call.caller = call.identity = principal.caller
            call.tenant = principal.tenant
            if self._scopes:
                auth.authorize(principal, self._path)
        except (Unauthenticated, PermissionDenied) as err:
            log_event(
                log,
                "auth_rejected",
                method=self._path,
                request_id=call.request_id,
                caller=call.caller,
                code=err.code.name,
                cause=err.metadata.get("cause", ""),
            )
            raise


class AuthStage:
    """Stage: authenticates every API call; see the module docstring."""

    def __init__(
        self, settings: AuthSettings, *, clock: Clock = time.time, tenant_claim: str | None = None
    ) -> None:
        self.authenticator = Authenticator(settings, clock=clock, tenant_claim=tenant_claim)

    def guard(self, path: str, behavior: Callable[..., Any], streaming: bool) -> Callable[..., Any]:
        """`behavior` (a unary or server-streaming method of a service beside the
        pipeline, e.g. admin) behind the same credentials and scopes; built once per
        method. Refusals are raised as ProxyErrors for the caller's error shaping."""
        auth = self.authenticator
        scopes = auth.required_scopes(path)

        def check(context: Any) -> None:
            principal = auth.authenticate(context.invocation_metadata(), context.peer())
            if scopes:
                auth.authorize(principal, path)

        if streaming:

            async def guarded_stream(request: Any, context: Any) -> Any:
                check(context)
                result = behavior(request, context)
                if hasattr(result, "__aiter__"):
                    async for item in result:
                        yield item
                else:
                    await result

            return guarded_stream

        async def guarded_unary(request: Any, context: Any) -> Any:
            check(context)
            return await behavior(request, context)

        return guarded_unary

    def bind(self, method: Method) -> _Bound | None:
        if is_open_method(method.path):
            return None
        return _Bound(self.authenticator, method.path)
