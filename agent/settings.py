"""The agent's settings (re-exported by agent.server, where callers import them from)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from urllib.parse import urlsplit

DEFAULT_LISTEN = "127.0.0.1:50052"
DEFAULT_MODEL = "ref-model-1"
BACKENDS = ("reference", "openai")
SESSION_STORES = ("memory", "redis")


@dataclass
class AgentSettings:
    # HOST:PORT to listen on, insecure; port 0 picks a free port (AgentServer.start returns it).
    listen: str = DEFAULT_LISTEN
    # Honour x-fault-* request metadata (agent.faults). Off: the metadata is ignored.
    enable_faults: bool = False
    # Time to the first token, then between tokens. Unary calls wait the whole total.
    first_token_delay_ms: float = 40.0
    token_delay_ms: float = 15.0
    # The model named in answers when a request names none.
    model: str = DEFAULT_MODEL
    # Chat sessions (agent/sessions.py): where they are kept, "memory" (this process) or
    # "redis" (shared by every replica, at redis_url), and their bounds: sessions kept
    # (least recently used dropped), messages per session, characters per message, and a
    # TTL refreshed by every turn; one owner (caller) keeps at most max_sessions_per_owner.
    # Each store call waits at most session_store_timeout_s.
    sessions: str = "memory"
    redis_url: str | None = None
    max_sessions: int = 10_000
    max_sessions_per_owner: int = 1000
    max_session_messages: int = 100
    max_message_chars: int = 8192
    session_ttl_s: float = 24 * 3600.0
    session_store_timeout_s: float = 1.0
    # The modelled prefix cache (agent/sessions.PrefixCache, reference backend): the first
    # token of a chat turn waits this long per prompt token not cached on this replica
    # (0: off); the cache holds at most prefix_cache_tokens tokens.
    prefill_ms_per_token: float = 0.0
    prefix_cache_tokens: int = 1_000_000
    # Sent back as trailing metadata x-agent-replica on every call (default: the bound
    # HOST:PORT), so a caller can see which replica answered.
    replica_name: str | None = None
    # Prompts per BatchGenerate call; more is INVALID_ARGUMENT.
    max_batch_size: int = 64
    # HTTP/2 streams per connection: a proxy multiplexes thousands of streams on one.
    max_concurrent_streams: int = 100_000
    # New calls C-core queues before it cancels them (default 1000 is too few for bursts).
    max_pending_requests: int = 20_000
    # TLS: PEM certificate chain and key (both or neither; neither = plaintext), and the
    # CA whose client certificates are required (mutual TLS, e.g. only the proxy may call).
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    tls_client_ca_file: str | None = None
    # Where answers come from: "reference" (deterministic, offline text) or "openai" (an
    # OpenAI-compatible /v1/chat/completions server at base_url; see agent.model_service).
    backend: str = "reference"
    # The model server's API root, e.g. http://127.0.0.1:11434/v1 (backend openai only).
    base_url: str | None = None
    # Bearer token for the model server (from OPENAI_API_KEY); never logged, never repr'd.
    api_key: str | None = field(default=None, repr=False)
    # Per model call when the caller sets no deadline (a deadline always wins when tighter).
    model_timeout_s: float = 120.0
    # How often GET /models is probed; health is NOT_SERVING while it fails.
    health_interval_s: float = 5.0
    # Connections kept to the model server (one pooled client per process).
    model_max_connections: int = 100
    # BatchGenerate: prompts sent to the model at once.
    batch_concurrency: int = 4

    def __post_init__(self) -> None:
        if ":" not in self.listen:
            raise ValueError(f"listen must be HOST:PORT, got {self.listen!r}")
        for name in ("first_token_delay_ms", "token_delay_ms", "prefill_ms_per_token"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and 0 <= value < math.inf):
                raise ValueError(f"{name} must be a non-negative number, got {value!r}")
        if not self.model:
            raise ValueError("model must not be empty")
        for name in (
            "max_sessions",
            "max_batch_size",
            "max_concurrent_streams",
            "max_pending_requests",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)!r}")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file go together")
        if self.tls_client_ca_file and not self.tls_cert_file:
            raise ValueError("tls_client_ca_file (mutual TLS) needs tls_cert_file and tls_key_file")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.backend == "openai":
            if not self.base_url:
                raise ValueError(
                    "backend openai needs base_url (--base-url, AIPROXY_AGENT_BASE_URL or "
                    "OPENAI_BASE_URL), e.g. http://127.0.0.1:11434/v1"
                )
            parts = urlsplit(self.base_url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(
                    f"base_url must be an http(s) URL, got {safe_url(self.base_url)!r}"
                )
        if self.sessions not in SESSION_STORES:
            raise ValueError(
                f"sessions must be one of {', '.join(SESSION_STORES)}, got {self.sessions!r}"
            )
        if self.sessions == "redis":
            if not self.redis_url:
                raise ValueError(
                    "sessions redis needs redis_url (--redis-url or AIPROXY_AGENT_REDIS_URL)"
                )
            if urlsplit(self.redis_url).scheme not in ("redis", "rediss", "unix"):
                raise ValueError(
                    f"redis_url must be redis://, rediss:// or unix://, got "
                    f"{safe_url(self.redis_url)!r}"
                )
        for name in ("max_message_chars", "prefix_cache_tokens", "max_sessions_per_owner"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)!r}")
        if self.replica_name is not None and not (
            0 < len(self.replica_name) <= 128
            and self.replica_name.isascii()
            and self.replica_name.isprintable()
        ):
            raise ValueError("replica_name must be 1-128 printable ASCII characters")
        for name in (
            "model_timeout_s",
            "health_interval_s",
            "session_ttl_s",
            "session_store_timeout_s",
        ):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and 0 < value < math.inf):
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        for name in ("model_max_connections", "batch_concurrency"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)!r}")
        if self.max_session_messages < 2:
            raise ValueError(
                f"max_session_messages must be at least 2, got {self.max_session_messages!r}"
            )


def safe_url(url: str) -> str:
    """The URL without user:password@ (it may carry credentials), for logs and messages."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return parts._replace(netloc=netloc).geturl()
