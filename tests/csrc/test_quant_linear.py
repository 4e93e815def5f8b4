"""lenserve._C's kernels over GGUF-encoded rows against a float64 reference of gguf's own
`dequantize`, on random well-formed blocks of every type, over odd shapes."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lenserve.engine import quant
from lenserve.engine._ext import has_op
from lenserve.engine.quant import QuantWeight

gguf_quants = pytest.importorskip("gguf.quants")
pytestmark = pytest.mark.skipif(not has_op("quant_linear", "cpu"), reason="lenserve._C is not built")

# byte offsets of the fp16 scale fields in each block (the rest of a block is any bytes)
_FP16_FIELDS = {
    quant.Q8_0: [0],
    quant.Q4_0: [0],
    quant.Q4_1: [0, 2],
    quant.Q5_0: [0],
    quant.Q5_1: [0, 2],
    quant.Q4_K: [0, 2],
    quant.Q5_K: [0, 2],
    quant.Q6_K: [208],
}
# decode dots x as int16 activation blocks against the weights' integers (prefill rounds x the same way)
INTEGER_DOT_TYPES = {quant.Q8_0, quant.Q4_0, quant.Q4_1, quant.Q5_0, quant.Q5_1, quant.Q4_K, quant.Q5_K, quant.Q6_K}


def random_rows(weight_type: int, n: int, k: int, seed: int) -> QuantWeight:
    """n rows of random well-formed blocks: any quant bits, scales fp16 of a plausible size
    (Q4_1's, Q5_1's and the K-quants' second field, the min, negative for Q4_1 and Q5_1)."""
    rng = np.random.default_rng(seed)
    if weight_type in (quant.F16, quant.BF16, quant.F32):
        w = torch.from_numpy(rng.standard_normal((n, k)).astype(np.float32))
        if weight_type == quant.F16:
            return QuantWeight.from_float16(w)
        if weight_type == quant.F32:
            return QuantWeight.from_float32(w)
        b = w.to(torch.bfloat16)
        return QuantWeight(b.view(torch.uint8).reshape(n, -1), quant.BF16, k)
    elems, nbytes = quant._BLOCK[weight_type]
    blocks = rng.integers(0, 256, size=(n, k // elems, nbytes), dtype=np.uint8)
    for off in _FP16_FIELDS[weight_type]:
        scale = rng.uniform(0.002, 0.05, size=blocks.shape[:2]).astype(np.float16)
        if weight_type in (quant.Q4_1, quant.Q5_1) and off == 2:
            scale = -scale * (8 if weight_type == quant.Q4_1 else 16)
        blocks[:, :, off : off + 2] = scale.view(np.uint8).reshape(*blocks.shape[:2], 2)
    return QuantWeight(torch.from_numpy(blocks.reshape(n, -1).copy()), weight_type, k)


def reference(w: QuantWeight) -> torch.Tensor:
    """float64 [n, k] from gguf's dequantize (of the file's layout, for interleaved rows)."""
    rows = w.file_rows().numpy()
    return torch.from_numpy(gguf_quants.dequantize(rows, quant.base_type(w.weight_type)).astype(np.float64)).reshape(w.shape)


def check_linear(x: torch.Tensor, w: QuantWeight, bias: torch.Tensor | None = None) -> None:
    out = torch.ops.lenserve.quant_linear(x, w.data, w.weight_type, w.shape[0], bias)
    wd = reference(w)
    xd = x.double()
    ref = xd @ wd.T + (bias.double() if bias is not None else 0)
    err = (out.double() - ref).abs()
    k = x.shape[1]
    magnitude = xd.abs() @ wd.abs().T  # sum_k |x w|
    # fp32 accumulation (as the fp32 packed linear's test)
    bound = 8 * torch.finfo(torch.float32).eps * k**0.5 * (magnitude + 1)
    if quant.base_type(w.weight_type) in INTEGER_DOT_TYPES:
        # x rounded per 32-block (at every batch size: see quant_linear.cpp) to d * round(x / d), d = max|x| / 127: each x moves by <= d / 2,
        # so an output moves by <= sum over blocks of d / 2 * sum |w| in the block
        amax = xd.abs().reshape(x.shape[0], -1, 32).amax(-1)  # [m, blocks]
        wsum = wd.abs().reshape(w.shape[0], -1, 32).sum(-1)  # [n, blocks]
        bound = bound + 1.001 * (amax / 65534) @ wsum.T
    assert (err <= bound).all(), (err.max().item(), (err - bound).max().item())


LEGACY = [quant.Q8_0, quant.Q4_0, quant.Q4_1, quant.Q5_0, quant.Q5_1]
SUPER = [quant.Q4_K, quant.Q5_K, quant.Q6_K]
X8 = LEGACY + [quant.Q4_K]  # the types interleaved eight rows at a time


def widths(weight_type: int, *ks: int) -> tuple[int, ...]:
    """K values for a type: as given for 32-element blocks, each rounded up to whole 256-element
    super-blocks for the K-quants (608 -> 768: an odd number of super-blocks)."""
    return tuple(-(-k // 256) * 256 for k in ks) if weight_type in SUPER else ks
SIXTEEN_BIT = [quant.F16, quant.BF16, quant.F32]


# rows of x: decode (1..16, every 4-row remainder) and the fp32 panel path past 16, with a row
# block remainder; rows of W: 1, odd, past a 16-row panel, 300
@pytest.mark.parametrize("m", [1, 2, 3, 5, 16, 17, 53])
@pytest.mark.parametrize("weight_type", LEGACY + SUPER + SIXTEEN_BIT)
def test_quant_linear_matches_fp64_dequantize(weight_type, m):
    # K: one block, an odd number of blocks (not a multiple of 256 where the format allows)
    ks = [32, 608] if weight_type in LEGACY else [256, 768] if weight_type in SUPER else [7, 130]
    for n in (1, 7, 33, 300):
        for k in ks:
            seed = weight_type * 10_000 + m * 100 + n + k
            w = random_rows(weight_type, n, k, seed)
            x = torch.from_numpy(np.random.default_rng(seed + 1).standard_normal((m, k)).astype(np.float32))
            check_linear(x, w)


@pytest.mark.parametrize("m", [1, 3, 4, 5, 16])
@pytest.mark.parametrize("weight_type", LEGACY + SUPER)
def test_integer_dots_are_exact_on_the_activation_grid(weight_type, m):
    """x already on the int16 grid (each 32-block q * 2^-12 with max |q| = 32767, so rounding
    leaves it as it is): the decode kernels' integer dots leave only fp32 accumulation error, with
    no allowance for rounding x. A wrong nibble, bit, scale or run order shows up far above it."""
    k = 768 if weight_type in SUPER else 608
    rng = np.random.default_rng(weight_type * 100 + m)
    q = rng.integers(-32767, 32768, size=(m, k // 32, 32))
    q[:, :, 0] = 32767 * rng.choice([-1, 1], size=(m, k // 32))  # sets d = 2^-12 exactly
    x = torch.from_numpy((q * 2.0**-12).astype(np.float32).reshape(m, k))
    w = random_rows(weight_type, 40, k, m)
    out = torch.ops.lenserve.quant_linear(x, w.data, w.weight_type, 40, None).double()
    wd = reference(w)
    ref = x.double() @ wd.T
    bound = 8 * torch.finfo(torch.float32).eps * k**0.5 * (x.double().abs() @ wd.abs().T + 1)
    assert ((out - ref).abs() <= bound).all(), ((out - ref).abs().max().item(), bound.min().item())


@pytest.mark.parametrize("m", [3, 40])
def test_bias_and_strided_rows(m):
    """The decode and the panel path both take a bias and rows of x with a stride."""
    w = random_rows(quant.Q4_1, 70, 96, 5)
    wide = torch.randn(m, 200)
    x = wide[:, 50:146]  # rows 200 apart
    bias = torch.randn(70)
    check_linear(x, w, bias)


@pytest.mark.parametrize("weight_type", LEGACY + SUPER + SIXTEEN_BIT)
def test_embedding_rows_equal_gguf_dequantize(weight_type):
    k = 256 if weight_type in SUPER else 96
    w = random_rows(weight_type, 300, k, weight_type)
    ids = torch.tensor([0, 299, 7, 7, 150], dtype=torch.int64)
    got = torch.ops.lenserve.quant_embedding(ids, w.data, w.weight_type, k)
    want = reference(w)[ids]
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-7)


def test_bad_inputs_raise():
    w = random_rows(quant.Q4_0, 8, 64, 1)
    with pytest.raises(RuntimeError, match="multiple of the type's block"):
        torch.ops.lenserve.quant_linear(torch.randn(2, 48), w.data, w.weight_type, 8, None)
    with pytest.raises(RuntimeError, match="weight must be"):
        torch.ops.lenserve.quant_linear(torch.randn(2, 64), w.data, w.weight_type, 9, None)
    with pytest.raises(RuntimeError, match="not supported"):
        torch.ops.lenserve.quant_linear(torch.randn(2, 64), w.data, 20, 8, None)  # IQ4_NL
    with pytest.raises(RuntimeError, match="out of"):
        torch.ops.lenserve.quant_embedding(torch.tensor([8]), w.data, w.weight_type, 64)


@pytest.mark.parametrize("weight_type", [quant.Q4_1, quant.Q8_0, quant.Q5_0, quant.Q5_1, quant.Q4_K])
def test_row_result_does_not_depend_on_batch(weight_type):
    """One row alone (decode path) and inside 40 rows (panel path) agree to fp32 rounding."""
    k = 512
    w = random_rows(weight_type, 50, k, 3)
    x = torch.randn(40, k)
    many = torch.ops.lenserve.quant_linear(x, w.data, w.weight_type, 50, None)
    for i in (0, 17, 39):
        one = torch.ops.lenserve.quant_linear(x[i : i + 1], w.data, w.weight_type, 50, None)
        torch.testing.assert_close(one[0], many[i], rtol=5e-5, atol=2e-4)  # outputs reach ~10


def interleaved(w: QuantWeight) -> QuantWeight:
    x8 = QuantWeight(w.data.clone(), w.weight_type, w.in_features)
    x8.interleave()
    return x8


@pytest.mark.parametrize("weight_type", X8)
def test_interleaving_is_the_documented_layout(weight_type):
    """The kernel's in-place interleaving against quant.deinterleave, a separate numpy statement
    of the layout; the type can only be interleaved once, and only in whole groups of 8 rows."""
    for n, k in zip((8, 24, 304), widths(weight_type, 32, 608, 96)):
        w = random_rows(weight_type, n, k, n + k)
        x8 = interleaved(w)
        assert x8.type_name == w.type_name + "x8" and x8.weight_type == weight_type | quant.INTERLEAVED
        assert not torch.equal(x8.data, w.data)
        assert np.array_equal(quant.deinterleave(x8.data.numpy(), weight_type), w.data.numpy())
        assert not x8.can_interleave()
    k = widths(weight_type, 64)[0]
    assert not random_rows(weight_type, 12, k, 1).can_interleave()
    with pytest.raises(RuntimeError, match="multiple of 8"):
        torch.ops.lenserve.quant_interleave(random_rows(weight_type, 12, k, 1).data, weight_type)
    with pytest.raises(RuntimeError, match="only Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 and Q4_K"):
        torch.ops.lenserve.quant_interleave(random_rows(quant.Q6_K, 8, 256, 1).data, quant.Q6_K)


def _isas() -> list[str]:
    """The integer GEMM's instruction sets this CPU runs: AVX2's kernel always (where built), and
    AVX-512 VNNI's where the CPU has it (quant_vnni.cpp)."""
    current = torch.ops.lenserve.quant_kernel_isa("")
    return ["avx2", "avx512_vnni"] if current == "avx512_vnni" else [current]


@pytest.fixture(params=["base", "avx512_vnni"])
def kernel_isa(request):
    """Runs the test on each integer-GEMM kernel the CPU has (base: AVX2's, or the scalar one in a
    build without AVX2), then puts the default back."""
    isa = _isas()[0] if request.param == "base" else request.param
    if isa not in _isas():
        pytest.skip(f"this CPU runs {_isas()}, not {isa}")
    before = torch.ops.lenserve.quant_kernel_isa(isa)
    yield isa
    torch.ops.lenserve.quant_kernel_isa(before)


# rows of x: every remainder of the 4-row (AVX2) and 8-row (VNNI) register tiles, up to AVX2's
# integer GEMM limit (256), and past it (AVX2: the fp32 panel path; VNNI: still the integer GEMM);
# rows of W: one group, odd groups, 300+
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 7, 9, 13, 53, 128, 256, 257])
@pytest.mark.parametrize("weight_type", X8)
def test_interleaved_linear_matches_fp64_dequantize(weight_type, m, kernel_isa):
    for n in (8, 40, 304):
        for k in widths(weight_type, 32, 608):
            seed = weight_type * 10_000 + m * 100 + n + k
            w = interleaved(random_rows(weight_type, n, k, seed))
            x = torch.from_numpy(np.random.default_rng(seed + 1).standard_normal((m, k)).astype(np.float32))
            check_linear(x, w, torch.randn(n) if m == 5 else None)


@pytest.mark.parametrize("weight_type", X8)
def test_integer_gemm_row_does_not_depend_on_batch(weight_type, kernel_isa):
    """The integer GEMM takes x in blocks of ~128 KiB of rows (32 rows at K = 1536): a row's outputs
    are the same bits alone as at any place among 256 rows, first or last of a block or inside one."""
    k, n = 1536, 40
    # AVX2 takes Q4_Kx8 past 40 rows to the panel path (kMaxQ4KAvx2DecodeRows in quant_linear.cpp)
    rows = 40 if weight_type == quant.Q4_K and kernel_isa != "avx512_vnni" else 256
    w = interleaved(random_rows(weight_type, n, k, 11))
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(weight_type))
    many = torch.ops.lenserve.quant_linear(x, w.data, w.weight_type, n, None)
    for i in sorted({0, 31, 32, min(100, rows - 1), rows - 1}):
        one = torch.ops.lenserve.quant_linear(x[i : i + 1], w.data, w.weight_type, n, None)
        assert torch.equal(one[0], many[i]), i


@pytest.mark.parametrize("weight_type", X8)
def test_vnni_kernel_equals_avx2_bit_for_bit(weight_type):
    """The VNNI GEMM adds the same exact int32 products as AVX2's madd + add and scales them in
    the same order, so the outputs are identical, at every tile remainder (up to AVX2's limit)."""
    if "avx512_vnni" not in _isas():
        pytest.skip("this CPU lacks AVX-512 VNNI")
    before = torch.ops.lenserve.quant_kernel_isa("")
    try:
        avx2_limit = 40 if weight_type == quant.Q4_K else 256  # AVX2's integer GEMM limit (quant_linear.cpp)
        for m in (m for m in (1, 3, 4, 7, 8, 9, 16, 21, 40, 256) if m <= avx2_limit):
            for n, k in zip((8, 40, 304), widths(weight_type, 32, 608, 96)):
                seed = weight_type * 1000 + m + n + k
                w = interleaved(random_rows(weight_type, n, k, seed))
                x = torch.from_numpy(np.random.default_rng(seed).standard_normal((m, k)).astype(np.float32))
                out = {}
                for isa in ("avx512_vnni", "avx2"):
                    torch.ops.lenserve.quant_kernel_isa(isa)
                    out[isa] = torch.ops.lenserve.quant_linear(x, w.data, w.weight_type, n, None)
                assert torch.equal(out["avx512_vnni"], out["avx2"]), (m, n, k)
    finally:
        torch.ops.lenserve.quant_kernel_isa(before)


def test_kernel_isa_switch():
    """Asking changes nothing; an unknown or unavailable instruction set is refused."""
    current = torch.ops.lenserve.quant_kernel_isa("")
    assert current in ("avx512_vnni", "avx2", "scalar")
    assert torch.ops.lenserve.quant_kernel_isa("") == current
    with pytest.raises(RuntimeError, match="unknown instruction set"):
        torch.ops.lenserve.quant_kernel_isa("sse9")
    if current != "avx512_vnni":
        with pytest.raises(RuntimeError, match="lacks AVX-512 VNNI"):
            torch.ops.lenserve.quant_kernel_isa("avx512_vnni")
    assert torch.ops.lenserve.quant_kernel_isa(current) == current


@pytest.mark.parametrize("weight_type", X8)
def test_interleaved_rows_agree_with_file_rows(weight_type):
    """Same sums as the file-layout kernels: the embedding rows exactly, the linear to fp32
    rounding (both are exact integer dots per block), one row alone or inside 160 (panel path)."""
    k = 512
    w = random_rows(weight_type, 48, k, 9)
    x8 = interleaved(w)
    ids = torch.tensor([0, 47, 8, 8, 23], dtype=torch.int64)
    assert torch.equal(torch.ops.lenserve.quant_embedding(ids, x8.data, x8.weight_type, k),
                       torch.ops.lenserve.quant_embedding(ids, w.data, w.weight_type, k))
    x = torch.randn(160, k)
    many = torch.ops.lenserve.quant_linear(x, x8.data, x8.weight_type, 48, None)
    for i in (0, 77, 159):
        for rows in (x8, w):
            one = torch.ops.lenserve.quant_linear(x[i : i + 1], rows.data, rows.weight_type, 48, None)
            torch.testing.assert_close(one[0], many[i], rtol=5e-5, atol=2e-4)
    with pytest.raises(RuntimeError, match="multiple of 8 rows"):
        torch.ops.lenserve.quant_linear(x, x8.data[:12], x8.weight_type, 12, None)
