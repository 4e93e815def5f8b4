"""decode_layers on quantized weights runs the whole stack inside one parallel region
(csrc/cpu/decoder_layer.cpp): it must equal decode_layer called layer by layer (the ops one after
another) bit for bit, over the weight types, row counts, cache dtypes and context lengths whose
code differs (interleaved groups and plain or K-quant rows, the VNNI tile's remainder, split
contexts, GQA, a qkv bias, a padding slot), and refuse malformed input with a clear error."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from lenserve.engine import quant
from lenserve.engine._ext import has_op

from .test_quant_linear import interleaved, random_rows

pytestmark = pytest.mark.skipif(not has_op("decode_layers", "cpu"), reason="lenserve._C has no decode_layers")

D, HEADS, KV_HEADS, HEAD_DIM, INTER, BLOCK = 256, 8, 2, 32, 512, 16
Q_SIZE, KV_SIZE = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
OUTS = [Q_SIZE + 2 * KV_SIZE, D, 2 * INTER, D]
INS = [D, Q_SIZE, D, INTER]

# per projection (qkv, o, gate_up, down): interleaved legacy rows, K-quant rows, and a mix
TYPE_SETS = {
    "q4_1x8": [quant.Q4_1] * 4,
    "kquants": [quant.Q4_K, quant.Q6_K, quant.Q5_K, quant.Q6_K],
    "mixed": [quant.Q8_0, quant.Q4_0, quant.Q4_1, quant.Q8_0],
}


def _layer_weights(types, layer: int, interleave: bool):
    out = []
    for j, (t, n, k) in enumerate(zip(types, OUTS, INS)):
        w = random_rows(t, n, k, seed=100 * layer + j)
        if interleave and w.can_interleave():
            w = interleaved(w)
        out.append(w)
    return out


def _problem(types, interleave, n, ctx, cache_dtype, num_layers=2, bias=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    weights = [w for layer in range(num_layers) for w in _layer_weights(types, layer, interleave)]
    max_blocks = ctx // BLOCK + 2
    num_blocks = n * max_blocks + 3
    tables = torch.randperm(num_blocks, generator=g)[: n * max_blocks].view(n, max_blocks).int().contiguous()
    lens = torch.tensor([max(1, ctx - 7 * i) for i in range(n)], dtype=torch.int32)
    # the new token is the last of each context; one row writes to no slot (a padding row)
    pos = (lens - 1).long()
    slots = torch.stack([tables[i, p // BLOCK].long() * BLOCK + p % BLOCK for i, p in enumerate(pos.tolist())])
    if n > 2:
        slots[1] = -1
    caches = [(torch.randn(num_blocks, BLOCK, KV_HEADS, HEAD_DIM, generator=g) * 0.5).to(cache_dtype) for _ in range(2 * num_layers)]
    norms = [1 + 0.1 * torch.randn(D, generator=g) for _ in range(2 * num_layers)]
    biases = [0.1 * torch.randn(OUTS[0], generator=g) for _ in range(num_layers)] if bias else []
    return {
        "hidden": torch.randn(n, D, generator=g), "residual": torch.randn(n, D, generator=g), "positions": pos,
        "weights": weights, "norms": norms, "biases": biases, "cos_sin": torch.randn(ctx + 8, HEAD_DIM, generator=g),
        "k_caches": caches[0::2], "v_caches": caches[1::2], "slots": slots, "tables": tables, "lens": lens,
    }


def _stack(p):
    num_layers = len(p["k_caches"])
    hidden, residual = p["hidden"].clone(), p["residual"].clone()
    k, v = [c.clone() for c in p["k_caches"]], [c.clone() for c in p["v_caches"]]
    out = torch.ops.lenserve.decode_layers(
        hidden, residual, p["positions"], p["norms"][:num_layers], p["norms"][num_layers:], 1e-5,
        [w.data for w in p["weights"]], [w.weight_type for w in p["weights"]], OUTS, list(p["biases"]),
        HEADS, KV_HEADS, HEAD_DIM, p["cos_sin"], k, v, p["slots"], p["tables"], p["lens"], HEAD_DIM**-0.5)
    return out, residual, k, v


def _layer_by_layer(p):
    num_layers = len(p["k_caches"])
    h, residual = p["hidden"].clone(), p["residual"].clone()
    k, v = [c.clone() for c in p["k_caches"]], [c.clone() for c in p["v_caches"]]
    for layer in range(num_layers):
        ws = p["weights"][4 * layer : 4 * layer + 4]
        h = torch.ops.lenserve.decode_layer(
            h, residual, p["positions"], p["norms"][layer], p["norms"][num_layers + layer], 1e-5, [w.data for w in ws],
            [w.weight_type for w in ws], OUTS, p["biases"][layer] if p["biases"] else None, HEADS, KV_HEADS, HEAD_DIM,
            p["cos_sin"], k[layer], v[layer], p["slots"], p["tables"], p["lens"], HEAD_DIM**-0.5)
    return h, residual, k, v


@pytest.mark.parametrize("types", list(TYPE_SETS))
@pytest.mark.parametrize("n", [1, 3, 10])
@pytest.mark.parametrize("ctx", [37, 150, 600])
def test_one_region_equals_layer_by_layer(types, n, ctx):
    p = _problem(TYPE_SETS[types], interleave=True, n=n, ctx=ctx, cache_dtype=torch.float16, bias=types == "mixed")
    got, want = _stack(p), _layer_by_layer(p)
    assert torch.isfinite(got[0]).all()
    for a, b in zip(got[:2], want[:2]):
        assert torch.equal(a, b)
    for a, b in zip(got[2] + got[3], want[2] + want[3]):  # the new tokens' keys and values, in every layer
        assert torch.equal(a, b)
    assert not torch.equal(got[2][0], p["k_caches"][0])


@pytest.mark.parametrize("bias", [False, True])
def test_bound_stack_equals_the_op(bias):
    """lenserve._C.DecodeStack binds the per-model arguments once (what the engine calls every
    decode step): run() gives the op's hidden state, residual and cache writes bit for bit, step
    after step on the same bound caches."""
    from lenserve.engine._ext import extension

    p = _problem(TYPE_SETS["mixed"], interleave=True, n=3, ctx=150, cache_dtype=torch.float16, bias=bias)
    num_layers = len(p["k_caches"])
    k, v = [c.clone() for c in p["k_caches"]], [c.clone() for c in p["v_caches"]]
    bound = extension().DecodeStack(
        p["norms"][:num_layers], p["norms"][num_layers:], 1e-5, [w.data for w in p["weights"]],
        [w.weight_type for w in p["weights"]], OUTS, list(p["biases"]), HEADS, KV_HEADS, HEAD_DIM, p["cos_sin"], k, v,
        HEAD_DIM**-0.5)
    for step in range(2):  # the second step reads the first one's cache writes
        if step:  # the op starts from the caches the bound stack has written
            p["k_caches"], p["v_caches"] = [c.clone() for c in k], [c.clone() for c in v]
        hidden, residual = p["hidden"].clone(), p["residual"].clone()
        got = bound.run(hidden, residual, p["positions"], p["slots"], p["tables"], p["lens"])
        want = _stack(p)
        assert torch.equal(got, want[0]) and torch.equal(residual, want[1])
        for a, b in zip(k + v, want[2] + want[3]):
            assert torch.equal(a, b)
        p["hidden"] = got  # the next step's input


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16])
def test_one_region_cache_dtypes_and_file_rows(cache_dtype):
    """Other cache dtypes, and legacy rows left in file order (not interleaved): the plain dot path."""
    p = _problem(TYPE_SETS["mixed"], interleave=False, n=3, ctx=300, cache_dtype=cache_dtype)
    got, want = _stack(p), _layer_by_layer(p)
    for a, b in zip(got[:2] + tuple(got[2]), want[:2] + tuple(want[2])):
        assert torch.equal(a, b)


def test_one_region_refuses_malformed_input():
    """Every check runs before the region starts (an error inside it could not be raised): a wrong
    weight size, a norm of the wrong size, a bad slot, position or block table, and mismatched
    caches are errors naming the problem, and the caches are left as they were."""
    p = _problem(TYPE_SETS["q4_1x8"], interleave=True, n=2, ctx=40, cache_dtype=torch.float16)
    good = _stack(p)[0]

    def raises(match, **change):
        q = dict(p, **change)
        k_before = [c.clone() for c in q["k_caches"]]
        with pytest.raises(RuntimeError, match=match):
            num_layers = len(q["k_caches"])
            torch.ops.lenserve.decode_layers(
                q["hidden"].clone(), q["residual"].clone(), q["positions"], q["norms"][:num_layers],
                q["norms"][num_layers:], 1e-5, [w.data for w in q["weights"]], [w.weight_type for w in q["weights"]], OUTS,
                list(q["biases"]), HEADS, KV_HEADS, HEAD_DIM, q["cos_sin"], q["k_caches"], q["v_caches"], q["slots"],
                q["tables"], q["lens"], HEAD_DIM**-0.5)
        assert all(torch.equal(a, b) for a, b in zip(q["k_caches"], k_before))

    short = list(p["weights"])
    short[5] = SimpleNamespace(data=short[5].data[:, :-4].contiguous(), weight_type=short[5].weight_type)
    raises("decode_layers: weight 5 must be", weights=short)
    raises("input_norms must be a contiguous fp32 CPU vector", norms=[p["norms"][0][:-1]] + p["norms"][1:])
    raises("outside the cache", slots=p["slots"] + 10**6)
    raises("outside the rotary cache", positions=p["positions"] + 10**4)
    raises("block_tables\\[0, 0\\]", tables=torch.full_like(p["tables"], 10**6))
    raises("every layer's caches", k_caches=[p["k_caches"][0], p["k_caches"][1][:-1]])
    raises("one entry per layer or none", biases=[torch.zeros(OUTS[0])])
    bad_bias = [torch.zeros(OUTS[0] - 1), torch.zeros(OUTS[0])]
    raises("qkv_biases must be", biases=bad_bias)
    assert torch.isfinite(good).all()
