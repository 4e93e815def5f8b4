"""Weights served in their GGUF encoding (the CPU default) against the same weights dequantized to
fp32: greedy tokens, perplexity, a GGUF of every kernel type written here, and fp16 weights."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from lenserve import LLM, SamplingParams
from lenserve.engine._ext import has_op
from lenserve.engine.linear import QuantLinear
from lenserve.engine.loader_gguf import find_embedded_gguf
from lenserve.engine.loader_hf import load_model_files
from lenserve.engine.model import LlamaModel
from lenserve.engine.quant import QuantWeight

from .helpers import check_logprobs_close, full_logits

gguf = pytest.importorskip("gguf")
pytestmark = pytest.mark.skipif(not has_op("quant_linear", "cpu"), reason="lenserve._C is not built")


@pytest.fixture(scope="module")
def native_llm(llm):
    assert llm.engine.weights_dtype == "native"  # the default for a GGUF on CPU (see _resolve_weights_dtype)
    return llm


@pytest.fixture(scope="module")
def fp32_llm():
    return LLM(weights_dtype="fp32", max_num_seqs=64, max_model_len=2048)


def test_native_keeps_the_files_encoding(native_llm):
    llm = native_llm
    model = llm.engine.model
    assert llm.engine.weights_dtype == "native"
    qkv = model.layers[0].qkv_proj
    # the file's Q4_1 / Q8_0 bytes, interleaved eight rows at a time for the decode kernel
    assert isinstance(qkv, QuantLinear) and [p.type_name for p in qkv.parts] == ["Q4_1x8"]
    assert isinstance(model.embed_tokens, QuantWeight) and model.embed_tokens.type_name == "Q8_0x8"
    assert model.lm_head.parts[0] is model.embed_tokens  # the tied head reads the embedding's rows
    assert model.num_bytes() < 100e6  # 96.4 MB in the file; 538 MB as fp32


def test_greedy_native_agrees_with_fp32_to_first_near_tie(native_llm, fp32_llm, test_prompts):
    llm = native_llm
    """40 real prompts decoded together; each sequence's tokens agree until a near tie."""
    prompts = test_prompts[:40]
    params = SamplingParams(max_tokens=24, temperature=0.0, logprobs=5, ignore_eos=True)
    native = llm.generate(prompts, params)
    ref = fp32_llm.generate(prompts, params)
    first_divergence = []
    for n, r in zip(native, ref):
        a, b = n.outputs[0], r.outputs[0]
        first_divergence.append(check_logprobs_close(b.token_ids, b.logprobs, a.token_ids, a.logprobs, "fp32", "native"))
    assert sum(d is None for d in first_divergence) >= 30, first_divergence


def _perplexity(model, ids: list[int]) -> float:
    logits = full_logits(model, [ids])[0]
    nll = torch.nn.functional.cross_entropy(logits[:-1].double(), torch.tensor(ids[1:]))
    return float(torch.exp(nll))


def test_perplexity_within_half_a_percent_of_fp32(native_llm, fp32_llm, test_prompts):
    llm = native_llm
    tok = llm.engine.tokenizer
    ids = tok.encode("\n\n".join(test_prompts[100:140]))[:600]
    native, ref = _perplexity(llm.engine.model, ids), _perplexity(fp32_llm.engine.model, ids)
    assert abs(native / ref - 1) < 0.005, (native, ref)


def test_fp16_weights_equal_fp32_of_the_rounded_weights():
    """--weights-dtype fp16 (any checkpoint, F16C in the kernel) computes what fp32 computes on
    weights rounded to fp16."""
    cfg, weights, _, _ = load_model_files(None)
    rounded = [(n, w.half().float() if w.dim() == 2 else w) for n, w in weights]
    cpu = torch.device("cpu")
    half = LlamaModel.from_weights(cfg, iter(rounded), torch.float32, cpu, weights_dtype="fp16")
    full = LlamaModel.from_weights(cfg, iter(rounded), torch.float32, cpu)
    assert half.layers[0].down_proj.parts[0].type_name == "F16"
    prompts = [list(range(100, 140)), [1, 2, 3]]
    for a, b in zip(full_logits(half, prompts), full_logits(full, prompts)):
        assert (a - b).abs().max().item() < 2e-3


