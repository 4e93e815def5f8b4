"""Shared bits of the benchmarks: machine description, result files, Azure length mixes, one
streamed completion timed over HTTP."""
from __future__ import annotations

import csv
import datetime
import gzip
import json
import os
import platform
import random
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")


def machine() -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and cpu == (platform.processor() or platform.machine()):
                    cpu = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = line.split(":", 1)[1].strip()
    except OSError:
        pass
    # the flags say which kernel paths ran (avx2 / fma / f16c, avx512*): results compare only on one machine
    info = {"cpu": cpu, "cpu_flags": flags, "cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "date": datetime.date.today().isoformat()}
    try:  # the quantized GEMM's kernel (AVX-512 VNNI or AVX2), chosen at run time from the CPU
        from lenserve.engine.quant import kernel_isa

        info["cpu_kernel_isa"] = kernel_isa() or "none (lenserve._C not built)"
    except ImportError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def save_figure(fig, path: str, title: str, machine_info: dict) -> None:
    """Titles a benchmark's figure with the machine it ran on (its numbers compare only there),
    writes it as a PNG and closes it."""
    import matplotlib.pyplot as plt

    fig.suptitle(f"{title}, {machine_info.get('cpu', '?')} ({machine_info.get('cores', '?')} cores)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def best_ms(fn, reps: int) -> float:
    """fn's best time of `reps` calls after one warm-up call, in ms (a shared machine's neighbours
    only ever slow a call down, so the best is the least disturbed)."""
    fn()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return 1e3 * best


def write_result(name: str, payload: dict) -> str:
    """Writes payload as JSON to benchmarks/results/<name>, or to `name` itself when it names a
    folder (a path such as benchmarks/results/x.json, from the working directory)."""
    path = name if os.path.dirname(name) else os.path.join(RESULTS, name)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=1)
    return path


def azure_prompt_lengths(n: int, seed: int = 0, max_len: int | None = None) -> list[int]:
    """Prompt lengths (ContextTokens) of n requests drawn from the shipped Azure conversation trace."""
    path = os.path.join(ROOT, "traces", "data", "azure_llm_2023_conv.csv.gz")
    with gzip.open(path, "rt") as f:
        lengths = [int(r["ContextTokens"]) for r in csv.DictReader(f)]
    rng = random.Random(seed)
    out = rng.sample(lengths, n)
    return [min(x, max_len) for x in out] if max_len else out


async def stream_completion(client, prompt, new_tokens: int) -> tuple[float | None, int, float]:
    """One streamed greedy /v1/completions request (ignore_eos) on an httpx.AsyncClient:
    (seconds to the first token, tokens received, seconds to the end). A token is a chunk whose
    choice carries text; a closing chunk with empty text and a finish_reason (llama-server's
    last event) is not one."""
    t0 = time.perf_counter()
    ttft, n = None, 0
    body = {"prompt": prompt, "max_tokens": new_tokens, "temperature": 0, "ignore_eos": True, "stream": True}
    async with client.stream("POST", "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            for choice in json.loads(line[6:]).get("choices") or []:
                if choice.get("text") is None or (choice.get("text") == "" and choice.get("finish_reason")):
                    continue
                if ttft is None:
                    ttft = time.perf_counter() - t0
                n += 1
    return ttft, n, time.perf_counter() - t0


def decode_steps(eng, batch: int, prompt_len: int, params, tag: str) -> list:
    """Adds `batch` synthetic prompts of prompt_len tokens and steps the engine until they finish:
    the (seconds, IterationStats) of every decode-only step (no prompt token in it)."""
    for i in range(batch):
        eng.add_request(f"{tag}-{i}", [1] + [100 + (7 * i + j) % 4000 for j in range(prompt_len - 1)], params)
    steps = []
    while eng.has_unfinished_requests():
        t = time.perf_counter()
        eng.step()
        dt = time.perf_counter() - t
        if eng.last_stats.num_prompt_tokens == 0:
            steps.append((dt, eng.last_stats))
    return steps
