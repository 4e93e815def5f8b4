"""`lenserve bench compare`: one server per configuration, the same trace replayed against each.

A configuration is `key=value` pairs joined by commas, configurations joined by semicolons:
"policy=fcfs;policy=sjf;attention=padded,max-num-seqs=32". Each becomes
`<server command> --host H --port P --policy sjf ...`, started fresh, polled on GET /health,
replayed against, and stopped before the next one starts, so they never share the machine.
"""
from __future__ import annotations

import json
import re
import shlex
import sys
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import httpx

from lenserve.server.process import ServerProcess, free_port
from lenserve.traces.replay import ReplayConfig, replay
from lenserve.traces.trace import Trace

DEFAULT_SERVER_CMD = f"{shlex.quote(sys.executable)} -m lenserve.cli serve"


def parse_configs(spec: str) -> list[dict[str, str]]:
    """'policy=fcfs;attention=padded,max-num-seqs=32' -> [{'policy': 'fcfs'}, {'attention': 'padded', 'max-num-seqs': '32'}]."""
    configs = []
    for part in spec.split(";"):
        part = part.strip()
        if not part:
            continue
        config = {}
        for item in part.split(","):
            key, sep, value = item.strip().partition("=")
            key = key.strip().lstrip("-")
            if not sep or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", key) or not value.strip():
                raise ValueError(f"--configs: {item.strip()!r} is not key=value (in {part!r})")
            config[key] = value.strip()
        configs.append(config)
    if not configs:
        raise ValueError("--configs: no configuration given")
    return configs


def config_label(config: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in config.items()) or "default"


def _dir_name(label: str, index: int) -> str:
    return f"{index:02d}-" + re.sub(r"[^A-Za-z0-9._-]+", "_", label)


def server_command(server_cmd: str, host: str, port: int, config: dict[str, str], serve_args: str = "") -> list[str]:
    args = shlex.split(server_cmd) + ["--host", host, "--port", str(port)]
    for key, value in config.items():
        args += [f"--{key}", value]
    return args + shlex.split(serve_args)


COMPARE_COLUMNS = (
    ("completed", lambda r: f"{r['num_completed']}/{r['num_requests']}"),
    ("failed", lambda r: str(r["num_failed"])),
    ("TTFT p50 (ms)", lambda r: _ms(r["ttft_s"], "p50")),
    ("TTFT p99 (ms)", lambda r: _ms(r["ttft_s"], "p99")),
    ("TPOT p50 (ms)", lambda r: _ms(r["tpot_s"], "p50")),
    ("TPOT p99 (ms)", lambda r: _ms(r["tpot_s"], "p99")),
    ("E2E p50 (s)", lambda r: _num(r["e2e_s"] and r["e2e_s"]["p50"])),
    ("E2E p99 (s)", lambda r: _num(r["e2e_s"] and r["e2e_s"]["p99"])),
    ("req/s", lambda r: _num(r["throughput_req_s"])),
    ("tok/s", lambda r: _num(r["throughput_tok_s"], ".1f")),
    ("goodput req/s", lambda r: _num(r["goodput_req_s"])),
)


def _ms(stats, key: str) -> str:
    return "–" if not stats or stats.get(key) is None else f"{stats[key] * 1000:.1f}"


def _num(x, fmt: str = ".2f") -> str:
    return "–" if x is None else format(x, fmt)


def render_table(results: Sequence[dict]) -> str:
    header = "| config | " + " | ".join(name for name, _ in COMPARE_COLUMNS) + " |"
    lines = [header, "|" + "---|" * (len(COMPARE_COLUMNS) + 1)]
    for result in results:
        report = result.get("report")
        if report is None:
            lines.append(f"| {result['label']} | " + " | ".join(["–"] * len(COMPARE_COLUMNS)) + f" |  ← {result.get('error', 'failed')}")
            continue
        lines.append(f"| {result['label']} | " + " | ".join(fmt(report) for _, fmt in COMPARE_COLUMNS) + " |")
    return "\n".join(lines)


