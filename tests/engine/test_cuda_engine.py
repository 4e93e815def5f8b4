"""The engine on a GPU (skipped without CUDA): random-weight models of two shapes, CUDA bf16 vs CPU
fp32, our kernels vs the torch backend, chunked prefill, CUDA graphs vs eager, a float16 KV cache
under bfloat16 weights, several engines in one process."""
from __future__ import annotations

import gc

import pytest
import torch

from benchmarks.gpu.ties import BF16_MAX_GAP, TOP_K, compare_greedy
from lenserve import LLM, SamplingParams
from lenserve.engine.model import LlamaModel
from lenserve.engine.random_weights import parse_spec, random_weights
from tests.engine.helpers import full_logits

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

SHAPES = ["random:smollm2-135m:4", "random:llama3-8b:2"]


def _prompts(vocab: int, lens: list[int], seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in lens]


def _model(spec: str, device: str, dtype: torch.dtype, backend: str = "auto") -> LlamaModel:
    cfg = parse_spec(spec)
    return LlamaModel.from_weights(cfg, random_weights(cfg, torch.device(device), dtype), dtype, torch.device(device), backend)


def _llm(spec: str, **kwargs) -> LLM:
    kwargs = {"device": "cuda", "dtype": "bfloat16", "max_model_len": 1024, "max_num_seqs": 32, **kwargs}
    return LLM(spec, **kwargs)


def _greedy(llm: LLM, prompts, max_tokens: int = 24):
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, logprobs=TOP_K)
    outs = llm.generate(prompts, params)
    return [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in outs]


def _same_greedy(a, b, name_a, name_b):
    """Greedy outputs of two bf16 runs that differ in batch shape: every sequence identical, or its
    first divergence a near tie (the device check's rule, benchmarks/gpu/ties.py); b the reference."""
    res = compare_greedy([t for t, _ in a], [t for t, _ in b], [lp for _, lp in a], [lp for _, lp in b], BF16_MAX_GAP)
    assert res["ok"], f"{name_a} vs {name_b}: {res['mismatches']} (near ties: {res['near_ties']})"
    return res


def _free(*llms) -> None:
    for llm in llms:
        del llm
    gc.collect()
    torch.cuda.empty_cache()


@pytest.mark.parametrize("spec", SHAPES)
def test_cuda_bf16_logits_match_cpu_fp32(spec):
    """Same weights (drawn on CPU, then rounded to bf16 on the GPU): every position's logits agree in
    direction, and the argmax agrees where the fp32 reference is not a near tie."""
    cpu = _model(spec, "cpu", torch.float32)
    gpu = _model(spec, "cuda", torch.bfloat16)
    prompts = _prompts(cpu.cfg.vocab_size, [1, 17, 200, 64])
    ref = torch.cat(full_logits(cpu, prompts))
    got = torch.cat(full_logits(gpu, prompts, kv_dtype=torch.bfloat16)).cpu()
    cos = torch.nn.functional.cosine_similarity(got, ref, dim=-1)
    assert cos.min() > 0.99, f"min cosine {cos.min():.4f}"
    top2 = ref.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 0.5
    agree = got.argmax(-1) == ref.argmax(-1)
    assert agree[clear].float().mean() >= 0.98


@pytest.mark.parametrize("spec", SHAPES)
def test_kernels_match_the_torch_backend(spec):
    prompts = _prompts(parse_spec(spec).vocab_size, [3, 100, 257, 31, 512], seed=1)
    kernels = _model(spec, "cuda", torch.bfloat16, "kernels")
    torch_ = _model(spec, "cuda", torch.bfloat16, "torch")
    a = torch.cat(full_logits(kernels, prompts, kv_dtype=torch.bfloat16))
    b = torch.cat(full_logits(torch_, prompts, kv_dtype=torch.bfloat16))
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    assert cos.min() > 0.999
    del kernels, torch_
    la, lb = _llm(spec, attention_backend="kernels"), _llm(spec, attention_backend="torch", enforce_eager=True)
    _same_greedy(_greedy(la, prompts), _greedy(lb, prompts), "kernels", "torch")
    _free(la, lb)


def test_chunked_prefill_matches_one_pass():
    spec = SHAPES[0]
    prompts = _prompts(parse_spec(spec).vocab_size, [700, 300, 5], seed=2)
    one = _llm(spec, max_num_batched_tokens=2048, target_itl_ms=0)
    chunked = _llm(spec, max_num_batched_tokens=64, target_itl_ms=0)
    _same_greedy(_greedy(one, prompts), _greedy(chunked, prompts), "one pass", "chunked")
    _free(one, chunked)


@pytest.mark.parametrize("spec", SHAPES)
def test_cuda_graphs_give_the_eager_tokens(spec):
    """5 and 19 sequences pad to graphs of 8 and 32: greedy tokens those of eager, up to near ties
    (the padded GEMM rounds bf16 differently)."""
    for n in (5, 19):
        prompts = _prompts(parse_spec(spec).vocab_size, [10 + 7 * i for i in range(n)], seed=n)
        graphs = _llm(spec)
        eager = _llm(spec, enforce_eager=True)
        assert graphs.engine.runner.decode_graphs is not None and eager.engine.runner.decode_graphs is None
        a, b = _greedy(graphs, prompts, 32), _greedy(eager, prompts, 32)
        assert graphs.engine.runner.decode_graphs.num_replays > 0
        _same_greedy(a, b, "graphs", "eager")
        _free(graphs, eager)


def test_float16_kv_cache_under_bfloat16_weights():
    spec = SHAPES[0]
    prompts = _prompts(parse_spec(spec).vocab_size, [40, 300], seed=3)
    fp16_cache = _llm(spec, kv_cache_dtype="float16")
    bf16_cache = _llm(spec)
    assert fp16_cache.engine.kv_cache.dtype == torch.float16
    _same_greedy(_greedy(fp16_cache, prompts), _greedy(bf16_cache, prompts), "fp16 cache", "bf16 cache")
    _free(fp16_cache, bf16_cache)


def test_several_engines_in_one_process():
    """Each sizes its cache from what the others left; none takes the whole device."""
    llms = [_llm(SHAPES[0]) for _ in range(3)]
    for llm in llms:
        assert llm.engine.kv_budget is not None and llm.engine.kv_cache.num_blocks >= 1
        _greedy(llm, _prompts(49152, [20]), 4)
    _free(*llms)
