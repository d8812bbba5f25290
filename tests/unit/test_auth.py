"""The authenticator's logic: JWT (HS256, RS256 from PEM, ES256/RS256 from JWKS), API keys,
scopes, the verified-token cache, and the auth configuration's validation.

Keys are generated per test session; tokens are minted with PyJWT against the real clock
(PyJWT checks exp/nbf against it), the cache's clock is injected.
"""

from __future__ import annotations

import json
import time
from typing import Any

import jwt
import pytest

from aiproxy.core.callinfo import CallInfo, metadata_dict
from aiproxy.core.errors import PermissionDenied, Reason, Unauthenticated
from aiproxy.core.ratelimit import caller_key, hash_api_key
from aiproxy.core.service import agent_service
from aiproxy.core.settings import AuthSettings, ConfigError, load_settings
from aiproxy.interceptors.auth import Authenticator, AuthStage, Cause, Principal, is_open_method
from aiproxy.server.chain import pipeline_stages
from tests.support.certs import SigningKeys, make_signing_keys
from tests.support.clock import FakeClock

SECRET = "s3cret-for-tests-only-0123456789abcdef"  # 38 bytes
OTHER_SECRET = "another-secret-that-is-long-enough-000"
API_KEY = "ak_test_4f1c2e9b7d"
PEER = "ipv4:127.0.0.1:5555"
EXECUTE = "/ai.agent.v1.AgentService/ExecuteAgent"
GENERATE = "/ai.agent.v1.AgentService/Generate"


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> SigningKeys:
    return make_signing_keys(tmp_path_factory.mktemp("jwt-keys"))


def claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    out: dict[str, Any] = {"sub": "alice", "iat": now, "nbf": now, "exp": now + 600}
    out.update(overrides)
    return {k: v for k, v in out.items() if v is not None}


def hs(
    secret: str = SECRET,
    alg: str = "HS256",
    headers: dict[str, Any] | None = None,
    **overrides: Any,
) -> str:
    return jwt.encode(claims(**overrides), secret, algorithm=alg, headers=headers)


def bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


def settings(**kwargs: Any) -> AuthSettings:
    base: dict[str, Any] = {"jwt_secret": SECRET}
    base.update(kwargs)
    return AuthSettings.model_validate(base)


def cause_of(
    exc: pytest.ExceptionInfo[Unauthenticated] | pytest.ExceptionInfo[PermissionDenied],
) -> str:
    return exc.value.metadata["cause"]


