"""The device-independent parts of the GPU serving path, run on CPU: the step's metadata in one
buffer, decode batch padding for CUDA graphs (the padded static forward, run eagerly), the decode
split-K plan, KV-cache sizing arithmetic, host-side varlen metadata checks, random-weight models."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from lenserve.config import EngineConfig
from lenserve.engine import attention
from lenserve.engine._ext import has_op
from lenserve.engine.cuda_graph import CAPTURE_SIZES, graph_batch_sizes, padded_batch_size
from lenserve.engine.memory import GiB, KVBudget, num_kv_blocks
from lenserve.engine.random_weights import parse_spec, random_weights, word_tokenizer
from lenserve.engine.step_buffer import StepBuffer, pack_layout


# ---- one buffer per step -------------------------------------------------------------------------
def test_pack_layout_aligns_every_field_to_8_bytes():
    layout, total = pack_layout([("a", torch.int32, (3,)), ("b", torch.int64, (2,)), ("c", torch.int32, (2, 3)), ("d", torch.int64, (0,))])
    offsets = {k: v[0] for k, v in layout.items()}
    assert offsets == {"a": 0, "b": 16, "c": 32, "d": 56}
    assert total == 56
    with pytest.raises(ValueError, match="twice"):
        pack_layout([("a", torch.int32, (1,)), ("a", torch.int32, (1,))])


def test_step_buffer_views_hold_the_values():
    buf = StepBuffer(torch.device("cpu"), pack=True)  # the CUDA path's one buffer, on the host
    t = buf.stage([
        ("ids", torch.int64, (4,), [5, 6, 7, 1 << 40]),
        ("cu", torch.int32, (3,), [0, 1, 4]),
        ("table", torch.int32, (2, 3), torch.tensor([[1, 2, 3], [4, 0, 0]], dtype=torch.int32)),
        ("empty", torch.int64, (0,), []),
    ])
    assert t["ids"].tolist() == [5, 6, 7, 1 << 40] and t["ids"].dtype == torch.int64
    assert t["cu"].tolist() == [0, 1, 4] and t["cu"].dtype == torch.int32
    assert t["table"].tolist() == [[1, 2, 3], [4, 0, 0]] and t["table"].is_contiguous()
    assert t["empty"].numel() == 0
    assert t["ids"].untyped_storage().data_ptr() == t["table"].untyped_storage().data_ptr()  # one buffer
    assert buf.num_copies == 0  # nothing to copy on CPU
    again = buf.stage([("ids", torch.int64, (1,), [9])])
    assert t["ids"].tolist() == [5, 6, 7, 1 << 40] and again["ids"].tolist() == [9]  # a step's views stay valid


def test_cpu_step_buffer_makes_fresh_tensors():
    """On CPU (nothing to copy to a device) each field is a tensor of its own with the values,
    dtype and shape asked for, and never the caller's tensor."""
    buf = StepBuffer(torch.device("cpu"))
    table = torch.tensor([[1, 2, 3], [4, 0, 0]], dtype=torch.int64)
    t = buf.stage([
        ("ids", torch.int64, (4,), [5, 6, 7, 1 << 40]),
        ("table", torch.int32, (2, 3), table),
        ("flat", torch.int32, (2, 2), [1, 2, 3, 4]),
        ("empty", torch.int64, (0,), []),
    ])
    assert t["ids"].tolist() == [5, 6, 7, 1 << 40] and t["ids"].dtype == torch.int64
    assert t["table"].tolist() == [[1, 2, 3], [4, 0, 0]] and t["table"].dtype == torch.int32
    assert t["flat"].tolist() == [[1, 2], [3, 4]] and t["empty"].numel() == 0
    table[0, 0] = 99
    assert t["table"][0, 0].item() == 1  # a copy, not a view of the caller's tensor
    assert buf.num_copies == 0


# ---- CUDA graph batch sizes ------------------------------------------------------------------------
def test_graph_batch_sizes_and_padding():
    assert CAPTURE_SIZES == (1, 2, 4, 8, 16, 32, 64, 128, 256)
    assert graph_batch_sizes(1) == (1,)
    assert graph_batch_sizes(64) == (1, 2, 4, 8, 16, 32, 64)
    assert graph_batch_sizes(50) == (1, 2, 4, 8, 16, 32, 64)
    assert graph_batch_sizes(1000) == CAPTURE_SIZES
    sizes = graph_batch_sizes(256)
    assert [padded_batch_size(n, sizes) for n in (1, 2, 3, 5, 8, 9, 33, 129, 256)] == [1, 2, 4, 8, 8, 16, 64, 256, 256]
    assert padded_batch_size(257, sizes) is None and padded_batch_size(0, sizes) is None


# ---- decode split-K plan (the C++ function the CUDA binding calls) ------------------------------
needs_ext = pytest.mark.skipif(not has_op("varlen_attention", "cpu"), reason="lenserve._C not built")


