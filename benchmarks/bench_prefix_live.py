"""Prefix-cache-aware routing, live: `lenserve serve --replicas 2` on Ray Serve with --router pow2,
then cache-aware, each replaying the same time-scaled multi-turn trace with real shared prefixes
(exact mode, every trace block a deterministic block of `--block-tokens` tokens, so a session's
later turns and the shared system prompts hit the engines' prefix caches). Beside the measurement,
the simulator runs the same trace with the CPU cost model and the replicas' KV size, so its
cache-aware / pow2 TTFT ratio can be checked against the measured one.

    python benchmarks/bench_prefix_live.py [--sessions 120] [--time-scale 1.0] [--routers pow2,cache-aware]
    python benchmarks/bench_prefix_live.py --smoke     # a few sessions, to check the plumbing

Measured per router: token-level prefix hit rate (lenserve:prefix_cache_hits_total over
queries_total, both replicas, over the replay), mean / p50 / p99 TTFT and E2E at the client, the
router's decision time p99 (lenserve:router_decision_seconds histogram on the ingress; pow2 is Ray's
own router and is not timed). Criteria (issue #23): hit rate >= 1.3x pow2's, mean TTFT <= 0.75x
pow2's, decision p99 <= 2 ms, simulator TTFT ratio within +-15% of the measured ratio. The machine's
load average before and after each run is recorded: on a shared 2-core machine the numbers are noisy.
Writes benchmarks/results/prefix_routing_live.json and .png.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import subprocess
import sys
import tempfile
import time

import httpx
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import RESULTS, machine  # noqa: E402

from lenserve.server.process import ServerProcess, free_port  # noqa: E402
from lenserve.traces.sessions import MultiTurnConfig, synthesize_multiturn  # noqa: E402
from lenserve.traces.synth import LengthDist  # noqa: E402


def lscpu() -> dict:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    keep = ("Model name", "CPU(s)", "Thread(s) per core", "Flags")
    return {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in out.splitlines()) if k.strip() in keep}


def make_trace(args):
    cfg = MultiTurnConfig(
        num_sessions=args.sessions, session_rate_s=args.session_rate, session_cv=2.0, mean_turns=args.turns,
        think_time_s=args.think_time_s, min_gap_s=args.think_time_s / 3, num_system_prompts=4, system_tokens=args.system_tokens,
        message=LengthDist(mu=math.log(args.message_tokens), sigma=0.6, max_tokens=4 * args.message_tokens),
        answer=LengthDist(mu=math.log(args.answer_tokens), sigma=0.5, max_tokens=4 * args.answer_tokens),
        max_prompt_tokens=args.max_model_len - 4 * args.answer_tokens - 8, block_tokens=args.block_tokens, seed=args.seed)
    return synthesize_multiturn(cfg)


def scrape(url: str) -> dict:
    """Sums over replicas of the prefix-cache counters, KV blocks, and the router decision histogram."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url + "/metrics", timeout=30).text
    out = {"queries": 0.0, "hits": 0.0, "kv_blocks": 0.0, "decision_buckets": {}, "decision_count": 0.0}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == "lenserve:prefix_cache_queries_total":
                out["queries"] += s.value
            elif s.name == "lenserve:prefix_cache_hits_total":
                out["hits"] += s.value
            elif s.name == "lenserve:kv_cache_total_blocks":
                out["kv_blocks"] = max(out["kv_blocks"], s.value)
            elif s.name == "lenserve:router_decision_seconds_bucket":
                le = float(s.labels["le"])
                out["decision_buckets"][le] = out["decision_buckets"].get(le, 0.0) + s.value
            elif s.name == "lenserve:router_decision_seconds_count":
                out["decision_count"] += s.value
    return out


def histogram_quantile(buckets: dict[float, float], q: float) -> float | None:
    """The upper bound of the bucket holding quantile q (cumulative Prometheus buckets)."""
    if not buckets:
        return None
    total = max(buckets.values())
    if total <= 0:
        return None
    for le in sorted(buckets):
        if buckets[le] >= q * total:
            return le
    return math.inf


