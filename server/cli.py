"""`aiproxy`: the one command line. Other tools and checks rely on these flags.

aiproxy agent --listen HOST:PORT [--enable-faults]
aiproxy serve --listen HOST:PORT --upstream HOST:PORT [--upstream ...] [--config FILE]
              [--metrics-listen HOST:PORT] [--workers N]
aiproxy check-config FILE
aiproxy health [--address HOST:PORT] [--service NAME]
aiproxy token --sub SUBJECT [--scope S] [--ttl SECONDS] [--secret S | --private-key FILE]
aiproxy api-key --name NAME [--key RAW] [--scope S]
aiproxy envoy --listen HOST:PORT --proxy HOST:PORT [--proxy ...]
aiproxy demo [--model-server local|URL] [--model NAME]
aiproxy model-server [--listen HOST:PORT] [--check]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable
from typing import Any

import yaml

from aiproxy.core import logs
from aiproxy.core.settings import ConfigError, load_settings
from aiproxy.server.process import workers


def _serve_overrides(args: argparse.Namespace) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    if args.listen:
        overrides.setdefault("server", {})["listen"] = args.listen
    if args.upstream:
        overrides.setdefault("upstream", {})["endpoints"] = args.upstream
    if args.metrics_listen:
        overrides.setdefault("metrics", {})["listen"] = args.metrics_listen
    if args.log_level:
        overrides.setdefault("log", {})["level"] = args.log_level
    if getattr(args, "workers", None):
        overrides.setdefault("server", {})["workers"] = args.workers
    return overrides


def cmd_serve(args: argparse.Namespace) -> int:
    from aiproxy.server.app import run_proxy
    from aiproxy.server.extensions import check_settings

    try:
        settings = load_settings(args.config, **_serve_overrides(args))
        check_settings(settings)
    except ConfigError as exc:
        print(f"aiproxy: {exc}", file=sys.stderr)
        return 2
    logs.configure(settings.log.level)
    if settings.server.workers > 1 and not workers.is_worker():
        return workers.supervise(settings, args)
    _run(run_proxy(settings))
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    try:
        settings = load_settings(args.file)
    except ConfigError as exc:
        print(f"aiproxy: {exc}", file=sys.stderr)
        return 2
    print(f"# {args.file}: valid. Effective settings (file + AIPROXY_* environment + defaults):")
    print(yaml.safe_dump(settings.model_dump(mode="json"), sort_keys=False), end="")
    return 0


def cmd_agent(args: argparse.Namespace) -> int:
    from aiproxy.agent import cli as agent_cli

    return agent_cli.run(args)


def cmd_health(args: argparse.Namespace) -> int:
    from aiproxy.server.process.probe import run

    return run(args.address, args.service, args.timeout)


def cmd_envoy(args: argparse.Namespace) -> int:
    from aiproxy.server.edge import cli as edge_cli

    return edge_cli.main(args)


def cmd_demo(args: argparse.Namespace) -> int:
    from aiproxy.server.process.demo import run_demo

    return run_demo(args)


def cmd_model_server(args: argparse.Namespace) -> int:
    from aiproxy.server.process import localmodel

    return localmodel.main(args)


def _run(coro: Any) -> None:
    """Run the server's coroutine, on uvloop when it is installed. Never inside the
    `except ImportError`: everything raised in the server would be chained to it ("During
    handling of the above exception... No module named 'uvloop'") in every traceback."""
    try:
        import uvloop
    except ImportError:  # optional: grpc.aio runs on the default loop too
        runner: Callable[[Any], Any] = asyncio.run
    else:
        runner = uvloop.run
    runner(coro)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aiproxy", description="gRPC-native middle tier for AI agent services"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the proxy")
    serve.add_argument("--listen", help="HOST:PORT for the gRPC listener (default 127.0.0.1:50051)")
    serve.add_argument(
        "--upstream", action="append", metavar="HOST:PORT", help="agent endpoint (repeatable)"
    )
    serve.add_argument("--config", metavar="FILE", help="YAML configuration file")
    serve.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    serve.add_argument(
        "--metrics-listen",
        metavar="HOST:PORT",
        help="Prometheus /metrics listener (default 127.0.0.1:9091)",
    )
    serve.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="N proxy processes sharing the port (SO_REUSEPORT; default 1)",
    )
    serve.set_defaults(func=cmd_serve)

    agent = sub.add_parser("agent", help="run the reference AI agent service (the upstream)")
    from aiproxy.agent import cli as agent_cli

    agent_cli.add_arguments(agent)
    agent.set_defaults(func=cmd_agent)

    check = sub.add_parser(
        "check-config", help="validate a config file and print the effective settings"
    )
    check.add_argument("file", metavar="FILE")
    check.set_defaults(func=cmd_check_config)

    health = sub.add_parser(
        "health", help="probe a grpc.health.v1 service: exit 0 if SERVING (container health checks)"
    )
    health.add_argument("--address", default="127.0.0.1:50051", metavar="HOST:PORT")
    health.add_argument(
        "--service",
        default="",
        help='service name ("" = the server as a whole; "liveness" = the process)',
    )
    health.add_argument("--timeout", type=float, default=3.0, metavar="SECONDS")
    health.set_defaults(func=cmd_health)

    from aiproxy.server.process import devtoken

    token = sub.add_parser(
        "token",
        help="mint a development JWT",
        epilog=devtoken.TOKEN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    devtoken.add_token_arguments(token)
    token.set_defaults(func=devtoken.run_token)

    api_key = sub.add_parser("api-key", help="make an API key and the config entry with its hash")
    devtoken.add_api_key_arguments(api_key)
    api_key.set_defaults(func=devtoken.run_api_key)
    envoy = sub.add_parser(
        "envoy", help="run Envoy (HTTP/JSON, SSE, the browser page) in front of proxy replicas"
    )
    from aiproxy.server.edge import cli as edge_cli

    edge_cli.add_arguments(envoy)
    envoy.set_defaults(func=cmd_envoy)

    demo = sub.add_parser("demo", help="reference agent + proxy + Envoy on the default ports")
    from aiproxy.server.process import demo as demo_cmd

    demo_cmd.add_arguments(demo)
    demo.set_defaults(func=cmd_demo)

    model_server = sub.add_parser(
        "model-server",
        help="serve the small local model (SmolLM2 via llama.cpp, OpenAI API) on loopback",
    )
    from aiproxy.server.process import localmodel

    localmodel.add_arguments(model_server)
    model_server.set_defaults(func=cmd_model_server)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
