"""The agent's command line, shared by `aiproxy agent` and `python -m agent`.

    add_arguments(parser)   adds --listen, --enable-faults, --first-token-delay-ms,
                            --token-delay-ms, --model, --backend, --base-url,
                            --model-timeout-s, --health-interval-s, --batch-concurrency,
                            --sessions, --redis-url, --session-ttl-s,
                            --prefill-ms-per-token, --replica-name,
                            --log-level, --trace-exporter,
                            --otlp-endpoint, --tls-cert, --tls-key, --tls-client-ca,
                            --record-metadata (TEST ONLY)
    run(args)               serves until SIGTERM/SIGINT; returns the exit code

When listening it prints one JSON line on stdout, which supervisors and tests wait for:
    {"event": "listening", "service": "agent", "address": "127.0.0.1:50052"}
Signals: SIGTERM/SIGINT drain (NOT_SERVING, 5 s for in-flight calls) and exit 0;
SIGUSR1 reports NOT_SERVING, SIGUSR2 SERVING again (to exercise health-driven routing).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from collections.abc import Coroutine, Mapping
from typing import Any

from aiproxy.agent import logs
from aiproxy.agent.logs import log_event
from aiproxy.agent.server import AgentServer
from aiproxy.agent.settings import (
    BACKENDS,
    DEFAULT_LISTEN,
    DEFAULT_MODEL,
    SESSION_STORES,
    AgentSettings,
)
from aiproxy.agent.tracing import DEFAULT_OTLP_ENDPOINT, EXPORTERS, build_tracer_provider

DESCRIPTION = (
    "The reference AI agent service (the upstream aiproxy fronts): deterministic and offline, "
    "or --backend openai to answer with any OpenAI-compatible model server."
)
DRAIN_GRACE_S = 5.0

log = logging.getLogger("agent.cli")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--listen",
        default=DEFAULT_LISTEN,
        metavar="HOST:PORT",
        help=f"gRPC listen address, port 0 for any (default {DEFAULT_LISTEN})",
    )
    parser.add_argument(
        "--enable-faults", action="store_true", help="honour x-fault-* request metadata"
    )
    parser.add_argument(
        "--first-token-delay-ms",
        type=_milliseconds,
        default=40.0,
        metavar="MS",
        help="time to first token (default 40)",
    )
    parser.add_argument(
        "--token-delay-ms",
        type=_milliseconds,
        default=15.0,
        metavar="MS",
        help="time between tokens (default 15)",
    )
    parser.add_argument(
        "--model",
        default=None,
        help="model name when a request names none (env AIPROXY_AGENT_MODEL, then with "
        f"--backend openai OPENAI_MODEL; default {DEFAULT_MODEL})",
    )
    parser.add_argument(
        "--backend",
        default=None,
        choices=BACKENDS,
        help="where answers come from: reference (deterministic, offline) or openai (an "
        "OpenAI-compatible /v1/chat/completions server) (env AIPROXY_AGENT_BACKEND; "
        "default reference)",
    )
    parser.add_argument(
        "--base-url",
        default=None,
        metavar="URL",
        help="--backend openai: the API root, e.g. http://127.0.0.1:11434/v1 (env "
        "AIPROXY_AGENT_BASE_URL, then OPENAI_BASE_URL); the key comes from OPENAI_API_KEY only",
    )
    parser.add_argument(
        "--model-timeout-s",
        type=_seconds,
        default=None,
        metavar="S",
        help="--backend openai: per model call when the caller sets no deadline "
        "(env AIPROXY_AGENT_MODEL_TIMEOUT_S; default 120)",
    )
    parser.add_argument(
        "--health-interval-s",
        type=_seconds,
        default=None,
        metavar="S",
        help="--backend openai: how often GET /models is probed for health "
        "(env AIPROXY_AGENT_HEALTH_INTERVAL_S; default 5)",
    )
    parser.add_argument(
        "--batch-concurrency",
        type=int,
        default=None,
        metavar="N",
        help="--backend openai: BatchGenerate prompts sent to the model at once "
        "(env AIPROXY_AGENT_BATCH_CONCURRENCY; default 4)",
    )
    parser.add_argument(
        "--sessions",
        default=None,
        choices=SESSION_STORES,
        help="where chat sessions are kept: memory (this process) or redis (shared by every "
        "replica, --redis-url) (env AIPROXY_AGENT_SESSIONS; default memory)",
    )
    parser.add_argument(
        "--redis-url",
        default=None,
        metavar="URL",
        help="--sessions redis: redis://HOST:PORT/DB (env AIPROXY_AGENT_REDIS_URL)",
    )
    parser.add_argument(
        "--session-ttl-s",
        type=_seconds,
        default=None,
        metavar="S",
        help="a session is forgotten this long after its last turn "
        "(env AIPROXY_AGENT_SESSION_TTL_S; default 86400)",
    )
    parser.add_argument(
        "--prefill-ms-per-token",
        type=_milliseconds,
        default=0.0,
        metavar="MS",
        help="modelled prefix cache: a chat turn's first token waits MS per prompt token not "
        "cached on this replica (default 0: off)",
    )
    parser.add_argument(
        "--replica-name",
        default=None,
        metavar="NAME",
        help="sent back in trailing metadata x-agent-replica (default: the bound HOST:PORT)",
    )
    parser.add_argument(
        "--tls-cert", metavar="FILE", help="PEM certificate chain: serve TLS (with --tls-key)"
    )
    parser.add_argument("--tls-key", metavar="FILE", help="PEM private key for --tls-cert")
    parser.add_argument(
        "--tls-client-ca",
        metavar="FILE",
        help="PEM CA: require client certificates signed by it (mutual TLS)",
    )
    parser.add_argument(
        "--trace-exporter",
        default="none",
        choices=EXPORTERS,
        help="OpenTelemetry span exporter (default none)",
    )
    parser.add_argument(
        "--otlp-endpoint",
        default=DEFAULT_OTLP_ENDPOINT,
        metavar="URL",
        help=f"OTLP/gRPC collector for --trace-exporter otlp (default {DEFAULT_OTLP_ENDPOINT})",
    )
    parser.add_argument(
        "--record-metadata",
        metavar="FILE",
        help="TEST ONLY: append every call's request metadata (names and values, credentials "
        "included) to FILE as JSON lines; never use in production",
    )
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="default INFO",
    )


def settings_from_args(
    args: argparse.Namespace, environ: Mapping[str, str] | None = None
) -> AgentSettings:
    """Flags win over AIPROXY_AGENT_* environment, which wins over OPENAI_* (openai only).

    The API key is read from OPENAI_API_KEY only: a flag would show it in `ps`.
    """
    env = os.environ if environ is None else environ

    def pick(flag: Any, name: str, openai_name: str | None = None) -> Any:
        if flag is not None:
            return flag
        value = env.get(f"AIPROXY_AGENT_{name}") or None
        if value is None and openai_name and backend == "openai":
            value = env.get(openai_name) or None
        return value

    backend = pick(getattr(args, "backend", None), "BACKEND") or "reference"
    extra: dict[str, Any] = {}
    for key, name, convert in (
        ("model_timeout_s", "MODEL_TIMEOUT_S", float),
        ("health_interval_s", "HEALTH_INTERVAL_S", float),
        ("batch_concurrency", "BATCH_CONCURRENCY", int),
        ("session_ttl_s", "SESSION_TTL_S", float),
        ("max_sessions_per_owner", "MAX_SESSIONS_PER_OWNER", int),
    ):
        value = pick(getattr(args, key, None), name)
        if value is not None:
            try:
                extra[key] = convert(value)
            except ValueError:
                raise ValueError(f"AIPROXY_AGENT_{name}: {value!r} is not a number") from None
    return AgentSettings(
        listen=args.listen,
        enable_faults=args.enable_faults,
        first_token_delay_ms=args.first_token_delay_ms,
        token_delay_ms=args.token_delay_ms,
        model=pick(args.model, "MODEL", "OPENAI_MODEL") or DEFAULT_MODEL,
        tls_cert_file=getattr(args, "tls_cert", None),
        tls_key_file=getattr(args, "tls_key", None),
        tls_client_ca_file=getattr(args, "tls_client_ca", None),
        backend=backend,
        base_url=pick(getattr(args, "base_url", None), "BASE_URL", "OPENAI_BASE_URL"),
        api_key=(env.get("OPENAI_API_KEY") or None) if backend == "openai" else None,
        sessions=pick(getattr(args, "sessions", None), "SESSIONS") or "memory",
        redis_url=pick(getattr(args, "redis_url", None), "REDIS_URL"),
        prefill_ms_per_token=getattr(args, "prefill_ms_per_token", 0.0),
        replica_name=getattr(args, "replica_name", None),
        **extra,
    )


def run(args: argparse.Namespace) -> int:
    """Serve until SIGTERM or SIGINT.

    Exit code 0 after a clean drain, 1 if the agent cannot start, 2 on bad settings.
    """
    logs.configure(getattr(args, "log_level", "INFO"))
    try:
        settings = settings_from_args(args)
    except ValueError as exc:
        print(f"agent: {exc}", file=sys.stderr)
        return 2
    provider = build_tracer_provider(
        getattr(args, "trace_exporter", "none"),
        getattr(args, "otlp_endpoint", DEFAULT_OTLP_ENDPOINT),
    )
    record = getattr(args, "record_metadata", None)
    return asyncio.run(serve(settings, tracer_provider=provider, record_metadata=record))


async def serve(
    settings: AgentSettings, tracer_provider: Any | None = None, record_metadata: str | None = None
) -> int:
    server = AgentServer(settings, tracer_provider=tracer_provider, record_metadata=record_metadata)
    try:
        await server.start()
    except RuntimeError as exc:
        log_event(log, "agent_start_failed", logging.ERROR, error=str(exc))
        return 1

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    background: set[asyncio.Task[None]] = set()

    def in_background(coro: Coroutine[Any, Any, None]) -> None:
        task = loop.create_task(coro)
        background.add(task)  # keep a reference until done, or the task may be collected
        task.add_done_callback(background.discard)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, lambda: in_background(server.set_serving(False)))
    loop.add_signal_handler(signal.SIGUSR2, lambda: in_background(server.set_serving(True)))

    _print_ready(server.address)
    try:
        await stop.wait()
        log_event(log, "agent_draining", grace_s=DRAIN_GRACE_S)
        await server.stop(grace=DRAIN_GRACE_S)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2):
            loop.remove_signal_handler(sig)
    return 0


def _print_ready(address: str) -> None:
    sys.stdout.write(
        json.dumps({"event": "listening", "service": "agent", "address": address}) + "\n"
    )
    sys.stdout.flush()


def _milliseconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a non-negative number of milliseconds")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return value
