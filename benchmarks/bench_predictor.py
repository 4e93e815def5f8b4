"""Length-predictor latency on CPU: load time, and predict time per prompt at batch 1 and batch 64
(and the same for the length probe that refines it after the prefill).

Prompts are lenserve's shipped prompt set (traces/data/prompts.jsonl.gz), so their length mix is
that of real instructions (median ~190 characters, some pasted code or documents of several KB).
Prints one JSON object.

    python benchmarks/bench_predictor.py [--predictor DIR] [--out benchmarks/results/predictor_latency.json]
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import time
from datetime import datetime, timezone

import numpy as np

from lenserve.predictor.model import DEFAULT_DIR, load_predictor
from lenserve.predictor.types import PromptInput

PROMPTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "traces", "data", "prompts.jsonl.gz")


def machine() -> dict:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "num_cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()}


def per_prompt_ms(predictor, prompts: list[PromptInput], batch: int, num_batches: int) -> dict:
    times = []
    for i in range(num_batches):
        chunk = prompts[(i * batch) % len(prompts):][:batch]
        t0 = time.perf_counter()
        predictor.predict(chunk)
        times.append((time.perf_counter() - t0) / len(chunk) * 1e3)
    return {"p50": round(float(np.median(times)), 4), "p90": round(float(np.percentile(times, 90)), 4),
            "mean": round(float(np.mean(times)), 4)}


def probe_latency(path: str) -> dict:
    """The length probe's cost once the engine has the state (it comes with the prefill): load, and
    predict_states per prompt at batch 1 and 64 (the cost does not depend on the values)."""
    from lenserve.predictor.probe import HiddenStateProbe

    t0 = time.perf_counter()
    probe = HiddenStateProbe.load(path)
    load_s = time.perf_counter() - t0
    states = np.random.default_rng(0).standard_normal((1024, probe.state_size)).astype(np.float32)
    probe.predict_states(states[:64])

    def per_state_ms(batch: int, num_batches: int) -> dict:
        times = []
        for i in range(num_batches):
            chunk = states[(i * batch) % len(states):][:batch]
            t = time.perf_counter()
            probe.predict_states(chunk, [None] * len(chunk))
            times.append((time.perf_counter() - t) / len(chunk) * 1e3)
        return {"p50": round(float(np.median(times)), 4), "p90": round(float(np.percentile(times, 90)), 4)}

    return {"path": os.path.relpath(path), "layers": list(probe.layers), "load_s": round(load_s, 4),
            "batch_1_ms_per_prompt": per_state_ms(1, 1000), "batch_64_ms_per_prompt": per_state_ms(64, 32)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--predictor", default=DEFAULT_DIR)
    ap.add_argument("--num-prompts", type=int, default=2000)
    ap.add_argument("--out", default=None, help="also write the JSON here")
    args = ap.parse_args()

    with gzip.open(PROMPTS, "rt") as f:
        texts = [json.loads(line)["prompt"] for line in f]
    order = np.random.default_rng(0).permutation(len(texts))[: args.num_prompts]
    prompts = [PromptInput(texts[i], num_tokens=len(texts[i]) // 4 + 1) for i in order]

    t0 = time.perf_counter()
    predictor = load_predictor(args.predictor)
    load_s = time.perf_counter() - t0
    predictor.predict(prompts[:64])  # warm-up
    result = {
        "benchmark": "predictor_latency",
        "predictor": os.path.relpath(args.predictor),
        "kind": predictor.kind,
        "load_s": round(load_s, 4),
        "batch_1_ms_per_prompt": per_prompt_ms(predictor, prompts, 1, min(len(prompts), 1000)),
        "batch_64_ms_per_prompt": per_prompt_ms(predictor, prompts, 64, max(len(prompts) // 64, 1) * 2),
        "num_prompts": len(prompts),
        "machine": machine(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    probe_dir = os.path.join(args.predictor, "probe")
    if os.path.isdir(probe_dir):
        result["probe"] = probe_latency(probe_dir)
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