def plot_compare(results: Sequence[dict], path: Path) -> None:
    from matplotlib.figure import Figure

    ok = [r for r in results if r.get("report")]
    labels = [r["label"] for r in ok]
    fig = Figure(figsize=(max(8, 2.2 * len(labels) + 4), 7), layout="constrained")
    axes = fig.subplots(2, 2)
    panels = (
        ("TTFT (s)", "ttft_s"),
        ("TPOT (s)", "tpot_s"),
        ("E2E latency (s)", "e2e_s"),
    )
    x = range(len(labels))
    for ax, (title, key) in zip(axes.flat, panels):
        for offset, (q, color) in zip((-0.2, 0.2), (("p50", "tab:blue"), ("p99", "tab:orange"))):
            values = [(r["report"][key] or {}).get(q) or 0.0 for r in ok]
            ax.bar([i + offset for i in x], values, width=0.4, label=q, color=color)
        ax.set_title(title)
        ax.set_xticks(list(x), labels, rotation=20, ha="right")
        ax.legend()
        ax.grid(alpha=0.3, axis="y")
    ax = axes[1, 1]
    ax.bar([i - 0.2 for i in x], [r["report"]["throughput_req_s"] or 0.0 for r in ok], width=0.4, label="throughput")
    ax.bar([i + 0.2 for i in x], [r["report"]["goodput_req_s"] or 0.0 for r in ok], width=0.4, label="goodput")
    ax.set_title("requests / s")
    ax.set_xticks(list(x), labels, rotation=20, ha="right")
    ax.legend()
    ax.grid(alpha=0.3, axis="y")
    fig.savefig(path, dpi=100)


def compare(
    trace: Trace,
    configs: Sequence[dict[str, str]],
    replay_config: ReplayConfig,
    out_dir: str | Path,
    *,
    server_cmd: str = DEFAULT_SERVER_CMD,
    serve_args: str = "",
    host: str = "127.0.0.1",
    startup_timeout_s: float = 600.0,
) -> dict:
    """Runs every configuration in turn; writes compare.json, compare.md and compare.png."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for index, config in enumerate(configs):
        label = config_label(config)
        run_dir = out / _dir_name(label, index)
        run_dir.mkdir(parents=True, exist_ok=True)
        port = free_port(host)
        url = f"http://{host}:{port}"
        argv = server_command(server_cmd, host, port, config, serve_args)
        result = {"label": label, "config": config, "server_argv": argv, "dir": run_dir.name}
        print(f"[{index + 1}/{len(configs)}] {label}: {shlex.join(argv)}", file=sys.stderr, flush=True)
        try:
            with ServerProcess(argv, run_dir / "server.log", url) as server:
                server.wait_healthy(startup_timeout_s)
                result["report"] = replay(trace, replace(replay_config, url=url), run_dir)
        except (RuntimeError, ValueError, httpx.HTTPError) as e:
            result["error"] = str(e)
            print(f"  failed: {e}", file=sys.stderr)
        results.append(result)
        if result.get("report", {}).get("interrupted"):
            break  # Ctrl-C: keep what ran, start no further server

    summary = {
        "trace": {"name": trace.name, "source": trace.source, "num_requests": len(trace)},
        "replay": {"mode": replay_config.mode, "time_scale": replay_config.time_scale, "slo": {"ttft_s": replay_config.slo_ttft_s, "tpot_s": replay_config.slo_tpot_s}},
        "server_cmd": server_cmd,
        "serve_args": serve_args,
        "results": results,
    }
    (out / "compare.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    table = render_table(results)
    md = [f"# bench compare: {trace.name}", "", f"{len(trace)} requests, mode {replay_config.mode}, time scale {replay_config.time_scale}; "
          f"goodput SLOs TTFT ≤ {replay_config.slo_ttft_s} s, TPOT ≤ {replay_config.slo_tpot_s} s.", "", table, ""]
    if any(r.get("report") for r in results):
        plot_compare(results, out / "compare.png")
        md.append("![compare](compare.png)")
    (out / "compare.md").write_text("\n".join(md) + "\n")
    return summary
