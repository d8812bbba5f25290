"""Stream load generator: K concurrent streams, every chunk checked. Runs as its own process.

    python -m bench.streamload --spec SPEC.json

SPEC (JSON): {"mode": "grpc"|"sse"|"openai", "target": "HOST:PORT", "path": "/pkg.Svc/Method"
or "/api/..." or "/v1/chat/completions", "request": "<hex of the serialized request>" (grpc)
or {...} (the JSON body: sse, and openai, whose events are OpenAI's chunks),
"expected": ["piece", ...], "headers": {...} (optional, sse/openai), "streams": K, "ramp_s": S, "timeout_s": T, "channels": C,
"duration_s": D, "max_rounds": R}: K callers each run stream after stream for D seconds.

Each stream checks that `seq` counts 0, 1, 2, ... with no gap or repeat, that the deltas
concatenate to exactly the expected text (a lost, duplicated or reordered chunk changes
it; the proxy may merge queued deltas, which does not), that a final chunk came, and that
the call ended OK. gRPC mode reads raw bytes and parses only the chunk (upb, C), so the
generator spends as little CPU as it can; its own CPU time is reported.

Prints one JSON line with the aggregate, the per-stream time to first chunk, and a
histogram of the interval between one content chunk and the next of the same stream (what
a caller sees of coalescing: bucket = tenths of a millisecond).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import time
from typing import Any


class Tally:
    def __init__(self, expected: list[str]) -> None:
        self.expected_text = "".join(expected)
        self.expected_pieces = expected
        self.ok = 0
        self.failed = 0
        self.errors: dict[str, int] = {}
        self.messages = 0
        self.heartbeats = 0
        self.pieces_delivered = 0
        self.lost_pieces = 0
        self.seq_errors = 0  # gaps, repeats, out-of-order seq
        self.text_mismatch = 0
        self.no_final = 0
        self.ttfc_s: list[float] = []
        self.interval_hist: dict[int, int] = {}  # 0.1 ms bucket -> count
        self.open_now = 0
        self.open_peak = 0
        self.first_start: float | None = None
        self.last_end = 0.0

    def interval(self, seconds: float) -> None:
        bucket = int(seconds * 10_000)
        self.interval_hist[bucket] = self.interval_hist.get(bucket, 0) + 1

    def error(self, what: str) -> None:
        self.failed += 1
        self.errors[what] = self.errors.get(what, 0) + 1

    def settle(self, text: str, seq_ok: bool, final: bool) -> bool:
        """Account one finished stream's content; True when it is complete and in order."""
        good = True
        if not seq_ok:
            self.seq_errors += 1
            good = False
        if text == self.expected_text:
            self.pieces_delivered += len(self.expected_pieces)
        else:
            self.text_mismatch += 1
            good = False
            # Pieces that arrived intact, in order, from the start.
            n = 0
            pos = 0
            for piece in self.expected_pieces:
                if text.startswith(piece, pos):
                    pos += len(piece)
                    n += 1
                else:
                    break
            self.pieces_delivered += n
            self.lost_pieces += len(self.expected_pieces) - n
        if not final:
            self.no_final += 1
            good = False
        return good


async def grpc_stream(channel: Any, spec: dict[str, Any], tally: Tally, chunk_cls: type) -> None:
    import grpc

    call = channel.unary_stream(spec["path"])(
        bytes.fromhex(spec["request"]), timeout=spec["timeout_s"]
    )
    t0 = time.monotonic()
    tally.first_start = t0 if tally.first_start is None else min(tally.first_start, t0)
    tally.open_now += 1
    tally.open_peak = max(tally.open_peak, tally.open_now)
    parts: list[str] = []
    expect_seq = 0
    seq_ok = True
    final = False
    first = True
    last_content = 0.0
    try:
        async for raw in call:
            msg = chunk_cls.FromString(raw)
            now = time.monotonic()
            if first:
                tally.ttfc_s.append(now - t0)
                first = False
            tally.messages += 1
            if msg.seq != expect_seq:
                seq_ok = False
            expect_seq = msg.seq + 1
            if msg.heartbeat:
                tally.heartbeats += 1
                continue
            if last_content:
                tally.interval(now - last_content)
            last_content = now
            if msg.HasField("error"):
                tally.error(f"in-band error {msg.error.code}")
                tally.settle("".join(parts), seq_ok, final)
                return
            parts.append(msg.delta)
            if msg.is_final:
                final = True
        code = await call.code()
        if code != grpc.StatusCode.OK:
            tally.error(code.name)
            tally.settle("".join(parts), seq_ok, final)
            return
    except grpc.aio.AioRpcError as exc:
        tally.error(exc.code().name)
        tally.settle("".join(parts), seq_ok, final)
        return
    finally:
        tally.open_now -= 1
        tally.last_end = max(tally.last_end, time.monotonic())
    if tally.settle("".join(parts), seq_ok, final):
        tally.ok += 1
    else:
        tally.failed += 1