def unsigned(payload: dict[str, Any]) -> str:
    """An `alg: none` token, built by hand (PyJWT refuses to verify one, as it should)."""
    import base64

    def b64(obj: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

    return f"{b64({'alg': 'none', 'typ': 'JWT'})}.{b64(payload)}."


# -- valid credentials: the identity is the rate-limit key --------------------------------


def test_valid_hs256_token_gives_the_subject_as_the_rate_limit_key() -> None:
    auth = Authenticator(settings())
    principal = auth.authenticate(bearer(hs(scope="agent:execute read")), PEER)
    assert principal == Principal("sub:alice", frozenset({"agent:execute", "read"}), "jwt")
    # What the limiter computes for the same caller (core/ratelimit.py).
    assert principal.caller == caller_key({}, PEER, subject="alice")


@pytest.mark.parametrize(
    "metadata",
    [
        [("x-api-key", API_KEY)],
        [("authorization", f"ApiKey {API_KEY}")],
        [("authorization", f"apikey  {API_KEY} ")],
    ],
    ids=["x-api-key", "authorization-ApiKey", "scheme-case-insensitive"],
)
def test_api_key_identity_matches_the_limiter_key(metadata: list[tuple[str, str]]) -> None:
    auth = Authenticator(
        settings(api_keys=[{"name": "ci", "key_hash": hash_api_key(API_KEY), "scopes": ["x"]}])
    )
    principal = auth.authenticate(metadata, PEER)
    assert (
        principal.caller
        == caller_key({"x-api-key": API_KEY}, PEER)
        == f"key:{hash_api_key(API_KEY)}"
    )
    assert principal.scopes == {"x"} and principal.kind == "api_key"


def test_api_keys_alone_refuse_bearer_tokens() -> None:
    auth = Authenticator(AuthSettings(api_keys=[{"name": "ci", "key_hash": hash_api_key(API_KEY)}]))
    with pytest.raises(Unauthenticated) as exc:
        auth.authenticate(bearer(hs()), PEER)
    assert cause_of(exc) == Cause.UNSUPPORTED_SCHEME


def test_small_clock_skew_is_allowed() -> None:
    now = int(time.time())
    auth = Authenticator(settings(leeway_s=30))
    assert auth.authenticate(bearer(hs(exp=now - 10)), PEER).caller == "sub:alice"
    assert auth.authenticate(bearer(hs(nbf=now + 10, sub="bob")), PEER).caller == "sub:bob"


# -- rejected credentials: UNAUTHENTICATED with the cause ---------------------------------

REJECTED = {
    "expired": (lambda: hs(exp=int(time.time()) - 120), Cause.TOKEN_EXPIRED),
    "not-yet-valid": (lambda: hs(nbf=int(time.time()) + 120), Cause.TOKEN_NOT_YET_VALID),
    "wrong-signature": (lambda: hs(secret=OTHER_SECRET), Cause.BAD_SIGNATURE),
    "tampered-payload": (
        lambda: ".".join([hs().split(".")[0], hs(sub="mallory").split(".")[1], hs().split(".")[2]]),
        Cause.BAD_SIGNATURE,
    ),
    "alg-none": (lambda: unsigned(claims()), Cause.ALGORITHM_NOT_ALLOWED),
    "alg-not-allowlisted": (
        lambda: hs(alg="HS512", secret=SECRET * 2),
        Cause.ALGORITHM_NOT_ALLOWED,
    ),
    "malformed-garbage": (lambda: "not-a-token", Cause.MALFORMED_TOKEN),
    "malformed-segments": (lambda: "a.b.c", Cause.MALFORMED_TOKEN),
    "malformed-too-long": (lambda: "a" * 10_000, Cause.MALFORMED_TOKEN),
    "aud-when-none-configured": (lambda: hs(aud="someone-else"), Cause.WRONG_AUDIENCE),
    "missing-sub": (lambda: hs(sub=None), Cause.MISSING_CLAIM),
    "missing-exp": (lambda: hs(exp=None), Cause.MISSING_CLAIM),
    "empty-subject": (lambda: hs(sub=""), Cause.INVALID_CLAIMS),
    "subject-not-a-string": (lambda: hs(sub=42), Cause.INVALID_CLAIMS),
    "subject-not-printable": (lambda: hs(sub="a\nb"), Cause.INVALID_CLAIMS),
    "iat-in-the-future": (lambda: hs(iat=int(time.time()) + 3600), Cause.TOKEN_NOT_YET_VALID),
}


@pytest.mark.parametrize("make_token,cause", REJECTED.values(), ids=REJECTED.keys())
def test_bad_tokens_are_unauthenticated_with_their_cause(make_token: Any, cause: Cause) -> None:
    auth = Authenticator(settings())
    with pytest.raises(Unauthenticated) as exc:
        auth.authenticate(bearer(make_token()), PEER)
    assert cause_of(exc) == cause
    assert exc.value.reason is Reason.UNAUTHENTICATED
    assert exc.value.code.name == "UNAUTHENTICATED"


def test_audience_and_issuer_are_checked_when_configured() -> None:
    auth = Authenticator(settings(audience=["aiproxy"], issuer="https://idp.test"))
    assert (
        auth.authenticate(bearer(hs(aud="aiproxy", iss="https://idp.test")), PEER).caller
        == "sub:alice"
    )
    assert auth.authenticate(bearer(hs(aud=["other", "aiproxy"], iss="https://idp.test")), PEER)
    for token, cause in [
        (hs(aud="other", iss="https://idp.test"), Cause.WRONG_AUDIENCE),
        (hs(iss="https://idp.test"), Cause.MISSING_CLAIM),
        (hs(aud="aiproxy", iss="https://evil.test"), Cause.WRONG_ISSUER),
        (hs(aud="aiproxy"), Cause.MISSING_CLAIM),
    ]:
        with pytest.raises(Unauthenticated) as exc:
            auth.authenticate(bearer(token), PEER)
        assert cause_of(exc) == cause


@pytest.mark.parametrize(
    "metadata,cause",
    [
        ([], Cause.MISSING_CREDENTIALS),
        ([("x-other", "1")], Cause.MISSING_CREDENTIALS),
        ([("authorization", "Basic YWxpY2U6cHc=")], Cause.UNSUPPORTED_SCHEME),
        ([("authorization", "Bearer")], Cause.MALFORMED_TOKEN),
        (
            [("authorization", "Bearer a"), ("authorization", "Bearer b")],
            Cause.AMBIGUOUS_CREDENTIALS,
        ),
        ([("x-api-key", "nope")], Cause.UNKNOWN_API_KEY),
        ([("authorization", "ApiKey ")], Cause.UNKNOWN_API_KEY),
    ],
    ids=["none", "unrelated", "basic", "empty-bearer", "two-headers", "unknown-key", "empty-key"],
)
def test_credential_header_problems(metadata: list[tuple[str, str]], cause: Cause) -> None:
    auth = Authenticator(settings(api_keys=[{"name": "ci", "key_hash": hash_api_key(API_KEY)}]))
    with pytest.raises(Unauthenticated) as exc:
        auth.authenticate(metadata, PEER)
    assert cause_of(exc) == cause


def test_error_messages_never_carry_the_credential() -> None:
    auth = Authenticator(settings())
    token = hs(secret=OTHER_SECRET)
    with pytest.raises(Unauthenticated) as exc:
        auth.authenticate(bearer(token), PEER)
    text = repr(exc.value) + str(exc.value.metadata)
    assert token not in text and token.split(".")[2] not in text


# -- asymmetric keys ----------------------------------------------------------------------


def test_rs256_with_a_pem_public_key(keys: SigningKeys) -> None:
    auth = Authenticator(AuthSettings(jwt_public_key_file=str(keys.rsa_public_pem)))
    token = jwt.encode(claims(sub="svc-a"), keys.rsa_private, algorithm="RS256")
    assert auth.authenticate(bearer(token), PEER).caller == "sub:svc-a"
    forged = jwt.encode(claims(), keys.other_ec_private, algorithm="ES256")
    with pytest.raises(Unauthenticated) as exc:
        auth.authenticate(bearer(forged), PEER)
    assert cause_of(exc) == Cause.ALGORITHM_NOT_ALLOWED  # an RSA key verifies no ES256


def test_hs256_signed_with_the_public_key_is_refused(keys: SigningKeys) -> None:
    """The classic algorithm-confusion attack: HS256 keyed with the (public) PEM text."""
    auth = Authenticator(AuthSettings(jwt_public_key_file=str(keys.rsa_public_pem)))
    pem = keys.rsa_public_pem.read_bytes()
    import base64
    import hashlib
    import hmac

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    signing_input = f"{b64(json.dumps({'alg': 'HS256', 'typ': 'JWT'}).encode())}.{b64(json.dumps(claims()).encode())}"
    signature = hmac.new(pem, signing_input.encode(), hashlib.sha256).digest()
    with pytest.raises(Unauthenticated) as exc:
        auth.authenticate(bearer(f"{signing_input}.{b64(signature)}"), PEER)
    assert cause_of(exc) == Cause.ALGORITHM_NOT_ALLOWED


def test_jwks_keys_are_chosen_by_kid(keys: SigningKeys) -> None:
    auth = Authenticator(AuthSettings(jwks_file=str(keys.jwks)))
    es = jwt.encode(
        claims(sub="ec-user"), keys.ec_private, algorithm="ES256", headers={"kid": "ec-1"}
    )
    rs = jwt.encode(
        claims(sub="rsa-user"), keys.rsa_private, algorithm="RS256", headers={"kid": "rsa-1"}
    )
    assert auth.authenticate(bearer(es), PEER).caller == "sub:ec-user"
    assert auth.authenticate(bearer(rs), PEER).caller == "sub:rsa-user"
    unknown = jwt.encode(claims(), keys.ec_private, algorithm="ES256", headers={"kid": "ec-9"})
    wrong_key = jwt.encode(
        claims(), keys.other_ec_private, algorithm="ES256", headers={"kid": "ec-1"}
    )
    for token, cause in [(unknown, Cause.UNKNOWN_KEY), (wrong_key, Cause.BAD_SIGNATURE)]:
        with pytest.raises(Unauthenticated) as exc:
            auth.authenticate(bearer(token), PEER)
        assert cause_of(exc) == cause


def test_jwks_file_without_usable_keys_fails_at_start(tmp_path: Any) -> None:
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}))
    with pytest.raises(ValueError, match="no usable signing keys"):
        Authenticator(AuthSettings(jwks_file=str(path)))