# ---- a small GGUF written here with the gguf writer, one tensor type per projection ----------

HIDDEN, FFN, LAYERS, HEADS, KV_HEADS = 256, 512, 2, 4, 2


def _random_blocks(rng, qtype, rows, cols) -> np.ndarray:
    """Well-formed K-quant blocks (gguf cannot quantize these): any bits, small fp16 scales."""
    T = gguf.GGMLQuantizationType
    elems, nbytes = gguf.GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, size=(rows, cols // elems, nbytes), dtype=np.uint8)
    offsets = {T.Q6_K: [208], T.Q2_K: [80, 82]}.get(qtype, [0, 2])
    for off in offsets:
        scale = rng.uniform(0.0005, 0.002, size=blocks.shape[:2]).astype(np.float16)
        blocks[:, :, off : off + 2] = scale.view(np.uint8).reshape(*blocks.shape[:2], 2)
    return blocks.reshape(rows, -1)


def _write_gguf(path: str) -> None:
    T = gguf.GGMLQuantizationType
    src = gguf.GGUFReader(find_embedded_gguf())
    fields = {name: f.contents() for name, f in src.fields.items() if name.startswith("tokenizer.")}
    vocab = len(fields["tokenizer.ggml.tokens"])
    w = gguf.GGUFWriter(path, "llama")
    w.add_name("tiny-mixed")
    w.add_block_count(LAYERS)
    w.add_context_length(512)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model(fields["tokenizer.ggml.model"])
    w.add_token_list(fields["tokenizer.ggml.tokens"])
    w.add_token_types(fields["tokenizer.ggml.token_type"])
    w.add_token_merges(fields["tokenizer.ggml.merges"])
    w.add_bos_token_id(fields["tokenizer.ggml.bos_token_id"])
    w.add_eos_token_id(fields["tokenizer.ggml.eos_token_id"])
    rng = np.random.default_rng(0)

    def add(name, rows, cols, qtype, scale=0.06):
        if qtype in (T.Q2_K, T.Q4_K, T.Q5_K, T.Q6_K):
            w.add_tensor(name, _random_blocks(rng, qtype, rows, cols), raw_dtype=qtype)
            return
        data = (rng.standard_normal((rows, cols)) * scale).astype(np.float32)
        if qtype == T.F16:
            w.add_tensor(name, data.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)

    add("token_embd.weight", vocab, HIDDEN, T.Q8_0, scale=1.0)
    w.add_tensor("output_norm.weight", np.ones(HIDDEN, dtype=np.float32))
    kv = HIDDEN // HEADS * KV_HEADS
    # q/k/v of three types: the fused projection runs as parts; Q2_K has no kernel (fp16 fallback)
    types = [
        dict(attn_q=T.Q4_K, attn_k=T.Q5_K, attn_v=T.Q6_K, attn_output=T.Q4_0, ffn_gate=T.Q4_1, ffn_up=T.Q4_1, ffn_down=T.Q8_0),
        dict(attn_q=T.Q8_0, attn_k=T.Q5_0, attn_v=T.Q5_1, attn_output=T.F16, ffn_gate=T.Q4_K, ffn_up=T.Q4_K, ffn_down=T.Q2_K),
    ]
    shapes = dict(attn_q=(HIDDEN, HIDDEN), attn_k=(kv, HIDDEN), attn_v=(kv, HIDDEN), attn_output=(HIDDEN, HIDDEN),
                  ffn_gate=(FFN, HIDDEN), ffn_up=(FFN, HIDDEN), ffn_down=(HIDDEN, FFN))
    for i, layer_types in enumerate(types):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(HIDDEN, dtype=np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(HIDDEN, dtype=np.float32))
        for name, qtype in layer_types.items():
            add(f"blk.{i}.{name}.weight", *shapes[name], qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_small_gguf_of_every_type_loads_and_serves(tmp_path, caplog):
    path = str(tmp_path / "tiny.gguf")
    _write_gguf(path)
    with caplog.at_level(logging.INFO, logger="lenserve"):
        native = LLM(model=path, weights_dtype="native", max_num_seqs=4, max_model_len=256, kv_cache_memory_gb=0.05)
    assert "Q2_K have no native kernel" in caplog.text
    model = native.engine.model
    assert [p.type_name for p in model.layers[0].qkv_proj.parts] == ["Q4_Kx8", "Q5_K", "Q6_K"]
    assert [p.type_name for p in model.layers[1].qkv_proj.parts] == ["Q8_0x8", "Q5_0x8", "Q5_1x8"]
    assert model.layers[1].down_proj.parts[0].type_name == "F16"
    cfg, weights, _, _ = load_model_files(path)
    ref = LlamaModel.from_weights(cfg, weights, torch.float32, torch.device("cpu"))
    prompts = [list(range(300, 309)), list(range(1000, 1040))]  # decode-sized and panel-sized
    for got, want in zip(full_logits(model, prompts), full_logits(ref, prompts)):
        assert (got - want).abs().max().item() < 0.02 * want.abs().max().item()
    out = native.generate("Hello", SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True))[0]
    assert len(out.token_ids) == 5


def test_native_packed_batching_equals_one_at_a_time(native_llm, test_prompts):
    from .helpers import check_logprobs_close
    from .test_batching import GREEDY, _alone, _prompts, _staggered

    eng = native_llm.engine
    prompts = _prompts(eng.tokenizer, test_prompts[700:800], [3, 17, 40, 150, 9, 600])  # decode-sized and panel-sized rows
    params_for = lambda i: SamplingParams(max_tokens=10, **GREEDY)
    batched = _staggered(eng, prompts, params_for, every=1)
    for i, p in enumerate(prompts):
        alone = _alone(eng, p, params_for(i))
        check_logprobs_close(alone.token_ids, alone.logprobs, batched[i].token_ids, batched[i].logprobs, "alone", "batched")


def _set_fused(llm, layers: bool, stack: bool = False) -> None:
    llm.engine.model.fuse_decode_layers = stack
    for layer in llm.engine.model.layers:
        layer.fuse_decode = layers


@pytest.mark.skipif(not has_op("decode_layers", "cpu"), reason="lenserve._C has no decode_layers")
@pytest.mark.parametrize("which", ["native", "fp32"])
def test_fused_decode_layer_equals_the_unfused_layer(which, native_llm, fp32_llm, test_prompts):
    """Decode-only steps run every layer in one decode_layers call, or each layer as one
    decode_layer call (native Q4_1x8 / Q8_0x8 rows and packed fp32 alike): the same kernels in the
    same order, so greedy tokens and logprobs equal the op-by-op layer's."""
    from torch.profiler import ProfilerActivity, profile

    llm = native_llm if which == "native" else fp32_llm
    assert all(layer.fused_decode_weights() is not None for layer in llm.engine.model.layers)
    assert llm.engine.model._fused_stack() is not None
    prompts = test_prompts[40:48]
    params = SamplingParams(max_tokens=12, temperature=0.0, logprobs=3, ignore_eos=True)
    runs = {}
    try:
        for name, op, layers, stack in (("stack", "decode_layers", True, True), ("layer", "decode_layer", True, False),
                                        ("plain", None, False, False)):
            _set_fused(llm, layers, stack)
            llm.engine.block_manager.reset_prefix_cache()  # every run prefills every prompt token alike
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                runs[name] = llm.generate(prompts, params)
            calls = {e.key: e.count for e in prof.key_averages()}
            # the 11 decode-only steps: one call each, or one per layer
            per_step = 1 if name == "stack" else len(llm.engine.model.layers)
            if op is not None:
                assert calls.get(f"lenserve::{op}", 0) >= 11 * per_step
            assert calls.get("lenserve::decode_layers", 0) == (0 if name != "stack" else calls["lenserve::decode_layers"])
            assert calls.get("lenserve::decode_layer", 0) == (0 if name != "layer" else calls["lenserve::decode_layer"])
    finally:
        _set_fused(llm, True, True)
    for fused in (runs["stack"], runs["layer"]):
        for a, b in zip(fused, runs["plain"]):
            assert a.outputs[0].token_ids == b.outputs[0].token_ids
            for la, lb in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
                assert [t for t, _ in la.top] == [t for t, _ in lb.top]
                assert abs(la.logprob - lb.logprob) < 1e-5 and all(abs(x - y) < 1e-5 for (_, x), (_, y) in zip(la.top, lb.top))


@pytest.mark.skipif(not has_op("decode_layers", "cpu"), reason="lenserve._C has no decode_layers")
def test_bound_decode_stack_follows_the_caches(native_llm):
    """The model binds its decode stack to the KV caches once (lenserve._C.DecodeStack) and binds
    again only when it is handed other cache tensors."""
    model = native_llm.engine.model
    stack, kv = model._fused_stack(), native_llm.engine.kv_cache.layers
    first = model._decode_stack(stack, kv)
    assert model._decode_stack(stack, list(kv)) is first  # the same tensors in another list
    other = [(k[:1].clone(), v[:1].clone()) for k, v in kv]
    try:
        assert model._decode_stack(stack, other) is not first
    finally:
        assert model._decode_stack(stack, kv) is not first  # rebound to the engine's caches
    assert all(a is b for a, b in zip(model._bound_caches, kv))


@pytest.mark.skipif(not has_op("decode_layer", "cpu"), reason="lenserve._C has no decode_layer")
def test_decode_layer_rejects_malformed_inputs(native_llm):
    layer = native_llm.engine.model.layers[0]
    weights, types, outs, bias = layer.fused_decode_weights()
    cfg = layer.cfg
    h = torch.randn(2, cfg.hidden_size)
    args = (torch.zeros(2, dtype=torch.long), layer.input_norm, layer.post_norm, 1e-5)
    tail = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, native_llm.engine.model.cos_sin_cache, torch.zeros(4, 16, cfg.num_kv_heads, cfg.head_dim),
            torch.zeros(4, 16, cfg.num_kv_heads, cfg.head_dim), torch.zeros(2, dtype=torch.long), torch.zeros(2, 1, dtype=torch.int32),
            torch.ones(2, dtype=torch.int32), 0.125)
    with pytest.raises(RuntimeError, match="4 each"):
        torch.ops.lenserve.decode_layer(h, h.clone(), *args, weights[:3], types[:3], outs[:3], bias, *tail)
    with pytest.raises(RuntimeError, match="do not fit"):
        torch.ops.lenserve.decode_layer(h, h.clone(), *args, weights, types, outs, bias, cfg.num_heads + 1, *tail[1:])
    with pytest.raises(RuntimeError, match="differ"):
        torch.ops.lenserve.decode_layer(h, h[:1].clone(), *args, weights, types, outs, bias, *tail)
    # the whole stack: one entry per layer in every list, four weights each
    norms = [layer.input_norm, layer.input_norm]
    caches = [tail[4], tail[4]]
    stack_tail = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, tail[3])
    meta = tail[6:]

    def stack(hidden, in_norms=norms, w=weights * 2, t=types * 2, biases=(), k=caches):
        return torch.ops.lenserve.decode_layers(hidden, hidden.clone(), args[0], in_norms, norms, 1e-5, w, t, outs, list(biases),
                                                *stack_tail, k, caches, *meta)

    with pytest.raises(RuntimeError, match="one entry per layer"):
        stack(h, in_norms=norms[:1])
    with pytest.raises(RuntimeError, match="one entry per layer"):
        stack(h, k=caches * 2)
    with pytest.raises(RuntimeError, match="4 per layer"):
        stack(h, w=weights * 2 + weights[:1])
    with pytest.raises(RuntimeError, match="one entry per layer or none"):
        stack(h, biases=[None])
    with pytest.raises(RuntimeError, match="out_features takes"):
        torch.ops.lenserve.decode_layers(h, h.clone(), args[0], norms, norms, 1e-5, weights * 2, types * 2, outs[:3], [],
                                         *stack_tail, caches, caches, *meta)
    with pytest.raises(RuntimeError, match="do not fit"):  # each layer's own checks still run
        torch.ops.lenserve.decode_layers(h, h.clone(), args[0], norms, norms, 1e-5, weights * 2, types * 2, outs, [],
                                         cfg.num_heads + 1, cfg.num_kv_heads, cfg.head_dim, tail[3], caches, caches, *meta)
    out = stack(h)  # well-formed: two layers run
    assert out.shape == h.shape and torch.isfinite(out).all()


