"""Prefix-cache-aware routing, live: `lenserve serve --replicas 2` on Ray Serve with --router pow2,
then cache-aware, each replaying the same time-scaled multi-turn trace with real shared prefixes
(exact mode, every trace block a deterministic block of `--block-tokens` tokens, so a session's
later turns and the shared system prompts hit the engines' prefix caches). The trace is the
generator's (lenserve.traces.sessions, its own length distributions, as the simulator benchmark
runs it); the time scale puts the simulated pow2 replicas at `--busy` (0.55) with one replica's cost
model measured in-process first.

    python benchmarks/bench_prefix_live.py [--sessions 32] [--time-scale S] [--routers pow2,cache-aware]
    python benchmarks/bench_prefix_live.py --smoke     # a few sessions, to check the plumbing

Measured per router: token-level prefix hit rate (lenserve:prefix_cache_hits_total over
queries_total, both replicas, over the replay), mean / p50 / p99 TTFT and E2E at the client, the
engines' own mean TTFT (the rest is HTTP, ingress and Ray), the router's decision time p99
(lenserve:router_decision_seconds histogram on the ingress, and the routing thread's CPU time of the
same decisions, lenserve:router_decision_cpu_seconds; pow2 is Ray's own router and is not timed). Beside the measurement, the cluster simulator runs the same trace with the cost model the
replicas fitted over all their steps in the first run (lenserve:step_cost_model_lifetime_seconds,
pooled) plus the overhead measured there, so its cache-aware / pow2 TTFT ratio can be checked
against the measured one; references: one cache as large as both replicas that every request
goes through (the most hit rate any router can reach) and the simulator's cache-oracle router.
Criteria (issue #23): hit rate >= 1.3x pow2's, mean TTFT <= 0.75x pow2's, decision p99 <= 2 ms,
simulator TTFT ratio within +-15% of the measured ratio. The machine's load average before and after
each run is recorded: on a shared 2-core machine the numbers are noisy.
Writes benchmarks/results/prefix_routing_live.json and .png.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
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

from lenserve.scheduler.cost_model import FEATURES  # noqa: E402
from lenserve.server.metrics import served_cost_model  # noqa: E402
from lenserve.server.process import ServerProcess, free_port  # noqa: E402
from lenserve.traces.sessions import MultiTurnConfig, shared_cache_hit_rate, synthesize_multiturn  # noqa: E402


def lscpu() -> dict:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    keep = ("Model name", "CPU(s)", "Thread(s) per core", "Flags")
    return {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in out.splitlines()) if k.strip() in keep}


def make_trace(args):
    """The synthetic multi-turn trace (lenserve.traces.sessions) with the generator's own length
    distributions (messages ~100 tokens, answers ~150, a 256-token system prompt), the ones the
    simulator benchmark (bench_prefix_routing.py) runs, unless the flags set the medians."""
    base = MultiTurnConfig()

    def median(dist, tokens):
        return dist if tokens is None else dataclasses.replace(dist, mu=math.log(tokens))

    answer = median(base.answer, args.answer_tokens)
    cfg = dataclasses.replace(
        base, num_sessions=args.sessions, session_rate_s=args.session_rate, mean_turns=args.turns, think_time_s=args.think_time_s,
        min_gap_s=args.think_time_s / 3, system_tokens=base.system_tokens if args.system_tokens is None else args.system_tokens,
        message=median(base.message, args.message_tokens), answer=answer,
        max_prompt_tokens=args.max_model_len - answer.max_tokens - 8, block_tokens=args.block_tokens, seed=args.seed)
    return synthesize_multiturn(cfg)


# per-replica counters a run compares with the simulator's per-replica summary
PER_REPLICA = {"lenserve:request_success_total": "num_requests", "lenserve:num_preemptions_total": "preemptions",
               "lenserve:prefix_cache_queries_total": "queries", "lenserve:prefix_cache_hits_total": "hits",
               "lenserve:prompt_tokens_total": "prompt_tokens_computed", "lenserve:generation_tokens_total": "generation_tokens",
               "lenserve:step_duration_seconds_sum": "busy_s"}


def per_request(records, n: int) -> dict:
    out = {"cached_tokens": [None] * n, "prompt_tokens": [None] * n, "ttft_s": [None] * n, "e2e_s": [None] * n}
    for r in records:
        if r.ok:
            out["cached_tokens"][r.index] = r.cached_tokens_server
            out["prompt_tokens"][r.index] = r.prompt_tokens_server
            out["ttft_s"][r.index] = None if r.ttft_s is None else round(r.ttft_s, 4)
            out["e2e_s"][r.index] = round(r.e2e_s, 4)
    return out


def per_replica_delta(before: dict, after: dict, wall_s: float) -> list[dict]:
    """Each replica's counters over the replay (after - before), its prefix hit rate and busy fraction,
    busiest first."""
    out = []
    for rep, a in after["per_replica"].items():
        b = before["per_replica"].get(rep, {})
        d = {k: a.get(k, 0.0) - b.get(k, 0.0) for k in a}
        d["prefix_hit_rate"] = d["hits"] / d["queries"] if d.get("queries") else None
        d["busy_frac"] = d.get("busy_s", 0.0) / wall_s if wall_s > 0 else None
        out.append(d)
    return sorted(out, key=lambda d: -d.get("busy_s", 0.0))


def scrape(url: str) -> dict:
    """Sums over replicas of the prefix-cache counters, KV blocks, and the router decision histogram."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url + "/metrics", timeout=30).text
    out = {"queries": 0.0, "hits": 0.0, "kv_blocks": 0.0, "decision_buckets": {}, "decision_cpu_buckets": {}, "decision_count": 0.0,
           "engine_ttft_sum": 0.0, "engine_ttft_count": 0.0, "text": text}
    per = out["per_replica"] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            name = PER_REPLICA.get(s.name)
            if name and s.labels.get("replica"):
                rep = per.setdefault(s.labels["replica"], {})
                rep[name] = rep.get(name, 0.0) + s.value
            if s.name == "lenserve:prefix_cache_queries_total":
                out["queries"] += s.value
            elif s.name == "lenserve:prefix_cache_hits_total":
                out["hits"] += s.value
            elif s.name == "lenserve:kv_cache_total_blocks":
                out["kv_blocks"] = max(out["kv_blocks"], s.value)
            elif s.name in ("lenserve:router_decision_seconds_bucket", "lenserve:router_decision_cpu_seconds_bucket"):
                key = "decision_cpu_buckets" if "cpu" in s.name else "decision_buckets"
                le = float(s.labels["le"])
                out[key][le] = out[key].get(le, 0.0) + s.value
            elif s.name == "lenserve:router_decision_seconds_count":
                out["decision_count"] += s.value
            elif s.name == "lenserve:time_to_first_token_seconds_sum":
                out["engine_ttft_sum"] += s.value
            elif s.name == "lenserve:time_to_first_token_seconds_count":
                out["engine_ttft_count"] += s.value
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
                           metrics_interval_s=0, show_progress=False, request_timeout_s=args.request_timeout_s, seed=args.seed,
                           temperature=0.0)
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
    engine_ttft_n = after["engine_ttft_count"] - before["engine_ttft_count"]
    engine_ttft = (after["engine_ttft_sum"] - before["engine_ttft_sum"]) / engine_ttft_n if engine_ttft_n else None
    buckets, cpu_buckets = ({le: after[key].get(le, 0.0) - before[key].get(le, 0.0) for le in after[key]}
                            for key in ("decision_buckets", "decision_cpu_buckets"))
    res = {
        "router": router, "num_requests": len(replayer.records), "num_ok": len(ok),
        "errors": sorted({str(r.status) for r in replayer.records if not r.ok}),
        "prefix_hit_rate": hits / queries if queries else None, "prefix_query_tokens": queries, "prefix_hit_tokens": hits,
        "mean_ttft_s": float(ttft.mean()) if len(ttft) else None, "p50_ttft_s": float(np.percentile(ttft, 50)) if len(ttft) else None,
        "p99_ttft_s": float(np.percentile(ttft, 99)) if len(ttft) else None,
        "engine_mean_ttft_s": engine_ttft,
        # what the client waits beyond the engines' own time to first token (HTTP, ingress, Ray)
        "overhead_mean_ttft_s": float(ttft.mean()) - engine_ttft if len(ttft) and engine_ttft is not None else None,
        "mean_e2e_s": float(e2e.mean()) if len(e2e) else None, "p99_e2e_s": float(np.percentile(e2e, 99)) if len(e2e) else None,
        "decision_p99_s": histogram_quantile(buckets, 0.99), "decision_p50_s": histogram_quantile(buckets, 0.5),
        "decision_cpu_p99_s": histogram_quantile(cpu_buckets, 0.99), "decision_buckets": {str(k): v for k, v in sorted(buckets.items())},
        "decisions": buckets.get(math.inf, 0.0),
        "replica_kv_blocks": after["kv_blocks"], "wall_s": round(wall, 1), "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
        "per_replica": per_replica_delta(before, after, wall),
        # per request, in trace order (None where it failed): what it found cached, and its times
        "requests": per_request(replayer.records, len(trace)),
        "prompt_tokens_mismatch": sum(1 for r in ok if r.prompt_tokens_server is not None and r.prompt_tokens_server != r.prompt_tokens),
    }
    log(f"live {router}: " + json.dumps({k: v for k, v in res.items() if not isinstance(v, (list, dict))}))
    res["_metrics_text"] = after["text"]
    return res