# -- scopes -------------------------------------------------------------------------------


def test_method_scopes_need_every_scope() -> None:
    auth = Authenticator(settings(method_scopes={"ExecuteAgent": ["agent:execute"]}))
    reader = auth.authenticate(bearer(hs(scope="read")), PEER)
    with pytest.raises(PermissionDenied) as exc:
        auth.authorize(reader, EXECUTE)
    assert exc.value.metadata == {"cause": "missing_scope", "scope": "agent:execute"}
    assert exc.value.reason is Reason.PERMISSION_DENIED
    auth.authorize(reader, GENERATE)  # no scope configured: any authenticated caller
    auth.authorize(auth.authenticate(bearer(hs(scope="read agent:execute")), PEER), EXECUTE)
    auth.authorize(auth.authenticate(bearer(hs(scp=["agent:execute"], sub="bob")), PEER), EXECUTE)


# -- the verified-token cache -------------------------------------------------------------


def test_verified_tokens_are_cached_until_they_expire(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeClock(time.time())
    auth = Authenticator(settings(leeway_s=5), clock=clock)
    verified: list[str] = []
    real_verify = auth._verify

    def counting(token: str) -> Any:
        verified.append(token)
        return real_verify(token)

    monkeypatch.setattr(auth, "_verify", counting)
    token = hs(exp=int(clock.now) + 60)
    for _ in range(3):
        assert auth.authenticate(bearer(token), PEER).caller == "sub:alice"
    assert len(verified) == 1
    clock.now += 66  # past exp + leeway on the authenticator's clock: verified again, refused
    with pytest.raises(Unauthenticated) as expired:
        auth.authenticate(bearer(token), PEER)
    assert cause_of(expired) == Cause.TOKEN_EXPIRED
    assert len(verified) == 2


@pytest.mark.parametrize("exp", [10**400, 2**64, 1e308], ids=["10**400", "2**64", "1e308"])
def test_an_expiry_past_what_a_float_holds_is_valid_not_a_crash(exp: Any) -> None:
    """Issue 20 §4: `exp: 10**400` (validly signed) got HTTP 500 (OverflowError)."""
    auth = Authenticator(settings())
    assert auth.authenticate(bearer(hs(exp=exp)), PEER).caller == "sub:alice"
    assert auth.authenticate(bearer(hs(exp=exp)), PEER).caller == "sub:alice"  # cached


@pytest.mark.parametrize("as_text", [str, lambda n: f"{n}.0", float])
def test_an_expiry_pyjwt_accepted_is_the_one_enforced_once_cached(as_text: Any) -> None:
    """Issue 20 §4: a string `exp` passed PyJWT (it reads int(exp)) but was ignored by the
    cache's own parse, so the token stayed valid forever once cached."""
    clock = FakeClock(time.time())
    auth = Authenticator(settings(leeway_s=5), clock=clock)
    exp = int(clock.now) + 60
    try:
        token = hs(exp=as_text(exp))
        auth.authenticate(bearer(token), PEER)
    except Unauthenticated:
        return  # PyJWT refused this form: nothing to cache
    clock.now += 66
    with pytest.raises(Unauthenticated) as expired:
        auth.authenticate(bearer(token), PEER)
    assert cause_of(expired) == Cause.TOKEN_EXPIRED
    clock.now -= 66 + 120  # and before its string nbf
    with pytest.raises(Unauthenticated) as early:
        auth.authenticate(bearer(hs(nbf=str(int(clock.now) + 120 + 60))), PEER)
    assert cause_of(early) == Cause.TOKEN_NOT_YET_VALID


# -- wiring and configuration -------------------------------------------------------------


def test_open_methods() -> None:
    assert is_open_method("/grpc.health.v1.Health/Check")
    assert is_open_method("/grpc.health.v1.Health/Watch")
    assert is_open_method("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo")
    assert not is_open_method(GENERATE)
    assert not is_open_method("/ai.proxy.v1.ProxyAdminService/ListUpstreams")


def test_auth_is_off_by_default_and_the_secret_env_turns_it_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert not any(isinstance(i, AuthStage) for i in pipeline_stages(load_settings()))
    monkeypatch.setenv("AIPROXY_AUTH__JWT_SECRET", SECRET)
    loaded = load_settings()
    assert loaded.auth.active
    chain = pipeline_stages(loaded)
    assert isinstance(chain[1], AuthStage)  # right after the request id
    monkeypatch.setenv("AIPROXY_AUTH__ENABLED", "false")
    assert not load_settings().auth.active


@pytest.mark.parametrize(
    "env,message",
    [
        ({"AIPROXY_AUTH__JWT_SECRET": "short-secret"}, "at least 32 bytes"),
        (
            {"AIPROXY_AUTH__JWT_SECRET": SECRET, "AIPROXY_AUTH__ALGORITHMS": '["none"]'},
            "never 'none'",
        ),
        (
            {"AIPROXY_AUTH__JWT_SECRET": SECRET, "AIPROXY_AUTH__ALGORITHMS": '["HS512"]'},
            "at least 64 bytes",
        ),
        (
            {"AIPROXY_AUTH__JWT_SECRET": SECRET, "AIPROXY_AUTH__ALGORITHMS": '["RS256"]'},
            "need jwt_public_key_file",
        ),
        ({"AIPROXY_AUTH__ENABLED": "true"}, "no jwt_secret"),
        (
            {"AIPROXY_AUTH__JWT_SECRET": SECRET, "AIPROXY_AUTH__METHOD_SCOPES": '{"Nope": ["x"]}'},
            "no method 'Nope'",
        ),
        ({"AIPROXY_AUTH__JWKS_FILE": "/nonexistent/jwks.json"}, "file not found"),
    ],
)
def test_bad_auth_configuration_is_refused(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], message: str
) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ConfigError) as exc:
        load_settings()
    assert message in str(exc.value)
    assert "short-secret" not in str(exc.value)  # secrets are never echoed