async def sse_stream(spec: dict[str, Any], tally: Tally) -> None:
    """One POST with an SSE answer over its own HTTP/1.1 connection (as browsers do)."""
    host, port = spec["target"].rsplit(":", 1)
    body = json.dumps(spec["request"]).encode()
    t0 = time.monotonic()
    tally.first_start = t0 if tally.first_start is None else min(tally.first_start, t0)
    tally.open_now += 1
    tally.open_peak = max(tally.open_peak, tally.open_now)
    parts: list[str] = []
    expect_seq = 0
    seq_ok = True
    final = False
    first = True
    last_content = 0.0
    writer = None
    try:
        async with asyncio.timeout(spec["timeout_s"]):
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(
                (
                    f"POST {spec['path']} HTTP/1.1\r\nHost: {spec['target']}\r\n"
                    f"Content-Type: application/json\r\nAccept: text/event-stream\r\n"
                    + "".join(f"{k}: {v}\r\n" for k, v in spec.get("headers", {}).items())
                    + f"Content-Length: {len(body)}\r\n\r\n"
                ).encode()
                + body
            )
            status_line = await reader.readline()
            status = status_line.split(b" ", 2)[1].decode() if status_line.count(b" ") >= 1 else "?"
            headers: dict[str, str] = {}
            while True:
                line = await reader.readline()
                if line in (b"\r\n", b"\n", b""):
                    break
                k, _, v = line.decode("latin-1").partition(":")
                headers[k.strip().lower()] = v.strip()
            if status != "200":
                tally.error(f"HTTP {status}")
                return
            buf = b""
            openai = spec["mode"] == "openai"
            async for data in _body(reader, headers):
                buf += data
                while b"\n\n" in buf:
                    event, buf = buf.split(b"\n\n", 1)
                    for line in event.split(b"\n"):
                        if line.startswith(b": "):
                            tally.heartbeats += 1  # the OpenAI route's keep-alive comment
                            continue
                        if not line.startswith(b"data:"):
                            continue
                        if openai:
                            # OpenAI's chunks: no seq; the text in choices[0].delta; the
                            # finish_reason chunk is the final one, [DONE] ends the body.
                            if line == b"data: [DONE]":
                                continue
                            msg = json.loads(line[5:])
                            now = time.monotonic()
                            if first:
                                tally.ttfc_s.append(now - t0)
                                first = False
                            tally.messages += 1
                            if msg.get("error"):
                                tally.error("in-band error")
                                tally.settle("".join(parts), seq_ok, final)
                                return
                            choices = msg.get("choices") or [{}]
                            piece = choices[0].get("delta", {}).get("content")
                            if piece:
                                if last_content:
                                    tally.interval(now - last_content)
                                last_content = now
                                parts.append(piece)
                            if choices[0].get("finish_reason"):
                                final = True
                            continue
                        msg = json.loads(line[5:])
                        now = time.monotonic()
                        if first:
                            tally.ttfc_s.append(now - t0)
                            first = False
                        tally.messages += 1
                        seq = int(msg.get("seq", 0))
                        if seq != expect_seq:
                            seq_ok = False
                        expect_seq = seq + 1
                        if msg.get("heartbeat"):
                            tally.heartbeats += 1
                            continue
                        if last_content:
                            tally.interval(now - last_content)
                        last_content = now
                        if msg.get("error"):
                            tally.error(f"in-band error {msg['error'].get('code')}")
                            tally.settle("".join(parts), seq_ok, final)
                            return
                        parts.append(msg.get("delta", ""))
                        if msg.get("isFinal"):
                            final = True
    except TimeoutError:
        tally.error("timeout")
        tally.settle("".join(parts), seq_ok, final)
        return
    except (OSError, ValueError, IndexError) as exc:
        tally.error(type(exc).__name__)
        tally.settle("".join(parts), seq_ok, final)
        return
    finally:
        tally.open_now -= 1
        tally.last_end = max(tally.last_end, time.monotonic())
        if writer is not None:
            writer.close()
    if tally.settle("".join(parts), seq_ok, final):
        tally.ok += 1
    else:
        tally.failed += 1