@needs_ext
@pytest.mark.parametrize("ctx", [16, 100, 512, 513, 1000, 4096, 32768, 131072])
@pytest.mark.parametrize("num_seqs", [1, 4, 32, 256])
@pytest.mark.parametrize("kv_heads,group", [(8, 4), (3, 3), (1, 12), (32, 1)])
def test_decode_split_plan(ctx, num_seqs, kv_heads, group):
    sms = 132
    splits, part = torch.ops.lenserve.paged_decode_split(ctx, num_seqs, kv_heads, group, sms)
    assert 64 <= part <= 512 and part % 64 == 0
    assert splits == 1 or (splits - 1) * part < ctx <= splits * part  # every partition holds keys
    tile = 1 if group == 1 else 2 if group == 2 else 4 if group <= 4 else 8
    blocks = kv_heads * -(-group // tile) * num_seqs
    if blocks * -(-ctx // 512) >= 2 * sms:
        assert part == 512 or splits == 1  # the SMs are covered without extra splitting
    elif ctx > 64:
        assert splits > 1  # too few blocks: the keys are split
        # about two blocks a SM; rounding partitions up to 64 keys may lose up to half of that
        assert blocks * splits >= sms or part == 64


@needs_ext
def test_decode_split_plan_batch_one_covers_an_h100():
    splits, part = torch.ops.lenserve.paged_decode_split(1024, 1, 8, 4, 132)
    assert (splits, part) == (16, 64)  # 8 blocks a split -> 128 blocks, not 3 as before
    assert torch.ops.lenserve.paged_decode_split(0, 1, 8, 4, 132) == [1, 512]


# ---- KV cache sizing --------------------------------------------------------------------------------
def test_kv_budget_arithmetic():
    b = KVBudget(total_bytes=80 * GiB, free_bytes=70 * GiB, gpu_memory_utilization=0.9, activation_peak_bytes=2 * GiB, graph_pool_bytes=GiB)
    assert b.kv_bytes == int(0.9 * 80 * GiB) - 10 * GiB - 3 * GiB
    assert num_kv_blocks(b, 2**20, 10**9) == b.kv_bytes // 2**20
    assert num_kv_blocks(b, 2**20, 1000) == 1000  # no more than max_num_seqs full sequences use


def test_kv_budget_of_nothing_is_a_clear_error():
    b = KVBudget(total_bytes=80 * GiB, free_bytes=7 * GiB, gpu_memory_utilization=0.9, activation_peak_bytes=GiB, graph_pool_bytes=0)
    with pytest.raises(ValueError, match="gpu_memory_utilization leaves no memory for the KV cache.*73.00 GiB already in use"):
        num_kv_blocks(b, 2**20, 10**6)
    tiny = KVBudget(total_bytes=GiB, free_bytes=GiB, gpu_memory_utilization=0.5, activation_peak_bytes=GiB // 2 - 100, graph_pool_bytes=0)
    with pytest.raises(ValueError, match="one block needs"):
        num_kv_blocks(tiny, 2**20, 10)


# ---- host-side varlen checks ------------------------------------------------------------------------
@pytest.mark.parametrize("cu_q, cu_k, max_q, max_k, message", [
    ([1, 3, 8], [0, 3, 8], 5, 5, r"cu_seqlens_q\[0\] must be 0"),
    ([0, 6, 8], [0, 6, 5], 6, 6, "non-decreasing"),
    ([0, 3, 7], [0, 3, 8], 5, 5, "must equal the number of tokens"),
    ([0, 3, 8], [0, 3, 8], 4, 5, "max_seqlen_q"),
    ([0, 3, 8], [0, 3, 8], 5, 4, "max_seqlen_k"),
    ([0, 8], [0, 3, 8], 8, 5, "num_seqs"),
])
def test_varlen_metadata_is_checked_on_the_host(cu_q, cu_k, max_q, max_k, message):
    with pytest.raises(ValueError, match=message):
        attention.check_varlen_metadata(cu_q, cu_k, max_q, max_k, 8, 8)
    attention.check_varlen_metadata([0, 3, 8], [0, 3, 8], 5, 5, 8, 8)


def test_backend_for_ignores_the_cache_dtype_and_routes_fp32_to_torch():
    cpu = torch.device("cpu")
    assert attention.backend_for("torch", cpu, torch.bfloat16, 64) == "torch"
    if has_op("varlen_attention", "cpu"):
        assert attention.backend_for("auto", cpu, torch.float32, 80) == "kernels"  # CPU kernels take any head_dim


# ---- random-weight models -----------------------------------------------------------------------------
def test_random_specs():
    cfg = parse_spec("random:llama3-8b:2")
    assert (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size) == (2, 32, 8, 128, 128256)
    smol = parse_spec("random:smollm2-135m")
    assert (smol.num_layers, smol.num_heads, smol.num_kv_heads, smol.head_dim, smol.tie_word_embeddings) == (30, 9, 3, 64, True)
    for bad in ("random:gpt5", "random:tiny:0", "random:tiny:x", "random:tiny:1:2"):
        with pytest.raises(ValueError, match="random:"):
            parse_spec(bad)
    assert EngineConfig(model="random:tiny").model == "random:tiny"


def test_random_weights_repeat_and_convert():
    cfg = parse_spec("random:tiny")
    a = dict(random_weights(cfg, torch.device("cpu"), torch.float32))
    b = dict(random_weights(cfg, torch.device("cpu"), torch.bfloat16))
    assert a.keys() == b.keys() and "lm_head.weight" in a
    for name in a:
        assert torch.equal(a[name].bfloat16(), b[name]), name
    tok = word_tokenizer(cfg.vocab_size)
    assert tok.decode(tok.encode("t5 t17 t3")) == "t5 t17 t3"


# ---- the engine path on CPU: one copy, batched sampler, padded static decode ------------------------
def _tiny_llm(**kwargs):
    from lenserve import LLM

    return LLM("random:tiny", device="cpu", max_model_len=512, max_num_seqs=16, kv_cache_memory_gb=0.05, **kwargs)


def _greedy_tokens(llm, prompts, n=12):
    from lenserve import SamplingParams

    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True))
    return [o.outputs[0].token_ids for o in outs]


def test_padded_static_decode_gives_the_eager_tokens_on_cpu():
    """What a CUDA graph replays, run eagerly: 5 and 3 sequences padded to batches of 8 and 4 (padding
    rows write no slot, read no key) decode exactly the tokens of the plain path."""
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 512, (int(n),), generator=gen).tolist() for n in (3, 40, 9, 70, 17)]
    eager = _tiny_llm()
    want = _greedy_tokens(eager, prompts)
    static = _tiny_llm()
    graphs = static.engine.runner.enable_decode_graphs(16, 512, capture=False)
    assert graphs.sizes == (1, 2, 4, 8, 16)
    got = _greedy_tokens(static, prompts)
    assert graphs.num_runs > 0 and graphs.num_replays == 0
    assert got == want
    assert _greedy_tokens(static, prompts[:3]) == want[:3]


