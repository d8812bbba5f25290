"""core/headers.py: which request metadata never reaches an agent."""

from __future__ import annotations

import random
import string

import pytest

from aiproxy.core.headers import is_credential


@pytest.mark.parametrize(
    "name",
    [
        "authorization",
        "proxy-authorization",
        "cookie",
        "x-api-key",
        "api-key",
        "x-goog-api-key",
        "ocp-apim-subscription-key",
        "x-auth-token",
        "x-amz-security-token",
        "x-csrf-token",
        "x-xsrf-token",
        "x-session-id",
        "x-client-secret",
        "x-db-password",
        "x-upstream-token-bin",
        "www-authenticate",
    ],
)
def test_credential_bearing_names_are_a_class(name: str) -> None:
    assert is_credential(name)


@pytest.mark.parametrize(
    "name",
    [
        "x-request-id",
        "traceparent",
        "tracestate",
        "x-client-id",
        "x-fault-slow-ms",
        "grpc-timeout",
        "content-type",
        "last-event-id",
        "x-b3-traceid",
        "keep-alive",
        "x-monkey-business",  # words, not substrings
    ],
)
def test_other_metadata_is_not_a_credential(name: str) -> None:
    assert not is_credential(name)


def test_generated_names_with_a_credential_word_anywhere() -> None:
    rng = random.Random()
    for _ in range(200):
        words = ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(1, 6))) for _ in "abc"]
        words.insert(rng.randrange(4), rng.choice(["token", "secret", "cookie", "key", "auth"]))
        sep = rng.choice("-_.")
        name = sep.join(words) + rng.choice(["", "-bin"])
        assert is_credential(name), name
