"""Figures from raw measurements: percentiles, ratios, medians of repeated runs, the
merge of stream results, and how rows are printed while the benchmark runs."""

from __future__ import annotations

import datetime as dt
import math
from typing import Any

from bench import h2load


def merge_stream_results(
    outs: list[dict[str, Any]], watched: dict[str, Any] | None, k: int
) -> dict[str, Any]:
    keys = (
        "streams",
        "calls",
        "ok",
        "failed",
        "messages",
        "heartbeats",
        "pieces_expected",
        "pieces_delivered",
        "lost_pieces",
        "seq_errors",
        "text_mismatch",
        "no_final",
        "open_peak",
        "client_cpu_s",
    )
    m: dict[str, Any] = {key: sum(o[key] for o in outs) for key in keys}
    errors: dict[str, int] = {}
    for o in outs:
        for e, c in o["errors"].items():
            errors[e] = errors.get(e, 0) + c
    m["errors"] = errors
    ttfc = sorted(t for o in outs for t in o["ttfc_s"])
    starts = [o["first_start"] for o in outs if o["first_start"] is not None]
    window = (max(o["last_end"] for o in outs) - min(starts)) if starts else math.nan
    m["window_s"] = window
    m["chunks_per_s"] = m["pieces_delivered"] / window if window else 0.0
    m["messages_per_s"] = m["messages"] / window if window else 0.0
    m["ttfc_p50_ms"] = percentile(ttfc, 50)
    m["ttfc_p99_ms"] = percentile(ttfc, 99)
    hist: dict[int, int] = {}
    for o in outs:
        for bucket, count in o.get("interval_hist", {}).items():
            hist[int(bucket)] = hist.get(int(bucket), 0) + count
    m["chunk_interval_p50_ms"] = hist_p(hist, 50)
    m["chunk_interval_p99_ms"] = hist_p(hist, 99)
    # The streaming spec's own measure: the mean interval (< 100 ms; alert over 200 ms).
    total = sum(hist.values())
    m["chunk_interval_mean_ms"] = (
        sum((b + 0.5) / 10 * c for b, c in hist.items()) / total if total else None
    )
    m["server_cpu_us_per_call"] = None
    m["client_cpu_us_per_chunk"] = (
        m["client_cpu_s"] / m["pieces_delivered"] * 1e6 if m["pieces_delivered"] else None
    )
    m["zero_loss"] = not (
        m["failed"] or m["lost_pieces"] or m["seq_errors"] or m["text_mismatch"] or m["no_final"]
    )
    if watched is not None:
        m["server_rss_before"] = watched["rss_before"]
        m["server_rss_peak"] = watched["rss_peak"]
        m["server_bytes_per_stream"] = (watched["rss_peak"] - watched["rss_before"]) / max(
            1, m["open_peak"]
        )
        m["server_cpu_s"] = watched["cpu_s"]
        m["server_cpu_us_per_chunk"] = (
            watched["cpu_s"] / m["pieces_delivered"] * 1e6 if m["pieces_delivered"] else None
        )
        m["server_cpu_us_per_call"] = watched["cpu_s"] / m["calls"] * 1e6 if m["calls"] else None
    return m


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, or None when either is missing or the base is not positive."""
    if a is None or b is None or b <= 0 or math.isnan(a) or math.isnan(b):
        return None
    return a / b


def fmt_x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def median_run(runs: list[dict[str, Any]], key: str, keep: tuple[str, ...]) -> dict[str, Any]:
    """The repetition with the median `key` (the lower middle of an even count), with every
    repetition's `keep` figures under "reps" and `verified`/`zero_loss` true only when
    every repetition's is."""
    ordered = sorted(runs, key=lambda r: (r.get(key) is None, r.get(key) or 0.0))
    out = dict(ordered[(len(ordered) - 1) // 2])
    if len(runs) > 1:
        out["reps"] = [{k: r.get(k) for k in keep} for r in runs]
        for flag in ("verified", "zero_loss"):
            if flag in out:
                out[flag] = all(r.get(flag) for r in runs)
    return out


def hist_p(hist: dict[int, int], p: float) -> float | None:
    """Percentile of a 0.1 ms-bucket histogram, as the bucket's upper edge in ms."""
    total = sum(hist.values())
    if not total:
        return None
    rank = p / 100 * total
    seen = 0
    for bucket in sorted(hist):
        seen += hist[bucket]
        if seen >= rank:
            return (bucket + 1) / 10
    return (max(hist) + 1) / 10


def percentile(values: list[float], p: float) -> float | None:
    v = h2load.percentile(values, p)
    return None if v is None else v * 1000


def print_stream(shape: dict[str, Any], path: str, r: dict[str, Any]) -> None:
    print(
        f"  streams {shape['name']:<12} {path:<6} ok {r['ok']}/{r['streams']}  {r['chunks_per_s']:8.0f} chunks/s  "
        f"ttfc p50 {r['ttfc_p50_ms'] or 0:.1f} ms p99 {r['ttfc_p99_ms'] or 0:.1f} ms  interval mean {r.get('chunk_interval_mean_ms') or 0:.1f} p99 {r.get('chunk_interval_p99_ms') or 0:.1f} ms  {r.get('messages_per_s') or 0:.0f} msg/s  lost {r['lost_pieces']} seq-err {r['seq_errors']}  "
        f"server {r.get('server_cpu_us_per_chunk') or 0:.0f} us/chunk {r.get('server_bytes_per_stream', 0) / 1024:.1f} KiB/stream  errors {r['errors']}",
        flush=True,
    )


def fmt_ms(us: float | None) -> str:
    return "   -   " if us is None else f"{us / 1000:6.2f} ms"


def stamp() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S")