def test_engine_on_cpu_has_no_graphs_and_enforce_eager_is_a_flag():
    from lenserve.cli import build_parser

    llm = _tiny_llm()
    assert not llm.engine.use_cuda_graphs and llm.engine.runner.decode_graphs is None
    args = build_parser().parse_args(["generate", "hi", "--enforce-eager"])
    assert args.enforce_eager is True


def test_gpu_path_imports_without_server_packages():
    """The device machine has torch, tokenizers and jinja2 but no fastapi, uvicorn, pydantic, gguf,
    safetensors, numpy, scipy or tqdm: the engine and the device-check helpers must import and run
    (40 steps: past the online cost model's first refit) without them."""
    code = (
        "import sys\n"
        "for m in ('fastapi', 'uvicorn', 'pydantic', 'gguf', 'safetensors', 'numpy', 'scipy', 'tqdm', 'transformers', 'xgrammar', 'lightgbm', 'sklearn'):\n"
        "    sys.modules[m] = None\n"
        "import torch\n"
        "from lenserve.engine.llm_engine import LLMEngine\n"
        "from lenserve.config import EngineConfig\n"
        "import benchmarks.gpu.e2e, benchmarks.gpu.kernels, benchmarks.gpu.smoke, benchmarks.gpu.common\n"
        "eng = LLMEngine(EngineConfig(model='random:tiny', device='cpu', max_model_len=256, kv_cache_memory_gb=0.01))\n"
        "from lenserve.engine.sampling_params import SamplingParams\n"
        "eng.add_request('r', [1, 2, 3], SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True))\n"  # past the cost model's first refit
        "eng.generate_all()\n"
        "print('ok')\n"
    )
    import os

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    res = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-3000:]


@needs_ext
def test_one_kv_head_views_with_any_stride_on_cpu():
    """num_kv_heads = 1: a [tokens, 1, head_dim] view whose size-1 dim has stride 1 is legal (the CUDA
    binding's check_token_rows accepts it too; tests/csrc/test_cuda_kernels.py checks it there)."""
    torch.manual_seed(0)
    lens = [3, 9]
    cu = torch.tensor([0, 3, 12], dtype=torch.int32)
    q = torch.randn(12, 4, 64)
    k, v = torch.randn(12, 64), torch.randn(12, 64)
    k_odd, v_odd = k.view(12, 64, 1).transpose(1, 2), v.view(12, 64, 1).transpose(1, 2)
    assert k_odd.stride(1) == 1
    out = torch.ops.lenserve.varlen_attention(q, k_odd, v_odd, cu, cu, max(lens), max(lens), 0.125, True)
    expected = attention.reference_varlen_attention(q, k[:, None], v[:, None], cu, cu, 9, 9, 0.125, True)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
