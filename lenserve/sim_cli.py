"""Subcommands: `lenserve simulate` (the scheduler on a trace, no model) and `lenserve bench cost-model`
(measure the step-time model the simulator uses from the real engine)."""
from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import time

logger = logging.getLogger("lenserve")


# ---- lenserve simulate -------------------------------------------------------------------------------
def add_simulation_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("simulation")
    g.add_argument("--policies", default="fcfs,sjf,oracle", help="comma-separated: fcfs, sjf, oracle")
    g.add_argument("--predictions", default="noisy-tau:0.5",
                   help="oracle | noisy:SIGMA (log-length noise) | noisy-tau:TAU (noise for that Kendall tau) | "
                   "empirical:FILE (a predictor eval's residuals)")
    g.add_argument("--cost-model", default=None, metavar="FILE", help="default: the CPU model shipped in lenserve/scheduler/data")
    g.add_argument("--from-server", default=None, metavar="URL",
                   help="simulate that running lenserve server: the step cost model it fitted over all its steps, each step's "
                        "time scattered as its steps scatter around its predictions (both read from URL/metrics); the engine "
                        "settings come from --cost-model or the shipped model (with --replicas: the cost model only)")
    g.add_argument("--time-scale", type=float, default=1.0, metavar="X", help="speed-up: arrival time = trace time / X")
    g.add_argument("--batching", choices=("continuous", "bucketed"), default="continuous")
    g.add_argument("--bucket-affinity", action="store_true", help="continuous batching: admit from the head's length bucket first")
    g.add_argument("--kv-reserve", choices=("none", "predicted", "max"), default="predicted")
    g.add_argument("--max-num-seqs", type=int, default=None, help="default: the cost model's engine setting")
    g.add_argument("--max-num-batched-tokens", type=int, default=None, help="default: the cost model's engine setting")
    g.add_argument("--num-kv-blocks", type=int, default=None, help="default: the cost model's engine setting")
    g.add_argument("--block-size", type=int, default=None)
    g.add_argument("--max-model-len", type=int, default=None, help="longer requests are clipped (default: the cost model's)")
    g.add_argument("--max-tokens", type=int, default=2048, help="each request's max_tokens (raised to its true length if shorter)")
    g.add_argument("--aging", type=float, default=None, metavar="TOK_PER_STEP", help="sjf/oracle aging: tokens of predicted work forgiven per engine step waited (default 0.3)")
    g.add_argument("--max-wait-s", type=float, default=None, help="requests waiting longer go first")
    g.add_argument("--fcfs-wait-bound", type=float, default=None, metavar="X",
                   help="requests that have waited X times their fcfs wait (work queued ahead at arrival) go first")
    g.add_argument("--max-latency-s", type=float, default=None,
                   help="end-to-end latency objective (s): a request goes first once a later start would leave too little time for its expected response (predicted mean tokens x measured step time)")
    g.add_argument("--target-itl-ms", type=float, default=None, metavar="MS",
                   help="size each step's prompt chunks to keep decodes within this inter-token latency (as serve's "
                   "--target-itl-ms; default: a fixed --max-num-batched-tokens budget)")
    g.add_argument("--min-prefill-chunk", type=int, default=16, help="the fewest prompt tokens a step takes under --target-itl-ms")
    g.add_argument("--seed", type=int, default=0, help="prediction noise")
    g.add_argument("--json", action="store_true", help="print one JSON object keyed by policy")
    c = p.add_argument_group("replicas (a router in front of N engines)")
    c.add_argument("--replicas", type=int, default=1, help="engine replicas behind the router")
    c.add_argument("--router", default=None, help="comma-separated: least-work, pow2, round-robin, cache-aware, ray-prefix (default with "
                   "--replicas > 1: all five; the cache-aware ones need a trace with prefix blocks: Mooncake hash_ids or sessions); "
                   "ablations affinity, prefix-affinity, cache-aware-nolength; jsq, min-delay and cache-oracle are references that "
                   "see what a real router cannot (live state, true lengths, every replica's cache)")
    c.add_argument("--report-interval-s", type=float, default=1.0, help="least-work: how often replicas report their outstanding work")
    c.add_argument("--plan-capacity", action="store_true", help="find the fewest replicas meeting --slo-ttft-s and --slo-tpot-s, per router")
    c.add_argument("--slo-ttft-s", type=float, default=None, help="capacity planning: time to first token objective")
    c.add_argument("--slo-tpot-s", type=float, default=None, help="capacity planning: time per output token objective")
    c.add_argument("--slo-quantile", type=float, default=0.99, help="the share of requests that must meet each objective")
    c.add_argument("--max-replicas", type=int, default=64, help="capacity planning: give up beyond this many")
    c.add_argument("--plot", default=None, metavar="PNG", help="capacity planning: write the plot here")
    c.add_argument("--out", default=None, metavar="JSON", help="capacity planning: write the table here")


