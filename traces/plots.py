"""PNG plots of a replay: latency CDFs, request and token rates over time, server queue and KV usage.

Figures are built with matplotlib's object API (`Figure`, rendered by Agg), never pyplot, so
no display or global backend state is involved.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from lenserve.traces.report import rate_series, token_times_s

PLOT_FILES = ("latency_cdf.png", "throughput.png", "server_metrics.png")


def _figure(nrows: int, ncols: int, size: tuple[float, float]):
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, layout="constrained")
    return fig, fig.subplots(nrows, ncols, squeeze=False)


def _no_data(ax, what: str) -> None:
    ax.text(0.5, 0.5, f"no {what}", ha="center", va="center", transform=ax.transAxes, color="gray")


def plot_latency_cdfs(records: Sequence[Mapping], slo: Mapping, path: Path) -> None:
    fig, axes = _figure(2, 2, (10, 7))
    done = [r for r in records if r.get("ok")]
    series = (
        ("TTFT", [r["ttft_s"] for r in done if r.get("ttft_s") is not None], slo.get("ttft_s")),
        ("TPOT", [r["tpot_s"] for r in done if r.get("tpot_s") is not None], slo.get("tpot_s")),
        ("ITL", [x for r in done for x in (r.get("itl_s") or ())], None),
        ("E2E latency", [r["e2e_s"] for r in done if r.get("e2e_s") is not None], None),
    )
    for ax, (label, values, limit) in zip(axes.flat, series):
        ax.set_title(label)
        ax.set_xlabel("seconds")
        ax.set_ylabel("fraction of requests" if label != "ITL" else "fraction of tokens")
        ax.grid(alpha=0.3)
        if not values:
            _no_data(ax, "completed requests")
            continue
        x = np.sort(np.asarray(values, np.float64))
        ax.step(x, np.arange(1, len(x) + 1) / len(x), where="post")
        if limit is not None:
            ax.axvline(limit, color="tab:red", linestyle="--", label=f"SLO {limit:g} s")
            ax.legend(loc="lower right")
    fig.savefig(path, dpi=100)


def plot_throughput(records: Sequence[Mapping], path: Path, bin_s: float = 1.0) -> None:
    fig, axes = _figure(2, 1, (10, 6.5))
    ends = [r["end_s"] for r in records if r.get("end_s") is not None]
    sends = [r["sent_s"] for r in records if r.get("sent_s") is not None]
    end = max(ends + sends, default=0.0)
    ax = axes[0, 0]
    if sends:
        t, sent = rate_series(sends, bin_s, end)
        _, done = rate_series([r["end_s"] for r in records if r.get("ok")], bin_s, end)
        _, failed = rate_series([r["end_s"] for r in records if not r.get("ok") and r.get("end_s") is not None], bin_s, end)
        ax.step(t, sent, where="post", label="sent (arrival rate)")
        ax.step(t, done, where="post", label="completed")
        if failed.any():
            ax.step(t, failed, where="post", label="failed", color="tab:red")
        ax.legend(loc="upper right")
    else:
        _no_data(ax, "requests")
    ax.set_ylabel("requests / s")
    ax.set_title(f"request rates ({bin_s:g} s bins)")
    ax.grid(alpha=0.3)
    ax = axes[1, 0]
    tokens = [t for r in records if r.get("ok") for t in token_times_s(r)]
    if tokens:
        t, rate = rate_series(tokens, bin_s, end)
        ax.step(t, rate, where="post", color="tab:green")
    else:
        _no_data(ax, "tokens")
    ax.set_ylabel("output tokens / s")
    ax.set_xlabel("seconds since replay start")
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=100)


def plot_server_metrics(samples: Sequence[Mapping], path: Path) -> None:
    fig, axes = _figure(2, 1, (10, 6.5))
    t = np.asarray([s["t_s"] for s in samples], np.float64)

    def column(name: str) -> np.ndarray:
        return np.asarray([np.nan if s.get(name) is None else s[name] for s in samples], np.float64)

    ax = axes[0, 0]
    plotted = False
    for name, label in (("num_requests_running", "running"), ("num_requests_waiting", "waiting (queue depth)")):
        y = column(name)
        if len(y) and not np.isnan(y).all():
            ax.plot(t, y, label=label)
            plotted = True
    if plotted:
        ax.legend(loc="upper right")
    else:
        _no_data(ax, "queue metrics from /metrics")
    ax.set_ylabel("requests")
    ax.set_title("server state (scraped from /metrics)")
    ax.grid(alpha=0.3)
    ax = axes[1, 0]
    y = column("kv_cache_usage_perc")
    if len(y) and not np.isnan(y).all():
        ax.plot(t, y * 100, color="tab:purple")
        ax.set_ylim(0, 105)
    else:
        _no_data(ax, "KV-cache metric from /metrics")
    ax.set_ylabel("KV cache used (%)")
    ax.set_xlabel("seconds since replay start")
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=100)


def write_plots(out_dir: Path, records: Sequence[Mapping], samples: Sequence[Mapping], report: Mapping) -> list[Path]:
    out_dir = Path(out_dir)
    span = report.get("duration_s") or 0.0
    bin_s = 1.0 if span <= 600 else float(np.ceil(span / 600))
    paths = [out_dir / name for name in PLOT_FILES]
    plot_latency_cdfs(records, report.get("slo", {}), paths[0])
    plot_throughput(records, paths[1], bin_s)
    plot_server_metrics(samples, paths[2])
    return paths