def test_demo_hint_only_when_auth_is_on(monkeypatch: pytest.MonkeyPatch) -> None:
    from aiproxy.server.process.devtoken import demo_hint

    monkeypatch.delenv("AIPROXY_AUTH__JWT_SECRET", raising=False)
    assert demo_hint() == ""
    monkeypatch.setenv("AIPROXY_AUTH__JWT_SECRET", SECRET)
    assert "aiproxy token --sub" in demo_hint()


def test_check_config_never_prints_the_secret(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    from aiproxy.server.cli import main

    config = tmp_path / "aiproxy.yaml"
    config.write_text(f"auth:\n  jwt_secret: {SECRET}\n  audience: [aiproxy]\n")
    assert main(["check-config", str(config)]) == 0
    out = capsys.readouterr().out
    assert SECRET not in out and "jwt_secret: '**********'" in out


def test_the_tenant_claim_names_the_callers_tenant() -> None:
    auth = Authenticator(settings(), tenant_claim="tenant")
    assert auth.authenticate(bearer(hs(tenant="acme"))).tenant == "acme"
    assert auth.authenticate(bearer(hs(sub="bob", tenant=42))).tenant == "42"
    # Absent, not a string, too long or unprintable: no tenant (limited as itself).
    for value in (None, ["acme"], {"a": 1}, True, "x" * 200, "a\nb", ""):
        assert auth.authenticate(bearer(hs(sub="carol", tenant=value))).tenant == ""
    # Without limits.tenant_claim the claim means nothing.
    assert Authenticator(settings()).authenticate(bearer(hs(tenant="acme"))).tenant == ""


async def test_the_auth_stage_puts_the_tenant_in_callinfo() -> None:
    method = agent_service().by_name["Generate"]
    keys = [{"name": "ci", "key_hash": hash_api_key(API_KEY)}]
    stage = AuthStage(settings(api_keys=keys), tenant_claim="tenant")
    bound = stage.bind(method)
    assert bound is not None
    headers, repeated = metadata_dict(bearer(hs(sub="alice", tenant="acme")))
    call = CallInfo(method.path, metadata=headers, repeated=repeated, peer=PEER)
    await bound.enter(call, None, None)
    assert (call.caller, call.tenant) == ("sub:alice", "acme")
    # An API key caller has no tenant claim; its name applies through the limit policy.
    headers, repeated = metadata_dict([("x-api-key", API_KEY)])
    keyed = CallInfo(method.path, metadata=headers, repeated=repeated, peer=PEER)
    await bound.enter(keyed, None, None)
    assert keyed.tenant == "" and keyed.caller == f"key:{hash_api_key(API_KEY)}"


def test_the_pipeline_passes_the_tenant_claim_to_auth() -> None:
    stages = pipeline_stages(
        load_settings(auth={"jwt_secret": SECRET}, limits={"tenant_claim": "team"})
    )
    auth = next(s for s in stages if isinstance(s, AuthStage))
    assert auth.authenticator.authenticate(bearer(hs(team="blue"))).tenant == "blue"


def test_the_admin_service_needs_its_own_scope_configurable() -> None:
    """Issue 20 §4: authenticated with no scope was enough for ProxyAdminService."""
    path = "/ai.proxy.v1.ProxyAdminService/ListEndpoints"
    plain = Principal("sub:alice", frozenset({"agent:execute"}), "jwt")
    admin = Principal("sub:root", frozenset({"aiproxy.admin"}), "jwt")
    auth = Authenticator(settings())
    assert auth.required_scopes(path) == {"aiproxy.admin"}
    assert auth.required_scopes(GENERATE) == frozenset()
    with pytest.raises(PermissionDenied) as denied:
        auth.authorize(plain, path)
    assert denied.value.metadata["scope"] == "aiproxy.admin"
    auth.authorize(admin, path)
    ops = Authenticator(settings(admin_scopes=["ops", "read"]))
    with pytest.raises(PermissionDenied):
        ops.authorize(admin, path)
    ops.authorize(Principal("sub:o", frozenset({"ops", "read"}), "jwt"), path)
    Authenticator(settings(admin_scopes=[])).authorize(plain, path)  # the operator's choice
