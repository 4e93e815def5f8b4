"""End-to-end checks on random-weight models (no tokenizer, file or download).

    python -m benchmarks.gpu.e2e check [--device cuda] [--tiny] [--out DIR]
        For each shape (SmolLM2: 9/3 heads, head_dim 64; Llama-3-8B-like: 32/8, 128; fewer layers
        than the real models): logits of the device model (bf16 on CUDA) vs a CPU fp32 model with
        the same weights; our kernels vs the torch attention backend; greedy tokens with CUDA
        graphs vs eager, and with chunked prefill vs one pass: identical, or diverging first at a
        near tie (benchmarks/gpu/ties.py; random weights give nearly flat logits, and bf16 GEMMs of
        another batch shape round differently).
    python -m benchmarks.gpu.e2e throughput [--device cuda] [--tiny] [--out DIR]
        Offline decode at batch 1, 32, 256 (prompt 256 tokens, 128 new, greedy, ignore_eos) on
        the SmolLM2 shape, beside HF transformers `generate` on the same weights (skipped when
        transformers is absent).

Exit status 1 when a check fails. `--tiny` runs a small model with small batches (the CPU run of
the harness in CI).
"""
from __future__ import annotations

import argparse
import gc
import sys
import time

import torch

from benchmarks.gpu.common import sync, write_json
from benchmarks.gpu.ties import TOP_K, compare_greedy
from lenserve.config import EngineConfig
from lenserve.engine.llm_engine import LLMEngine
from lenserve.engine.model import LlamaModel
from lenserve.engine.model_runner import packed_prefill_logits
from lenserve.engine.random_weights import parse_spec, random_weights
from lenserve.engine.sampling_params import SamplingParams

CHECK_SPECS = ["random:smollm2-135m:4", "random:llama3-8b:2"]
THROUGHPUT_SPEC = "random:smollm2-135m"
MIN_COSINE = 0.99  # bf16 vs fp32 logits, per position
MIN_ARGMAX_AGREEMENT = 0.98  # where the fp32 top two are > 0.5 apart


# ---- comparisons (pure functions: tested on CPU) ---------------------------------------------------
def compare_logits(candidate: torch.Tensor, reference: torch.Tensor, clear_margin: float = 0.5) -> dict:
    """[positions, vocab] logits vs a reference: cosine per position, and how often the argmax
    agrees at positions whose reference top two are more than clear_margin apart."""
    candidate, reference = candidate.float().cpu(), reference.float().cpu()
    cos = torch.nn.functional.cosine_similarity(candidate, reference, dim=-1)
    top2 = reference.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > clear_margin
    agree = candidate.argmax(-1) == reference.argmax(-1)
    agreement = float(agree[clear].float().mean()) if bool(clear.any()) else 1.0
    return {
        "positions": int(reference.shape[0]),
        "min_cosine": round(float(cos.min()), 6),
        "mean_cosine": round(float(cos.mean()), 6),
        "max_abs_diff": round(float((candidate - reference).abs().max()), 4),
        "clear_positions": int(clear.sum()),
        "argmax_agreement": round(agreement, 4),
        "ok": bool(cos.min() >= MIN_COSINE and agreement >= MIN_ARGMAX_AGREEMENT),
    }


def throughput_rows(lenserve: dict[int, float], hf: dict[int, float] | None) -> list[dict]:
    """tok/s per batch size for lenserve and HF, with lenserve's speedup where both ran."""
    rows = []
    for batch, ours in sorted(lenserve.items()):
        row = {"batch": batch, "lenserve_tok_s": round(ours, 1)}
        if hf and batch in hf:
            row["hf_tok_s"] = round(hf[batch], 1)
            row["speedup_vs_hf"] = round(ours / hf[batch], 2)
        rows.append(row)
    return rows


# ---- models -------------------------------------------------------------------------------------
def build_model(spec: str, device: str, dtype: torch.dtype, backend: str = "auto") -> LlamaModel:
    cfg = parse_spec(spec)
    return LlamaModel.from_weights(cfg, random_weights(cfg, torch.device(device), dtype), dtype, torch.device(device), backend)


def prompt_ids(vocab: int, lens: list[int], seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in lens]


