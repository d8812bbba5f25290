"""Which limits apply to a call: the caller's key and tenant -> what to ask the LimitStore.

The store holds no policy (core/limitstore.py): the limits stage resolves, per call, the
request bucket's shape, the stream cap, the token quotas and whose daily budget pays,
and passes them to `store.admit(...)`. This is that resolution, pure and precomputed
(a few dict lookups per call), so the stage and its tests share one definition:

- overrides are looked up most specific first: the caller's own key (`sub:`, `key:`,
  `peer:`; and `client:<id>` / an unverified `key:` for the sub-bucket of an id the caller
  declared, which can only narrow: interceptors/limits.py), then `apikey:<name>` (an API
  key caller, by its configured name),
  then `tenant:<value>` (the value of `limits.tenant_claim` in the caller's JWT);
- rate, burst, stream cap and tokens per minute stay per caller (the key passed to the
  store), shaped by the override found;
- the daily token budget is the tenant's when the call has one (`budget_key` =
  `tenant:<value>`, sized by the tenant's override or the default), so a team's
  services share one budget; otherwise the caller's own.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from aiproxy.core.limitstore import TokenLimits
from aiproxy.core.ratelimit import LimitSpec
from aiproxy.core.settings import LimitSettings, RateLimitOverride, Settings

# A tenant claim's value becomes part of a key (and of a Redis key): bounded and plain.
MAX_TENANT_CHARS: Final = 128
_MAX_CACHED: Final = 10_000


@dataclass(frozen=True, slots=True)
class CallerLimits:
    """What to pass to `store.admit` for one caller (one object per distinct override)."""

    spec: LimitSpec
    stream_limit: int
    token_limits: TokenLimits | None  # None: no token quota applies
    budget_key: str | None  # None: the caller's own key


def tenant_from_claims(claims: Mapping[str, Any], claim: str | None) -> str | None:
    """The caller's tenant from verified JWT claims: the claim's value if it is a short
    printable string (or a number), else None (the call is limited as its own caller)."""
    if claim is None:
        return None
    value = claims.get(claim)
    if isinstance(value, bool) or not isinstance(value, str | int):
        return None
    text = str(value)
    if not text or len(text) > MAX_TENANT_CHARS or not text.isprintable():
        return None
    return text


class LimitPolicy:
    """Resolve the limits of a caller from `limits.*` (and the API key names of `auth.*`)."""

    def __init__(
        self, settings: LimitSettings, api_key_names: Mapping[str, str] | None = None
    ) -> None:
        """`api_key_names`: caller key ("key:<hash>") -> configured name, so `apikey:NAME`
        overrides apply (server assembly: {f"key:{k.key_hash}": k.name for k in api_keys})."""
        self._settings = settings
        self._api_key_names = dict(api_key_names or {})
        self._tenants = settings.tenant_claim is not None
        self.default = self._build(None)
        self._by_override = {key: self._build(o) for key, o in settings.overrides.items()}
        # The daily budget of a tenant without an override of its own: the default size.
        self._default_per_day = settings.tokens_per_day
        # (override resolved, tenant key) -> limits; the overrides live as long as self.
        self._tenant_cache: dict[tuple[int, str], CallerLimits] = {}

    @classmethod
    def from_settings(cls, settings: Settings) -> LimitPolicy:
        """From the whole settings: `apikey:<name>` overrides find their callers' hashes."""
        names = {f"key:{k.key_hash}": k.name for k in settings.auth.api_keys}
        return cls(settings.limits, names)

    def _build(self, override: RateLimitOverride | None) -> CallerLimits:
        s = self._settings
        rate = (
            s.rate_per_s if override is None or override.rate_per_s is None else override.rate_per_s
        )
        burst = s.burst if override is None or override.burst is None else override.burst
        streams = s.max_streams_per_caller
        if override is not None and override.max_streams is not None:
            streams = override.max_streams
        per_minute, per_day = s.token_quotas(override)
        tokens = TokenLimits(per_minute, per_day)
        return CallerLimits(
            LimitSpec(rate, burst), streams, tokens if tokens.enforced else None, None
        )

    def for_caller(self, key: str, tenant: str | None = None) -> CallerLimits:
        """The limits of caller `key` (from caller_key or auth), in `tenant` if any."""
        by = self._by_override
        found = by.get(key)
        if found is None and key.startswith("key:"):
            name = self._api_key_names.get(key)
            if name is not None:
                found = by.get(f"apikey:{name}")
        tenant_key = f"tenant:{tenant}" if tenant and self._tenants else None
        tenant_limits = by.get(tenant_key) if tenant_key is not None else None
        if found is None:
            found = tenant_limits or self.default
        if tenant_key is None:
            return found
        cached = self._tenant_cache.get((id(found), tenant_key))
        if cached is not None:
            return cached
        # A tenant's callers share its daily budget, sized by its override (or the default).
        if tenant_limits is None:
            per_day = self._default_per_day
        else:
            per_day = tenant_limits.token_limits.per_day if tenant_limits.token_limits else None
        per_minute = found.token_limits.per_minute if found.token_limits is not None else None
        tokens = TokenLimits(per_minute, per_day)
        resolved = CallerLimits(
            found.spec, found.stream_limit, tokens if tokens.enforced else None, tenant_key
        )
        if len(self._tenant_cache) >= _MAX_CACHED:
            self._tenant_cache.clear()  # bounded: tenants are few, callers may be many
        self._tenant_cache[(id(found), tenant_key)] = resolved
        return resolved