def _replicas(url: str) -> set[str]:
    from prometheus_client.parser import text_string_to_metric_families

    with contextlib.suppress(httpx.HTTPError):
        text = httpx.get(url + "/metrics", timeout=10).text
        return {s.labels["replica"] for f in text_string_to_metric_families(text) if f.name == "lenserve:num_requests_running"
                for s in f.samples if s.labels.get("replica")}
    return set()


SIM_ROUTERS = ("pow2", "cache-aware", "cache-oracle")


def _terms(cost) -> dict:
    return {k: getattr(cost, k) for k in FEATURES}


def replica_cost(args):
    """One replica's engine as `--replicas 2` runs it (half the cores, the served context and KV),
    its cost model measured in-process before the runs: what the time scale is set with."""
    from lenserve.config import EngineConfig
    from lenserve.server.ray_serve import default_threads
    from lenserve.sim_cli import measure_cost_model

    return measure_cost_model(EngineConfig(max_model_len=args.max_model_len, num_threads=default_threads(2),
                                           kv_cache_memory_gb=args.kv_gb), quick=True, temperature=0.0)


def sim_requests(trace, args, time_scale: float):
    from lenserve.scheduler.simulator import SimRequests

    if args.block_tokens != int(trace.meta["block_tokens"]):
        raise ValueError("the simulated trace must use the live block size")
    return SimRequests.from_trace(trace, time_scale=time_scale, max_model_len=args.max_model_len, max_tokens=4096)


