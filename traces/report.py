"""Replay report: statistics over per-request records (pure functions) and report.json / report.md.

A record is a dict as written to requests.jsonl (see replay.RequestRecord): times in seconds
after the replay's start (`sent_s`, `end_s`), latencies in seconds (`ttft_s`, `tpot_s`,
`e2e_s`, `itl_s` a list), `ok`, `status`, `output_tokens`.
"""
from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

LATENCY_KEYS = ("ttft_s", "tpot_s", "itl_s", "e2e_s")


def latency_stats(values: Iterable[float]) -> dict | None:
    """{mean, p50, p90, p99} (linear-interpolated percentiles), or None for no values."""
    x = np.asarray([v for v in values if v is not None], np.float64)
    if not len(x):
        return None
    p50, p90, p99 = np.percentile(x, [50, 90, 99])
    return {"mean": float(x.mean()), "p50": float(p50), "p90": float(p90), "p99": float(p99)}


def tpot_s(e2e_s: float | None, ttft_s: float | None, output_tokens: int) -> float | None:
    """Time per output token after the first: (e2e - ttft) / (tokens - 1); None below 2 tokens."""
    if e2e_s is None or ttft_s is None or output_tokens < 2:
        return None
    return (e2e_s - ttft_s) / (output_tokens - 1)


def meets_slo(record: Mapping, slo_ttft_s: float, slo_tpot_s: float) -> bool:
    """A completed request within both SLOs; one without a TPOT (one token) meets the TPOT SLO."""
    if not record.get("ok") or record.get("ttft_s") is None:
        return False
    tpot = record.get("tpot_s")
    return record["ttft_s"] <= slo_ttft_s and (tpot is None or tpot <= slo_tpot_s)


def measured_span_s(records: Sequence[Mapping]) -> float:
    """From the first send to the last response end (or send, for requests that never ended)."""
    sent = [r["sent_s"] for r in records if r.get("sent_s") is not None]
    if not sent:
        return 0.0
    ends = [r["end_s"] for r in records if r.get("end_s") is not None] + sent
    return max(ends) - min(sent)


def build_report(records: Sequence[Mapping], slo_ttft_s: float, slo_tpot_s: float) -> dict:
    completed = [r for r in records if r.get("ok")]
    failed = [r for r in records if not r.get("ok")]
    span = measured_span_s(records)

    def per_s(n: float) -> float | None:
        return n / span if span > 0 else None

    lag = np.asarray([r["send_lag_s"] for r in records if r.get("send_lag_s") is not None], np.float64)
    mismatched = [
        r for r in completed if r.get("prompt_tokens_server") is not None and r.get("prompt_tokens") is not None and r["prompt_tokens_server"] != r["prompt_tokens"]
    ]
    report = {
        "num_requests": len(records),
        "num_completed": len(completed),
        "num_failed": len(failed),
        "failures_by_status": dict(sorted(Counter(str(r.get("status")) for r in failed).items())),
        "ttft_s": latency_stats(r.get("ttft_s") for r in completed),
        "tpot_s": latency_stats(r.get("tpot_s") for r in completed),
        "itl_s": latency_stats(x for r in completed for x in (r.get("itl_s") or ())),
        "e2e_s": latency_stats(r.get("e2e_s") for r in completed),
        "throughput_req_s": per_s(len(completed)),
        "throughput_tok_s": per_s(sum(r.get("output_tokens") or 0 for r in completed)),
        "goodput_req_s": per_s(sum(meets_slo(r, slo_ttft_s, slo_tpot_s) for r in completed)),
        "send_lag_s": {
            "p50": float(np.percentile(lag, 50)) if len(lag) else None,
            "p99": float(np.percentile(lag, 99)) if len(lag) else None,
            "max": float(lag.max()) if len(lag) else None,
        },
        "slo": {"ttft_s": slo_ttft_s, "tpot_s": slo_tpot_s},
        "duration_s": span,
        "num_output_tokens": sum(r.get("output_tokens") or 0 for r in completed),
        "num_prompt_tokens_mismatched": len(mismatched),
    }
    return report


