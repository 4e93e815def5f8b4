"""Routing across replicas, simulated at BurstGPT scale, and a capacity plan.

    python benchmarks/bench_routing.py [--requests 1000000] [--replicas 8] [--load 0.9]
        [--residuals benchmarks/results/predictor_residuals_holdout.json]
    python benchmarks/bench_routing.py --make-residuals   # rebuild the residuals from ../shared/data

The simulator (lenserve.scheduler.cluster) drives one real Scheduler per replica with the CPU cost
model measured from the engine. Predictions carry the shipped predictor's real error: its
predicted/actual ratios and p90s on the CASTILLO prompts it never saw (the 20% hash partition;
one (actual, predicted, p90) triple per sampled response, 20,000 of them), resampled by length
(`empirical:` predictions). `load` is relative to the replicas' capacity: 0.9 means arrivals ask
for 0.9x the tokens per second that N saturated fcfs replicas produce.

Sections: `scale` (every router on the >= 1M-request BurstGPT-style trace), `sweep` (routers at
several loads, 50k requests, with real-error and oracle predictions), `capacity` (the fewest
replicas meeting TTFT/TPOT objectives for a 50k-request trace at a fixed rate; table and plot).
Writes benchmarks/results/routing_sim.json, capacity_plan.json and capacity_plan.png.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_scheduler import Bench, burstgpt_like  # noqa: E402
from common import RESULTS, machine  # noqa: E402

from lenserve.scheduler.cluster import ROUTERS, SLO, plan_capacity, plot_capacity, simulate_cluster  # noqa: E402
from lenserve.scheduler.cost_model import load_default  # noqa: E402
from lenserve.scheduler.simulator import make_predictions, scheduler_config_for  # noqa: E402

CASTILLO = ("../shared/data/castillo/castillo_train.jsonl.gz", "../shared/data/castillo/castillo_validate.jsonl.gz")
RESIDUALS = os.path.join(RESULTS, "predictor_residuals_holdout.json")
KEYS = ("mean_e2e_s", "p50_e2e_s", "p99_e2e_s", "mean_ttft_s", "p99_ttft_s", "mean_tpot_s", "p99_tpot_s",
        "throughput_tok_s", "requests_per_replica_min", "requests_per_replica_max", "preemptions", "sim_wall_s")


def make_residuals(path: str, num_samples: int = 20000, seed: int = 0) -> dict:
    """The default predictor's errors on the CASTILLO prompts held out of its training."""
    from lenserve.predictor import load_default_predictor
    from lenserve.predictor.dataset import castillo_held_out, iter_rows
    from lenserve.predictor.evaluate import predict_rows

    rows = [r for p in CASTILLO for r in iter_rows(p) if castillo_held_out(r.prompt_text)]
    preds = predict_rows(load_default_predictor(), rows)
    triples = [(a, p.p50, p.p90) for r, p in zip(rows, preds) for a in r.output_sizes if a > 0]
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(triples), min(num_samples, len(triples)), replace=False)
    actual = [int(triples[i][0]) for i in pick]
    out = {
        "source": "lenserve default predictor on CASTILLO (Perez-Ramirez et al., 2025, CC-BY-4.0) prompts held out of its "
                  "training (sha256('holdout:' + prompt_text) < 0.2): one sampled response per triple",
        "num_rows": len(rows),
        "actual": actual,
        "predicted": [round(float(triples[i][1]), 1) for i in pick],
        "p90": [round(float(triples[i][2]), 1) for i in pick],
    }
    from scipy.stats import kendalltau

    out["kendall_tau"] = round(float(kendalltau(out["predicted"], actual).statistic), 4)
    with open(path, "w") as f:
        json.dump(out, f, separators=(",", ":"))
        f.write("\n")
    return out


