"""Request metadata that only this proxy interprets: defined once, never forwarded upstream.

A caller (or Envoy, from HTTP headers) sends these to steer the proxy: resume a stream,
cancel one on purpose, use the cache, pick a coalescing window, name a routing key, prove
it came through the edge. None of them means anything to an agent, and some would mislead
one (an agent behind another aiproxy would act on `x-aiproxy-resume` or `cache-control` a
second time) or leak a capability (a stream id is the key to someone's answer). So the forwarder
drops every name in `PROXY_ONLY_METADATA`, and, so that a header added later cannot slip
through by being forgotten here, every request key with the `x-aiproxy-` prefix too.

The modules that act on a header import its name from here (core/streambuffer.py,
core/cache.py, server/request/forwarding.py, interceptors/limits.py).
"""

from __future__ import annotations

import functools
import re
from typing import Final

# Every request header named x-aiproxy-* is this proxy's own (see the module docstring).
PROXY_PREFIX: Final = "x-aiproxy-"

# Resumable streams (core/streambuffer.py, server/request/resume.py).
RESUMABLE_HEADER: Final = "x-aiproxy-resumable"  # "1" asks for a resumable stream
RESUME_HEADER: Final = "x-aiproxy-resume"  # the stream id to resume
LAST_EVENT_ID_HEADER: Final = "last-event-id"  # the last seq the caller saw (SSE's name)
CANCEL_HEADER: Final = "x-aiproxy-cancel"  # stop that stream's upstream now
# The response cache (core/cache.py): the HTTP convention, max-age / no-cache / no-store.
CACHE_CONTROL: Final = "cache-control"
# A caller's own stream coalescing window in ms (server/request/forwarding.py).
COALESCE_HEADER: Final = "x-aiproxy-coalesce-ms"
# The edge's proof that a call came through Envoy (interceptors/limits.py); a secret.
EDGE_SECRET_HEADER: Final = "x-aiproxy-edge"
# A routing key for a call without a session: calls naming the same key (scoped by the
# caller's identity, like session ids) go to the same replica (server/pool/balancer.py).
AFFINITY_HEADER: Final = "x-aiproxy-affinity"

# Set by the proxy, never by a caller (a caller's own is dropped with every x-aiproxy-*):
# whose conversations a session method may see, for the agent (core/sessions.py).
SESSION_OWNER_HEADER: Final = "x-aiproxy-session-owner"
# ... and whose count a session it writes goes to, for the agent's bound on sessions per
# owner: the owner, or for an anonymous caller its address (hashed; core/sessions.py).
SESSION_QUOTA_HEADER: Final = "x-aiproxy-session-quota"
# "initial": a unary answer's reply metadata (x-request-id, x-ratelimit-*, the relayed
# upstream.reply_metadata, x-aiproxy-cache) goes out as initial metadata, before the
# answer. Without it a native gRPC unary call gets them in the trailing metadata, with the
# status: grpc.aio sends custom initial metadata as a batch of its own (one more write
# and event-loop round trip per call, ~90 us of CPU, ~0.1x of a bare hop's cost), while
# the trailers go out with the answer anyway. The edge sends "initial" for its HTTP/JSON,
# gRPC-Web and Connect callers, which read them as response headers. Streams always send
# them as initial metadata, with the first chunk.
REPLY_HEADERS_HEADER: Final = "x-aiproxy-reply-headers"

PROXY_ONLY_METADATA: Final = frozenset(
    {
        RESUMABLE_HEADER,
        RESUME_HEADER,
        LAST_EVENT_ID_HEADER,
        CANCEL_HEADER,
        CACHE_CONTROL,
        COALESCE_HEADER,
        EDGE_SECRET_HEADER,
        AFFINITY_HEADER,
        REPLY_HEADERS_HEADER,
    }
)


# Credentials: a class of names, not a list. A header whose name has one of these words
# (split on "-", "_", ".") carries something that proves who the caller is or opens a
# session: authorization, proxy-authorization, cookie, x-api-key, x-auth-token,
# x-goog-api-key, ocp-apim-subscription-key, x-csrf-token, x-amz-security-token, any
# *-secret, *-password... The forwarder never sends one to an agent (an agent has no
# business holding the caller's credentials, and one behind another hop could replay
# them); the proxy's own edge secret is x-aiproxy-* and dropped by its prefix as well.
CREDENTIAL_WORDS: Final = frozenset(
    {
        "auth",
        "authorization",
        "authenticate",
        "authentication",
        "apikey",
        "key",
        "cookie",
        "cookies",
        "token",
        "jwt",
        "bearer",
        "secret",
        "password",
        "passwd",
        "credential",
        "credentials",
        "session",
        "sessionid",
        "csrf",
        "xsrf",
        "signature",
    }
)
_WORD_SPLIT: Final = re.compile(r"[-_.]+")


@functools.lru_cache(maxsize=4096)
def is_credential(name: str) -> bool:
    """Whether request metadata `name` (lowercase, as gRPC gives it) carries a credential
    (see CREDENTIAL_WORDS). Memoized: called for every forwarded key of every call."""
    base = name[:-4] if name.endswith("-bin") else name
    return not CREDENTIAL_WORDS.isdisjoint(_WORD_SPLIT.split(base))