def rate_series(times_s: Iterable[float], bin_s: float, end_s: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(bin start times, events per second in each bin) for event times in seconds."""
    t = np.asarray([x for x in times_s if x is not None], np.float64)
    if bin_s <= 0:
        raise ValueError(f"bin width must be > 0 s, got {bin_s}")
    end = end_s if end_s is not None else (float(t.max()) if len(t) else 0.0)
    num_bins = max(1, math.ceil(end / bin_s - 1e-9))
    counts = np.bincount(np.clip((t // bin_s).astype(np.int64), 0, num_bins - 1), minlength=num_bins) if len(t) else np.zeros(num_bins)
    return np.arange(num_bins) * bin_s, counts / bin_s


def token_times_s(record: Mapping) -> list[float]:
    """When each streamed token arrived, in seconds after the replay's start."""
    if record.get("sent_s") is None or record.get("ttft_s") is None:
        return []
    t = record["sent_s"] + record["ttft_s"]
    times = [t]
    for gap in record.get("itl_s") or ():
        t += gap
        times.append(t)
    return times


# ---------------------------------------------------------------------------------------------
# Writing


def _ms(stats: Mapping | None, key: str) -> str:
    if not stats or stats.get(key) is None:
        return "–"
    return f"{stats[key] * 1000:.1f}"


def _num(x: float | None, fmt: str = ".2f") -> str:
    return "–" if x is None else format(x, fmt)


def render_markdown(report: Mapping, plots: Sequence[str] = ()) -> str:
    info = report.get("replay", {})
    lines = [f"# Replay report: {info.get('trace', {}).get('name', 'trace')}", ""]
    if info:
        lines += [
            f"- server: `{info.get('url')}`, model `{info.get('model')}`, mode `{info.get('mode')}`, endpoint `{info.get('endpoint')}`",
            f"- trace: `{info.get('trace', {}).get('source')}`, time scale {info.get('time_scale')}, started {info.get('started_at')}",
        ]
    lines += [
        f"- requests: {report['num_requests']} sent, {report['num_completed']} completed, {report['num_failed']} failed"
        + (f" ({', '.join(f'{k}: {v}' for k, v in report['failures_by_status'].items())})" if report["failures_by_status"] else ""),
        f"- duration {_num(report.get('duration_s'), '.1f')} s; throughput {_num(report['throughput_req_s'])} req/s, "
        f"{_num(report['throughput_tok_s'], '.1f')} output tok/s",
        f"- goodput {_num(report['goodput_req_s'])} req/s (TTFT ≤ {report['slo']['ttft_s']} s and TPOT ≤ {report['slo']['tpot_s']} s)",
        f"- send lag p50 {_ms(report['send_lag_s'], 'p50')} ms, p99 {_ms(report['send_lag_s'], 'p99')} ms",
    ]
    if report.get("num_prompt_tokens_mismatched"):
        lines.append(f"- {report['num_prompt_tokens_mismatched']} requests had a prompt token count (server usage) other than the target")
    if report.get("interrupted"):
        lines.append("- **interrupted**: the replay was stopped before the trace ended")
    lines += ["", "| latency (ms) | mean | p50 | p90 | p99 |", "|---|---|---|---|---|"]
    for key, label in (("ttft_s", "TTFT"), ("tpot_s", "TPOT"), ("itl_s", "ITL"), ("e2e_s", "E2E")):
        s = report.get(key)
        lines.append(f"| {label} | {_ms(s, 'mean')} | {_ms(s, 'p50')} | {_ms(s, 'p90')} | {_ms(s, 'p99')} |")
    if plots:
        lines.append("")
        lines += [f"![{Path(p).stem}]({Path(p).name})" for p in plots]
    return "\n".join(lines) + "\n"


def write_jsonl(path: str | Path, rows: Iterable[Mapping]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
