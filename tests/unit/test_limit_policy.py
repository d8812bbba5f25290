"""core/limitpolicy.py: which limits a caller gets, from its key, API key name and tenant."""

from __future__ import annotations

import pytest

from aiproxy.core.limitpolicy import LimitPolicy, tenant_from_claims
from aiproxy.core.limitstore import TokenLimits
from aiproxy.core.ratelimit import LimitSpec
from aiproxy.core.settings import load_settings

HASH = "a" * 32


def policy(**limits: object) -> LimitPolicy:
    settings = load_settings(
        auth={"api_keys": [{"name": "ci", "key_hash": HASH}]},
        limits={
            "rate_per_s": 10,
            "burst": 20,
            "max_streams_per_caller": 4,
            "tokens_per_minute": 1000,
            "tokens_per_day": 10_000,
            "tenant_claim": "tenant",
            **limits,
        },
    )
    return LimitPolicy.from_settings(settings)


def test_defaults_apply_to_a_caller_without_override_or_tenant() -> None:
    got = policy().for_caller("sub:alice")
    assert got.spec == LimitSpec(10, 20) and got.stream_limit == 4
    assert got.token_limits == TokenLimits(1000, 10_000) and got.budget_key is None


def test_tokens_off_means_no_reservation() -> None:
    got = policy(tokens_per_minute=0, tokens_per_day=None).for_caller("sub:alice")
    assert got.token_limits is None


def test_the_most_specific_override_wins() -> None:
    p = policy(
        overrides={
            "sub:batch": {"rate_per_s": 50, "burst": 100, "max_streams": 40},
            "apikey:ci": {"rate_per_s": 2, "tokens_per_minute": 0},
            "tenant:acme": {"rate_per_s": 30, "tokens_per_day": 1_000_000},
        }
    )
    # Own key beats tenant; rate and streams from the own override, tokens inherited.
    own = p.for_caller("sub:batch", "acme")
    assert own.spec == LimitSpec(50, 100) and own.stream_limit == 40
    # ... but the daily budget is the tenant's, shared under the tenant's key and size.
    assert own.budget_key == "tenant:acme"
    assert own.token_limits == TokenLimits(1000, 1_000_000)
    # An API key caller is matched by its configured name; 0 tokens per minute: off.
    ci = p.for_caller(f"key:{HASH}")
    assert ci.spec == LimitSpec(2, 20) and ci.token_limits == TokenLimits(None, 10_000)
    assert p.for_caller("key:" + "b" * 32).spec == LimitSpec(10, 20)  # unknown key: default
    # A caller with only a tenant gets the tenant's override.
    member = p.for_caller("sub:svc-1", "acme")
    assert member.spec == LimitSpec(30, 20) and member.budget_key == "tenant:acme"
    assert p.for_caller("sub:svc-2", "acme") == member  # resolved once, shared


def test_a_tenant_without_override_shares_the_default_daily_budget() -> None:
    got = policy().for_caller("sub:svc", "globex")
    assert got.spec == LimitSpec(10, 20)
    assert got.budget_key == "tenant:globex" and got.token_limits == TokenLimits(1000, 10_000)


def test_tenants_are_ignored_unless_a_claim_is_configured() -> None:
    got = policy(tenant_claim=None).for_caller("sub:svc", "acme")
    assert got.budget_key is None


@pytest.mark.parametrize(
    ("claims", "expected"),
    [
        ({"tenant": "acme"}, "acme"),
        ({"tenant": 42}, "42"),
        ({"tenant": True}, None),
        ({"tenant": ["a", "b"]}, None),
        ({"tenant": ""}, None),
        ({"tenant": "x" * 129}, None),
        ({"tenant": "bad\nvalue"}, None),
        ({}, None),
    ],
)
def test_tenant_claims_are_plain_bounded_strings(claims: dict, expected: str | None) -> None:
    assert tenant_from_claims(claims, "tenant") == expected
    assert tenant_from_claims(claims, None) is None