def run_routers(bench: Bench, trace, num_replicas: int, load: float, capacity: float, predictions: str, routers, log) -> dict:
    req, time_scale = bench.at_load(trace, load * num_replicas, capacity)
    preds = make_predictions(predictions, req.output_tokens, seed=0)
    config = bench.config(policy="fcfs")
    out = {"num_requests": len(req), "num_replicas": num_replicas, "load": load, "time_scale": time_scale,
           "predictions": preds.source, "prediction_kendall_tau": preds.kendall_tau(req.output_tokens.astype(np.float64))}
    for router in routers:
        s = simulate_cluster(req, num_replicas, router, config, bench.cost, preds).summary()
        out[router] = {k: s[k] for k in KEYS}
        log(f"{len(req)} requests x{num_replicas} load {load} {preds.source} {router}: "
            + json.dumps({k: round(v, 2) for k, v in out[router].items()}))
    if "least-work" in out and "pow2" in out:
        out["least_work_over_pow2_mean_e2e"] = out["least-work"]["mean_e2e_s"] / out["pow2"]["mean_e2e_s"]
        out["least_work_over_pow2_mean_ttft"] = out["least-work"]["mean_ttft_s"] / out["pow2"]["mean_ttft_s"]
        out["least_work_over_pow2_p99_ttft"] = out["least-work"]["p99_ttft_s"] / out["pow2"]["p99_ttft_s"]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=1_000_000, help="the scale run (0: skip)")
    p.add_argument("--replicas", type=int, default=8)
    p.add_argument("--load", type=float, default=0.9)
    p.add_argument("--routers", default=",".join(ROUTERS))
    p.add_argument("--residuals", default=RESIDUALS)
    p.add_argument("--make-residuals", action="store_true", help="rebuild --residuals from ../shared/data/castillo and exit")
    p.add_argument("--sweep-requests", type=int, default=50_000, help="0: skip the load sweep")
    p.add_argument("--sweep-loads", default="0.7,0.9,1.0")
    p.add_argument("--capacity-requests", type=int, default=50_000, help="0: skip capacity planning")
    p.add_argument("--capacity-rate-replicas", type=float, default=6.0,
                   help="capacity trace: arrivals at this many saturated replicas' worth of tokens per second")
    p.add_argument("--slo-ttft-s", type=float, default=30.0)
    p.add_argument("--slo-tpot-s", type=float, default=1.5)
    p.add_argument("--slo-quantile", type=float, default=0.9)
    p.add_argument("--out", default=os.path.join(RESULTS, "routing_sim.json"))
    p.add_argument("--capacity-out", default=os.path.join(RESULTS, "capacity_plan.json"))
    p.add_argument("--capacity-plot", default=os.path.join(RESULTS, "capacity_plan.png"))
    args = p.parse_args(argv)

    def log(*parts):
        print(*parts, file=sys.stderr, flush=True)

    if args.make_residuals:
        r = make_residuals(args.residuals)
        log(f"wrote {args.residuals}: {len(r['actual'])} triples from {r['num_rows']} held-out rows, tau {r['kendall_tau']}")
        return 0
    cost = load_default()
    predictions = f"empirical:{args.residuals}"
    bench = Bench(cost, predictions, 2048, log)
    routers = [r for r in args.routers.split(",") if r]
    t0 = time.monotonic()
    result = {"meta": {
        "date": time.strftime("%Y-%m-%d"), "machine": machine(),
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip(),
        "cost_model": {k: v for k, v in cost.to_json().items() if k != "meta"},
        "replica_policy": "fcfs", "kv_reserve": "predicted", "report_interval_s": 1.0,
        "trace": "BurstGPT-style synthetic (benchmarks/bench_scheduler.py burstgpt_like: Gamma inter-arrivals CV 2, "
                 "lognormal prompt median 400 / response median 200 tokens)",
    }}
    probe = burstgpt_like(20000)
    capacity = bench.capacity_tok_s(probe)  # one saturated fcfs replica
    result["meta"]["replica_capacity_tok_s"] = capacity
    log(f"one replica: {capacity:.1f} tok/s")

    if args.requests:
        big = burstgpt_like(args.requests, seed=2)
        result["scale"] = run_routers(bench, big, args.replicas, args.load, capacity, predictions, routers, log)
        result["scale"]["trace"] = big.source
    if args.sweep_requests:
        trace = burstgpt_like(args.sweep_requests, seed=3)
        result["sweep"] = [run_routers(bench, trace, args.replicas, load, capacity, spec, ("pow2", "least-work"), log)
                           for load in map(float, args.sweep_loads.split(",")) for spec in (predictions, "oracle")]
    if args.capacity_requests:
        trace = burstgpt_like(args.capacity_requests, seed=4)
        req, time_scale = bench.at_load(trace, args.capacity_rate_replicas, capacity)
        preds = make_predictions(predictions, req.output_tokens, seed=0)
        slo = SLO(args.slo_ttft_s, args.slo_tpot_s, args.slo_quantile)
        plan = plan_capacity(req, routers, slo, bench.config(policy="fcfs"), cost, preds, max_replicas=64, log=log)
        plan["trace"] = {"num_requests": len(req), "rate_req_s": (len(req) - 1) / float(req.arrival_s[-1]),
                         "offered_tok_s": float(req.output_tokens.sum() / req.arrival_s[-1]),
                         "offered_in_saturated_replicas": args.capacity_rate_replicas, "time_scale": time_scale,
                         "predictions": preds.source}
        plan["meta"] = result["meta"]
        with open(args.capacity_out, "w") as f:
            json.dump(plan, f, indent=1)
            f.write("\n")
        plot_capacity(plan, args.capacity_plot, title=f"Capacity plan: {len(req)} BurstGPT-style requests at "
                      f"{plan['trace']['rate_req_s']:.2f} req/s, CPU cost model, fcfs replicas")
        result["capacity"] = {"min_replicas": plan["min_replicas"], "slo": plan["slo"], "file": os.path.relpath(args.capacity_out)}
        log("capacity", json.dumps(plan["min_replicas"]))
    result["meta"]["wall_s"] = round(time.monotonic() - t0, 1)
    if "scale" in result and "least_work_over_pow2_mean_e2e" in result["scale"]:
        result["criteria"] = {"least_work_mean_e2e_le_0.8x_pow2": result["scale"]["least_work_over_pow2_mean_e2e"] <= 0.8}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    json.dump(result, sys.stdout, indent=1)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