def run_live(router: str, trace, args, out_dir: str, log) -> dict:
    from lenserve.traces.replay import ReplayConfig, Replayer

    port = free_port()
    cmd = [sys.executable, "-m", "lenserve.cli", "serve", "--replicas", "2", "--router", router, "--port", str(port),
           "--predictor", args.predictor, "--max-model-len", str(args.max_model_len), "--kv-cache-memory-gb", str(args.kv_gb),
           "--max-queue", "100000"]
    log_path = os.path.join(out_dir, f"server_{router}.log")
    load_before = os.getloadavg()
    with ServerProcess(cmd, log_path, f"http://127.0.0.1:{port}", stop_timeout_s=90,
                       env={"RAY_USAGE_STATS_ENABLED": "0", "OMP_WAIT_POLICY": "PASSIVE"}) as proc:
        proc.wait_healthy(600, ready=lambda: len(_replicas(proc.url)) == 2)
        before = scrape(proc.url)
        cfg = ReplayConfig(url=proc.url, mode="exact", time_scale=args.time_scale, prefix_block_tokens=args.block_tokens,
                           metrics_interval_s=0, show_progress=False, request_timeout_s=args.request_timeout_s, seed=args.seed)
        replayer = Replayer(trace, cfg)
        t0 = time.monotonic()
        asyncio.run(replayer.run())
        wall = time.monotonic() - t0
        time.sleep(2.5)  # one more metrics push from each replica
        after = scrape(proc.url)
    ok = [r for r in replayer.records if r.ok]
    ttft = np.array([r.ttft_s for r in ok if r.ttft_s is not None])
    e2e = np.array([r.e2e_s for r in ok])
    queries, hits = after["queries"] - before["queries"], after["hits"] - before["hits"]
    buckets = {le: after["decision_buckets"].get(le, 0.0) - before["decision_buckets"].get(le, 0.0) for le in after["decision_buckets"]}
    res = {
        "router": router, "num_requests": len(replayer.records), "num_ok": len(ok),
        "errors": sorted({str(r.status) for r in replayer.records if not r.ok}),
        "prefix_hit_rate": hits / queries if queries else None, "prefix_query_tokens": queries, "prefix_hit_tokens": hits,
        "mean_ttft_s": float(ttft.mean()) if len(ttft) else None, "p50_ttft_s": float(np.percentile(ttft, 50)) if len(ttft) else None,
        "p99_ttft_s": float(np.percentile(ttft, 99)) if len(ttft) else None,
        "mean_e2e_s": float(e2e.mean()) if len(e2e) else None, "p99_e2e_s": float(np.percentile(e2e, 99)) if len(e2e) else None,
        "decision_p99_s": histogram_quantile(buckets, 0.99), "decisions": buckets.get(math.inf, 0.0),
        "replica_kv_blocks": after["kv_blocks"], "wall_s": round(wall, 1), "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
        "prompt_tokens_mismatch": sum(1 for r in ok if r.prompt_tokens_server is not None and r.prompt_tokens_server != r.prompt_tokens),
    }
    log(f"live {router}: " + json.dumps({k: v for k, v in res.items() if not isinstance(v, (list, dict))}))
    return res


def _replicas(url: str) -> set[str]:
    from prometheus_client.parser import text_string_to_metric_families

    with contextlib.suppress(httpx.HTTPError):
        text = httpx.get(url + "/metrics", timeout=10).text
        return {s.labels["replica"] for f in text_string_to_metric_families(text) if f.name == "lenserve:num_requests_running"
                for s in f.samples if s.labels.get("replica")}
    return set()