def pick_time_scale(trace, cost, args, log) -> tuple[float, float]:
    """The time scale at which the simulated pow2 replicas (the offline cost model) are `--busy`
    busy on average, and that busy fraction."""
    from lenserve.scheduler.cluster import simulate_cluster
    from lenserve.scheduler.simulator import make_predictions, scheduler_config_for

    lo, hi, scale, busy = None, None, 1.0, 0.0
    for _ in range(14):
        req = sim_requests(trace, args, scale)
        s = simulate_cluster(req, 2, "pow2", scheduler_config_for(cost), cost, make_predictions(PREDICTIONS, req.output_tokens)).summary()
        busy = s["busy_frac_mean"]
        log(f"  time scale {scale:.4g}: simulated pow2 busy {busy:.3f}")
        if abs(busy - args.busy) <= 0.02:
            break
        if busy < args.busy:
            lo = scale
            scale = scale * 2 if hi is None else math.sqrt(scale * hi)
        else:
            hi = scale
            scale = scale / 2 if lo is None else math.sqrt(scale * lo)
    return scale, busy


# the replicas' predictor reads synthetic exact-mode prompts: predictions of middling quality
PREDICTIONS = "noisy-tau:0.5"
SIM_SEEDS = 8  # router draws the simulator averages over


def run_sim(trace, args, cost, time_scale: float, overhead_s: float = 0.0) -> dict:
    """The cluster simulator on the replayed trace, per router; `overhead_s` (what the client
    waited beyond the engines' TTFT in the pow2 run: HTTP, ingress, Ray) added to its TTFT."""
    from lenserve.scheduler.cluster import simulate_cluster
    from lenserve.scheduler.simulator import make_predictions, scheduler_config_for

    req = sim_requests(trace, args, time_scale)
    preds = make_predictions(PREDICTIONS, req.output_tokens)
    keys = ("mean_ttft_s", "p99_ttft_s", "mean_e2e_s", "p99_e2e_s", "prefix_hit_rate", "busy_frac_mean")
    out = {}
    for router in SIM_ROUTERS:
        # The routers draw at random (pow2's pairs, ties), and one live run is one draw: the
        # simulator reports the mean over SIM_SEEDS draws, each draw's TTFT beside it, and the
        # first draw's per-replica and per-request detail.
        runs = [simulate_cluster(req, 2, router, scheduler_config_for(cost), cost, preds, seed=seed) for seed in range(SIM_SEEDS)]
        sums = [r.summary() for r in runs]
        out[router] = {k: float(np.mean([s[k] for s in sums])) for k in keys}
        out[router]["mean_ttft_s"] += overhead_s
        out[router]["mean_ttft_s_by_seed"] = [round(s["mean_ttft_s"] + overhead_s, 4) for s in sums]
        res = runs[0]
        out[router]["per_replica"] = sorted(res.per_replica, key=lambda d: -d["busy_frac"])
        out[router]["requests"] = {"cached_tokens": res.cached_tokens.tolist(), "replica": res.replica.tolist(),
                                   "ttft_s": np.round(res.ttft_s, 4).tolist(), "e2e_s": np.round(res.e2e_s, 4).tolist()}
    return out


