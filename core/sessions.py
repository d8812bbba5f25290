"""Whose conversation a session is: the owner the proxy tells the agent.

A chat session is scoped by the caller's verified identity. The proxy derives an opaque
owner from what its auth stage verified (interceptors/auth.py: `CallInfo.identity`
"sub:<JWT subject>" or "key:<hash of the API key>", and `CallInfo.tenant`, the token's
tenant claim) and sends it to the agent with every session method in request metadata
`x-aiproxy-session-owner` (server/request/forwarding.py). The agent keys every session
by owner and id together (`scoped_key`): another owner naming the same id reaches
another conversation, never this one.

- Sessions are per subject (or API key), within its tenant: a tenant shares nothing.
  Two people of one tenant have separate conversations; the same subject under two
  tenants too. (Tenants share limits and cached answers, core/limitpolicy.py and
  core/cache.py; a conversation is personal.)
- Anonymous callers (auth off) all have the owner "anonymous": a caller-chosen id is
  then a name anyone can use, and only CreateSession's ids (128 random bits) keep a
  conversation private, as a bearer capability. Keying anonymous callers by address
  would break a phone that changes networks. But the agent's bound on sessions per
  owner is counted per caller (`session_quota`, in `x-aiproxy-session-quota`): for an
  anonymous caller, per the address the proxy believes (behind Envoy, the client
  address it reports), so one anonymous caller creating sessions in a loop pushes out
  its own oldest, never another caller's.
- Callers cannot forge the owner: the forwarder drops every caller-sent x-aiproxy-*
  header before it adds its own. The agent trusts the header because it listens behind
  the proxy only (a private address, mutual TLS with the proxy's client certificate
  where configured: `aiproxy agent --tls-client-ca`); anyone who can call the agent
  directly can name any owner.

The owner is a hash (128 bits, hex): ASCII whatever the subject holds, of bounded
length, and no subject or key hash in the agent's store or logs.
"""

from __future__ import annotations

import hashlib
from typing import Final

from aiproxy.core.callinfo import CallInfo

ANONYMOUS_OWNER: Final = "anonymous"
# What the auth stage puts in CallInfo.identity for a verified caller; the limits stage
# puts "peer:<address>" there for an unauthenticated one, which is not an identity.
_VERIFIED_PREFIXES: Final = ("sub:", "key:")
_DOMAIN: Final = b"aiproxy-session-owner\x00"
_QUOTA_DOMAIN: Final = b"aiproxy-session-quota\x00"


def session_owner(call: CallInfo) -> str:
    """The owner of the sessions `call` may see (see the module docstring)."""
    identity = call.identity
    if not identity.startswith(_VERIFIED_PREFIXES):
        return ANONYMOUS_OWNER
    digest = hashlib.sha256(_DOMAIN + call.tenant.encode() + b"\x00" + identity.encode())
    return digest.hexdigest()[:32]


def session_quota(call: CallInfo, owner: str) -> str:
    """Whose count the sessions `call` writes go to, for the agent's bound on sessions
    per owner: the owner itself for a verified caller; for an anonymous one its address
    ("peer:<address>" from the limits stage, hashed: no address reaches the agent), so
    that anonymous callers, who share one owner, do not share that bound. "anonymous"
    (shared, as before) when the proxy knows no address for it."""
    if owner != ANONYMOUS_OWNER:
        return owner
    identity = call.identity
    if not identity.startswith("peer:"):
        return ANONYMOUS_OWNER
    return "a" + hashlib.sha256(_QUOTA_DOMAIN + identity.encode()).hexdigest()[:32]


def scoped_key(owner: str, session_id: str) -> str:
    """One owner's session: what the agent stores it under (and what affinity routing
    hashes), so that equal ids of two owners never meet."""
    return f"{owner}\x00{session_id}"
