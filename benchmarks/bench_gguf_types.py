"""The embedded SmolLM2 in the GGUF types people's files hold, served natively on CPU: the file's own
Q4_1, and the same weights requantized (benchmarks/requant_gguf.py) to Q5_0 / Q5_1 (what Q4_K_M /
Q5_K_M files hold for 576-wide rows) and to a Q4_K_M-like mix (Q4_K ffn_down, Q5_0 elsewhere).
Each beside the engine before it had Q5 kernels and Q4_K interleaving: Q5 matrices held as fp16
rows, Q4_K dotted in file rows. Each configuration runs in a fresh process: weight bytes, VmHWM
after load, prefill tok/s (10 prompts of 200 tokens in one step), batch-1 decode tok/s (best of 3
runs) and decode-only step times at batch 8 and 32.

    python benchmarks/bench_gguf_types.py [--out bench_gguf_types_cpu.json] [--plot-from JSON]

Prints JSON and writes it (and a PNG beside it) under benchmarks/results/.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine, save_figure, write_result  # noqa: E402

_CHILD = r"""
import json, sys
sys.path.insert(0, {bench_dir!r})
path, before = sys.argv[1], sys.argv[2] == "before"
if before:  # the engine before Q5 kernels and Q4_K interleaving
    from lenserve.engine import loader_gguf, quant
    loader_gguf.KERNEL_TYPES = loader_gguf.KERNEL_TYPES - {{quant.Q5_0, quant.Q5_1}}  # fp16 rows at load
    quant.INTERLEAVABLE = quant.INTERLEAVABLE - {{quant.Q4_K}}  # Q4_K dotted in file rows
from bench_peers import _batched_decode, _prompts, prefill_and_batch1
from lenserve import LLM

def kb(key):
    return [int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key)][0]

llm = LLM(model=path, weights_dtype="native", max_num_seqs=64, max_num_batched_tokens=2048, enable_prefix_caching=False)
hwm_mb = kb("VmHWM") / 1024
eng = llm.engine
prompts = _prompts(40, 200)
speeds = prefill_and_batch1(llm, prompts, {new_tokens})
steps = _batched_decode(eng, prompts, batches=(8, 32))
types = sorted({{p.type_name for layer in eng.model.layers for lin in (layer.qkv_proj, layer.down_proj) for p in lin.parts}})
print(json.dumps(dict(weight_bytes=eng.model.num_bytes(), vmhwm_mb=round(hwm_mb, 1), layer_types=types, **speeds,
                      decode_step_ms=steps)))
"""


def _run(path: str, before: bool, new_tokens: int) -> dict:
    code = _CHILD.format(bench_dir=os.path.dirname(os.path.abspath(__file__)), new_tokens=new_tokens)
    out = subprocess.run([sys.executable, "-c", code, path, "before" if before else "now"], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["configs"])
    rows = [result["configs"][n] for n in names]
    panels = [("batch-1 decode tok/s", [r["decode_batch1_tok_s"] for r in rows]),
              ("batch-32 decode tok/s", [32e3 / r["decode_step_ms"]["32"] for r in rows]),
              ("prefill tok/s", [r["prefill_tok_s"] for r in rows]),
              ("VmHWM after load (MiB)", [r["vmhwm_mb"] for r in rows])]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.8 * len(panels), 4.4))
    colors = ["tab:gray" if "before" in n else "tab:blue" for n in names]
    for ax, (title, values) in zip(axes, panels):
        ax.bar(range(len(names)), values, color=colors)
        labels = [n.replace(" (the file's own)", "\n(the file's)").replace("-like", "\n-like").replace(", native", "\nnative")
                  .replace(", before", "\nbefore") for n in names]
        ax.set_xticks(range(len(names)), labels, fontsize=7)
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3, axis="y")
    isa = result["machine"].get("cpu_kernel_isa", "?")
    save_figure(fig, path, f"SmolLM2-135M by GGUF type, lenserve on CPU ({isa} kernels)", result["machine"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench_gguf_types_cpu.json")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--plot-from", default=None, help="redraw the PNG of an earlier run's JSON, run nothing")
    args = ap.parse_args()
    if args.plot_from:
        with open(args.plot_from) as f:
            plot(json.load(f), os.path.splitext(args.plot_from)[0] + ".png")
        return
    from tqdm import tqdm

    from requant_gguf import requantize
    from lenserve.engine.loader_gguf import find_embedded_gguf

    src = find_embedded_gguf()
    configs = {}
    with tempfile.TemporaryDirectory() as tmp:
        files = {"Q4_1 (the file's own)": (src, False)}
        for qtype, label in (("Q5_0", "Q5_0"), ("Q5_1", "Q5_1"), ("Q4_K", "Q4_K_M-like")):
            path = os.path.join(tmp, f"smollm2-{qtype}.gguf")
            requantize(src, path, matrix_type=qtype, progress=False)
            files[f"{label}, native"] = (path, False)
            files[f"{label}, before"] = (path, True)
        for name, (path, before) in tqdm(files.items(), desc="configurations"):
            configs[name] = _run(path, before, args.new_tokens)

    def now_over_before(label: str) -> dict:
        native, base = configs[f"{label}, native"], configs[f"{label}, before"]
        return {"decode_batch1_tok_s": round(native["decode_batch1_tok_s"] / base["decode_batch1_tok_s"], 2),
                "decode_batch8_step_time": round(native["decode_step_ms"]["8"] / base["decode_step_ms"]["8"], 2),
                "decode_batch32_step_time": round(native["decode_step_ms"]["32"] / base["decode_step_ms"]["32"], 2),
                "prefill_tok_s": round(native["prefill_tok_s"] / base["prefill_tok_s"], 2),
                "vmhwm": round(native["vmhwm_mb"] / base["vmhwm_mb"], 2)}

    result = {"machine": machine(), "new_tokens": args.new_tokens, "configs": configs,
              "native_over_before": {label: now_over_before(label) for label in ("Q5_0", "Q5_1", "Q4_K_M-like")}}
    print(json.dumps(result, indent=1))
    out = write_result(args.out, result)
    png = os.path.splitext(out)[0] + ".png"
    plot(result, png)
    print("wrote", out, png)


if __name__ == "__main__":
    main()