def run_sim(trace, routers, args, kv_blocks: int) -> dict:
    import dataclasses

    from lenserve.scheduler.cluster import simulate_cluster
    from lenserve.scheduler.cost_model import load_default
    from lenserve.scheduler.simulator import SimRequests, make_predictions, scheduler_config_for

    # the replicas' engine: the measured CPU cost model with half the cores each, the served KV size
    cost = dataclasses.replace(load_default(), num_kv_blocks=int(kv_blocks) or load_default().num_kv_blocks,
                               block_size=args.block_tokens, max_model_len=args.max_model_len)
    scale = args.block_tokens / float(trace.meta["block_tokens"])
    req = SimRequests.from_trace(trace, time_scale=args.time_scale, max_model_len=args.max_model_len, max_tokens=4096)
    if scale != 1:
        raise ValueError("the simulated trace must use the live block size")
    preds = make_predictions("oracle", req.output_tokens)
    out = {}
    for router in routers:
        s = simulate_cluster(req, 2, router, scheduler_config_for(cost), cost, preds).summary()
        out[router] = {k: s[k] for k in ("mean_ttft_s", "p99_ttft_s", "mean_e2e_s", "p99_e2e_s", "prefix_hit_rate", "busy_frac_mean")}
    return out


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    live = result["live"]
    routers = list(live)
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.8))
    axes[0].bar(routers, [live[r]["prefix_hit_rate"] or 0 for r in routers])
    axes[0].set_title("prefix hit rate (tokens)")
    axes[1].bar([f"{r}\nlive" for r in routers] + [f"{r}\nsim" for r in routers],
                [live[r]["mean_ttft_s"] or 0 for r in routers] + [result["sim"][r]["mean_ttft_s"] for r in routers])
    axes[1].set_title("mean TTFT, s")
    axes[2].bar(routers, [(live[r]["decision_p99_s"] or 0) * 1e3 for r in routers])
    axes[2].axhline(2.0, color="gray", ls="--")
    axes[2].set_title("router decision p99, ms (pow2: not timed)")
    fig.suptitle(f"2 replicas, {result['trace']['num_requests']} multi-turn requests, time scale {result['config']['time_scale']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sessions", type=int, default=120)
    p.add_argument("--session-rate", type=float, default=0.25, help="sessions starting per second (trace time)")
    p.add_argument("--turns", type=float, default=4.0)
    p.add_argument("--think-time-s", type=float, default=20.0)
    p.add_argument("--system-tokens", type=int, default=256)
    p.add_argument("--message-tokens", type=int, default=48, help="median new message, tokens")
    p.add_argument("--answer-tokens", type=int, default=24, help="median answer, tokens")
    p.add_argument("--block-tokens", type=int, default=16)
    p.add_argument("--time-scale", type=float, default=1.0)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--kv-gb", type=float, default=0.3, help="--kv-cache-memory-gb of each replica")
    p.add_argument("--predictor", default="default")
    p.add_argument("--routers", default="pow2,cache-aware")
    p.add_argument("--request-timeout-s", type=float, default=600.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="6 sessions, fast: checks the plumbing, numbers mean nothing")
    p.add_argument("--out", default=os.path.join(RESULTS, "prefix_routing_live.json"))
    p.add_argument("--plot", default=os.path.join(RESULTS, "prefix_routing_live.png"))
    args = p.parse_args(argv)
    if args.smoke:
        args.sessions, args.turns, args.think_time_s, args.session_rate, args.time_scale = 6, 3.0, 3.0, 2.0, 1.0
        args.system_tokens, args.message_tokens, args.answer_tokens, args.predictor = 64, 16, 6, "none"

    def log(*parts):
        print(*parts, file=sys.stderr, flush=True)

    trace = make_trace(args)
    routers = [r for r in args.routers.split(",") if r]
    result = {"meta": {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine(), "lscpu": lscpu(), "loadavg_start": os.getloadavg(),
                       "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip(),
                       "smoke": args.smoke},
              "config": {k: v for k, v in vars(args).items() if k not in ("out", "plot")},
              "trace": {"source": trace.source, "num_requests": len(trace), "duration_s": trace.duration_s,
                        "mean_prompt_tokens": float(trace.columns.prompt_tokens.mean()),
                        "mean_output_tokens": float(trace.columns.output_tokens.mean())},
              "live": {}}
    with tempfile.TemporaryDirectory() as out_dir:
        for router in routers:
            result["live"][router] = run_live(router, trace, args, out_dir, log)
    kv_blocks = max(r["replica_kv_blocks"] for r in result["live"].values())
    result["sim"] = run_sim(trace, routers, args, kv_blocks)
    if "pow2" in result["live"] and "cache-aware" in result["live"]:
        lp, lc = result["live"]["pow2"], result["live"]["cache-aware"]
        sp, sc = result["sim"]["pow2"], result["sim"]["cache-aware"]
        measured = lc["mean_ttft_s"] / lp["mean_ttft_s"] if lp["mean_ttft_s"] else None
        simulated = sc["mean_ttft_s"] / sp["mean_ttft_s"] if sp["mean_ttft_s"] else None
        hit_ratio = lc["prefix_hit_rate"] / lp["prefix_hit_rate"] if lp["prefix_hit_rate"] else None
        result["ratios"] = {"hit_rate_over_pow2": hit_ratio, "mean_ttft_over_pow2": measured, "sim_mean_ttft_over_pow2": simulated,
                            "sim_over_measured_ttft_ratio": simulated / measured if measured and simulated else None}
        result["criteria"] = {
            "hit_rate_ge_1.3x_pow2": hit_ratio is not None and hit_ratio >= 1.3,
            "mean_ttft_le_0.75x_pow2": measured is not None and measured <= 0.75,
            "decision_p99_le_2ms": lc["decision_p99_s"] is not None and lc["decision_p99_s"] <= 0.002,
            "sim_ttft_ratio_within_15pct": result["ratios"]["sim_over_measured_ttft_ratio"] is not None
            and abs(result["ratios"]["sim_over_measured_ttft_ratio"] - 1) <= 0.15,
        }
    result["meta"]["loadavg_end"] = os.getloadavg()
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    plot(result, args.plot)
    json.dump({k: result.get(k) for k in ("ratios", "criteria")}, sys.stdout, indent=1)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
