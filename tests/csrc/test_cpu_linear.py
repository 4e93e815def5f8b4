"""lenserve._C's packed fp32 linear (16-row panels) against an fp64 reference over odd shapes."""
from __future__ import annotations

import pytest
import torch

from lenserve.engine._ext import has_op
from lenserve.engine.linear import Linear

pytestmark = pytest.mark.skipif(not has_op("packed_linear", "cpu"), reason="lenserve._C is not built")


def _case(m, n, k, seed=0):
    g = torch.Generator().manual_seed(seed * 1000 + m * 31 + n * 7 + k)
    return torch.randn(m, k, generator=g), torch.randn(n, k, generator=g), torch.randn(n, generator=g)


# rows: 1 (decode), every micro-kernel remainder 1..5, row blocks past the L2 block, a prefill;
# columns: below one panel, a partial last panel, exact panels, the vocabulary-sized head
@pytest.mark.parametrize("m", [1, 2, 3, 5, 6, 7, 13, 250, 1031])
@pytest.mark.parametrize("n,k", [(1, 1), (15, 7), (17, 64), (33, 576), (576, 576), (960, 1536), (4099, 96)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_packed_linear_matches_fp64(m, n, k, with_bias):
    x, w, b = _case(m, n, k)
    packed = torch.ops.lenserve.pack_linear_weight(w)
    assert packed.shape == (-(-n // 16), k, 16)
    out = torch.ops.lenserve.packed_linear(x, packed, n, b if with_bias else None)
    ref = x.double() @ w.double().T + (b.double() if with_bias else 0)
    err = (out.double() - ref).abs().max().item()
    # fp32 accumulation over k terms of size ~1: error grows like sqrt(k) * eps * |ref|
    bound = 8 * torch.finfo(torch.float32).eps * (k ** 0.5) * max(1.0, ref.abs().max().item())
    assert err <= bound, (err, bound)
    # and within a small factor of torch's own fp32 matmul (BLAS splits the k sum into blocks;
    # the micro-kernel sums each output along k in one register, so long k costs a few x more)
    torch_err = ((x @ w.T + (b if with_bias else 0)).double() - ref).abs().max().item()
    assert err <= 8 * torch_err + 1e-6


def test_strided_rows_and_3d_input_through_linear():
    x, w, b = _case(9, 70, 48)
    wide = torch.randn(9, 100)
    wide[:, 10:58] = x
    view = wide[:, 10:58]  # rows strided (stride 100), columns contiguous
    lin = Linear(w, b)
    assert lin.lenserve_packed
    torch.testing.assert_close(lin(view), x @ w.T + b, atol=1e-4, rtol=1e-5)
    x3 = x.view(3, 3, 48)
    torch.testing.assert_close(lin(x3), (x @ w.T + b).view(3, 3, 70), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(lin(torch.empty(0, 48)), torch.empty(0, 70))


def test_pack_is_deterministic_and_padded_with_zeros():
    w = torch.randn(21, 5)
    p = torch.ops.lenserve.pack_linear_weight(w)
    torch.testing.assert_close(p[0, :, :16], w[:16].T)
    torch.testing.assert_close(p[1, :, :5], w[16:].T)
    assert p[1, :, 5:].abs().sum() == 0


def test_huge_weights_round_trip():  # >= 2 MiB takes the 2 MiB-aligned huge-page allocation
    x, w, b = _case(4, 3000, 200)
    out = torch.ops.lenserve.packed_linear(x, torch.ops.lenserve.pack_linear_weight(w), 3000, b)
    torch.testing.assert_close(out, x @ w.T + b, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: (torch.randn(2, 8), torch.ops.lenserve.pack_linear_weight(torch.randn(5, 9)), 5, None), "features"),
        (lambda: (torch.randn(2, 8), torch.ops.lenserve.pack_linear_weight(torch.randn(5, 8)), 17, None), "out_features"),
        (lambda: (torch.randn(2, 8).double(), torch.ops.lenserve.pack_linear_weight(torch.randn(5, 8)), 5, None), "Float"),
        (lambda: (torch.randn(2, 8), torch.randn(1, 8, 16), 5, torch.randn(4)), "bias"),
        (lambda: (torch.randn(2, 8), torch.randn(1, 8, 8), 5, None), "panels of 16"),
        (lambda: (torch.randn(8, 2).T, torch.randn(1, 8, 16), 5, None), "contiguous"),
    ],
)
def test_malformed_inputs_raise(make, match):
    x, packed, n, bias = make()
    with pytest.raises(RuntimeError, match=match):
        torch.ops.lenserve.packed_linear(x, packed, n, bias)


def test_pack_rejects_bad_weights():
    with pytest.raises(RuntimeError, match="Float"):
        torch.ops.lenserve.pack_linear_weight(torch.randn(4, 4).half())
    with pytest.raises(RuntimeError, match="2 dimensions"):
        torch.ops.lenserve.pack_linear_weight(torch.randn(4))
