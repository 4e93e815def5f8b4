"""The step cost model's shape against real engine steps: decode batches of 1-64 sequences, alone
and beside a prompt chunk of 16-1,024 tokens, timed on the embedded model; the shipped linear
model (`cost_model.fit`), a roofline-shaped alternative (a weight-streaming floor under the linear
layers) and the engine's online fit (`OnlineCostModel`, from the shipped prior) each fitted to
one pass of the grid and judged on the other.

    python benchmarks/bench_step_cost.py [--weights-dtype fp32] [--out benchmarks/results/step_cost_cpu_fp32.json]
    python benchmarks/bench_step_cost.py --samples FILE   # refit and compare measured samples again
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import RESULTS, machine  # noqa: E402

DECODE_BATCHES = (1, 4, 8, 16, 32, 64)
CONTEXTS = (128, 768)
CHUNKS = (0, 16, 64, 256, 1024)  # prompt tokens beside the decodes (0: a pure decode step)
PASSES = 2


def measure(weights_dtype: str, num_threads: int | None, max_model_len: int, log=print) -> list[dict]:
    """Steps of every (batch, context, chunk) of the grid, PASSES times over: dicts of the cost
    model's features, the cell and the step's seconds."""
    from lenserve.config import EngineConfig
    from lenserve.engine.llm_engine import LLMEngine
    from lenserve.engine.sampling_params import SamplingParams
    from lenserve.scheduler.config import SchedulerConfig
    from lenserve.scheduler.cost_model import step_features

    engine = LLMEngine(EngineConfig(max_model_len=max_model_len, num_threads=num_threads, weights_dtype=weights_dtype,
                                    scheduler=SchedulerConfig(max_num_batched_tokens=2048)))
    sched = engine.scheduler
    captured: list[dict] = []
    schedule = sched.schedule

    def spy():
        out = schedule()
        captured.append(step_features(zip(out.seqs, out.num_new_tokens)))
        return out

    sched.schedule = spy
    rng = random.Random(0)
    vocab = engine.arch.vocab_size
    ids = iter(range(10**9))
    samples: list[dict] = []

    def prompt(n: int) -> list[int]:
        return [rng.randrange(100, vocab - 100) for _ in range(n)]

    def step(cell: dict | None) -> None:
        captured.clear()
        t0 = time.perf_counter()
        engine.step()
        dt = time.perf_counter() - t0
        if cell is not None and captured and captured[0]["num_tokens"]:
            samples.append({**captured[0], **cell, "step_s": dt})

    greedy = dict(temperature=0.0, ignore_eos=True)
    engine.add_request(f"w{next(ids)}", prompt(64), SamplingParams(max_tokens=4, **greedy))
    while engine.has_unfinished_requests():
        step(None)
    for rep in range(PASSES):
        for batch in DECODE_BATCHES:
            for context in CONTEXTS:
                shared = prompt(context)
                params = SamplingParams(max_tokens=4 * len(CHUNKS) + 8, **greedy)
                engine.add_request(f"d{next(ids)}", shared, params)
                step(None)
                for _ in range(batch - 1):  # these find the prompt in the prefix cache
                    engine.add_request(f"d{next(ids)}", shared, params)
                step(None)
                step(None)
                for chunk in CHUNKS:
                    cell = {"pass": rep, "batch": batch, "context": context, "chunk": chunk}
                    if chunk:
                        engine.add_request(f"p{next(ids)}", prompt(chunk), SamplingParams(max_tokens=1, **greedy))
                    step(cell)
                    step({**cell, "chunk": 0})  # a pure decode step between the mixed ones
                for request_id in list(engine.requests):
                    engine.abort_request(request_id)
                while engine.has_unfinished_requests():
                    step(None)
                log(f"pass {rep + 1}: batch {batch} x {context} tokens measured")
    return samples


def _floor_model(train: list[dict]):
    """The roofline-shaped alternative: the linear layers take max(floor, token_s x tokens) (a
    weight-streaming floor under the per-row compute), the other terms as in CostModel; fitted
    by robust least squares on relative error. Returns a predict(sample) function."""
    from scipy.optimize import least_squares

    f = np.array([[s["num_tokens"], s["num_sampled"], s["prefill_pairs"], s["decode_context"]] for s in train], float)
    y = np.array([s["step_s"] for s in train])

    def model(c, f):
        return c[0] + np.maximum(c[5], c[1] * f[:, 0]) + c[2] * f[:, 1] + c[3] * 1e-6 * f[:, 2] + c[4] * 1e-6 * f[:, 3]

    c = least_squares(lambda c: model(c, f) / y - 1, np.full(6, 0.01), bounds=(0, np.inf), loss="soft_l1", f_scale=0.05).x
    return lambda s: float(model(c, np.array([[s["num_tokens"], s["num_sampled"], s["prefill_pairs"], s["decode_context"]]], float))[0])


def _online_model(train: list[dict]):
    """What the engine's online fit makes of these steps, in the order they ran, from the shipped prior."""
    from lenserve.scheduler.cost_model import OnlineCostModel, load_default

    online = OnlineCostModel(prior=load_default())
    keys = ("num_tokens", "num_sampled", "prefill_pairs", "decode_context")
    for s in train:
        online.observe({k: s[k] for k in keys}, s["step_s"])
    online.refit()
    return lambda s: online.model.step_time(*(s[k] for k in keys))