def packed_logits(model: LlamaModel, prompts: list[list[int]], kv_dtype: torch.dtype) -> torch.Tensor:
    """Logits at every position of every prompt, all prompts in one packed prefill."""
    return torch.cat(packed_prefill_logits(model, prompts, kv_dtype))


def engine(spec: str, device: str, dtype: str, **kwargs) -> LLMEngine:
    sched = {k: kwargs.pop(k) for k in ("max_num_seqs", "max_num_batched_tokens") if k in kwargs}
    config = EngineConfig(model=spec, device=device, dtype=dtype, **kwargs)
    for k, v in sched.items():
        setattr(config.scheduler, k, v)
    config.scheduler.__post_init__()
    return LLMEngine(config)


def greedy(eng: LLMEngine, prompts: list[list[int]], max_tokens: int, logprobs: bool = False):
    """(tokens, logprobs, seconds): greedy tokens of every prompt (ignore_eos), with logprobs=True
    each token's top-TOP_K logprobs per sequence (else None), and the wall time of the whole run.
    The timed throughput runs leave logprobs off: the extra log_softmax, top-k and transfer would
    be timed too."""
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, logprobs=TOP_K if logprobs else None)
    for i, p in enumerate(prompts):
        eng.add_request(f"r{i}", p, params)
    done: dict[str, tuple[list[int], list | None]] = {}
    t0 = time.perf_counter()
    while eng.has_unfinished_requests():
        for out in eng.step():
            if out.finished:
                done[out.request_id] = (out.outputs[0].token_ids, out.outputs[0].logprobs)
    sync(str(eng.device))
    seconds = time.perf_counter() - t0
    runs = [done[f"r{i}"] for i in range(len(prompts))]
    return [t for t, _ in runs], [lp for _, lp in runs] if logprobs else None, seconds


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---- stages --------------------------------------------------------------------------------------
def run_check(device: str, tiny: bool) -> dict:
    specs = ["random:tiny"] if tiny else CHECK_SPECS
    on_cuda = device.startswith("cuda")
    dtype = torch.bfloat16 if on_cuda else torch.float32
    dtype_name = "bfloat16" if on_cuda else "float32"
    results = []
    for spec in specs:
        cfg = parse_spec(spec)
        lens = [1, 17, 64, 200] if not tiny else [1, 5, 30]
        prompts = prompt_ids(cfg.vocab_size, lens)
        res: dict = {"spec": spec, "heads": [cfg.num_heads, cfg.num_kv_heads, cfg.head_dim], "layers": cfg.num_layers}
        reference = packed_logits(build_model(spec, "cpu", torch.float32), prompts, torch.float32)
        _free()
        model = build_model(spec, device, dtype, "auto")
        res["device_vs_cpu_fp32"] = compare_logits(packed_logits(model, prompts, dtype), reference)
        del model
        model = build_model(spec, device, dtype, "torch")
        torch_logits = packed_logits(model, prompts, dtype)
        del model
        _free()
        res["kernels_vs_torch_backend"] = compare_logits(packed_logits(build_model(spec, device, dtype, "auto"), prompts, dtype), torch_logits)
        _free()
        # Greedy decode: CUDA graphs (on CPU: the padded static path) vs eager; chunked prefill vs one pass.
        gen_prompts = prompt_ids(cfg.vocab_size, [5 + 11 * i for i in range(5 if tiny else 19)], seed=1)
        common = dict(max_model_len=512, max_num_seqs=32, kv_cache_memory_gb=None if on_cuda else 0.05)
        eager = engine(spec, device, dtype_name, enforce_eager=True, **common)
        want, want_lp, _ = greedy(eager, gen_prompts, 16, logprobs=True)
        del eager
        _free()
        graphs = engine(spec, device, dtype_name, **common)
        if graphs.runner.decode_graphs is None:
            graphs.runner.enable_decode_graphs(32, 512, capture=False)
        got, got_lp, _ = greedy(graphs, gen_prompts, 16, logprobs=True)
        res["graphs_vs_eager"] = {**compare_greedy(got, want, got_lp, want_lp), "graph_replays": graphs.runner.decode_graphs.num_replays,
                                  "static_runs": graphs.runner.decode_graphs.num_runs}
        del graphs
        _free()
        chunked = engine(spec, device, dtype_name, max_num_batched_tokens=32, **common)
        got, got_lp, _ = greedy(chunked, gen_prompts, 16, logprobs=True)
        res["chunked_prefill_vs_one_pass"] = compare_greedy(got, want, got_lp, want_lp)
        del chunked
        _free()
        res["ok"] = (res["device_vs_cpu_fp32"]["ok"] and res["kernels_vs_torch_backend"]["ok"]
                     and res["graphs_vs_eager"]["ok"] and res["chunked_prefill_vs_one_pass"]["ok"])
        print(f"e2e check: {spec}: {'ok' if res['ok'] else 'FAILED'} {res}", flush=True)
        results.append(res)
    return {"device_arg": device, "tiny": tiny, "shapes": results, "ok": all(r["ok"] for r in results)}


