"""lenserve and llama.cpp's llama-server side by side on the same GGUF, same client, one run.

Every server is started on 127.0.0.1 (an idle one takes no CPU) and driven by the same
closed-loop client: C streams, each sending its requests back to back (streaming /v1/completions,
the same ~200-token prompts as token ids, 128 new tokens, ignore_eos, temperature 0). The servers
take turns level by level, in --rounds rounds whose order rotates, so that the shared machine's
slow and fast spells (minutes long, +-20%) fall on every server alike: each ratio to llama-server
is the median of its per-round ratios, each pair measured back to back. Then, in-process: lenserve's prefill and
batch-1 decode with native vs fp32-dequantized weights, the bound that the weight bytes read per
token set at this machine's measured read bandwidth (the best reading of a plain buffer and of a
huge-page one), beside the kernels' own reference (every byte in cache: the linears and the
attention, no memory traffic), the per-step time outside the ops, and each
mode's resident memory after load (VmHWM, a fresh process each), beside a floor no torch-based
server can undercut: a process that imports torch and holds the file's bytes, nothing else.

    python benchmarks/bench_peers.py [--llama-server PATH] [--gguf FILE] [--out bench_peers_cpu.json]
    python benchmarks/bench_peers.py --memory-only --out bench_peers_memory_cpu.json   # seconds
    python benchmarks/bench_peers.py --plot-from benchmarks/results/bench_peers_cpu_avx512_vnni_run11.json

llama-server is taken from --llama-server or PATH; without it the peer's rows are skipped.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import gzip
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import httpx
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import ROOT, best_ms, machine, save_figure, stream_completion, write_result  # noqa: E402

from lenserve.server.process import ServerProcess, free_port  # noqa: E402
from lenserve.engine.quant import kernel_isa  # noqa: E402


def _prompts(n: int, num_tokens: int) -> list[list[int]]:
    """n prompts of num_tokens real-text token ids (tests/data prompts, tokenized by the model)."""
    from lenserve.engine.loader_gguf import find_embedded_gguf, load_gguf

    _, _, tok = load_gguf(find_embedded_gguf())
    with gzip.open(os.path.join(ROOT, "tests", "data", "prompts_1200.jsonl.gz"), "rt") as f:
        texts = [json.loads(line)["prompt"] for line in f]
    pool = tok.encode("\n\n".join(texts[:600]))
    return [pool[(i * 1009) % (len(pool) - num_tokens) :][:num_tokens] for i in range(n)]


async def _closed_loop(url, streams, requests_per_stream, prompts, new_tokens):
    # a fresh connection per request: llama-server (cpp-httplib) may close a kept-alive connection
    # just as the next request reuses it ("Server disconnected without sending a response")
    async with httpx.AsyncClient(base_url=url, timeout=1800, limits=httpx.Limits(max_keepalive_connections=0)) as c:

        async def stream(s):
            return [await stream_completion(c, prompts[(s * requests_per_stream + r) % len(prompts)], new_tokens) for r in range(requests_per_stream)]

        t0 = time.perf_counter()
        per_stream = await asyncio.gather(*(stream(s) for s in range(streams)))
        wall = time.perf_counter() - t0
    results = [r for rs in per_stream for r in rs]
    tokens = sum(n for _, n, _ in results)
    ttfts = [t for t, _, _ in results]
    tpots = [(e - t) / max(n - 1, 1) for t, n, e in results]
    return {"streams": streams, "requests": len(results), "tokens": tokens, "wall_s": round(wall, 2),
            "tok_s": round(tokens / wall, 2), "ttft_p50_s": round(float(np.percentile(ttfts, 50)), 3),
            "tpot_p50_ms": round(1e3 * float(np.percentile(tpots, 50)), 2)}


def _requests_per_stream(streams: int) -> int:
    return 3 if streams == 1 else 1  # one stream sends three, so its rate is not one request's


def _requests_per_round(levels) -> int:
    return sum(s * _requests_per_stream(s) for s in levels)


def _serve_all(specs: dict, levels, prompts, new_tokens, rounds: int) -> dict:
    """specs: name -> (argv, url, env). Every server up at once; then, round after round and level by
    level, each server in turn (the order rotated each round) runs the closed loop on the same
    prompts, fresh ones at each level and round (len(prompts) >= rounds * _requests_per_round;
    the warm-up takes the last). Rows per server, each with its round."""
    need = rounds * _requests_per_round(levels) + 1
    if len(prompts) < need:
        raise ValueError(f"{rounds} rounds at levels {list(levels)} take {need} prompts, got {len(prompts)}")
    rows = {name: [] for name in specs}
    with tempfile.TemporaryDirectory() as d, contextlib.ExitStack() as stack:
        servers = {name: stack.enter_context(ServerProcess(argv, os.path.join(d, f"{name}.log"), url, env=env))
                   for name, (argv, url, env) in specs.items()}
        for server in servers.values():
            server.wait_healthy(600)
            asyncio.run(_closed_loop(server.url, 1, 1, prompts[-1:], 8))  # warm-up
        names = list(servers)
        start = 0
        for r in range(rounds):
            order = names[r % len(names):] + names[: r % len(names)]
            for streams in levels:
                per_stream = _requests_per_stream(streams)
                # prompts no earlier level or round sent: no server's prefix cache holds them
                batch = prompts[start : start + streams * per_stream]
                start += streams * per_stream
                for name in order:
                    row = {"round": r, **asyncio.run(_closed_loop(servers[name].url, streams, per_stream, batch, new_tokens))}
                    print(name, row, flush=True)
                    rows[name].append(row)
    return rows


def _median_by_level(rows: list[dict], key: str) -> dict:
    by = {}
    for row in rows:
        by.setdefault(row["streams"], []).append(row[key])
    return {s: float(np.median(v)) for s, v in by.items()}


def _ratios(ours: list[dict], peer: list[dict], levels) -> dict:
    """Per level: the median over rounds of ours / peer, each round's pair measured back to back."""
    out = {}
    for s in levels:
        pairs = [(a, b) for a in ours for b in peer if a["streams"] == b["streams"] == s and a["round"] == b["round"]]
        tok = [a["tok_s"] / b["tok_s"] for a, b in pairs]
        ttft = [a["ttft_p50_s"] / b["ttft_p50_s"] for a, b in pairs]
        out[str(s)] = {"tok_s": round(float(np.median(tok)), 2), "ttft_p50": round(float(np.median(ttft)), 2),
                       "tok_s_by_round": [round(x, 2) for x in tok]}
    return out


