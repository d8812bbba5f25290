"""`aiproxy envoy`'s flags, and its entry point."""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
from collections.abc import Sequence

from aiproxy.server.edge.config import (
    DEFAULT_CORS_ORIGINS,
    DEFAULT_LISTEN,
    DEFAULT_PROXY,
    DESCRIPTOR,
    EDGE_SECRET_ENV,
    EDGE_SECRET_HEADER,
    PAGE,
    EdgeError,
    EdgeSettings,
    render,
)
from aiproxy.server.edge.process import run


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--listen",
        default=DEFAULT_LISTEN,
        metavar="HOST:PORT",
        help=f"HTTP/gRPC listener, port 0 for any (default {DEFAULT_LISTEN})",
    )
    parser.add_argument(
        "--proxy",
        action="append",
        metavar="HOST:PORT",
        help=f"aiproxy replica (repeatable; default {DEFAULT_PROXY})",
    )
    parser.add_argument(
        "--cors-origin",
        action="append",
        metavar="ORIGIN",
        help="origin allowed by CORS, e.g. https://app.example.com; '*' for any (repeatable; default: http://localhost:3000 and http://127.0.0.1:3000)",
    )
    parser.add_argument(
        "--health-interval-s",
        type=float,
        default=1.0,
        help="active gRPC health check interval (default 1)",
    )
    parser.add_argument(
        "--sse-coalesce-ms",
        type=int,
        default=50,
        help="stream coalescing window for HTTP/JSON (SSE) callers that send no "
        "x-aiproxy-coalesce-ms: at most one event per window after the first, which is never "
        "held back (default 50, the streaming spec's; 0 = every chunk as it comes)",
    )
    parser.add_argument(
        "--startup-wait-s",
        type=float,
        default=10.0,
        help="wait this long for a healthy proxy before reporting ready (default 10)",
    )
    parser.add_argument(
        "--descriptor",
        type=pathlib.Path,
        default=DESCRIPTOR,
        help="descriptor set for the transcoder (default build/descriptors/aiproxy.pb)",
    )
    parser.add_argument(
        "--page",
        type=pathlib.Path,
        default=PAGE,
        help="the browser page served at / (default envoy/page/index.html)",
    )
    parser.add_argument(
        "--concurrency", type=int, default=None, help="Envoy worker threads (default: one per core)"
    )
    parser.add_argument(
        "--max-requests-per-io-cycle",
        type=int,
        default=1,
        help="new requests Envoy takes from one connection per I/O cycle of a worker, the "
        "rest in the next (Envoy's http.max_requests_per_io_cycle): a burst on a few "
        "connections takes turns with every other caller (default 1; 0 = no limit)",
    )
    parser.add_argument(
        "--log-level",
        default="warning",
        choices=["trace", "debug", "info", "warning", "error", "critical", "off"],
        help="Envoy's log level (default warning)",
    )
    parser.add_argument(
        "--drain-s",
        type=float,
        default=30.0,
        help="on SIGTERM, let requests in flight finish for up to this long (default 30)",
    )
    parser.add_argument(
        "--log-flush-ms",
        type=int,
        default=1000,
        help="how often buffered access log lines are written (default 1000)",
    )
    parser.add_argument(
        "--edge-secret-file",
        type=pathlib.Path,
        default=None,
        help=f"file holding the secret Envoy adds as {EDGE_SECRET_HEADER} (the proxy's limits.edge_secret); default: ${EDGE_SECRET_ENV}",
    )
    parser.add_argument(
        "--no-compression",
        action="store_true",
        help="do not compress responses (default: brotli or gzip, as the caller accepts, for JSON answers and pages of at least --compress-min-bytes)",
    )
    parser.add_argument(
        "--compress-min-bytes",
        type=int,
        default=1024,
        help="smallest response body compressed (default 1024)",
    )
    parser.add_argument(
        "--compress-sse",
        action="store_true",
        help="compress SSE streams (text/event-stream) too (default off; docs/operations.md has the measurement)",
    )
    parser.add_argument(
        "--admin-view",
        action="store_true",
        help="serve the operators' live view at /admin/ and GET /admin/v1/overview (ProxyAdminService.GetOverview; needs an admin scope when the proxy's auth is on)",
    )
    parser.add_argument("--print-config", action="store_true", help="print the rendered configuration and exit")  # fmt: skip


def _edge_secret(path: pathlib.Path | None) -> str | None:
    secret = (
        path.read_text().strip()
        if path is not None
        else os.environ.get(EDGE_SECRET_ENV, "").strip()
    )
    if secret and not all(0x21 <= ord(c) < 0x7F for c in secret):
        raise EdgeError(
            "the edge secret must be printable ASCII without spaces (it is a header value)"
        )
    return secret or None


def settings_from_args(args: argparse.Namespace) -> EdgeSettings:
    return EdgeSettings(
        listen=args.listen,
        proxies=tuple(args.proxy or (DEFAULT_PROXY,)),
        cors_origins=tuple(args.cors_origin or DEFAULT_CORS_ORIGINS),
        health_interval_s=args.health_interval_s,
        sse_coalesce_ms=args.sse_coalesce_ms,
        max_requests_per_io_cycle=args.max_requests_per_io_cycle,
        edge_secret=_edge_secret(args.edge_secret_file),
        compression=not args.no_compression,
        compress_min_bytes=args.compress_min_bytes,
        compress_sse=args.compress_sse,
        admin_view=args.admin_view,
        descriptor=args.descriptor,
        page=args.page,
    )


def main(args: argparse.Namespace) -> int:
    try:
        settings = settings_from_args(args)
        if args.print_config:
            sys.stdout.write(render(settings, reveal_secret=False))
            return 0
    except (EdgeError, ValueError, OSError) as exc:
        print(f"aiproxy envoy: {exc}", file=sys.stderr)
        return 2
    return run(
        settings,
        log_level=args.log_level,
        concurrency=args.concurrency,
        startup_wait_s=args.startup_wait_s,
        log_flush_ms=args.log_flush_ms,
        drain_s=args.drain_s,
    )


def parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="aiproxy envoy")
    add_arguments(parser)
    return parser.parse_args(list(argv))