async def _body(reader: asyncio.StreamReader, headers: dict[str, str]) -> Any:
    if headers.get("transfer-encoding", "").lower() == "chunked":
        while True:
            size_line = await reader.readline()
            if not size_line:
                return
            size = int(size_line.split(b";")[0].strip() or b"0", 16)
            if size == 0:
                await reader.readline()
                return
            data = await reader.readexactly(size)
            await reader.readexactly(2)
            yield data
    elif "content-length" in headers:
        yield await reader.readexactly(int(headers["content-length"]))
    else:
        while data := await reader.read(65536):
            yield data


async def run(spec: dict[str, Any]) -> dict[str, Any]:
    tally = Tally(spec["expected"])
    k = int(spec["streams"])
    ramp = float(spec.get("ramp_s", 0.0))
    cpu0 = time.process_time()
    channels: list[Any] = []
    if spec["mode"] == "grpc":
        import grpc

        from aiproxy.ai.agent.v1 import agent_service_pb2 as pb

        chunk_cls = getattr(pb, spec.get("chunk", "StreamGenerateResponse"))
        n_channels = max(1, int(spec.get("channels", 1)))
        options = [
            ("grpc.use_local_subchannel_pool", 1),  # one connection per channel, really
            ("grpc.max_receive_message_length", 16 * 1024 * 1024),
            ("grpc.enable_retries", 0),
        ]
        channels = [
            grpc.aio.insecure_channel(spec["target"], options=options) for _ in range(n_channels)
        ]
        for ch in channels:
            await asyncio.wait_for(ch.channel_ready(), 10)

        def make(i: int) -> Any:
            return grpc_stream(channels[i % n_channels], spec, tally, chunk_cls)
    else:

        def make(i: int) -> Any:
            return sse_stream(spec, tally)

    start = time.monotonic()
    duration = float(spec.get("duration_s", 0))
    max_rounds = int(spec.get("max_rounds", 1))

    async def slot(i: int) -> None:
        # One of K concurrent callers: stream after stream until duration_s is over
        # (just one stream when it is 0), at most max_rounds.
        for _ in range(max_rounds):
            await make(i)
            if time.monotonic() - start >= duration:
                return

    tasks = []
    batch = max(1, k // 50)  # open in 50 steps spread over ramp_s
    for i in range(k):
        tasks.append(asyncio.create_task(slot(i)))
        if ramp and (i + 1) % batch == 0:
            await asyncio.sleep(ramp / 50)
    await asyncio.gather(*tasks, return_exceptions=True)
    wall = time.monotonic() - start
    for ch in channels:
        await ch.close()
    cpu = time.process_time() - cpu0
    return {
        "streams": k,
        "calls": tally.ok + tally.failed,
        "ok": tally.ok,
        "failed": tally.failed,
        "errors": tally.errors,
        "messages": tally.messages,
        "heartbeats": tally.heartbeats,
        "pieces_expected": (tally.ok + tally.failed) * len(tally.expected_pieces),
        "pieces_delivered": tally.pieces_delivered,
        "lost_pieces": tally.lost_pieces,
        "seq_errors": tally.seq_errors,
        "text_mismatch": tally.text_mismatch,
        "no_final": tally.no_final,
        "open_peak": tally.open_peak,
        "first_start": tally.first_start,
        "last_end": tally.last_end,
        "wall_s": wall,
        "client_cpu_s": cpu,
        "ttfc_s": tally.ttfc_s,
        "interval_hist": tally.interval_hist,
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--spec", required=True)
    args = parser.parse_args()
    with open(args.spec) as f:
        spec = json.load(f)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, max(soft, 65536))
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    result = asyncio.run(run(spec))
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
