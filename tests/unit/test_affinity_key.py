"""Which calls have an affinity key, and in whose scope (server/request/forwarding.py)."""

from __future__ import annotations

from typing import Any

from aiproxy.ai.agent.v1 import agent_service_pb2 as pb
from aiproxy.core.callinfo import CallInfo
from aiproxy.core.headers import AFFINITY_HEADER, PROXY_ONLY_METADATA
from aiproxy.core.service import agent_service
from aiproxy.core.sessions import scoped_key, session_owner
from aiproxy.core.settings import load_settings
from aiproxy.server.pool.balancer import key_hash
from aiproxy.server.request.forwarding import Forwarder

SECRET = "s" * 32


def forwarder(**overrides: Any) -> Forwarder:
    return Forwarder(None, load_settings(**overrides))  # type: ignore[arg-type]


def key(fw: Forwarder, method: str, request: Any, identity: str = "", **headers: str) -> Any:
    m = agent_service().by_name[method]
    call = CallInfo(m.path, metadata=dict(headers), identity=identity)
    return fw.affinity_key(call, request, fw.keyed(m))


def test_the_session_id_is_the_key_of_the_methods_that_have_one() -> None:
    fw = forwarder()
    keyed = {m.name for m in agent_service().methods if fw.keyed(m)}
    assert {"Chat", "StreamChat"} <= keyed
    assert not keyed & {"Generate", "StreamGenerate", "SearchRag", "BatchGenerate"}
    assert key(fw, "Chat", pb.ChatRequest(session_id="s1")) == key_hash("anonymous\x00s1")
    assert key(fw, "StreamChat", pb.StreamChatRequest(session_id="s1")) == key_hash(
        "anonymous\x00s1"
    )
    # No session (the agent mints one) and no header: P2C.
    assert key(fw, "Chat", pb.ChatRequest()) is None
    assert key(fw, "Generate", pb.GenerateRequest()) is None


def test_the_affinity_header_keys_calls_without_a_session_in_the_same_namespace() -> None:
    fw = forwarder()
    h = {AFFINITY_HEADER: "s1"}
    assert key(fw, "Generate", pb.GenerateRequest(), **h) == key_hash("anonymous\x00s1")
    # A session id wins over the header.
    assert key(fw, "Chat", pb.ChatRequest(session_id="s2"), **h) == key_hash("anonymous\x00s2")
    assert key(fw, "Chat", pb.ChatRequest(), **h) == key_hash("anonymous\x00s1")
    # Proxy-only: never forwarded upstream.
    assert AFFINITY_HEADER in PROXY_ONLY_METADATA


def test_keys_are_scoped_by_the_verified_identity_only_with_auth_on() -> None:
    req = pb.ChatRequest(session_id="support-42")
    on = forwarder(auth={"jwt_secret": SECRET})
    alice = key(on, "Chat", req, identity="sub:alice")
    mallory = key(on, "Chat", req, identity="sub:mallory")
    owner = session_owner(CallInfo("/m", identity="sub:alice"))
    assert alice == key_hash(scoped_key(owner, "support-42")) and alice != mallory
    # Auth off: a `peer:` identity (what limits set) is no scope; every caller shares one.
    off = forwarder()
    assert key(off, "Chat", req, identity="peer:127.0.0.1:1") == key_hash("anonymous\x00support-42")


def test_affinity_off_keys_nothing() -> None:
    fw = forwarder(upstream={"affinity": {"enabled": False}})
    assert not any(fw.keyed(m) for m in agent_service().methods)
    assert key(fw, "Generate", pb.GenerateRequest(), **{AFFINITY_HEADER: "k"}) is None


def test_only_the_configured_upstream_metadata_is_passed_on_to_the_caller() -> None:
    fw = forwarder()
    call = CallInfo("/m", reply_metadata=(("x-ratelimit-remaining", "9"),))
    fw._relay(call, (("x-agent-replica", "agent-2"), ("x-other", "no"), ("x-bin", b"\0")))
    assert call.reply_metadata == (("x-ratelimit-remaining", "9"), ("x-agent-replica", "agent-2"))
    fw = forwarder(upstream={"reply_metadata": []})
    call = CallInfo("/m")
    fw._relay(call, (("x-agent-replica", "agent-2"),))
    assert call.reply_metadata == ()