def compare(samples: list[dict]) -> dict:
    """Each model fitted to one pass of the grid and judged on the other (both ways round): mean
    relative error (predicted / measured - 1) per (batch, prompt tokens actually beside it) cell."""
    from lenserve.scheduler.cost_model import fit

    keys = ("num_tokens", "num_sampled", "prefill_pairs", "decode_context")

    def linear(train):
        cost = fit(train)
        return lambda s: cost.step_time(*(s[k] for k in keys))

    forms = {"linear": linear, "floor": _floor_model, "online": _online_model}
    passes = sorted({s["pass"] for s in samples})
    errors = {name: [] for name in forms}
    for held in passes:
        train = [s for s in samples if s["pass"] != held] or samples
        test = [s for s in samples if s["pass"] == held]
        for name, make in forms.items():
            predict = make(train)
            for s in test:
                errors[name].append((s["batch"], s["num_tokens"] - s["batch"], predict(s) / s["step_s"] - 1, s["step_s"]))
    table = []
    for batch in DECODE_BATCHES:
        for chunk in sorted({c for b, c, *_ in errors["linear"] if b == batch}):
            cell = [(x, y) for b, c, x, y in errors["linear"] if b == batch and c == chunk]
            row = {"batch": batch, "chunk": chunk, "num_steps": len(cell), "measured_ms": round(1000 * float(np.median([y for _, y in cell])), 1)}
            for name in forms:
                row[f"{name}_rel_err"] = round(float(np.mean([x for b, c, x, _ in errors[name] if b == batch and c == chunk])), 3)
            table.append(row)

    def summary(rows):
        a = np.abs(np.array([x for *_, x, _ in rows]))
        return {"mean_abs_rel_err": round(float(a.mean()), 4), "median_abs_rel_err": round(float(np.median(a)), 4)}

    overall = {name: {"all": summary(e), "decode_only": summary([r for r in e if r[1] == 0]),
                      "with_prompt_tokens": summary([r for r in e if r[1] > 0])} for name, e in errors.items()}
    return {"table": table, "overall": overall}


def print_table(result: dict) -> None:
    print(f"{'batch':>5} {'chunk':>5} {'steps':>5} {'measured ms':>11} {'linear':>8} {'floor':>8} {'online':>8}")
    for row in result["table"]:
        print(f"{row['batch']:>5} {row['chunk']:>5} {row['num_steps']:>5} {row['measured_ms']:>11.1f} {row['linear_rel_err']:>+8.1%} "
              f"{row['floor_rel_err']:>+8.1%} {row['online_rel_err']:>+8.1%}")
    for name, o in result["overall"].items():
        print(name, json.dumps(o))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights-dtype", default="fp32")
    p.add_argument("--num-threads", type=int, default=None)
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--samples", default=None, help="a result file of this script: refit its samples, measure nothing")
    p.add_argument("--out", default=os.path.join(RESULTS, "step_cost_cpu_fp32.json"))
    args = p.parse_args(argv)
    if args.samples:
        with open(args.samples) as f:
            result = json.load(f)
    else:
        t0 = time.monotonic()
        result = {"machine": machine(), "weights_dtype": args.weights_dtype, "load_average_1m_before": os.getloadavg()[0]}
        result["samples"] = measure(args.weights_dtype, args.num_threads, args.max_model_len,
                                    log=lambda *a: print(*a, file=sys.stderr, flush=True))
        result["load_average_1m_after"] = os.getloadavg()[0]
        result["measure_s"] = round(time.monotonic() - t0, 1)
        with open(args.out, "w") as f:  # the samples, whatever the comparison below does
            json.dump(result, f, indent=1)
    result.update(compare(result["samples"]))
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    print_table(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
