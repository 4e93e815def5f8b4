"""Length-aware scheduling, measured: the simulator at BurstGPT scale and (optionally) the real server.

    python benchmarks/bench_scheduler.py [--quick] [--server] [--residuals FILE]
        [--out benchmarks/results/scheduler.json] [--plot benchmarks/results/scheduler.png]

Simulations drive the real Scheduler with the cost model measured from the engine
(lenserve/scheduler/data/cost_model_cpu.json unless --cost-model). Loads are relative to a
measured capacity: `load` 1.1 means arrivals ask for 1.1x the tokens per second a saturated
fcfs run produces. Predictions are a calibrated noisy predictor with Kendall tau 0.5 (the
CASTILLO baseline level) unless --residuals gives a predictor's evaluation residuals.

Sections: policies at saturation (a BurstGPT-style synthetic trace and the real Azure
conversation trace), load and aging sweeps, prediction quality, continuous vs bucketed
batching, KV reservation (none / p90 / max_tokens), a 1M-request run for speed, and --server: a
saturated natural-mode replay against `lenserve serve` compared with the simulator on the same
arrivals and lengths. Prints the JSON it writes.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from lenserve.scheduler.cost_model import CostModel, load_default
from lenserve.scheduler.simulator import (
    SimRequests,
    make_predictions,
    scheduler_config_for,
    simulate,
    simulate_policies,
)
from lenserve.traces.loaders import load_trace
from lenserve.traces.synth import LengthDist, SynthConfig, synthesize

AZURE_TRACE = os.path.join(os.path.dirname(__file__), "..", "traces", "data", "azure_llm_2023_conv.csv.gz")
POLICIES = ("fcfs", "sjf", "oracle")
# At saturation sjf and oracle run with an end-to-end objective (max_latency_s, no aging) of this
# multiple of fcfs's p99 E2E on the same arrivals: an operator's latency objective, set inside the
# 1.5x tail bound the issue asks for because the rule starts a request by its expected decode
# time, so responses longer than predicted end a little after it (p99 at ~1.02-1.03x the objective).
LATENCY_OBJECTIVE = 1.4
KEYS = ("mean_e2e_s", "p50_e2e_s", "p99_e2e_s", "mean_ttft_s", "p99_ttft_s", "throughput_tok_s", "preemptions",
        "preemption_rate", "max_concurrent", "mean_concurrent", "reestimations", "sim_wall_s", "sim_requests_per_s")


def burstgpt_like(num_requests: int, seed: int = 1):
    """BurstGPT's load model: Gamma inter-arrivals with CV 2 (shape 0.25), lognormal lengths
    (prompt median 400, response median 200 tokens, heavy right tails)."""
    return synthesize(SynthConfig(
        num_requests=num_requests, gamma_shape=0.25, gamma_scale=4.0,
        prompt=LengthDist(mu=6.0, sigma=1.0, max_tokens=4096),
        output=LengthDist(mu=5.3, sigma=1.0, max_tokens=2048), seed=seed,
    ))


def _slim(summary: dict) -> dict:
    return {k: summary[k] for k in KEYS if k in summary}


class Bench:
    """`config_defaults`: SchedulerConfig fields every simulation here starts from (after p90 KV
    reservation, kv_reserve="predicted", and the cost model's engine limits)."""

    def __init__(self, cost: CostModel, predictions: str, max_tokens: int, log=print, config_defaults: dict | None = None) -> None:
        self.cost = cost
        self.predictions = predictions
        self.max_tokens = max_tokens
        self.log = log
        self.config_defaults = dict(config_defaults or {})

    def config(self, **overrides):
        base = {"kv_reserve": "predicted", **self.config_defaults}
        base.update(overrides)
        return scheduler_config_for(self.cost, **base)

    def capacity_tok_s(self, trace, **config) -> float:
        """Tokens per second of a saturated fcfs run: 2,000 requests arriving at once."""
        req = SimRequests.from_trace(trace.head(2000), time_scale=1e6, max_tokens=self.max_tokens)
        return simulate(req, self.config(policy="fcfs", **config), self.cost).summary()["throughput_tok_s"]

    def at_load(self, trace, load: float, capacity: float) -> tuple[SimRequests, float]:
        base = SimRequests.from_trace(trace, max_tokens=self.max_tokens)
        rate = (len(base) - 1) / base.arrival_s[-1]
        time_scale = load * capacity / base.output_tokens.mean() / rate
        return SimRequests.from_trace(trace, time_scale=time_scale, max_tokens=self.max_tokens), time_scale

    def policies(self, req: SimRequests, policies=POLICIES, predictions: str | None = None, fcfs: dict | None = None,
                 **config) -> dict:
        """`fcfs`: an fcfs result on the same requests to compare with (when fcfs is not run here)."""
        preds = make_predictions(predictions or self.predictions, req.output_tokens, seed=0)
        results = simulate_policies(req, policies, self.config(**config), self.cost, preds)
        out = {p: _slim(s) for p, s in results.items()}
        out["prediction_kendall_tau"] = next(iter(results.values()))["prediction_kendall_tau"]
        f = results.get("fcfs", fcfs)
        if f is not None and "sjf" in results:
            s = results["sjf"]
            out["sjf_over_fcfs_mean_e2e"] = s["mean_e2e_s"] / f["mean_e2e_s"]
            out["sjf_over_fcfs_p99_e2e"] = s["p99_e2e_s"] / f["p99_e2e_s"]
            if "oracle" in results:
                out["sjf_over_oracle_mean_e2e"] = s["mean_e2e_s"] / results["oracle"]["mean_e2e_s"]
        return out

    def with_objective(self, req: SimRequests, factor: float = LATENCY_OBJECTIVE, predictions: str | None = None) -> dict:
        """fcfs, then sjf and oracle under max_latency_s = factor x fcfs's p99 E2E (no aging)."""
        fcfs = self.policies(req, ("fcfs",), predictions)["fcfs"]
        objective = factor * fcfs["p99_e2e_s"]
        r = self.policies(req, ("sjf", "oracle"), predictions, fcfs=fcfs, aging_tok_per_step=0.0, max_latency_s=objective)
        return {"fcfs": fcfs, **r, "max_latency_s": objective, "max_latency_over_fcfs_p99_e2e": factor}


def run_simulations(args, bench: Bench) -> dict:
    n = 3000 if args.quick else args.num_requests
    n_sweep = 2000 if args.quick else args.num_requests // 2
    out: dict = {}
    synth = burstgpt_like(n)
    capacity = bench.capacity_tok_s(synth)
    bench.log(f"capacity {capacity:.1f} tok/s")

    # ---- policies at saturation -------------------------------------------------------------------
    scenarios = {}
    req, ts = bench.at_load(synth, args.load, capacity)
    headline = bench.with_objective(req)
    # the scheduler's defaults (aging 0.3 tokens/step, no objective), as in earlier results
    aged = bench.policies(req, ("sjf", "oracle"), fcfs=headline["fcfs"])
    scenarios["burstgpt_synthetic"] = {"trace": synth.source, "num_requests": len(req), "load": args.load,
                                       "time_scale": ts, **headline, "aged_default": aged}
    bench.log("burstgpt_synthetic", json.dumps({k: v for k, v in scenarios["burstgpt_synthetic"].items() if "over" in k}))
    azure = load_trace(AZURE_TRACE)
    if args.quick:
        azure = azure.head(n)
    azure_capacity = bench.capacity_tok_s(azure)
    req, ts = bench.at_load(azure, args.load, azure_capacity)
    scenarios["azure_conv"] = {"trace": "Azure LLM inference trace 2023, conversation (CC-BY-4.0)", "num_requests": len(req),
                               "load": args.load, "time_scale": ts, "capacity_tok_s": azure_capacity, **bench.with_objective(req)}
    bench.log("azure_conv", json.dumps({k: v for k, v in scenarios["azure_conv"].items() if "over" in k}))
    out["saturation"] = {"capacity_tok_s": capacity, **scenarios}

    sweep_trace = synth.head(n_sweep)
    # ---- load sweep ---------------------------------------------------------------------------------
    out["load_sweep"] = []
    for load in (0.8, 0.9, 1.0, 1.05, 1.1, 1.2):
        req, _ = bench.at_load(sweep_trace, load, capacity)
        r = bench.policies(req)
        out["load_sweep"].append({"load": load, **{k: v for k, v in r.items() if "over" in k},
                                  **{f"{p}_mean_e2e_s": r[p]["mean_e2e_s"] for p in POLICIES},
                                  **{f"{p}_p99_e2e_s": r[p]["p99_e2e_s"] for p in POLICIES}})
        bench.log("load", load, json.dumps(out["load_sweep"][-1]))
    out["load_sweep_objective"] = []
    for load in (1.0, 1.05, 1.1, 1.2, 1.3):
        req, _ = bench.at_load(sweep_trace, load, capacity)
        r = bench.with_objective(req)
        out["load_sweep_objective"].append({"load": load, "max_latency_over_fcfs_p99_e2e": LATENCY_OBJECTIVE,
                                            **{k: v for k, v in r.items() if "over" in k}})
        bench.log("load (objective)", load, json.dumps(out["load_sweep_objective"][-1]))

    # ---- aging: the mean / tail trade-off -------------------------------------------------------------
    out["aging_sweep"] = []
    req, _ = bench.at_load(sweep_trace, 1.1, capacity)
    fcfs = bench.policies(req, ("fcfs",))["fcfs"]
    variants = [{"aging_tok_per_step": a} for a in (0.0, 0.1, 0.2, 0.3, 0.5, 1.0)]
    variants += [{"aging_tok_per_step": 0.0, "fcfs_wait_bound": b} for b in (1.2, 1.5, 2.0, 2.5, 3.0)]
    # an absolute bound, as an operator would set it from a latency objective: here in multiples
    # of the fcfs p99 E2E of this very run (so the sweep means the same on any cost model)
    variants += [{"aging_tok_per_step": 0.0, "max_wait_s": f * fcfs["p99_e2e_s"], "max_wait_over_fcfs_p99_e2e": f}
                 for f in (0.75, 1.0, 1.15, 1.3, 1.5)]
    # an end-to-end objective: a request starts by the objective less its expected decode time
    variants += [{"aging_tok_per_step": 0.0, "max_latency_s": f * fcfs["p99_e2e_s"], "max_latency_over_fcfs_p99_e2e": f}
                 for f in (1.2, 1.3, 1.4, 1.5, 1.6)]
    for variant in variants:
        variant = dict(variant)
        factor = variant.pop("max_wait_over_fcfs_p99_e2e", None)
        objective = variant.pop("max_latency_over_fcfs_p99_e2e", None)
        r = bench.policies(req, ("sjf", "oracle"), **variant)
        out["aging_sweep"].append({
            "load": 1.1, "aging_tok_per_step": variant["aging_tok_per_step"], "fcfs_wait_bound": variant.get("fcfs_wait_bound"),
            "max_wait_s": variant.get("max_wait_s"), "max_wait_over_fcfs_p99_e2e": factor,
            "max_latency_s": variant.get("max_latency_s"), "max_latency_over_fcfs_p99_e2e": objective,
            "sjf_over_fcfs_mean_e2e": r["sjf"]["mean_e2e_s"] / fcfs["mean_e2e_s"],
            "sjf_over_fcfs_p99_e2e": r["sjf"]["p99_e2e_s"] / fcfs["p99_e2e_s"],
            "sjf_over_oracle_mean_e2e": r["sjf"]["mean_e2e_s"] / r["oracle"]["mean_e2e_s"],
        })
        bench.log("aging", json.dumps(out["aging_sweep"][-1]))

    # ---- prediction quality ------------------------------------------------------------------------
    out["prediction_quality"] = []
    req, _ = bench.at_load(sweep_trace, args.load, capacity)
    specs = ["noisy-tau:0.3", "noisy-tau:0.5", "noisy-tau:0.7", "oracle"]
    if args.residuals:
        specs.insert(0, f"empirical:{args.residuals}")
    for spec in specs:
        r = bench.policies(req, ("fcfs", "sjf", "oracle"), predictions=spec)
        out["prediction_quality"].append({"predictions": spec, "kendall_tau": r["prediction_kendall_tau"],
                                          **{k: v for k, v in r.items() if "over" in k}, "sjf_preemptions": r["sjf"]["preemptions"]})
        bench.log("predictions", json.dumps(out["prediction_quality"][-1]))

    # ---- continuous vs bucketed -----------------------------------------------------------------------
    out["batching"] = {}
    for name, cfg in (("continuous", {}), ("continuous_bucket_affinity", {"bucket_affinity": True}), ("bucketed_static", {"batching": "bucketed"})):
        r = bench.policies(req, ("fcfs", "sjf"), **cfg)
        out["batching"][name] = {"fcfs": r["fcfs"], "sjf": r["sjf"]}
        bench.log("batching", name, r["sjf"]["mean_e2e_s"], r["sjf"]["throughput_tok_s"])

    # ---- KV reservation: memory-bound (many slots, a small cache) --------------------------------------
    out["kv_reserve"] = {"max_num_seqs": 512, "num_kv_blocks": args.kv_blocks, "max_tokens": bench.max_tokens}
    kv_capacity = bench.capacity_tok_s(sweep_trace, max_num_seqs=512)
    req, _ = bench.at_load(sweep_trace, args.load, kv_capacity)
    for mode in ("predicted", "max", "none"):
        preds = make_predictions(bench.predictions, req.output_tokens, seed=0)
        s = simulate(req, bench.config(policy="sjf", kv_reserve=mode, max_num_seqs=512), bench.cost, preds,
                     num_kv_blocks=args.kv_blocks).summary()
        out["kv_reserve"][mode] = _slim(s)
        bench.log("kv_reserve", mode, s["max_concurrent"], s["mean_concurrent"], s["preemption_rate"])
    p, m = out["kv_reserve"]["predicted"], out["kv_reserve"]["max"]
    out["kv_reserve"]["predicted_over_max_max_concurrent"] = p["max_concurrent"] / m["max_concurrent"]
    out["kv_reserve"]["predicted_over_max_mean_concurrent"] = p["mean_concurrent"] / m["mean_concurrent"]

    # ---- BurstGPT scale -------------------------------------------------------------------------------
    if args.scale_from:
        with open(args.scale_from) as f:
            out["scale"] = json.load(f)["simulations"]["scale"]
    elif args.scale_requests:
        big = burstgpt_like(args.scale_requests, seed=2)
        req, ts = bench.at_load(big, args.load, capacity)
        bench.log(f"scale: {len(req)} requests")
        out["scale"] = {"trace": big.source, "num_requests": len(req), "load": args.load, "time_scale": ts,
                        **bench.policies(req, tuple(args.scale_policies.split(",")))}
        bench.log("scale", json.dumps({p: out["scale"][p]["sim_wall_s"] for p in args.scale_policies.split(",")}))
    return out


# ---- the real server -------------------------------------------------------------------------------------
def run_server(args, log=print) -> dict:
    """Natural-mode replay against `lenserve serve` at saturation, then the simulator on the same
    arrivals, prompt and response lengths, with a cost model measured on the same engine settings."""
    from lenserve.config import EngineConfig
    from lenserve.scheduler.config import SchedulerConfig
    from lenserve.sim_cli import measure_cost_model

    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"  # this process's cost model measurement, and the servers it starts
    engine = dict(max_num_seqs=args.server_max_num_seqs, max_num_batched_tokens=1024)
    t0 = time.monotonic()
    # The replay samples greedily: the cost model is measured sampling the same way (random sampling
    # costs ~1.5 ms a sequence per step here, 15% of a 16-sequence decode step).
    temperature = 0.0
    cost = measure_cost_model(EngineConfig(num_threads=1, scheduler=SchedulerConfig(**engine)), temperature=temperature)
    log(f"server cost model measured in {time.monotonic() - t0:.0f}s (fit error {cost.meta['fit_mean_abs_rel_error']:.3f})")
    trace = load_trace(AZURE_TRACE).head(args.server_requests)
    port = 18000 + os.getpid() % 1000
    results = {"engine": {**engine, "num_threads": 1, "device": "cpu"}, "cost_model": {k: v for k, v in cost.to_json().items() if k != "meta"},
               "cost_model_sampling": cost.meta.get("sampling"), "runs": []}
    for time_scale in args.server_time_scales:
        for policy in args.server_policies.split(","):
            results["runs"].append(_server_run(args, trace, cost, engine, policy, time_scale, temperature, port, log))
    return results


def _server_run(args, trace, cost, engine: dict, policy: str, time_scale: float, temperature: float, port: int, log) -> dict:
    """One natural-mode replay of `trace` against a fresh server, and the simulator on the arrivals
    and the prompt and response lengths the server saw."""
    from lenserve.server.process import ServerProcess
    from lenserve.traces.replay import ReplayConfig, replay
    from lenserve.traces.report import read_jsonl

    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "lenserve.cli", "serve", "--port", str(port), "--num-threads", "1", "--policy", policy,
           "--max-num-seqs", str(engine["max_num_seqs"]), "--max-num-batched-tokens", str(engine["max_num_batched_tokens"]),
           "--predictor", args.server_predictor, "--max-queue", "100000"]
    log(f"time scale {time_scale}:", " ".join(cmd))
    with tempfile.TemporaryDirectory() as out_dir:
        with ServerProcess(cmd, Path(out_dir) / "server.log", url) as server:
            server.wait_healthy(300)
            config = ReplayConfig(url=url, mode="natural", time_scale=time_scale,
                                  max_tokens_cap=args.server_max_tokens, temperature=temperature, metrics_interval_s=0, show_progress=False)
            report = replay(trace, config, out_dir)
        records = [r for r in read_jsonl(os.path.join(out_dir, "requests.jsonl")) if r["ok"]]
    sent = np.array([r["sent_s"] for r in records])
    prompt = np.array([r["prompt_tokens_server"] for r in records])
    output = np.array([max(r["output_tokens"], 1) for r in records])
    real_e2e = np.array([r["e2e_s"] for r in records])
    real_ttft = np.array([r["ttft_s"] for r in records if r["ttft_s"] is not None])
    span = max(r["end_s"] for r in records) - sent.min()
    req = SimRequests.from_arrays(sent, prompt, output, max_model_len=cost.max_model_len, max_tokens=args.server_max_tokens)
    # The server had no predictor (--predictor none): neither does the simulated scheduler.
    preds = None if args.server_predictor == "none" else make_predictions("oracle", req.output_tokens)
    sim = simulate(req, scheduler_config_for(cost, policy=policy), cost, preds).summary()
    run = {
        "policy": policy,
        "time_scale": time_scale,
        "num_requests": len(records),
        "real": {"mean_e2e_s": float(real_e2e.mean()), "p50_e2e_s": float(np.median(real_e2e)),
                 "p99_e2e_s": float(np.percentile(real_e2e, 99)), "mean_ttft_s": float(real_ttft.mean()),
                 "throughput_tok_s": float(output.sum() / span),
                 # requests in the server on average (Little's law): at max_num_seqs it is saturated
                 "mean_in_server": float(real_e2e.sum() / span)},
        "simulated": _slim(sim),
        "sim_over_real_mean_e2e": sim["mean_e2e_s"] / float(real_e2e.mean()),
        "report": {k: report.get(k) for k in ("num_requests", "num_ok", "duration_s") if k in report},
    }
    log(policy, json.dumps({k: run[k] for k in ("time_scale", "num_requests", "sim_over_real_mean_e2e")}))
    return run