def _hf_throughput(spec: str, device: str, batches: list[int], prompt_len: int, new_tokens: int) -> dict[int, float] | str:
    try:
        import transformers
    except ImportError:
        return "transformers is not installed: HF generate skipped"
    cfg = parse_spec(spec)
    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim, rope_theta=cfg.rope_theta, rms_norm_eps=cfg.rms_norm_eps,
        max_position_embeddings=cfg.max_position_embeddings, tie_word_embeddings=cfg.tie_word_embeddings,
    )
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    model = transformers.LlamaForCausalLM(hf_cfg).to(device=device, dtype=dtype).eval()
    missing, unexpected = model.load_state_dict(dict(random_weights(cfg, torch.device(device), dtype)), strict=False)
    if unexpected or [m for m in missing if not m.startswith("lm_head")]:
        return f"HF weights did not load: missing {missing[:3]}, unexpected {unexpected[:3]}"
    out = {}
    for batch in batches:
        ids = torch.tensor(prompt_ids(cfg.vocab_size, [prompt_len] * batch, seed=batch), device=device)
        kwargs = dict(do_sample=False, min_new_tokens=new_tokens, max_new_tokens=new_tokens, pad_token_id=0, eos_token_id=None)
        with torch.inference_mode():
            model.generate(ids[:, :8], **{**kwargs, "min_new_tokens": 2, "max_new_tokens": 2})  # warm-up
            sync(device)
            t0 = time.perf_counter()
            model.generate(ids, **kwargs)
            sync(device)
        out[batch] = batch * new_tokens / (time.perf_counter() - t0)
        print(f"e2e throughput: HF generate batch {batch}: {out[batch]:.1f} tok/s", flush=True)
    del model
    _free()
    return out


def run_throughput(device: str, tiny: bool) -> dict:
    spec = "random:tiny" if tiny else THROUGHPUT_SPEC
    batches, prompt_len, new_tokens = ([1, 4], 16, 8) if tiny else ([1, 32, 256], 256, 128)
    on_cuda = device.startswith("cuda")
    cfg = parse_spec(spec)
    eng = engine(spec, device, "bfloat16" if on_cuda else "float32", max_model_len=prompt_len + new_tokens + 16,
                 max_num_seqs=max(batches), max_num_batched_tokens=8192 if not tiny else 256,
                 kv_cache_memory_gb=None if on_cuda else 0.05)
    greedy(eng, prompt_ids(cfg.vocab_size, [prompt_len] * 2), 4)  # warm-up
    ours = {}
    for batch in batches:
        _, _, seconds = greedy(eng, prompt_ids(cfg.vocab_size, [prompt_len] * batch, seed=batch), new_tokens)
        ours[batch] = batch * new_tokens / seconds
        print(f"e2e throughput: lenserve batch {batch}: {ours[batch]:.1f} tok/s", flush=True)
    graphs = eng.runner.decode_graphs.num_replays if eng.runner.decode_graphs is not None else 0
    del eng
    _free()
    hf = _hf_throughput(spec, device, batches, prompt_len, new_tokens)
    return {"device_arg": device, "tiny": tiny, "spec": spec, "prompt_tokens": prompt_len, "new_tokens": new_tokens,
            "graph_replays": graphs, "hf": hf if isinstance(hf, str) else "ran",
            "rows": throughput_rows(ours, hf if isinstance(hf, dict) else None), "ok": True}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("stage", choices=["check", "throughput"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    result = run_check(args.device, args.tiny) if args.stage == "check" else run_throughput(args.device, args.tiny)
    if args.out:
        write_json(args.out, f"e2e_{args.stage}", result)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