def _ratios(out: dict) -> dict:
    p = out["pow2"]
    return {r: {"mean_ttft": v["mean_ttft_s"] / p["mean_ttft_s"], "hit_rate": v["prefix_hit_rate"] / p["prefix_hit_rate"]}
            for r, v in out.items() if r != "pow2" and p["mean_ttft_s"] and p["prefix_hit_rate"]}


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
                [live[r]["mean_ttft_s"] or 0 for r in routers] + [result["sim"].get(r, {}).get("mean_ttft_s", 0) for r in routers])
    axes[1].set_title("mean TTFT, s")
    axes[2].bar(routers, [(live[r]["decision_p99_s"] or 0) * 1e3 for r in routers])
    axes[2].axhline(2.0, color="gray", ls="--")
    axes[2].set_title("router decision p99, ms (pow2: not timed)")
    fig.suptitle(f"2 replicas, {result['trace']['num_requests']} multi-turn requests, time scale {result['config']['time_scale']:.3g}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def judge(result: dict, trace, args, fitted, offline, overhead: float) -> None:
    """The simulator's runs beside the live ones (fitted costs plus overhead; offline costs), the
    references, the ratios and the criteria, into `result`."""
    result["sim"] = run_sim(trace, args, fitted, args.time_scale, overhead)
    result["sim_offline_model"] = run_sim(trace, args, offline, args.time_scale)
    kv_tokens = offline.num_kv_blocks * offline.block_size
    result["reference"] = {"shared_cache_hit_rate": shared_cache_hit_rate(trace, 2 * kv_tokens), "replica_kv_tokens": kv_tokens,
                           "sim_over_pow2": _ratios(result["sim"]), "sim_offline_model_over_pow2": _ratios(result["sim_offline_model"])}
    if "pow2" in result["live"] and "cache-aware" in result["live"]:
        lp, lc = result["live"]["pow2"], result["live"]["cache-aware"]
        sp, sc = result["sim"]["pow2"], result["sim"]["cache-aware"]
        # the most any router could gain in hit rate: one cache as large as both, every request through it
        result["reference"]["shared_cache_hit_rate_over_pow2"] = (result["reference"]["shared_cache_hit_rate"] / lp["prefix_hit_rate"]
                                                                  if lp["prefix_hit_rate"] else None)
        measured = lc["mean_ttft_s"] / lp["mean_ttft_s"] if lp["mean_ttft_s"] else None
        simulated = sc["mean_ttft_s"] / sp["mean_ttft_s"] if sp["mean_ttft_s"] else None
        hit_ratio = lc["prefix_hit_rate"] / lp["prefix_hit_rate"] if lp["prefix_hit_rate"] else None
        # how far one draw's ratio strays: cache-aware over pow2 for each seed pair
        by_seed = [c / p for c, p in zip(sc["mean_ttft_s_by_seed"], sp["mean_ttft_s_by_seed"]) if p]
        result["ratios"] = {"hit_rate_over_pow2": hit_ratio, "mean_ttft_over_pow2": measured, "sim_mean_ttft_over_pow2": simulated,
                            "sim_mean_ttft_over_pow2_by_seed": [round(x, 3) for x in by_seed],
                            "sim_over_measured_ttft_ratio": simulated / measured if measured and simulated else None}
        result["criteria"] = {
            "hit_rate_ge_1.3x_pow2": hit_ratio is not None and hit_ratio >= 1.3,
            "mean_ttft_le_0.75x_pow2": measured is not None and measured <= 0.75,
            "decision_p99_le_2ms": lc["decision_p99_s"] is not None and lc["decision_p99_s"] <= 0.002,
            "sim_ttft_ratio_within_15pct": result["ratios"]["sim_over_measured_ttft_ratio"] is not None
            and abs(result["ratios"]["sim_over_measured_ttft_ratio"] - 1) <= 0.15,
        }


def write(result: dict, args) -> int:
    """The results file, its plot, and the ratios and criteria on stdout."""
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    plot(result, args.plot)
    json.dump({k: result.get(k) for k in ("ratios", "criteria")}, sys.stdout, indent=1)
    sys.stdout.write("\n")
    return 0


def resim(args) -> int:
    """The simulator side again, on a results file's live runs: after a change to the simulator."""
    from lenserve.scheduler.cost_model import CostModel

    with open(args.out) as f:
        result = json.load(f)
    for key, value in result["config"].items():
        if key not in ("resim",):
            setattr(args, key, value)
    trace = make_trace(args)
    kv = {"num_kv_blocks": result["reference"]["replica_kv_tokens"] // args.block_tokens, "block_size": args.block_tokens,
          "max_model_len": args.max_model_len}
    fitted = CostModel(**result["sim_cost_model"]["terms"], **kv)
    offline = CostModel(**result["sim_cost_model"]["offline_terms"], **kv)
    judge(result, trace, args, fitted, offline, result["sim_cost_model"]["ttft_overhead_s"])
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    result["meta"]["resimulated_at_commit"] = commit
    return write(result, args)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sessions", type=int, default=32)
    p.add_argument("--session-rate", type=float, default=0.25, help="sessions starting per second (trace time)")
    p.add_argument("--turns", type=float, default=4.0)
    p.add_argument("--think-time-s", type=float, default=20.0)
    p.add_argument("--system-tokens", type=int, default=None, help="default: the generator's (256)")
    p.add_argument("--message-tokens", type=int, default=None, help="median new message, tokens (default: the generator's, ~100)")
    p.add_argument("--answer-tokens", type=int, default=None, help="median answer, tokens (default: the generator's, ~150)")
    p.add_argument("--block-tokens", type=int, default=16)
    p.add_argument("--time-scale", type=float, default=None,
                   help="replay speed-up (default: where simulated pow2 replicas, with a replica's cost model measured first, are --busy)")
    p.add_argument("--busy", type=float, default=0.55, help="pow2's simulated mean busy fraction that sets the default time scale")
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--kv-gb", type=float, default=0.3, help="--kv-cache-memory-gb of each replica")
    p.add_argument("--predictor", default="default")
    p.add_argument("--routers", default="pow2,cache-aware")
    p.add_argument("--request-timeout-s", type=float, default=600.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="6 sessions, fast: checks the plumbing, numbers mean nothing")
    p.add_argument("--out", default=os.path.join(RESULTS, "prefix_routing_live.json"))
    p.add_argument("--plot", default=os.path.join(RESULTS, "prefix_routing_live.png"))
    p.add_argument("--resim", action="store_true",
                   help="rerun only the simulator side of --out's live runs (same trace, time scale, fitted and offline costs)")
    args = p.parse_args(argv)
    if args.resim:
        return resim(args)
    if args.smoke:
        args.sessions, args.turns, args.think_time_s, args.session_rate, args.time_scale = 6, 3.0, 3.0, 2.0, 1.0
        args.system_tokens, args.message_tokens, args.answer_tokens, args.predictor = 64, 16, 6, "none"

    def log(*parts):
        print(*parts, file=sys.stderr, flush=True)

    trace = make_trace(args)
    routers = [r for r in args.routers.split(",") if r]
    offline = replica_cost(args)
    log("a replica's cost model, measured offline: " + json.dumps({k: v for k, v in offline.to_json().items() if k != "meta"}))
    scale_how = {"how": "given"}
    if args.time_scale is None:
        args.time_scale, busy = pick_time_scale(trace, offline, args, log)
        scale_how = {"how": f"simulated pow2 busy {args.busy} with the offline cost model", "simulated_busy": busy}
    result = {"meta": {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine(), "lscpu": lscpu(), "loadavg_start": os.getloadavg(),
                       "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip(),
                       "smoke": args.smoke},
              "config": {k: v for k, v in vars(args).items() if k not in ("out", "plot")},
              "trace": {"source": trace.source, "num_requests": len(trace), "duration_s": trace.duration_s,
                        "mean_prompt_tokens": float(trace.columns.prompt_tokens.mean()),
                        "mean_output_tokens": float(trace.columns.output_tokens.mean())},
              "time_scale": {"value": args.time_scale, **scale_how}, "live": {}}
    with tempfile.TemporaryDirectory() as out_dir:
        for router in routers:
            result["live"][router] = run_live(router, trace, args, out_dir, log)
    texts = {r: v.pop("_metrics_text") for r, v in result["live"].items()}
    # The simulator with the cost model the replicas fitted over all their steps in the first
    # run (pooled), the client's overhead over the engines' TTFT measured there added; and, for
    # reference, with the model measured offline and no overhead.
    first = routers[0]
    served = served_cost_model(texts[first])
    fitted = served.lifetime or served.model or offline
    fitted = dataclasses.replace(fitted, num_kv_blocks=offline.num_kv_blocks, block_size=offline.block_size, max_model_len=args.max_model_len)
    overhead = result["live"][first]["overhead_mean_ttft_s"] or 0.0
    result["sim_cost_model"] = {"from": f"the replicas' lifetime fit in the {first} run", "terms": _terms(fitted),
                                "ttft_overhead_s": overhead, "offline_terms": _terms(offline)}
    judge(result, trace, args, fitted, offline, overhead)
    result["meta"]["loadavg_end"] = os.getloadavg()
    return write(result, args)


if __name__ == "__main__":
    sys.exit(main())