# ---- the embedded model's real weights requantized: Q5_0 / Q5_1 (what Q4_K_M / Q5_K_M files hold for
# 576-wide rows), and Q4_K where rows are whole super-blocks (ffn_down) with Q5_0 elsewhere --------


@pytest.fixture(scope="module", params=["Q5_0", "Q5_1", "Q4_K"])
def requantized_file(request, tmp_path_factory):
    from benchmarks.requant_gguf import requantize

    path = str(tmp_path_factory.mktemp("requant") / f"smollm2-{request.param}.gguf")
    report = requantize(find_embedded_gguf(), path, matrix_type=request.param, progress=False)
    # 7 matrices in each of 30 layers; Q4_K only for ffn_down (1536 wide), llama.cpp's Q5_0 fallback elsewhere
    assert report["tensors"] == ({"Q4_K": 30, "Q5_0": 180} if request.param == "Q4_K" else {request.param: 210}) | {"Q8_0": 1, "F32": 61}
    return request.param, path


def test_requantized_weights_agree_with_fp32_to_first_near_tie(requantized_file, test_prompts):
    """Real weights in Q5_0, Q5_1 or Q4_K, served natively (interleaved, integer dots) against the
    same file dequantized to fp32: greedy tokens to the first near tie, perplexity within 0.5%."""
    qtype, path = requantized_file
    kw = dict(max_num_seqs=16, max_model_len=1024, kv_cache_memory_gb=0.2)
    native, ref = LLM(model=path, weights_dtype="native", **kw), LLM(model=path, weights_dtype="fp32", **kw)
    layer = native.engine.model.layers[0]
    assert [p.type_name for p in layer.qkv_proj.parts] == [("Q5_0" if qtype == "Q4_K" else qtype) + "x8"]
    assert [p.type_name for p in layer.down_proj.parts] == [qtype + "x8"]
    prompts = test_prompts[:16]
    params = SamplingParams(max_tokens=24, temperature=0.0, logprobs=5, ignore_eos=True)
    same = 0
    for n, r in zip(native.generate(prompts, params), ref.generate(prompts, params)):
        a, b = n.outputs[0], r.outputs[0]
        same += check_logprobs_close(b.token_ids, b.logprobs, a.token_ids, a.logprobs, "fp32", qtype) is None
    assert same >= 12, same
    ids = native.engine.tokenizer.encode("\n\n".join(test_prompts[100:140]))[:600]
    ppl, ppl_ref = _perplexity(native.engine.model, ids), _perplexity(ref.engine.model, ids)
    assert abs(ppl / ppl_ref - 1) < 0.005, (ppl, ppl_ref)


def test_q4_k_writer_round_trips_through_gguf_dequantize():
    """benchmarks/requant_gguf.py's Q4_K encoder writes blocks gguf's own dequantize reads back to
    within a 4-bit step of each 32-element sub-block (its scale (max - min) / 15 and the 6-bit scales)."""
    from benchmarks.requant_gguf import quantize_q4_k

    x = np.random.default_rng(0).standard_normal((24, 768)).astype(np.float32) * np.array([0.01, 1.0, 30.0]).repeat(8)[:, None]
    y = gguf.quants.dequantize(quantize_q4_k(x), gguf.GGMLQuantizationType.Q4_K).reshape(x.shape)
    sub = x.reshape(24, -1, 32)
    step = (sub.max(-1) - np.minimum(sub.min(-1), 0)) / 15  # [rows, sub-blocks]
    err = np.abs(y - x).reshape(24, -1, 32).max(-1)
    assert (err <= step * 0.5 + 2.5 * step.max(-1, keepdims=True) / 63).all()