# ---- criteria, plot -----------------------------------------------------------------------------------
def criteria(result: dict) -> dict:
    sat = result["simulations"]["saturation"]["burstgpt_synthetic"]
    kv = result["simulations"]["kv_reserve"]
    out = {
        "sjf_mean_e2e_le_0.5x_fcfs": sat["sjf_over_fcfs_mean_e2e"] <= 0.5,
        "sjf_mean_e2e_within_15pct_of_oracle": sat["sjf_over_oracle_mean_e2e"] <= 1.15,
        "sjf_p99_e2e_le_1.5x_fcfs": sat["sjf_over_fcfs_p99_e2e"] <= 1.5,
        "p90_reservation_ge_2x_concurrency_of_max": kv["predicted_over_max_max_concurrent"] >= 2.0,
        "p90_reservation_preemptions_le_2pct": kv["predicted"]["preemption_rate"] <= 0.02,
    }
    runs = (result.get("server") or {}).get("runs")
    if runs:
        out["simulator_within_15pct_of_server_mean_e2e"] = all(abs(r["sim_over_real_mean_e2e"] - 1) <= 0.15 for r in runs)
    return out


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sims = result["simulations"]
    fig, axes = plt.subplots(2, 2, figsize=(12, 9))
    ax = axes[0][0]
    sat = sims["saturation"]
    names = ["burstgpt_synthetic", "azure_conv"]
    width = 0.25
    for i, policy in enumerate(POLICIES):
        ax.bar(np.arange(len(names)) + (i - 1) * width, [sat[n][policy]["mean_e2e_s"] / sat[n]["fcfs"]["mean_e2e_s"] for n in names],
               width, label=f"{policy} mean")
        ax.scatter(np.arange(len(names)) + (i - 1) * width, [sat[n][policy]["p99_e2e_s"] / sat[n]["fcfs"]["p99_e2e_s"] for n in names],
                   marker="_", s=300, color="k")
    ax.axhline(0.5, ls=":", color="gray")
    ax.set_xticks(range(len(names)), [f"{n}\n(load {sat[n]['load']})" for n in names])
    ax.set_ylabel("E2E relative to fcfs (bars: mean, ticks: p99)")
    ax.set_title(f"Policies at saturation (sjf, oracle: objective x{sat[names[0]].get('max_latency_over_fcfs_p99_e2e', '-')} fcfs p99)")
    ax.legend()

    ax = axes[0][1]
    sweep = sims["load_sweep"]
    loads = [r["load"] for r in sweep]
    for policy in POLICIES:
        ax.plot(loads, [r[f"{policy}_mean_e2e_s"] for r in sweep], "o-", label=f"{policy} mean")
    ax.plot(loads, [r["sjf_p99_e2e_s"] for r in sweep], "s--", label="sjf p99")
    ax.plot(loads, [r["fcfs_p99_e2e_s"] for r in sweep], "s--", label="fcfs p99")
    ax.set_yscale("log")
    ax.set_xlabel("offered load (x capacity)")
    ax.set_ylabel("E2E latency, s (simulated CPU engine)")
    ax.set_title("Load sweep, BurstGPT-style trace")
    ax.legend(fontsize=8)

    ax = axes[1][0]
    series = {
        "aging (tokens/step)": ([r for r in sims["aging_sweep"] if not (r.get("fcfs_wait_bound") or r.get("max_wait_s") or r.get("max_latency_s"))],
                                lambda r: f"{r['aging_tok_per_step']:g}"),
        "fcfs_wait_bound": ([r for r in sims["aging_sweep"] if r.get("fcfs_wait_bound")], lambda r: f"x{r['fcfs_wait_bound']:g}"),
        "max_wait_s (x fcfs p99)": ([r for r in sims["aging_sweep"] if r.get("max_wait_s")], lambda r: f"x{r['max_wait_over_fcfs_p99_e2e']:g}"),
        "max_latency_s (x fcfs p99)": ([r for r in sims["aging_sweep"] if r.get("max_latency_s")],
                                       lambda r: f"x{r['max_latency_over_fcfs_p99_e2e']:g}"),
    }
    for (label, (rows, name)), marker in zip(series.items(), "os^D"):
        if not rows:
            continue
        ax.plot([r["sjf_over_fcfs_p99_e2e"] for r in rows], [r["sjf_over_fcfs_mean_e2e"] for r in rows], marker + "-", label=label)
        for r in rows:
            ax.annotate(name(r), (r["sjf_over_fcfs_p99_e2e"], r["sjf_over_fcfs_mean_e2e"]), fontsize=7)
    ax.legend(fontsize=8)
    ax.axhline(0.5, ls=":", color="gray")
    ax.axvline(1.5, ls=":", color="gray")
    ax.set_xlabel("sjf p99 / fcfs p99")
    ax.set_ylabel("sjf mean / fcfs mean")
    ax.set_title("Tail bounds: mean vs p99, sjf at load 1.1")

    ax = axes[1][1]
    kv = sims["kv_reserve"]
    modes = ["max", "predicted", "none"]
    ax.bar(np.arange(3) - 0.2, [kv[m]["max_concurrent"] for m in modes], 0.4, label="max concurrent")
    ax.bar(np.arange(3) + 0.2, [kv[m]["mean_concurrent"] for m in modes], 0.4, label="mean concurrent")
    for i, m in enumerate(modes):
        ax.annotate(f"{100 * kv[m]['preemption_rate']:.1f}% preempted", (i - 0.35, kv[m]["max_concurrent"] + 1), fontsize=8)
    ax.set_xticks(range(3), ["max_tokens", "p90", "none (grow)"])
    ax.set_title(f"KV reservation ({kv['num_kv_blocks']} blocks, 512 slots)")
    ax.legend()
    fig.suptitle(f"lenserve scheduler — {result['meta']['date']} — {result['meta']['machine']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small traces (a smoke run)")
    p.add_argument("--num-requests", type=int, default=20000, help="requests per saturation scenario (sweeps use half)")
    p.add_argument("--load", type=float, default=1.1, help="offered load at saturation, x capacity")
    p.add_argument("--scale-requests", type=int, default=1_000_000, help="the BurstGPT-scale run (0: skip)")
    p.add_argument("--scale-policies", default="fcfs,sjf,oracle")
    p.add_argument("--scale-from", default=None, metavar="JSON", help="take the scale section from an earlier result instead of rerunning it")
    p.add_argument("--kv-blocks", type=int, default=4000, help="KV cache of the reservation comparison")
    p.add_argument("--max-tokens", type=int, default=2048, help="every request's max_tokens (the max reservation)")
    p.add_argument("--predictions", default="noisy-tau:0.5")
    p.add_argument("--residuals", default=None, help="a predictor eval's residuals (see lenserve.scheduler.simulator.load_residuals)")
    p.add_argument("--cost-model", default=None)
    p.add_argument("--server", action="store_true", help="also replay against the real server (minutes)")
    p.add_argument("--server-only", action="store_true", help="only the server part, added to the results already in --out")
    p.add_argument("--server-from", default=None, metavar="JSON", help="take the server section from an earlier result instead of rerunning it")
    p.add_argument("--server-requests", type=int, default=120)
    p.add_argument("--server-time-scales", type=lambda v: [float(x) for x in v.split(",")], default=[1.0, 0.2],
                   help="replay speeds of the Azure trace's head: 1.0 saturates the 1-thread server (~15 of 16 slots busy), 0.2 keeps it at ~4")
    p.add_argument("--server-max-tokens", type=int, default=96)
    p.add_argument("--server-max-num-seqs", type=int, default=16)
    p.add_argument("--server-policies", default="fcfs")
    p.add_argument("--server-predictor", default="none")
    p.add_argument("--out", default="benchmarks/results/scheduler.json")
    p.add_argument("--plot", default="benchmarks/results/scheduler.png")
    args = p.parse_args(argv)
    if args.quick:
        args.scale_requests = min(args.scale_requests, 20000)

    def log(*parts):
        print(*parts, file=sys.stderr, flush=True)

    cost = CostModel.load(args.cost_model) if args.cost_model else load_default()
    bench = Bench(cost, args.residuals and f"empirical:{args.residuals}" or args.predictions, args.max_tokens, log)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    result = {
        "meta": {
            "date": time.strftime("%Y-%m-%d"),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, shared (load average {os.getloadavg()[0]:.1f})",
            "commit": commit,
            "cost_model": {k: v for k, v in cost.to_json().items() if k != "meta"},
            "cost_model_measured": {k: cost.meta.get(k) for k in ("device", "num_threads", "measured_at", "load_average_1m", "fit_mean_abs_rel_error")},
            "predictions": bench.predictions,
            "load": args.load,
        },
    }
    if args.server_only:
        with open(args.out) as f:
            result = json.load(f)
    else:
        t0 = time.monotonic()
        result["simulations"] = run_simulations(args, bench)
        result["meta"]["simulation_wall_s"] = time.monotonic() - t0
    if args.server or args.server_only:
        result["server"] = run_server(args, log)
    elif args.server_from:
        with open(args.server_from) as f:
            earlier = json.load(f)
        # the measured server runs and any earlier server sections kept beside them
        result.update({k: v for k, v in earlier.items() if k.startswith("server")})
    result["criteria"] = criteria(result)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    if args.plot:
        plot(result, args.plot)
    json.dump(result, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
