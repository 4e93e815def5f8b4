"""Structured-output cost on this machine: prints one JSON object (and writes it under results/).

- engine decode tok/s at 1 and 32 streams, every sequence JSON-schema-constrained vs none (same
  prompts, 64 new tokens each; the schema needs far more, so every run decodes exactly 64);
- grammar compile time p50/p99 over the 50 random strict schemas the tests use;
- the grammar cache's hit rate on a workload that repeats those schemas (200 requests).

    python benchmarks/bench_structured_output.py [--out bench_structured_output_cpu.json]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from common import decode_steps, machine, write_result  # noqa: E402

from tests.schema_gen import root_schema  # noqa: E402

# Long answers by construction: at least 40 strings, so 64 tokens never reach the end.
LONG_SCHEMA = {
    "type": "object",
    "properties": {"items": {"type": "array", "items": {"type": "string", "maxLength": 16}, "minItems": 40},
                   "total": {"type": "integer"}},
    "required": ["items", "total"],
    "additionalProperties": False,
}
NEW_TOKENS = 64


def lscpu() -> dict:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    return {"model_name": fields.get("Model name", "").strip(), "flags": fields.get("Flags", "").strip()}


def decode_run(eng, batch: int, spec, tag: str) -> tuple[float, float]:
    """One run: (tokens per second over decode-only steps once prompts are prefilled, mean seconds
    per such step spent on the grammar bitmask)."""
    from lenserve.engine.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True, structured_output=spec)
    steps = decode_steps(eng, batch, 32, params, f"d{batch}-{tag}")
    tok_s = sum(s.num_generation_tokens for _, s in steps) / sum(dt for dt, _ in steps)
    return tok_s, sum(s.bitmask_time_s or 0.0 for _, s in steps) / len(steps)


def decode_compare(eng, batch: int, spec, repeats: int) -> dict:
    """Unconstrained and constrained runs alternate (a load change on a shared machine hits both);
    the best of each counts."""
    free, constrained, mask = [], [], []
    for r in range(repeats):
        free.append(decode_run(eng, batch, None, f"free{r}")[0])
        tok_s, mask_s = decode_run(eng, batch, spec, f"json{r}")
        constrained.append(tok_s)
        mask.append(mask_s)
    best_free, best_constrained = max(free), max(constrained)
    step_s = batch / best_constrained
    return {"unconstrained_tok_s": round(best_free, 1), "constrained_tok_s": round(best_constrained, 1),
            "ratio": round(best_constrained / best_free, 3), "runs_unconstrained": [round(x, 1) for x in free],
            "runs_constrained": [round(x, 1) for x in constrained],
            "bitmask_ms_per_step": round(1000 * min(mask), 3), "bitmask_share_of_step": round(min(mask) / step_s, 4)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench_structured_output_cpu.json")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    from lenserve.config import EngineConfig
    from lenserve.engine.llm_engine import LLMEngine
    from lenserve.engine.structured_output import StructuredOutputSpec
    from lenserve.engine.structured_output.xgrammar_backend import XgrammarBackend
    from lenserve.scheduler.config import SchedulerConfig

    eng = LLMEngine(EngineConfig(enable_prefix_caching=False, scheduler=SchedulerConfig(max_num_seqs=64)))

    backend = XgrammarBackend(eng.tokenizer, eng.arch.vocab_size)
    backend.compile(StructuredOutputSpec("regex", "x"))  # the vocabulary is read once, before timing
    rng = random.Random(24)
    schemas: list = []
    while len(schemas) < 50:  # the generator can repeat a small schema; each is timed once
        spec = StructuredOutputSpec.json_schema(root_schema(rng))
        if spec not in schemas:
            schemas.append(spec)
    compile_s = [backend.compile(s)[1] for s in schemas]
    ordered = sorted(compile_s)

    cache = XgrammarBackend(eng.tokenizer, eng.arch.vocab_size)
    workload = [rng.choice(schemas) for _ in range(200)]
    hit_lookup_s = []
    for s in workload:
        t = time.perf_counter()
        _, compiled_s = cache.compile(s)
        if compiled_s is None:
            hit_lookup_s.append(time.perf_counter() - t)
    stats = cache.cache_stats

    spec = StructuredOutputSpec.json_schema(LONG_SCHEMA)
    eng.structured_output.compile(spec)
    decode = {}
    for batch in (1, 32):
        decode[f"{batch}_streams"] = decode_compare(eng, batch, spec, args.repeats)
        print(batch, decode[f"{batch}_streams"], file=sys.stderr, flush=True)

    result = {
        "benchmark": "structured_output",
        "machine": machine(),
        "lscpu": lscpu(),
        "load_average_at_end": os.getloadavg(),
        "model": eng.model_name,
        "what": "engine decode with every sequence constrained by one JSON schema vs none; xgrammar CPU bitmask",
        "new_tokens": NEW_TOKENS,
        "decode": decode,
        "target_ratio": 0.9,
        "compile_50_schemas_s": {"p50": round(statistics.median(compile_s), 4),
                                 "p99": round(ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], 4),
                                 "max": round(ordered[-1], 4), "mean": round(statistics.mean(compile_s), 4)},
        "cache": {"requests": len(workload), "distinct_schemas": len(set(workload)), "hits": stats.hits,
                  "misses": stats.misses, "hit_rate": round(stats.hits / (stats.hits + stats.misses), 3),
                  "hit_lookup_p50_s": round(statistics.median(hit_lookup_s), 6)},
    }
    print(json.dumps(result, indent=1))
    print("wrote", write_result(args.out, result), file=sys.stderr)


if __name__ == "__main__":
    main()
