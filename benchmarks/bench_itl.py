"""Stall-free batching, live: `--target-itl-ms` against today's fixed 2,048-token step budget.

Side by side in one run on this machine, each against a fresh `lenserve serve` on the embedded
model, streaming `/v1/completions` in exact mode (prompts of the trace's token counts,
`ignore_eos`, max_tokens = the trace's response length):

Both servers of a comparison run at the same time, one thread each, on the machine's two cores:
they see the same machine at the same moments, whatever else runs on it. `--sequential` runs them
one after the other instead, each alone with all cores (what a deployment has).

1. capacity: requests finished per second with every request of the trace queued at once under
   the fixed budget: a live saturation run of a fixed-budget server on the trace's first 16
   requests calibrates the simulator (the cost model that server fitted over all its steps, and
   its step scatter), which then runs the whole trace repeated (`--capacity offline`: the model
   measured in-process before the run; `live`: the saturation run's own rate);
2. each trace replayed at `--load` (0.8) x capacity, once with the fixed budget and once with the
   target: ITL p50/p99 (client-side gaps between streamed tokens), TTFT p50, output throughput;
3. the simulator on the same send times and lengths under the same budget rule, as
   `lenserve simulate --from-server` runs it: the cost model the server fitted over all its steps
   (`lenserve:step_cost_model_lifetime_seconds`), each step's time scattered as the server's steps
   scattered around that model (`lenserve:step_time_over_lifetime_model`): its ITL p99 beside the
   live one (and, for reference, the same without scatter, with the scatter around the online
   model that sized each step, and with the model measured before);
4. heavy overload: the first trace at `--overload` (3) x capacity with a short queue
   (`--max-queue`): ITL p99 while excess requests get 429.

Traces: the shipped Azure LLM inference conversation trace (a slice), and a long-prompt mix
(log-uniform prompts from 150 tokens up to the served context, short answers, Poisson arrivals).

    python benchmarks/bench_itl.py [--quick] [--out benchmarks/results/itl_cpu.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import RESULTS, machine  # noqa: E402

from lenserve.config import TARGET_ITL_MS  # noqa: E402
from lenserve.scheduler.cost_model import FEATURES  # noqa: E402
from lenserve.scheduler.simulator import SimRequests, make_predictions, scheduler_config_for, simulate  # noqa: E402
from lenserve.traces.loaders import load_trace  # noqa: E402
from lenserve.traces.trace import Trace, TraceRequest  # noqa: E402

AZURE_TRACE = os.path.join(os.path.dirname(__file__), "..", "traces", "data", "azure_llm_2023_conv.csv.gz")
FIXED_BUDGET = 2048


def long_prompt_mix(n: int, max_prompt: int, rate_per_s: float = 1.0, seed: int = 0) -> Trace:
    """Long prompts (log-uniform from 150 tokens to `max_prompt`) with short answers (16-64
    tokens), Poisson arrivals at `rate_per_s` (replay rescales time)."""
    rng = np.random.default_rng(seed)
    arrival = np.cumsum(rng.exponential(1 / rate_per_s, n))
    prompt = np.exp(rng.uniform(np.log(150), np.log(max_prompt), n)).astype(int)
    output = rng.integers(16, 65, n)
    return Trace([TraceRequest(float(a), int(p), int(o)) for a, p, o in zip(arrival, prompt, output)], name="long_prompts",
                 source="synthetic: log-uniform prompts 150..context, 16-64 output tokens")


def azure_slice(n: int, max_model_len: int) -> Trace:
    """The first `n` requests of the shipped Azure conversation trace, prompt + response clipped to
    the served context."""
    trace = load_trace(AZURE_TRACE).head(n)
    reqs = []
    for r in trace:
        prompt = min(r.prompt_tokens, max_model_len // 2)
        reqs.append(TraceRequest(r.arrival_s, prompt, max(1, min(r.output_tokens, max_model_len - prompt - 1))))
    return Trace(reqs, name="azure_conv", source="Azure LLM inference trace 2023 (conversation), CC-BY-4.0")


def serve_argv(port: int, target_itl_ms: float, max_queue: int, args) -> list[str]:
    return [sys.executable, "-m", "lenserve.cli", "serve", "--port", str(port), "--predictor", "default",
            "--max-num-batched-tokens", str(FIXED_BUDGET), "--target-itl-ms", str(target_itl_ms), "--num-threads", str(args.num_threads),
            "--max-queue", str(max_queue), "--max-model-len", str(args.max_model_len), "--policy", args.policy,
            "--weights-dtype", args.weights_dtype]


def side_by_side(trace: Trace, time_scale: float, targets: list[float], args, max_queue: int = 100000, log=print) -> list[dict]:
    """One exact-mode replay of `trace` against a fresh server per ITL target (0: the fixed budget):
    all at the same time, so that every server sees the machine as it is at the same moments, or
    with `--sequential` one after the other, each server alone on the machine."""
    if getattr(args, "sequential", False):
        return [_replays(trace, time_scale, [target], args, max_queue, log)[0] for target in targets]
    return _replays(trace, time_scale, targets, args, max_queue, log)


def _replays(trace: Trace, time_scale: float, targets: list[float], args, max_queue: int, log) -> list[dict]:
    import asyncio
    from contextlib import ExitStack

    from lenserve.server.metrics import fetch_metrics_text, served_cost_model
    from lenserve.server.process import ServerProcess, free_port
    from lenserve.traces.replay import Replayer, ReplayConfig, write_outputs
    from lenserve.traces.report import read_jsonl

    t0 = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        urls = []
        for i, target in enumerate(targets):
            port = free_port()
            urls.append(f"http://127.0.0.1:{port}")
            server = stack.enter_context(ServerProcess(serve_argv(port, target, max_queue, args), Path(tmp) / f"server{i}.log", urls[-1]))
            server.wait_healthy(300)
        replayers = [Replayer(trace, ReplayConfig(url=url, mode="exact", time_scale=time_scale, temperature=0.0, metrics_interval_s=0,
                                                  request_timeout_s=3600, show_progress=not args.no_progress and i == 0))
                     for i, url in enumerate(urls)]

        async def run_all():
            await asyncio.gather(*(r.run() for r in replayers))

        asyncio.run(run_all())
        texts = [fetch_metrics_text(url) for url in urls]  # one read each: the fitted models and the step time
        fitted = [served_cost_model(text) for text in texts]
        busy = [_busy_s(text) for text in texts]
        runs = []
        for i, (target, replayer) in enumerate(zip(targets, replayers)):
            write_outputs(replayer, Path(tmp) / f"run{i}")
            records = read_jsonl(Path(tmp) / f"run{i}" / "requests.jsonl")
            runs.append(_summarize(trace, time_scale, target, records, fitted[i], time.monotonic() - t0, log, busy[i]))
    return runs


def _busy_s(metrics_text: str) -> float:
    """Seconds a server spent in engine steps (lenserve:step_duration_seconds' sum in its /metrics text)."""
    from prometheus_client.parser import text_string_to_metric_families

    return sum(s.value for f in text_string_to_metric_families(metrics_text) for s in f.samples
               if s.name == "lenserve:step_duration_seconds_sum")


def _window_tokens(records: list[dict]) -> int:
    """Tokens streamed (first token + one per gap) between the first and the last send."""
    start, end = min(r["sent_s"] for r in records), max(r["sent_s"] for r in records)
    count = 0
    for r in records:
        if r["ttft_s"] is None:
            continue
        t = r["sent_s"] + r["ttft_s"]
        count += start <= t <= end
        for gap in r["itl_s"]:
            t += gap
            count += start <= t <= end
    return count


def _summarize(trace: Trace, time_scale: float, target_itl_ms: float, records: list[dict], served, wall_s: float, log,
               busy_s: float | None = None) -> dict:
    fitted, step_noise = served.for_simulation()
    ok = [r for r in records if r["ok"]]
    itl = np.array([x for r in ok for x in r["itl_s"]])
    ttft = np.array([r["ttft_s"] for r in ok if r["ttft_s"] is not None])
    span = max(r["end_s"] for r in ok) - min(r["sent_s"] for r in ok)
    summary = {
        "target_itl_ms": target_itl_ms or None,
        "time_scale": time_scale,
        "num_requests": len(records),
        "num_ok": len(ok),
        "num_rejected_429": sum(1 for r in records if r["status"] == 429),
        "num_failed_other": sum(1 for r in records if not r["ok"] and r["status"] != 429),
        "itl_p50_s": float(np.percentile(itl, 50)),
        "itl_p90_s": float(np.percentile(itl, 90)),
        "itl_p99_s": float(np.percentile(itl, 99)),
        "itl_max_s": float(itl.max()),
        "num_token_gaps": int(len(itl)),
        "ttft_p50_s": float(np.percentile(ttft, 50)),
        "ttft_p99_s": float(np.percentile(ttft, 99)),
        "mean_e2e_s": float(np.mean([r["e2e_s"] for r in ok])),
        "output_throughput_tok_s": sum(r["output_tokens"] for r in ok) / span,
        # tokens streamed while requests were still arriving, per second of that window: whether the
        # server keeps up with the offered load, without the drain of the last requests
        "arrival_window_throughput_tok_s": _window_tokens(ok) / window if (window := max(r["sent_s"] for r in ok) - min(r["sent_s"] for r in ok)) > 0 else None,
        "span_s": span,
        # measured utilisation: the share of the replay the engine spent stepping (the offered
        # load as the server saw it, no model in between)
        "busy_s": busy_s,
        "busy_fraction": busy_s / span if busy_s is not None and span > 0 else None,
        "wall_s": round(wall_s, 1),
    }
    log(f"  {trace.name} x{time_scale:.3g} target={target_itl_ms or 'fixed'}: "
        + json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in summary.items()
                      if k in ("num_ok", "num_rejected_429", "itl_p50_s", "itl_p99_s", "ttft_p50_s", "output_throughput_tok_s", "busy_fraction")}))
    fitted_terms = _without_meta(fitted)
    def scatter(values) -> dict:
        out = {"num_values": int(len(values))}
        if len(values):
            out.update({f"p{q}": float(np.percentile(values, q)) for q in (10, 50, 90, 99)})
        return out
    return {"summary": summary, "itl_s": itl.tolist(), "records": ok, "fitted_cost_model": fitted_terms,
            "online_cost_model": _without_meta(served.model), "_online_step_noise": served.step_noise,
            "step_time_over_predicted": scatter(served.step_noise), "step_scatter_simulated": scatter(step_noise), "_fitted": fitted, "_online": served.model, "_step_noise": step_noise}