def _best_sum_gb_s(x) -> float:
    """Best of five sums over the fp32 tensor x with all threads: bytes read per second."""
    best = 0.0
    for _ in range(5):
        t0 = time.perf_counter()
        x.sum()
        best = max(best, x.numel() * 4 / (time.perf_counter() - t0) / 1e9)
    return best


def _read_bandwidth_gb_s(nbytes: int = 2**30) -> float:
    """The read bandwidth of a plain buffer (torch's allocation: 4 KiB pages where transparent huge
    pages are only on request, `madvise`, as on this machine)."""
    import torch

    return _best_sum_gb_s(torch.ones(nbytes // 4))


def _anon_huge_kb() -> int:
    with open("/proc/self/smaps_rollup") as f:
        return next((int(line.split()[1]) for line in f if line.startswith("AnonHugePages:")), 0)


def _read_bandwidth_huge_pages(nbytes: int = 2**30) -> dict | None:
    """The read bandwidth of a buffer in 2 MiB pages (madvise(MADV_HUGEPAGE), the kernel's THP), with
    the share of it the kernel did back with huge pages; None where Linux offers none. On the
    2-core EPYC VM both readings move with the machine's spells (32-34 GB/s in slow ones), and in
    fast ones the huge pages read more (58-62 GB/s against 51-54): the plain buffer's reading
    alone understates what the machine can read."""
    import mmap

    import torch

    huge = 2 << 20
    if not hasattr(mmap, "MADV_HUGEPAGE"):
        return None
    buf = mmap.mmap(-1, nbytes + huge, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        try:
            buf.madvise(mmap.MADV_HUGEPAGE)
        except OSError:
            return None
        before = _anon_huge_kb()
        raw = torch.frombuffer(buf, dtype=torch.uint8)
        start = -raw.data_ptr() % huge  # the first 2 MiB boundary
        x = raw[start : start + nbytes].view(torch.float32)
        x.fill_(1.0)  # the pages are made here, huge where the kernel can
        backed = min(1.0, (_anon_huge_kb() - before) * 1024 / nbytes)
        gb_s = _best_sum_gb_s(x)
        del x, raw
        return {"gb_s": gb_s, "huge_page_fraction": round(backed, 3)}
    finally:
        buf.close()


def _read_bandwidths() -> dict:
    """Both readings: a plain buffer's, and a huge-page buffer's where there are huge pages."""
    huge = _read_bandwidth_huge_pages()
    return {"4k_pages_gb_s": _read_bandwidth_gb_s(), "huge_pages_gb_s": huge["gb_s"] if huge else None,
            "huge_page_fraction": huge["huge_page_fraction"] if huge else None}


_RSS_SCRIPT = """
import sys
from lenserve import LLM
def kb(key):
    return [int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key)][0]
base = kb("VmHWM")
llm = LLM(model=sys.argv[1], weights_dtype=sys.argv[2], max_num_seqs=4, kv_cache_memory_gb=0.05)
print(base, kb("VmHWM"), kb("VmRSS"))
"""


def _memory_mb(gguf_path: str, weights_dtype: str) -> dict:
    """A fresh process: VmHWM after `import lenserve` (torch and the serving stack, no model), and
    VmHWM / VmRSS once the model is loaded; the model's own share is the difference."""
    out = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, gguf_path, weights_dtype], capture_output=True, text=True, check=True)
    base, hwm, rss = (int(x) / 1024 for x in out.stdout.strip().splitlines()[-1].split())
    return {"vmhwm_mb": round(hwm, 1), "vmrss_mb": round(rss, 1), "import_vmhwm_mb": round(base, 1), "model_vmhwm_mb": round(hwm - base, 1)}


_FLOOR_SCRIPT = """
import sys
import torch
def kb(key):
    return [int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key)][0]
base = kb("VmHWM")
import os
data = bytearray(os.path.getsize(sys.argv[1]))  # every byte of the file resident, as decoding reads every weight each step
with open(sys.argv[1], "rb", buffering=0) as f:
    assert f.readinto(data) == len(data)
print(base, kb("VmHWM"), len(data))
"""


def _memory_floor_mb(gguf_path: str) -> dict:
    """A reference no torch-based server can undercut: a fresh process that imports torch and
    holds the GGUF file's bytes, nothing else (no tokenizer, no engine, no buffers)."""
    out = subprocess.run([sys.executable, "-c", _FLOOR_SCRIPT, gguf_path], capture_output=True, text=True, check=True)
    base, hwm, size = (int(x) for x in out.stdout.strip().splitlines()[-1].split())
    return {"vmhwm_mb": round(hwm / 1024, 1), "import_torch_vmhwm_mb": round(base / 1024, 1), "file_mb": round(size / 2**20, 1)}


def _memory(gguf_path: str) -> dict:
    """VmHWM of native and fp32 loads and of the floor reference, each in a fresh process."""
    mem = {mode: _memory_mb(gguf_path, mode) for mode in ("native", "fp32")}
    floor = _memory_floor_mb(gguf_path)
    fp32 = mem["fp32"]["vmhwm_mb"]
    return {"memory": mem, "memory_floor_torch_plus_file": floor,
            "vmhwm_native_over_fp32": round(mem["native"]["vmhwm_mb"] / fp32, 3),
            "model_vmhwm_native_over_fp32": round(mem["native"]["model_vmhwm_mb"] / mem["fp32"]["model_vmhwm_mb"], 3),
            "vmhwm_floor_over_fp32": round(floor["vmhwm_mb"] / fp32, 3)}


def _memory_criteria(result: dict) -> dict:
    """Issue #25's memory must-show ("today's": the fp32-dequantized load, measured in the run), and
    whether the floor reference itself could meet it."""
    return {"vmhwm_native_le_0.3_fp32": result["vmhwm_native_over_fp32"] <= 0.3,
            "floor_reference_le_0.3_fp32": result["vmhwm_floor_over_fp32"] <= 0.3}


def _offline(gguf_path, prompts, new_tokens):
    from lenserve import LLM

    import torch

    report = {}
    default_isa = kernel_isa()
    # on a CPU with AVX-512 VNNI, native weights also on the AVX2 kernel (same outputs): its gain
    modes = ("native", "native_avx2", "fp32") if default_isa == "avx512_vnni" else ("native", "fp32")
    for mode in modes:
        torch.ops.lenserve.quant_kernel_isa("avx2" if mode.endswith("_avx2") else default_isa)
        # no prefix cache: the repeated prefills below compute every token
        llm = LLM(model=gguf_path, weights_dtype=mode.removesuffix("_avx2"), max_num_seqs=64, max_num_batched_tokens=2048,
                  enable_prefix_caching=False)
        eng = llm.engine
        row = {**prefill_and_batch1(llm, prompts, new_tokens), "weight_bytes": eng.model.num_bytes()}
        row["decode_step_ms_by_batch"] = _batched_decode(eng, prompts)
        if mode == "native":
            row["step_overhead"] = _step_overhead(eng, prompts[1])
            row["hot_cache_linears"] = _hot_cache_linears(eng.model)
            # the decode runs' mean context: a prompt and half the new tokens
            row["hot_cache_attention"] = _hot_cache_attention(eng, len(prompts[0]) + new_tokens // 2, torch.get_num_threads())
        report[mode] = row
        del llm, eng
    torch.ops.lenserve.quant_kernel_isa(default_isa)
    return report


def prefill_and_batch1(llm, prompts, new_tokens) -> dict:
    """Prefill tok/s of prompts[:10] in one step and batch-1 decode tok/s of new_tokens, each the
    best of three (a shared machine's neighbours only ever slow a run down)."""
    from lenserve import SamplingParams

    eng = llm.engine
    prefill_prompts = prompts[:10]  # 2,000 tokens in one step
    one = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    llm.generate(prefill_prompts[:1], one)
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        llm.generate(prefill_prompts, one)
        times.append(time.perf_counter() - t0)
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    llm.generate(prompts[:1], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    decode_runs = []
    for i in range(3):
        eng.add_request(f"d{i}", prompts[i], params)
        eng.step()  # prefill
        t1 = time.perf_counter()
        while eng.has_unfinished_requests():
            eng.step()
        decode_runs.append((new_tokens - 1) / (time.perf_counter() - t1))
    return {"prefill_tok_s": round(sum(map(len, prefill_prompts)) / min(times), 1), "decode_batch1_tok_s": round(max(decode_runs), 2),
            "decode_batch1_tok_s_runs": [round(r, 2) for r in decode_runs]}


def _hot_cache_linears(model, reps: int = 200) -> dict:
    """A reference no real batch-1 decode can beat on these kernels: one token's linear layers
    (every layer's four projections and the LM head, one row of x) timed with the weights already
    in cache (each matrix run back to back, best of `reps`), so no weight byte comes from memory.
    Its ms per token against the bandwidth bound's says how much of the bound the kernels alone
    would allow if memory were free."""
    import torch

    def linear_ms(lin) -> float:
        x = torch.randn(1, lin.in_features)
        return best_ms(lambda: lin(x), reps)

    from lenserve.engine.linear import QuantLinear
    from lenserve.engine.quant import Q8_0, QuantWeight

    layer = model.layers[0]
    per_layer = {name: round(linear_ms(getattr(layer, name)), 4) for name in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")}
    lm_head = linear_ms(model.lm_head)
    # each timed call also pays the op call from Python (the engine's fused layer calls the kernels
    # from C++): a one-block matrix's time stands for that cost and is taken off each call
    tiny = QuantLinear([QuantWeight(torch.zeros(8, 34, dtype=torch.uint8), Q8_0, 32)])
    call_ms = linear_ms(tiny)
    calls = 4 * len(model.layers) + 1
    total = sum(per_layer.values()) * len(model.layers) + lm_head - calls * call_ms
    return {"per_layer_ms": per_layer, "lm_head_ms": round(lm_head, 4), "num_layers": len(model.layers),
            "op_call_ms": round(call_ms, 4), "ms_per_token": round(total, 3), "tok_s": round(1e3 / total, 1)}


def _empty_op_call_ms() -> float:
    """An empty lenserve op call from Python (quant_kernel_isa(""), best of 2000): the dispatch
    that the kernels' timed calls also pay."""
    import torch

    return best_ms(lambda: torch.ops.lenserve.quant_kernel_isa(""), 2000)


def _hot_cache_attention(eng, context: int, threads: int, reps: int = 200) -> dict:
    """With _hot_cache_linears, a reference no real batch-1 decode can beat on these kernels: one
    token's attention over `context` keys of the engine's cache (its dtype and block size) in every
    layer, timed on one thread with the keys and values in cache (best of `reps`, less an empty op
    call), then divided by `threads` as if splitting the keys over them cost nothing."""
    import torch

    cfg, kv = eng.model.cfg, eng.kv_cache
    g = torch.Generator().manual_seed(0)
    num_blocks = -(-context // kv.block_size)
    k_cache, v_cache = (torch.randn(num_blocks, kv.block_size, cfg.num_kv_heads, cfg.head_dim, generator=g).to(kv.dtype)
                        for _ in range(2))
    table = torch.arange(num_blocks, dtype=torch.int32).view(1, -1)
    lens = torch.tensor([context], dtype=torch.int32)
    q = torch.randn(1, cfg.num_heads, cfg.head_dim, generator=g)
    ops = torch.ops.lenserve
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        layer_ms = best_ms(lambda: ops.paged_decode_attention(q, k_cache, v_cache, table, lens, cfg.head_dim ** -0.5), reps)
        empty_ms = _empty_op_call_ms()
    finally:
        torch.set_num_threads(before)
    total = (layer_ms - empty_ms) * len(eng.model.layers) / threads
    return {"context": context, "layer_ms_one_thread": round(layer_ms, 4), "threads": threads, "ms_per_token": round(total, 3)}


def _batched_decode(eng, prompts, batches=(1, 2, 4, 8, 16, 32, 64), new_tokens=24) -> dict:
    """Median decode-only step time (ms) with `b` sequences decoding together: where native rows
    stop paying against fp32 (the integer-dot path below 17 rows, unpacked panels above)."""
    from lenserve import SamplingParams

    out = {}
    for b in batches:
        steps = []
        for i in range(b):
            eng.add_request(f"b{b}-{i}", prompts[i % len(prompts)], SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True))
        while eng.has_unfinished_requests():
            t0 = time.perf_counter()
            eng.step()
            if eng.last_stats.num_prompt_tokens == 0:
                steps.append(time.perf_counter() - t0)
        out[str(b)] = round(1e3 * float(np.median(steps)), 2)
    return out


def _lenserve_op_names() -> list[str]:
    import torch

    return sorted({n.split("::", 1)[1].split(".")[0] for n in torch._C._dispatch_get_all_op_names() if n.startswith("lenserve::")})


def _step_overhead(eng, prompt, steps: int = 60):
    """Share of a batch-1 decode step spent outside lenserve's kernels (Python, torch dispatch,
    tensor views and allocations, metadata, the sampler's argmax). For the measured steps every
    lenserve op (and the extension's DecodeStack.run, the decode layers with their weights bound)
    is wrapped in a timer, so each step gives both its wall time and the time inside its op calls,
    and the fraction is the median over steps of 1 - kernels / wall: the same step,
    so the shared machine's drift falls on both (kernels from profiled steps against walls from
    plain ones, as before, swung from -0.15 to +0.33 between blocks of one run). A call's kernel
    time is its timed time less an empty op call's (quant_kernel_isa(""), best of 2000): the
    dispatch from Python counts as outside."""
    import torch

    from lenserve import SamplingParams
    from lenserve.engine._ext import extension

    ns = torch.ops.lenserve
    empty_s = _empty_op_call_ms() / 1e3
    targets = [(ns, name) for name in _lenserve_op_names()] + [(extension().DecodeStack, "run")]
    originals = {(owner, name): getattr(owner, name) for owner, name in targets}
    inside = [0.0, 0]  # seconds inside op calls, calls

    def timed(op):  # a plain function: on DecodeStack it binds as a method
        def call(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return op(*args, **kwargs)
            finally:
                inside[0] += time.perf_counter() - t0
                inside[1] += 1

        return call

    eng.add_request("o", prompt, SamplingParams(max_tokens=steps + 12, temperature=0, ignore_eos=True))
    for _ in range(8):
        eng.step()
    walls, kernels, calls = [], [], []
    try:
        for (owner, name), op in originals.items():
            setattr(owner, name, timed(op))
        for _ in range(steps):
            inside[0], inside[1] = 0.0, 0
            t0 = time.perf_counter()
            eng.step()
            walls.append(time.perf_counter() - t0)
            kernels.append(inside[0] - inside[1] * empty_s)
            calls.append(inside[1])
    finally:
        for (owner, name), op in originals.items():
            setattr(owner, name, op)
    while eng.has_unfinished_requests():
        eng.step()
    fractions = 1 - np.array(kernels) / np.array(walls)
    return {"step_ms": round(1e3 * float(np.median(walls)), 2), "kernels_ms": round(1e3 * float(np.median(kernels)), 2),
            "op_calls_per_step": int(np.median(calls)), "empty_op_call_us": round(1e6 * empty_s, 2),
            "outside_kernels_fraction": round(float(np.median(fractions)), 3),
            "outside_kernels_fraction_p10_p90": [round(float(np.percentile(fractions, q)), 3) for q in (10, 90)]}


def plot(result: dict, path: str) -> None:
    """Three panels: each server's aggregate tok/s and TTFT p50 by streams (the median over rounds,
    every round's value as a dot), and batch-1 decode beside the kernels' hot-cache reference and
    the bandwidth bounds (70% of the best one dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    for name, rows in result["servers"].items():
        levels = sorted({r["streams"] for r in rows})
        for ax, key in ((axes[0], "tok_s"), (axes[1], "ttft_p50_s")):
            med = [float(np.median([r[key] for r in rows if r["streams"] == s])) for s in levels]
            line, = ax.plot(levels, med, marker="o", label=name)
            ax.scatter([r["streams"] for r in rows], [r[key] for r in rows], s=10, color=line.get_color(), alpha=0.5)
    all_levels = sorted({r["streams"] for rows in result["servers"].values() for r in rows})
    for ax, ylabel in ((axes[0], "aggregate tok/s (streaming, closed loop)"), (axes[1], "TTFT p50 (s)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(all_levels, [str(v) for v in all_levels])
        ax.set_xlabel("concurrent streams")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[1].set_yscale("log")
    axes[0].legend(fontsize=8)
    native = result["offline"]["native"]
    attention = native.get("hot_cache_attention")  # runs before the 10th measured the linears alone
    bars = [("batch-1\ndecode", native["decode_batch1_tok_s"]),
            ("kernels,\nhot cache" if attention else "linears,\nhot cache",
             1e3 / (native["hot_cache_linears"]["ms_per_token"] + (attention["ms_per_token"] if attention else 0.0)))]
    readings = result["read_bandwidth_readings_gb_s"]
    if readings and isinstance(readings[0], dict):
        plain = max(r["4k_pages_gb_s"] for r in readings)
        bars.append((f"bound,\nplain buffer\n{plain:.1f} GB/s", plain * 1e9 / native["weight_bytes"]))
    bars.append((f"bound,\nbest reading\n{result['read_bandwidth_gb_s']:.1f} GB/s", result["decode_bound_tok_s"]))
    ax = axes[2]
    ax.bar(range(len(bars)), [v for _, v in bars], color=["tab:blue", "tab:green"] + ["tab:gray"] * (len(bars) - 2))
    ax.set_xticks(range(len(bars)), [b[0] for b in bars], fontsize=8)
    ax.axhline(0.7 * result["decode_bound_tok_s"], color="k", ls="--", lw=1, label="70% of the best bound")
    ax.set_ylabel("tok/s, one sequence (native weights)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    save_figure(fig, path, f"lenserve vs llama-server on {result['gguf']}", result["machine"])


def _plot_beside(result: dict, json_path: str) -> str:
    """plot() into the PNG named as the run's JSON; returns its path."""
    path = os.path.splitext(json_path)[0] + ".png"
    plot(result, path)
    return path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", default=None, help="default: the embedded SmolLM2 Q4_1 GGUF")
    ap.add_argument("--llama-server", default=shutil.which("llama-server"))
    ap.add_argument("--levels", default="1,8,32")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of every server at every level, taking turns")
    ap.add_argument("--prompt-tokens", type=int, default=200)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--lenserve-weights", default=None,
                    help="lenserve servers to run, by --weights-dtype; native_avx2: native with the AVX2 integer "
                         "kernel on a CPU that has AVX-512 VNNI (default: native,fp32, plus native_avx2 there)")
    ap.add_argument("--out", default="bench_peers_cpu.json")
    ap.add_argument("--memory-only", action="store_true", help="only the resident-memory measurements (fresh processes, seconds)")
    ap.add_argument("--plot-from", default=None, metavar="JSON", help="only draw the PNG of an earlier run's JSON (beside it)")
    args = ap.parse_args()
    if args.plot_from:
        with open(args.plot_from) as f:
            print("wrote", _plot_beside(json.load(f), args.plot_from))
        return
    from lenserve.engine.loader_gguf import find_embedded_gguf

    gguf_path = args.gguf or find_embedded_gguf()
    if args.memory_only:
        result = {"machine": machine(), "gguf": os.path.basename(gguf_path), **_memory(gguf_path)}
        result["criteria"] = _memory_criteria(result)
        print(json.dumps(result, indent=1))
        print("wrote", write_result(args.out, result))
        return
    levels = [int(x) for x in args.levels.split(",")]
    # The read bandwidth, at the start and again after the offline part, from a plain buffer and
    # from huge pages: the bound is the machine's best, and a shared machine's slow spell only ever
    # lowers a reading (one run read 33 GB/s where the others read 56-61), so the highest stands.
    readings = [_read_bandwidths()]
    prompts = _prompts(max(64, args.rounds * _requests_per_round(levels) + 1), args.prompt_tokens)
    specs = {}
    modes = args.lenserve_weights or ("native,native_avx2,fp32" if kernel_isa() == "avx512_vnni" else "native,fp32")
    for mode in modes.split(","):
        port = free_port()
        lenserve_argv = [sys.executable, "-m", "lenserve.cli", "serve", "--model", gguf_path, "--port", str(port), "--predictor", "none",
                         "--max-num-seqs", "64", "--weights-dtype", mode.removesuffix("_avx2"), "--num-threads", str(args.threads)]
        env = {"LENSERVE_CPU_ISA": "avx2"} if mode.endswith("_avx2") else None
        specs[f"lenserve_{mode}"] = (lenserve_argv, f"http://127.0.0.1:{port}", env)
    if args.llama_server and os.path.exists(args.llama_server):
        port = free_port()
        slots = max(levels)
        ctx = slots * (args.prompt_tokens + args.new_tokens + 64)
        argv = [args.llama_server, "-m", gguf_path, "--port", str(port), "--host", "127.0.0.1", "-t", str(args.threads),
                "-np", str(slots), "-c", str(ctx)]
        specs["llama_server"] = (argv, f"http://127.0.0.1:{port}", None)
    else:
        print("llama-server not found (--llama-server or PATH): peer skipped", flush=True)
    servers = _serve_all(specs, levels, prompts, args.new_tokens, args.rounds)
    offline = _offline(gguf_path, prompts, args.new_tokens)
    readings.append(_read_bandwidths())
    plain = max(r["4k_pages_gb_s"] for r in readings)
    bandwidth = max([plain] + [r["huge_pages_gb_s"] for r in readings if r["huge_pages_gb_s"]])
    weight_bytes = offline["native"]["weight_bytes"]
    bound = bandwidth * 1e9 / weight_bytes
    batch1 = offline["native"]["decode_batch1_tok_s"]
    # the kernels' reference (_hot_cache_linears + _hot_cache_attention): no memory traffic, no
    # overhead outside them, perfect thread scaling in the attention
    reference_ms = offline["native"]["hot_cache_linears"]["ms_per_token"] + offline["native"]["hot_cache_attention"]["ms_per_token"]
    result = {"machine": machine(), "gguf": os.path.basename(gguf_path), "threads": args.threads, "rounds": args.rounds,
              "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "servers": servers, "offline": offline,
              "read_bandwidth_gb_s": round(bandwidth, 2),
              "read_bandwidth_readings_gb_s": [{k: round(v, 3) if v is not None else None for k, v in r.items()} for r in readings],
              "decode_bound_tok_s": round(bound, 1),
              "decode_batch1_fraction_of_bound": round(batch1 / bound, 3),
              # against the plain buffer's best reading alone, as runs 1-9 measured the bound
              "decode_batch1_fraction_of_4k_page_bound": round(batch1 / (plain * 1e9 / weight_bytes), 3),
              # the kernels alone with the weights in cache (no memory traffic): the most any batch-1
              # decode on them could reach, as a fraction of the bandwidth bound
              "hot_cache_linears_fraction_of_bound": round(offline["native"]["hot_cache_linears"]["tok_s"] / bound, 3),
              "hot_cache_kernels_fraction_of_bound": round(1e3 / reference_ms / bound, 3),
              **_memory(gguf_path)}
    # per server and level, the median over rounds
    result["median_tok_s"] = {name: {str(k): round(v, 2) for k, v in _median_by_level(rows, "tok_s").items()} for name, rows in servers.items()}
    result["median_ttft_p50_s"] = {name: {str(k): round(v, 3) for k, v in _median_by_level(rows, "ttft_p50_s").items()}
                                   for name, rows in servers.items()}
    if "llama_server" in servers:
        for name in [n for n in servers if n.startswith("lenserve_")]:
            result.setdefault("ratios_vs_llama_server", {})[name] = _ratios(servers[name], servers["llama_server"], levels)
    result["prefill_native_over_fp32"] = round(offline["native"]["prefill_tok_s"] / offline["fp32"]["prefill_tok_s"], 2)
    # issue #25's must-shows ("today's" memory: the fp32-dequantized load, measured here)
    crit = {"prefill_native_ge_fp32": result["prefill_native_over_fp32"] >= 1.0,
            "decode_batch1_ge_0.7_of_bound": result["decode_batch1_fraction_of_bound"] >= 0.7,
            # whether the kernels' reference itself could (if not, these kernels cannot)
            "hot_cache_kernels_reference_ge_0.7_of_bound": result["hot_cache_kernels_fraction_of_bound"] >= 0.7,
            **_memory_criteria(result),
            "batch1_outside_kernels_le_0.1": offline["native"]["step_overhead"]["outside_kernels_fraction"] <= 0.1}
    ratios = result.get("ratios_vs_llama_server", {}).get("lenserve_native")
    if ratios:
        if "1" in ratios:
            crit["single_stream_ge_1.25x"] = ratios["1"]["tok_s"] >= 1.25
        for s in ("8", "32"):
            if s in ratios:
                crit[f"{s}_streams_ge_3x"] = ratios[s]["tok_s"] >= 3.0
        if "32" in ratios:
            crit["ttft_p50_32_streams_le_0.5x"] = ratios["32"]["ttft_p50"] <= 0.5
    result["criteria"] = crit
    print(json.dumps(result, indent=1))
    written = write_result(args.out, result)
    print("wrote", written)
    print("wrote", _plot_beside(result, written))


if __name__ == "__main__":
    main()