def cmd_simulate(args: argparse.Namespace) -> int:
    from lenserve.scheduler.cost_model import CostModel, load_default
    from lenserve.scheduler.simulator import SimRequests, make_predictions, scheduler_config_for, simulate_policies
    from lenserve.traces.cli import load_from_args

    cost = CostModel.load(args.cost_model) if args.cost_model else load_default()
    step_noise = None
    if args.from_server:
        cost, step_noise = _served(args.from_server, cost)
    trace = load_from_args(args)
    max_model_len = args.max_model_len or cost.max_model_len
    requests = SimRequests.from_trace(trace, time_scale=args.time_scale, max_model_len=max_model_len, max_tokens=args.max_tokens)
    if not len(requests):
        raise ValueError(f"trace {args.trace} has no requests with a response")
    predictions = make_predictions(args.predictions, requests.output_tokens, args.seed)
    overrides = dict(
        batching=args.batching,
        bucket_affinity=args.bucket_affinity,
        kv_reserve=args.kv_reserve,
        max_model_len=max_model_len,
        max_wait_s=args.max_wait_s,
        fcfs_wait_bound=args.fcfs_wait_bound,
        max_latency_s=args.max_latency_s,
        target_itl_s=args.target_itl_ms / 1000 if args.target_itl_ms else None,
        min_prefill_chunk=args.min_prefill_chunk,
    )
    for name in ("max_num_seqs", "max_num_batched_tokens"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    if args.aging is not None:
        overrides["aging_tok_per_step"] = args.aging
    config = scheduler_config_for(cost, **overrides)
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    if args.replicas > 1 or args.router or args.plan_capacity:
        return _simulate_replicas(args, trace, requests, predictions, config, cost, policies)
    results = simulate_policies(
        requests, policies, config, cost, predictions, num_kv_blocks=args.num_kv_blocks, block_size=args.block_size,
        step_noise=step_noise,
    )
    if args.json:
        json.dump(results, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    print(f"{trace.name}: {len(requests)} requests ({requests.num_clipped} clipped to {max_model_len} tokens), "
          f"predictions {predictions.source}, {config.batching} batching, kv-reserve {config.kv_reserve}")
    cols = [("mean_e2e_s", "mean E2E s"), ("p50_e2e_s", "p50 E2E s"), ("p99_e2e_s", "p99 E2E s"),
            ("mean_ttft_s", "mean TTFT s"), ("p99_ttft_s", "p99 TTFT s"), ("p50_itl_s", "p50 ITL s"), ("p99_itl_s", "p99 ITL s"),
            ("throughput_tok_s", "tok/s"),
            ("preemptions", "preempt"), ("max_concurrent", "max conc"), ("sim_requests_per_s", "sim req/s")]
    print(f"{'policy':<8}" + "".join(f"{label:>13}" for _, label in cols))
    for policy, s in results.items():
        print(f"{policy:<8}" + "".join(f"{s[key]:>13.2f}" if isinstance(s[key], float) else f"{s[key]:>13}" for key, _ in cols))
    return 0


def _served(url: str, settings):
    """The cost model and step scatter a running server reports, with `settings`' engine settings."""
    import dataclasses

    from lenserve.scheduler.cost_model import FEATURES
    from lenserve.server.metrics import fetch_served_cost_model

    try:
        served = fetch_served_cost_model(url)
    except ValueError as e:
        raise ValueError(f"--from-server: {e}") from e
    fitted, noise = served.for_simulation()
    if fitted is None:
        raise ValueError(f"--from-server: {url} reports no step cost model yet (lenserve:step_cost_model_seconds appears "
                         "after its first refit, a few dozen steps)")
    cost = dataclasses.replace(settings, **{k: getattr(fitted, k) for k in FEATURES}, meta={"from_server": url})
    logger.info("cost model from %s: %s; %d steps' scatter (measured / predicted)", url,
                {k: f"{getattr(cost, k):.3g}" for k in FEATURES}, len(noise))
    return cost, (noise if len(noise) else None)


def _simulate_replicas(args, trace, requests, predictions, config, cost, policies) -> int:
    from dataclasses import replace

    from lenserve.scheduler.cluster import ABLATION_ROUTERS, REFERENCE_ROUTERS, ROUTERS, SLO, plan_capacity, plot_capacity, simulate_routers

    routers = [r.strip() for r in (args.router or ",".join(ROUTERS)).split(",") if r.strip()]
    for r in routers:
        if r not in ROUTERS + ABLATION_ROUTERS + REFERENCE_ROUTERS:
            raise ValueError(f"--router must be among {', '.join(ROUTERS + ABLATION_ROUTERS + REFERENCE_ROUTERS)}, got {r!r}")
    if len(policies) != 1:
        raise ValueError(f"with replicas, give one --policies (each replica's scheduler), got {policies}")
    config = replace(config, policy=policies[0])
    kwargs = dict(report_interval_s=args.report_interval_s, num_kv_blocks=args.num_kv_blocks, block_size=args.block_size, seed=args.seed)
    header = (f"{trace.name}: {len(requests)} requests, predictions {predictions.source}, policy {config.policy}, "
              f"kv-reserve {config.kv_reserve}")
    if args.plan_capacity:
        if args.slo_ttft_s is None or args.slo_tpot_s is None:
            raise ValueError("--plan-capacity needs --slo-ttft-s and --slo-tpot-s")
        if not 0 < args.slo_quantile <= 1:
            raise ValueError(f"--slo-quantile must be in (0, 1], got {args.slo_quantile}")
        slo = SLO(args.slo_ttft_s, args.slo_tpot_s, args.slo_quantile)
        log = (lambda *a: print(*a, file=sys.stderr, flush=True))
        plan = plan_capacity(requests, routers, slo, config, cost, predictions, max_replicas=args.max_replicas, log=log, **kwargs)
        plan["trace"] = {"name": trace.name, "num_requests": len(requests), "time_scale": args.time_scale,
                         "predictions": predictions.source, "policy": config.policy}
        if args.out:
            with open(args.out, "w") as f:
                json.dump(plan, f, indent=2)
                f.write("\n")
        if args.plot:
            plot_capacity(plan, args.plot, title=header)
        if args.json:
            json.dump(plan, sys.stdout, indent=2)
            sys.stdout.write("\n")
            return 0
        q = f"q{slo.quantile:g}"
        print(header)
        print(f"SLO: TTFT {q} <= {slo.ttft_s:g}s, TPOT {q} <= {slo.tpot_s:g}s")
        print(f"{'router':<12}{'replicas':>9}{'TTFT ' + q:>13}{'TPOT ' + q:>13}{'mean E2E s':>12}{'tok/s':>10}  meets")
        for row in plan["rows"]:
            print(f"{row['router']:<12}{row['num_replicas']:>9}{row[f'ttft_{q}_s']:>13.2f}{row[f'tpot_{q}_s']:>13.3f}"
                  f"{row['mean_e2e_s']:>12.2f}{row['throughput_tok_s']:>10.1f}  {'yes' if row['meets_slo'] else 'no'}")
        for router, n in plan["min_replicas"].items():
            print(f"fewest replicas, {router}: {n if n is not None else f'more than {args.max_replicas}'}")
        return 0
    results = simulate_routers(requests, args.replicas, routers, config, cost, predictions, **kwargs)
    if args.json:
        json.dump(results, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    print(f"{header}, {args.replicas} replicas")
    cols = [("mean_e2e_s", "mean E2E s"), ("p99_e2e_s", "p99 E2E s"), ("mean_ttft_s", "mean TTFT s"), ("p99_ttft_s", "p99 TTFT s"),
            ("p99_tpot_s", "p99 TPOT s"), ("throughput_tok_s", "tok/s"), ("requests_per_replica_min", "min/replica"),
            ("requests_per_replica_max", "max/replica"), ("sim_requests_per_s", "sim req/s")]
    print(f"{'router':<12}" + "".join(f"{label:>13}" for _, label in cols))
    for router, s in results.items():
        print(f"{router:<12}" + "".join(f"{s[key]:>13.2f}" if isinstance(s[key], float) else f"{s[key]:>13}" for key, _ in cols))
    return 0


# ---- lenserve bench cost-model ---------------------------------------------------------------------------
# (batch size, context tokens) pairs measured; each is one prefill, a prefix-cached fill to the
# batch size, then a few decode steps; the whole grid `REPEATS` times. About two minutes on an
# idle 2-core CPU.
DECODE_BATCHES = (1, 2, 4, 8, 16, 32, 64)
DECODE_CONTEXTS = (128, 768)
PREFILL_LENGTHS = (128, 512, 1024)
NUM_DECODE_STEPS = 5
REPEATS = 3


def decode_points(max_num_seqs: int, quick: bool = False) -> list[tuple[int, int]]:
    """(batch size, context tokens) pairs to time decode steps at: the powers of two up to the
    engine's max_num_seqs and that limit itself, each at a short and a long context, so that the
    fit sees the batch sizes the engine will run (a 16-sequence server runs 1..16, not 32 or 64)."""
    batches = sorted({b for b in DECODE_BATCHES if b <= max_num_seqs} | {max(max_num_seqs, 1)})
    if quick:
        batches = batches[::2] + ([batches[-1]] if len(batches) % 2 == 0 else [])
    return [(b, c) for b in batches for c in DECODE_CONTEXTS]


def measure_cost_model(engine_config, quick: bool = False, temperature: float = 1.0, top_p: float = 1.0, top_k: int = -1):
    """Times real engine steps over a grid of prefill lengths, batch sizes and contexts, and fits
    the cost model to them. The sequences sample as the workload will (`temperature` 0 is greedy,
    an argmax; random sampling costs about 1.5 ms a sequence per step on CPU)."""
    import os

    import torch

    from lenserve.engine.llm_engine import LLMEngine
    from lenserve.engine.sampling_params import SamplingParams
    from lenserve.scheduler.cost_model import fit, step_features

    engine_config.target_itl_ms = None  # every step as scheduled here, whole prompts included
    engine = LLMEngine(engine_config)
    sampling = dict(temperature=temperature, top_p=top_p, top_k=top_k, ignore_eos=True)
    sched = engine.scheduler
    captured: list[dict] = []
    schedule = sched.schedule

    def spy():
        out = schedule()
        captured.append({**step_features(zip(out.seqs, out.num_new_tokens)), "num_seqs": len(out.seqs)})
        return out

    sched.schedule = spy
    rng = random.Random(0)
    vocab = engine.arch.vocab_size
    samples: list[dict] = []
    ids = iter(range(10**9))

    def prompt(n: int) -> list[int]:
        return [rng.randrange(100, vocab - 100) for _ in range(n)]

    def step(record: bool) -> None:
        captured.clear()
        t0 = time.perf_counter()
        engine.step()
        dt = time.perf_counter() - t0
        if record and captured and captured[0]["num_seqs"]:
            samples.append({**captured[0], "step_s": dt})

    def drain(record: bool) -> None:
        while engine.has_unfinished_requests():
            step(record)

    # Warm-up: the first steps allocate and pick kernels.
    engine.add_request(f"w{next(ids)}", prompt(64), SamplingParams(max_tokens=4, **sampling))
    drain(False)
    prefills = PREFILL_LENGTHS[:2] if quick else PREFILL_LENGTHS
    points = decode_points(engine_config.scheduler.max_num_seqs, quick)
    # The grid is measured REPEATS times over (not each point back to back), so that a spell of
    # other work on the machine lands on one pass of many points, which the robust fit discounts.
    for rep in range(1 if quick else REPEATS):
        for n in prefills:
            engine.add_request(f"p{next(ids)}", prompt(n), SamplingParams(max_tokens=1, **sampling))
            drain(True)
        for batch, context in points:
            shared = prompt(context)
            params = SamplingParams(max_tokens=NUM_DECODE_STEPS + 1, **sampling)
            engine.add_request(f"d{next(ids)}", shared, params)
            step(True)  # the prefill; the rest of the batch then finds it in the prefix cache
            for _ in range(batch - 1):
                engine.add_request(f"d{next(ids)}", shared, params)
            drain(True)
            logger.info("cost model: batch %d x %d tokens measured (pass %d)", batch, context, rep + 1)
    bm = engine.block_manager
    cfg = engine.config.scheduler
    meta = {
        "device": str(engine.device),
        "model": engine.model_name,
        "dtype": str(engine.dtype).replace("torch.", ""),
        "torch": torch.__version__,
        "num_threads": torch.get_num_threads(),
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "load_average_1m": os.getloadavg()[0],  # other work on the machine inflates step times
        "sampling": {"temperature": temperature, "top_p": top_p, "top_k": top_k},
        "samples": samples,
    }
    return fit(
        samples,
        num_kv_blocks=bm.num_blocks,
        block_size=bm.block_size,
        max_num_seqs=cfg.max_num_seqs,
        max_num_batched_tokens=cfg.max_num_batched_tokens,
        max_model_len=engine.max_model_len,
        meta=meta,
    )


def cmd_cost_model(args: argparse.Namespace) -> int:
    from lenserve.cli import engine_config_from_args

    t0 = time.monotonic()
    cost = measure_cost_model(engine_config_from_args(args), quick=args.quick,
                              temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
    cost.meta["measure_s"] = round(time.monotonic() - t0, 1)
    cost.meta["machine"] = _machine()
    cost.save(args.out)
    summary = {k: v for k, v in cost.to_json().items() if k != "meta"}
    summary["fit_mean_abs_rel_error"] = cost.meta["fit_mean_abs_rel_error"]
    print(json.dumps(summary, indent=2))
    return 0


def _machine() -> str:
    import os
    import platform

    return f"{platform.machine()} {os.cpu_count()} cores, {platform.system()} {platform.release()}"


def register(sub) -> None:
    from lenserve.cli import add_engine_args, subcommand_group
    from lenserve.traces.cli import add_trace_args

    p = sub.add_parser("simulate", help="simulate the scheduler on a trace with a measured cost model (no model)")
    add_trace_args(p)
    add_simulation_args(p)
    p.set_defaults(func=cmd_simulate)

    c = subcommand_group(sub, "bench", "benchmarks").add_parser(
        "cost-model", help="measure the engine's step times and fit the simulator's cost model"
    )
    c.add_argument("--out", required=True, metavar="FILE", help="JSON file to write")
    c.add_argument("--quick", action="store_true", help="a smaller grid (a rougher fit)")
    c.add_argument("--temperature", type=float, default=1.0, help="sample as the workload will: 0 is greedy (an argmax, far cheaper per sequence)")
    c.add_argument("--top-p", type=float, default=1.0)
    c.add_argument("--top-k", type=int, default=-1)
    add_engine_args(c)
    c.set_defaults(func=cmd_cost_model)