def _without_meta(model) -> dict | None:
    """A cost model's terms and engine settings as JSON (None for no model)."""
    return {k: v for k, v in model.to_json().items() if k != "meta"} if model is not None else None


def capacity(trace: Trace, cost, args, log=print) -> dict:
    """Requests per second the fixed-budget server finishes with the trace's requests all queued at
    once. `--capacity calibrated` (default): a live saturation run of a fixed-budget server on the
    trace's first `--capacity-requests` calibrates the simulator with the cost model that server
    fitted over all its steps and its step scatter (/metrics), which then runs the whole trace
    repeated; `offline`: the simulator with the cost model measured in-process before the run (a
    serving process's steps cost differently, by a quarter either way here, so the offered load
    missed its share of the servers' capacity); `live`: the saturation run's own finishing rate
    (its drain, a few long requests alone at the end, pulls it low)."""
    model, noise, how = cost, None, "simulated with the cost model measured offline"
    if args.capacity in ("live", "calibrated"):
        head = trace.head(min(args.capacity_requests, len(trace)))
        run = side_by_side(head, 1e6, [0], args, log=log)[0]
        s = run["summary"]
        if args.capacity == "live":
            return {"how": "live", "num_requests": s["num_ok"], "requests_per_s": s["num_ok"] / s["span_s"],
                    "output_tok_s": s["output_throughput_tok_s"]}
        model, noise = run["_fitted"] or cost, run["_step_noise"]
        how = (f"simulated with the cost model (fitted over all its steps) and step scatter of a fixed-budget server on a live "
               f"saturation run of the trace's first {len(head)} requests ({s['num_ok'] / s['span_s']:.4f} req/s live, drain included)")
    # the trace's requests repeated, so that the drain at the end (a few long ones alone) is a small part
    c = trace.columns
    reps = -(-1000 // len(trace))
    req = SimRequests.from_arrays(np.zeros(reps * len(trace)), np.tile(c.prompt_tokens, reps), np.tile(c.output_tokens, reps),
                                  max_model_len=args.max_model_len, max_tokens=args.max_model_len)
    config = scheduler_config_for(model, max_num_batched_tokens=FIXED_BUDGET, max_model_len=args.max_model_len)
    s = simulate(req, config, model, step_noise=noise).summary()
    return {"how": how + f", the trace's requests x{reps} queued at once", "num_requests": len(req),
            "requests_per_s": len(req) / s["makespan_s"], "output_tok_s": s["throughput_tok_s"],
            "cost_model": {k: getattr(model, k) for k in FEATURES}}


def time_scale_for(trace: Trace, load: float, capacity_rps: float) -> float:
    """The replay speed-up at which `trace` offers `load` x `capacity_rps` requests per second."""
    rate = (len(trace) - 1) / trace.duration_s if trace.duration_s > 0 else float("inf")
    return load * capacity_rps / rate


def simulated(run: dict, cost, target_itl_ms: float, max_model_len: int, policy: str, step_noise=None) -> dict:
    """The simulator on the live run's send times, prompt and response lengths, same budget rule;
    `step_noise`: measured over predicted times of real steps, each simulated step drawing one."""
    recs = run["records"]
    req = SimRequests.from_arrays(np.array([r["sent_s"] for r in recs]), np.array([r["prompt_tokens_server"] or r["prompt_tokens"] for r in recs]),
                                  np.array([max(r["output_tokens"], 1) for r in recs]), max_model_len=max_model_len, max_tokens=max_model_len)
    config = scheduler_config_for(cost, max_num_batched_tokens=FIXED_BUDGET, max_model_len=max_model_len, policy=policy,
                                  target_itl_s=target_itl_ms / 1000 if target_itl_ms else None)
    # the server's predictor read synthetic exact-mode prompts: predictions of middling quality
    s = simulate(req, config, cost, make_predictions("noisy-tau:0.5", req.output_tokens), step_noise=step_noise).summary()
    return {k: s[k] for k in ("p50_itl_s", "p99_itl_s", "mean_itl_s", "mean_ttft_s", "p50_ttft_s", "mean_e2e_s", "throughput_tok_s")}


def capacity_price(trace: Trace, entry: dict, args) -> dict:
    """What holding every step within the target costs in capacity, whatever the scheduler: the
    most output tokens per second any schedule sustains on the trace's lengths with and without
    the target (`step_budget.max_throughput`, with the cost model the target server fitted), and
    the shares of each that the replay's offered output rate asks for. The fit describes the steps
    that server ran, so pricing every other schedule with it extrapolates (a target server's fit
    over small chunks put the long mix 1.25x over capacity; the same replay, rerun, kept that
    server's engine busy 69% of the time): `busy_fraction_*`, the engines' measured step time
    over the replay span, is the load as the servers saw it."""
    from lenserve.scheduler.cost_model import CostModel
    from lenserve.scheduler.step_budget import max_throughput

    terms = entry["target"]["fitted_cost_model"]
    if not terms:
        return {}
    cost = CostModel(**terms)
    c = trace.columns
    free = max_throughput(cost, c.prompt_tokens, c.output_tokens, None, cost.max_num_seqs)
    held = max_throughput(cost, c.prompt_tokens, c.output_tokens, args.target_itl_ms / 1000, cost.max_num_seqs)
    offered = float(c.output_tokens.sum()) * entry["time_scale"] / trace.duration_s
    return {"max_output_tok_s": float(free), "max_output_tok_s_within_target": float(held), "target_over_free": float(held / free),
            "offered_output_tok_s": offered, "offered_over_max": offered / free, "offered_over_max_within_target": offered / held,
            "busy_fraction_fixed": entry["fixed"]["summary"]["busy_fraction"], "busy_fraction_target": entry["target"]["summary"]["busy_fraction"]}


def criteria(result: dict, target_s: float) -> dict:
    out = {}
    for name, t in result["traces"].items():
        fixed, tgt = t["fixed"]["summary"], t["target"]["summary"]
        out[name] = {
            "itl_p99_le_1.5T": tgt["itl_p99_s"] <= 1.5 * target_s,
            "ttft_p50_ratio_le_1.3": tgt["ttft_p50_s"] / fixed["ttft_p50_s"] <= 1.3,
            "throughput_ratio_ge_0.95": tgt["output_throughput_tok_s"] / fixed["output_throughput_tok_s"] >= 0.95,
            "sim_itl_p99_within_20pct": abs(t["target"]["simulated"]["p99_itl_s"] / tgt["itl_p99_s"] - 1) <= 0.2,
        }
    if "overload" in result:
        out["overload_itl_p99_le_2T"] = result["overload"]["target"]["summary"]["itl_p99_s"] <= 2 * target_s
    return out


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    target_s = result["target_itl_ms"] / 1000
    names = list(result["traces"])
    fig, axes = plt.subplots(1, len(names) + ("overload" in result), figsize=(5.2 * (len(names) + 1), 4.2))
    axes = np.atleast_1d(axes)
    panels = [(name, [("fixed 2,048-token budget", result["traces"][name]["fixed"]["itl_s"], "tab:red"),
                      (f"target {result['target_itl_ms']:.0f} ms", result["traces"][name]["target"]["itl_s"], "tab:blue")])
              for name in names]
    if "overload" in result:
        over = result["overload"]
        panels.append((f"{names[0]} at {over['load']:g}x capacity, --max-queue {over['max_queue']}",
                       [("fixed 2,048-token budget", over["fixed"]["itl_s"], "tab:red"),
                        (f"target {result['target_itl_ms']:.0f} ms", over["target"]["itl_s"], "tab:blue")]))
    for ax, (title, series) in zip(axes, panels):
        for label, itl, color in series:
            x = np.sort(np.asarray(itl))
            ax.plot(x, np.arange(1, len(x) + 1) / len(x), label=label, color=color)
        ax.axvline(target_s, color="k", ls=":", lw=1, label="target T")
        ax.axvline(1.5 * target_s, color="gray", ls="--", lw=1, label="1.5 T")
        ax.set_xscale("log")
        ax.set_xlabel("inter-token latency (s, client side)")
        ax.set_ylabel("CDF of token gaps")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    fig.suptitle(f"Stall-free batching on {result['machine']['cpu']} ({result['machine']['cores']} cores)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target-itl-ms", type=float, default=TARGET_ITL_MS["cpu"])
    p.add_argument("--load", type=float, default=0.8, help="offered load, x measured capacity")
    p.add_argument("--overload", type=float, default=3.0, help="the heavy-overload run's load (0: skip)")
    p.add_argument("--overload-max-queue", type=int, default=8)
    p.add_argument("--azure-requests", type=int, default=48)
    p.add_argument("--long-requests", type=int, default=40)
    p.add_argument("--capacity", default="calibrated", choices=["calibrated", "offline", "live"],
                   help="how the capacity that --load scales is measured (see capacity())")
    p.add_argument("--capacity-requests", type=int, default=16, help="requests of the live saturation run (calibrated, live)")
    p.add_argument("--max-model-len", type=int, default=4096, help="the served context (the long prompts reach it)")
    p.add_argument("--num-threads", type=int, default=None, help="each server's threads (default: 1 side by side, all cores with --sequential)")
    p.add_argument("--sequential", action="store_true", help="the servers of a comparison one after the other, each alone on the machine")
    p.add_argument("--weights-dtype", default="auto", choices=["auto", "fp32", "fp16", "native"], help="both servers' --weights-dtype")
    p.add_argument("--policy", default="sjf", choices=["fcfs", "sjf"],
                   help="both servers' queue policy (sjf: the length-aware order that also orders prompt chunks under the target)")
    p.add_argument("--quick", action="store_true", help="a few requests each (a smoke run)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--out", default=os.path.join(RESULTS, "itl_cpu.json"))
    p.add_argument("--plot", default=os.path.join(RESULTS, "itl_cpu.png"))
    args = p.parse_args(argv)
    if args.quick:
        args.azure_requests, args.long_requests, args.capacity_requests = 6, 4, 4
    if args.num_threads is None:
        args.num_threads = os.cpu_count() if args.sequential else 1

    from lenserve.config import EngineConfig
    from lenserve.scheduler.config import SchedulerConfig
    from lenserve.sim_cli import measure_cost_model

    def log(*parts):
        print(*parts, file=sys.stderr, flush=True)

    t0 = time.monotonic()
    result = {"machine": machine(), "target_itl_ms": args.target_itl_ms, "fixed_budget": FIXED_BUDGET, "load": args.load,
              "policy": args.policy, "num_threads_per_server": args.num_threads, "sequential": args.sequential, "weights_dtype": args.weights_dtype,
              "max_model_len": args.max_model_len, "traces": {}}
    # the servers' engine settings (side by side: one thread each, the two share the two cores)
    cost = measure_cost_model(EngineConfig(max_model_len=args.max_model_len, num_threads=args.num_threads, weights_dtype=args.weights_dtype,
                                           scheduler=SchedulerConfig(max_num_batched_tokens=FIXED_BUDGET)),
                              quick=args.quick, temperature=0.0)
    result["cost_model"] = {k: v for k, v in cost.to_json().items() if k != "meta"}
    result["cost_model"]["fit_mean_abs_rel_error"] = cost.meta["fit_mean_abs_rel_error"]
    log(f"cost model measured in {time.monotonic() - t0:.0f}s")
    traces = [azure_slice(args.azure_requests, args.max_model_len),
              long_prompt_mix(args.long_requests, args.max_model_len - 80)]
    for trace in traces:
        cap = capacity(trace, cost, args, log)
        log(f"{trace.name}: capacity {cap['requests_per_s']:.4f} req/s ({cap['how']})")
        scale = time_scale_for(trace, args.load, cap["requests_per_s"])
        entry = {"source": trace.source, "num_requests": len(trace), "capacity": cap, "time_scale": scale}
        for key, run in zip(("fixed", "target"), side_by_side(trace, scale, [0, args.target_itl_ms], args, log=log)):
            target = run["summary"]["target_itl_ms"]
            # The simulator as `lenserve simulate --from-server` runs it: the cost model the server
            # fitted over all its steps, each step scattered as the server's steps scattered around
            # that model (lenserve:step_time_over_lifetime_model). Beside it: the same model with
            # every step exactly as predicted, the model the server scheduled with at the end (recent
            # steps weigh more), the model measured before the run, that model's scatter from the
            # offline fit (one global fit over prompts and decode batches), and the scatter around
            # the online model that sized each step (lenserve:step_time_over_predicted: it also holds
            # that model's drift, so around the lifetime model it counts the drift twice).
            fitted = run.pop("_fitted") or cost
            online = run.pop("_online") or fitted
            served_noise = run.pop("_step_noise")
            online_noise = run.pop("_online_step_noise")
            run["simulated"] = simulated(run, fitted, target, args.max_model_len, args.policy, served_noise)
            run["simulated_online_model"] = simulated(run, online, target, args.max_model_len, args.policy, served_noise)
            run["simulated_no_step_noise"] = simulated(run, fitted, target, args.max_model_len, args.policy)
            run["simulated_measured_cost_model"] = simulated(run, cost, target, args.max_model_len, args.policy)
            run["simulated_offline_step_noise"] = simulated(run, fitted, target, args.max_model_len, args.policy, cost.residuals())
            # the scatter measured against the online model that sized each step (what the scheduler
            # discounts its target by), drawn around the lifetime model
            run["simulated_online_step_noise"] = simulated(run, fitted, target, args.max_model_len, args.policy, online_noise)
            run.pop("records")
            entry[key] = run
        entry["reference"] = capacity_price(trace, entry, args)
        tgt, fixed = entry["target"]["summary"], entry["fixed"]["summary"]
        entry["ratios"] = {
            "itl_p99_target_over_fixed": tgt["itl_p99_s"] / fixed["itl_p99_s"],
            "ttft_p50_target_over_fixed": tgt["ttft_p50_s"] / fixed["ttft_p50_s"],
            "throughput_target_over_fixed": tgt["output_throughput_tok_s"] / fixed["output_throughput_tok_s"],
            "arrival_window_throughput_target_over_fixed": tgt["arrival_window_throughput_tok_s"] / fixed["arrival_window_throughput_tok_s"],
            "sim_over_live_itl_p99_target": entry["target"]["simulated"]["p99_itl_s"] / tgt["itl_p99_s"],
            "sim_over_live_itl_p99_fixed": entry["fixed"]["simulated"]["p99_itl_s"] / fixed["itl_p99_s"],
            "sim_no_step_noise_over_live_itl_p99_target": entry["target"]["simulated_no_step_noise"]["p99_itl_s"] / tgt["itl_p99_s"],
            "sim_offline_step_noise_over_live_itl_p99_target": entry["target"]["simulated_offline_step_noise"]["p99_itl_s"] / tgt["itl_p99_s"],
            "sim_online_step_noise_over_live_itl_p99_target": entry["target"]["simulated_online_step_noise"]["p99_itl_s"] / tgt["itl_p99_s"],
        }
        result["traces"][trace.name] = entry
        log(trace.name, json.dumps(entry["ratios"]))
    if args.overload > 0:
        first = traces[0]
        cap = result["traces"][first.name]["capacity"]["requests_per_s"]
        runs = side_by_side(first, time_scale_for(first, args.overload, cap), [0, args.target_itl_ms], args,
                            max_queue=args.overload_max_queue, log=log)
        for run in runs:
            for key in ("records", "_fitted", "_online", "_step_noise", "_online_step_noise"):
                run.pop(key)
        result["overload"] = {"load": args.overload, "max_queue": args.overload_max_queue, "fixed": runs[0], "target": runs[1]}
    result["criteria"] = criteria(result, args.target_itl_ms / 1000)
    result["wall_s"] = round(time.monotonic() - t0, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    plot(result, args.plot)
    print(json.dumps({"criteria": result["criteria"], **{n: t["ratios"] for n, t in result["traces"].items()}}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
