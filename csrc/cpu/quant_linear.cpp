// Linear layers and embedding lookups over weights kept in their GGUF form (quant_blocks.h):
// Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K, and F16 / BF16 / F32 rows.
//
// Decode (up to kMaxDecodeRows rows of x; interleaved rows up to kMaxInterleavedDecodeRows, and at
// every row count on a CPU with AVX-512 VNNI) is bound by the weight bytes read, so each weight row
// is read once and dotted with every row of x while it is in L1:
//   - Q8_0 / Q4_0 / Q4_1 / Q5_0 / Q5_1: x is quantized per 32-block to int16 (BlockQAct) once per
//     call and the dots are integer (_mm256_madd_epi16): a block is widened to int16 once for up
//     to four rows of x (quant_legacy.cpp says why int16 and why not fp32 activations). Rows
//     interleaved eight at a time (quant_interleaved.cpp; Q4_K too) keep 8 rows in a register.
//   - Q4_K / Q5_K / Q6_K in file rows: the same integer dots per 32-element run
//     (quant_kquants.cpp), one row at a time against up to four rows of x.
//   - 16-bit rows: the row is unpacked to fp32 in L1 and dotted with each row of x.
// Larger batches (prefill) are compute bound: a group of 16-row panels is unpacked to fp32 once
// and every row block of x runs the fp32 6x16 micro-kernel over it (panel_kernel.h), the same
// loop as the packed fp32 linear, so the unpack cost is shared by all rows. For the integer-dot
// types x is first rounded exactly as decode rounds it (d * q per 32-block), so a row's result
// does not depend on how many rows share the step: decode and prefill compute the same sums up
// to fp32 rounding, and packed batching agrees with one-at-a-time as it does in fp32.
#include <cstdlib>
#include <ATen/Parallel.h>

#include <cstring>
#include <memory>
#include <vector>

#include "cpu/common.h"
#include "cpu/panel_kernel.h"
#include "cpu/quant_blocks.h"

namespace lenserve {
namespace quant {

int64_t block_elems(int64_t type) {
  if (is_interleaved(type)) return can_interleave(base_type(type)) ? block_elems(base_type(type)) : 0;
  switch (type) {
    case kF32:
    case kF16:
    case kBF16: return 1;
    case kQ8_0:
    case kQ4_0:
    case kQ4_1:
    case kQ5_0:
    case kQ5_1: return QK;
    case kQ4_K:
    case kQ5_K:
    case kQ6_K: return QK_K;
    default: return 0;
  }
}

int64_t block_bytes(int64_t type) {
  if (is_interleaved(type)) return can_interleave(base_type(type)) ? block_bytes(base_type(type)) : 0;
  switch (type) {
    case kF32: return 4;
    case kF16:
    case kBF16: return 2;
    case kQ8_0: return sizeof(BlockQ8_0);
    case kQ4_0: return sizeof(BlockQ4_0);
    case kQ4_1: return sizeof(BlockQ4_1);
    case kQ5_0: return sizeof(BlockQ5_0);
    case kQ5_1: return sizeof(BlockQ5_1);
    case kQ4_K: return sizeof(BlockQ4_K);
    case kQ5_K: return sizeof(BlockQ5_K);
    case kQ6_K: return sizeof(BlockQ6_K);
    default: return 0;
  }
}

}  // namespace quant

namespace {

using namespace quant;

constexpr int64_t kMaxDecodeRows = 16;
// Interleaved rows keep the integer GEMM up to 256 rows of x. Measured on SmolLM2's four layer
// matrices (2-core EPYC, AVX2, ms a layer, two runs; LENSERVE_QUANT_INT_ROWS forces the path):
// integer GEMM 8.2/6.8 at 128 rows, 8.7/8.5 at 160, 14.2/13.6 at 256, 18.5/19.4 at 320; the panel
// path (unpack a panel of blocks to fp32, then the 6x16 micro-kernel) 8.3/6.4, 10.2/9.2,
// 16.4/16.8, 16.4/17.4. The integer GEMM's cost per row is flat (~0.055 ms a layer); the panel
// path's falls with rows as its unpack is shared (~0.045 at 2048), so it wins past ~300. A step
// that carries a prompt chunk beside its decodes (stall-free batching: 100-250 rows at the CPU's
// default ITL target) stays on the integer GEMM.
constexpr int64_t kMaxInterleavedDecodeRows = 256;
// With AVX-512 VNNI (quant_vnni.cpp) the integer GEMM wins at every row count. Measured on the
// same four matrices (2-core EPYC with AVX-512, ms a layer per row, best of 7, both kernels in one
// process): VNNI 0.0252 at 8 rows, 0.0233 at 64, 0.0239 at 256, 0.0255 at 512, 0.0251 at 1024;
// AVX2 integer 0.0353, 0.0338, 0.0337, 0.0343, 0.0363; the panel path 0.036-0.044 from 257 up.
// vpdpwssd does the AVX2 kernel's madd + add in one instruction and its 32 registers hold an
// 8-row tile, so the unpacking that the panel path shares over all rows costs less here than the
// panel path's fp32 FMAs (half the multiply-adds per instruction).
constexpr int64_t kMaxVnniDecodeRows = int64_t{1} << 40;
// Q4_Kx8 on AVX2 (4 rows a tile; each sub-block pair takes two int32 sums a row and its scales):
// the integer GEMM against the panel path from file rows, 1B-Llama and SmolLM2 shapes, best of 8:
// 1.39-1.43x as fast at 17 rows, 1.00-1.14x at 32, 0.87-0.96x at 48, 0.84-0.90x at 64.
constexpr int64_t kMaxQ4KAvx2DecodeRows = 40;

// LENSERVE_QUANT_INT_ROWS overrides it (read once): for measuring the crossover on another CPU.
int64_t max_interleaved_decode_rows(int64_t type) {
  static const int64_t forced = [] {
    const char* env = std::getenv("LENSERVE_QUANT_INT_ROWS");
    return env != nullptr && std::atoll(env) > 0 ? static_cast<int64_t>(std::atoll(env)) : int64_t{0};
  }();
  if (forced > 0) return forced;
  if (use_vnni()) return kMaxVnniDecodeRows;
  return base_type(type) == kQ4_K ? kMaxQ4KAvx2DecodeRows : kMaxInterleavedDecodeRows;
}

void dequant_row_f16(const uint8_t* row, float* out, int64_t K) {
  const auto* h = reinterpret_cast<const uint16_t*>(row);
  int64_t k = 0;
#ifdef LENSERVE_AVX2
  for (; k + 8 <= K; k += 8)
    _mm256_storeu_ps(out + k, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h + k))));
#endif
  for (; k < K; ++k) out[k] = fp16_to_float(h[k]);
}

void dequant_row_bf16(const uint8_t* row, float* out, int64_t K) {
  const auto* h = reinterpret_cast<const uint16_t*>(row);
  for (int64_t k = 0; k < K; ++k) {
    const uint32_t bits = static_cast<uint32_t>(h[k]) << 16;
    std::memcpy(out + k, &bits, sizeof(float));
  }
}

void dequant_row(int64_t type, const uint8_t* row, float* out, int64_t K) {
  switch (type) {
    case kF32: std::memcpy(out, row, K * sizeof(float)); break;
    case kF16: dequant_row_f16(row, out, K); break;
    case kBF16: dequant_row_bf16(row, out, K); break;
    case kQ8_0: dequant_row_q8_0(row, out, K); break;
    case kQ4_0: dequant_row_q4_0(row, out, K); break;
    case kQ4_1: dequant_row_q4_1(row, out, K); break;
    case kQ5_0: dequant_row_q5_0(row, out, K); break;
    case kQ5_1: dequant_row_q5_1(row, out, K); break;
    case kQ4_K: dequant_row_q4_k(row, out, K); break;
    case kQ5_K: dequant_row_q5_k(row, out, K); break;
    default: dequant_row_q6_k(row, out, K); break;
  }
}

bool is_kquant(int64_t type) { return type == kQ4_K || type == kQ5_K || type == kQ6_K; }

// LENSERVE_KQUANT_DOTS=fp32 (read once) puts K-quants in file rows back on fp32 activations against
// unpacked rows, the path before their integer dots: for measuring one against the other
// (benchmarks/bench_quant_linear.py --kquants). Interleaved Q4_Kx8 rows have only integer dots.
bool kquant_integer_dots() {
  static const bool on = [] {
    const char* env = std::getenv("LENSERVE_KQUANT_DOTS");
    return env == nullptr || std::strcmp(env, "fp32") != 0;
  }();
  return on;
}

// Types whose decode dots are integer (x rounded to int16 activation blocks; prefill rounds x the same way).
bool has_integer_dot(int64_t type) {
  return can_interleave(base_type(type)) || (is_kquant(type) && kquant_integer_dots());
}

// Rows n0 .. n0 + count - 1 of a matrix of `type` (interleaved or not) as fp32 rows K apart:
// an interleaved group is unpacked once for all of its rows asked for.
void dequant_rows(int64_t type, const uint8_t* w, int64_t row_bytes, int64_t n0, int64_t count, float* out, int64_t K) {
  if (!is_interleaved(type)) {
    for (int64_t n = n0; n < n0 + count; ++n) dequant_row(type, w + n * row_bytes, out + (n - n0) * K, K);
    return;
  }
  for (int64_t g = n0 / 8; g * 8 < n0 + count; ++g) {
    const int64_t r0 = std::max<int64_t>(n0, g * 8) - g * 8, r1 = std::min<int64_t>(n0 + count, g * 8 + 8) - g * 8;
    dequant_group_x8(base_type(type), w + g * 8 * row_bytes, K / QK, static_cast<int>(r0), static_cast<int>(r1),
                     out + (g * 8 + r0 - n0) * K, K);
  }
}

float dot_f32(const float* a, const float* b, int64_t K) {
  using namespace vec;
  Vec8 s0 = zero(), s1 = zero();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    s0 = fma(vload(a + k), vload(b + k), s0);
    s1 = fma(vload(a + k + 8), vload(b + k + 8), s1);
  }
  for (; k + 8 <= K; k += 8) s0 = fma(vload(a + k), vload(b + k), s0);
  float sum = reduce_add(add(s0, s1));
  for (; k < K; ++k) sum += a[k] * b[k];
  return sum;
}

// The activation blocks of one call, in a buffer each calling thread keeps (grown, never shrunk):
// a std::vector zero-filled its 72-byte blocks by copying, ~3% of a batch-8 decode step in
// perf, and a large prefill allocated megabytes afresh per call.
BlockQAct* act_blocks(int64_t n) {
  static thread_local std::unique_ptr<BlockQAct[]> buf;
  static thread_local int64_t capacity = 0;
  if (capacity < n) {
    buf.reset(new BlockQAct[n]);
    capacity = n;
  }
  return buf.get();
}

}  // namespace

namespace quant {

int64_t row_bytes_of(int64_t type, int64_t K, const char* what) {
  const int64_t be = block_elems(type);
  LS_CHECK(be > 0, what, ": weight type ", type, " is not supported (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K)");
  LS_CHECK(K % be == 0, what, ": ", K, " features is not a multiple of the type's block of ", be);
  return K / be * block_bytes(type);
}

// Whether quant_linear takes M rows of x against `type` on its decode path (decode_rows), else
// the panel path (prefill_rows).
bool on_decode_path(int64_t type, int64_t M) {
  return M <= (is_interleaved(type) ? max_interleaved_decode_rows(type) : kMaxDecodeRows);
}

bool on_integer_decode_path(int64_t type, int64_t M) { return has_integer_dot(type) && on_decode_path(type, M); }

int64_t decode_cols_unit(int64_t type) { return is_interleaved(type) ? 8 : 1; }

void decode_cols(int64_t type, const uint8_t* w, int64_t row_bytes, const BlockQAct* xq, int64_t nb, int64_t M,
                 int64_t N, int64_t n0, int64_t n1, float* out) {
  if (is_interleaved(type)) {
    gemm_x8(base_type(type), w, row_bytes, xq, nb, M, N, n0 / 8, n1 / 8, out);
    return;
  }
  const auto dot = is_kquant(type) ? dot_row_act_k : dot_row_act;
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t m = 0; m < M; m += 4)
      dot(type, w + n * row_bytes, xq + m * nb, nb, static_cast<int>(std::min<int64_t>(4, M - m)), out + m * N + n, N);
}

}  // namespace quant

namespace {

void decode_rows(const float* x, int64_t ldx, int64_t M, const uint8_t* w, int64_t row_bytes, int64_t type, int64_t K,
                 int64_t N, float* out) {
  const int64_t grain = std::max<int64_t>(1, (int64_t{32} << 10) / row_bytes);
  if (has_integer_dot(type)) {
    const int64_t nb = K / QK;
    BlockQAct* xq = act_blocks(M * nb);
    at::parallel_for(0, M, row_grain(K), [&](int64_t m0, int64_t m1) {
      for (int64_t m = m0; m < m1; ++m) quantize_row_act(x + m * ldx, xq + m * nb, K);
    });
    // ~32 KiB of weights per chunk of work: a decode step's small matrices still split over threads
    const int64_t unit = decode_cols_unit(type);
    at::parallel_for(0, N / unit, std::max<int64_t>(1, (int64_t{32} << 10) / (unit * row_bytes)), [&](int64_t u0, int64_t u1) {
      decode_cols(type, w, row_bytes, xq, nb, M, N, u0 * unit, u1 * unit, out);
    });
    return;
  }
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
    std::vector<float> buf(K);
    for (int64_t n = n0; n < n1; ++n) {
      dequant_row(type, w + n * row_bytes, buf.data(), K);
      for (int64_t m = 0; m < M; ++m) out[m * N + n] = dot_f32(buf.data(), x + m * ldx, K);
    }
  });
}

#ifdef LENSERVE_AVX2
// In place: row i of the 8 x 8 block (r[0..7]) becomes its column i.
inline void transpose8(__m256* r) {
  const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
  const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
  const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
  const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  const __m256 s0 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(1, 0, 1, 0)), s1 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(3, 2, 3, 2));
  const __m256 s2 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(1, 0, 1, 0)), s3 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(3, 2, 3, 2));
  const __m256 s4 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(1, 0, 1, 0)), s5 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(3, 2, 3, 2));
  const __m256 s6 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(1, 0, 1, 0)), s7 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(3, 2, 3, 2));
  r[0] = _mm256_permute2f128_ps(s0, s4, 0x20);
  r[1] = _mm256_permute2f128_ps(s1, s5, 0x20);
  r[2] = _mm256_permute2f128_ps(s2, s6, 0x20);
  r[3] = _mm256_permute2f128_ps(s3, s7, 0x20);
  r[4] = _mm256_permute2f128_ps(s0, s4, 0x31);
  r[5] = _mm256_permute2f128_ps(s1, s5, 0x31);
  r[6] = _mm256_permute2f128_ps(s2, s6, 0x31);
  r[7] = _mm256_permute2f128_ps(s3, s7, 0x31);
}
#endif

// nrows (<= 16) unpacked rows [nrows][K] into a panel [K][16] (rows past nrows zero). A full
// panel goes by 8 x 8 register transposes: the element-by-element copy strided every read by K
// floats and took most of a batched decode step's unpacking time.
void rows_to_panel(const float* rows, int64_t K, int64_t nrows, float* panel) {
  int64_t k0 = 0;
#ifdef LENSERVE_AVX2
  if (nrows == kPanel) {
    for (; k0 + 8 <= K; k0 += 8)
      for (int r0 = 0; r0 < kPanel; r0 += 8) {
        __m256 v[8];
        for (int i = 0; i < 8; ++i) v[i] = _mm256_loadu_ps(rows + (r0 + i) * K + k0);
        transpose8(v);
        for (int i = 0; i < 8; ++i) _mm256_storeu_ps(panel + (k0 + i) * kPanel + r0, v[i]);
      }
  }
#endif
  for (int64_t k = k0; k < K; ++k) {
    float* dst = panel + k * kPanel;
    for (int64_t r = 0; r < nrows; ++r) dst[r] = rows[r * K + k];
    for (int64_t r = nrows; r < kPanel; ++r) dst[r] = 0.f;
  }
}

// Rows n0 .. n0 + nrows - 1 (whole interleaved groups) straight into a panel where the type has a
// direct kernel (panel_from_group_x8), without the rows in between: unpacking Q4_Kx8 rows one by
// one strides through every chunk, which made the panel path 1.1-1.9x slower than from file rows.
bool panel_from_groups(int64_t type, const uint8_t* w, int64_t row_bytes, int64_t n0, int64_t nrows, int64_t K, float* panel) {
  if (!is_interleaved(type)) return false;
  for (int64_t g = 0; g * 8 < nrows; ++g)
    if (!panel_from_group_x8(base_type(type), w + (n0 + 8 * g) * row_bytes, K / QK, panel + 8 * g, kPanel)) return false;
  if (nrows < kPanel)  // one group in the last panel: its other 8 columns are zero
    for (int64_t k = 0; k < K; ++k) std::fill(panel + k * kPanel + nrows, panel + (k + 1) * kPanel, 0.f);
  return true;
}

void prefill_rows(const float* x, int64_t ldx, int64_t M, const uint8_t* w, int64_t row_bytes, int64_t type, int64_t K,
                  int64_t N, const float* bias, float* out) {
  const int64_t P = ceil_div(N, kPanel);
  const int64_t panel_floats = K * kPanel;
  // Panels unpacked together: at most ~256 KiB of fp32 (they stay in L2 while every row block of
  // x passes), and enough groups that both threads get several.
  const int64_t max_by_cache = std::max<int64_t>(1, (int64_t{256} << 10) / (panel_floats * 4));
  const int64_t threads = std::max(1, at::get_num_threads());
  const int64_t max_by_balance = std::max<int64_t>(1, P / (4 * threads));
  // A long prefill splits its rows among the threads, each unpacking every panel (a few percent of
  // the work at these row counts), so that no thread idles at the end when the panel groups do not
  // divide evenly (SmolLM2's qkv and o: 9 groups over 2 threads cost ~10%).
  const int64_t m_parts = M >= 128 * threads ? threads : 1;
  const int64_t G = m_parts > 1 ? max_by_cache : std::min(max_by_cache, max_by_balance);
  const int64_t num_groups = ceil_div(P, G);
  const int64_t part_rows = ceil_div(M, m_parts);
  const int64_t MB = std::max<int64_t>(kMaxMR, (64 * 1024 / K) / kMaxMR * kMaxMR);
  std::unique_ptr<float[]> rounded;  // not value-initialised: every element is written
  if (has_integer_dot(type)) {
    rounded.reset(new float[M * K]);
    float* r = rounded.get();
    at::parallel_for(0, M, row_grain(K), [&](int64_t m0, int64_t m1) {
      for (int64_t m = m0; m < m1; ++m) round_row_act(x + m * ldx, r + m * K, K);
    });
    x = r;
    ldx = K;
  }
  // item i: rows part i / num_groups against panel group i % num_groups
  at::parallel_for(0, num_groups * m_parts, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> rows(kPanel * K);
    std::vector<float> panels(G * panel_floats);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t g = i % num_groups, m_lo = (i / num_groups) * part_rows, m_hi = std::min(M, m_lo + part_rows);
      const int64_t p0 = g * G, p1 = std::min(P, p0 + G);
      for (int64_t p = p0; p < p1; ++p) {
        float* panel = panels.data() + (p - p0) * panel_floats;
        const int64_t nrows = std::min<int64_t>(kPanel, N - p * kPanel);
        if (!panel_from_groups(type, w, row_bytes, p * kPanel, nrows, K, panel)) {
          dequant_rows(type, w, row_bytes, p * kPanel, nrows, rows.data(), K);
          rows_to_panel(rows.data(), K, nrows, panel);
        }
      }
      for (int64_t m0 = m_lo; m0 < m_hi; m0 += MB) {
        const int64_t m1 = std::min(m_hi, m0 + MB);
        for (int64_t p = p0; p < p1; ++p)
          panel_rows(x, ldx, panels.data() + (p - p0) * panel_floats, K, N, p * kPanel, bias, out, m0, m1);
      }
    }
  });
}

}  // namespace

torch::Tensor quant_linear_cpu(const torch::Tensor& x, const torch::Tensor& weight, int64_t weight_type,
                               int64_t out_features, const std::optional<torch::Tensor>& bias) {
  LS_CHECK_CPU(x);
  LS_CHECK_CPU(weight);
  LS_CHECK_DTYPE(x, at::kFloat);
  LS_CHECK_DTYPE(weight, at::kByte);
  LS_CHECK_DIM(x, 2);
  LS_CHECK_DIM(weight, 2);
  LS_CHECK_CONTIGUOUS(weight);
  const int64_t M = x.size(0), K = x.size(1), N = out_features;
  const int64_t row_bytes = row_bytes_of(weight_type, K, "quant_linear");
  LS_CHECK(weight.size(0) == N && weight.size(1) == row_bytes, "quant_linear: weight must be [", N, ", ", row_bytes,
           "] bytes for ", N, " rows of ", K, " features of type ", weight_type, ", got ", weight.sizes());
  LS_CHECK(x.stride(1) == 1 || K == 1, "quant_linear: x rows must be contiguous");
  LS_CHECK(!is_interleaved(weight_type) || N % 8 == 0, "quant_linear: interleaved weights need a multiple of 8 rows, got ", N);
  const float* b = nullptr;
  if (bias.has_value()) {
    LS_CHECK_CPU(*bias);
    LS_CHECK_DTYPE(*bias, at::kFloat);
    LS_CHECK_CONTIGUOUS(*bias);
    LS_CHECK(bias->dim() == 1 && bias->size(0) == N, "quant_linear: bias must be [", N, "]");
    b = bias->data_ptr<float>();
  }
  auto out = torch::empty({M, N}, x.options().memory_format(at::MemoryFormat::Contiguous));
  if (M == 0) return out;
  const float* xp = x.data_ptr<float>();
  const uint8_t* wp = weight.data_ptr<uint8_t>();
  float* op = out.data_ptr<float>();
  if (on_decode_path(weight_type, M)) {
    decode_rows(xp, x.stride(0), M, wp, row_bytes, weight_type, K, N, op);
    if (b != nullptr)
      for (int64_t m = 0; m < M; ++m)
        for (int64_t n = 0; n < N; ++n) op[m * N + n] += b[n];
  } else {
    prefill_rows(xp, x.stride(0), M, wp, row_bytes, weight_type, K, N, b, op);
  }
  return out;
}

void quant_interleave_cpu(torch::Tensor& weight, int64_t weight_type) {
  LS_CHECK_CPU(weight);
  LS_CHECK_DTYPE(weight, at::kByte);
  LS_CHECK_DIM(weight, 2);
  LS_CHECK_CONTIGUOUS(weight);
  LS_CHECK(can_interleave(weight_type), "quant_interleave: only Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 and Q4_K rows interleave, got type ", weight_type);
  const int64_t N = weight.size(0);
  LS_CHECK(N % 8 == 0, "quant_interleave: the rows must be a multiple of 8, got ", N);
  LS_CHECK(weight.size(1) % block_bytes(weight_type) == 0, "quant_interleave: rows of ", weight.size(1),
           " bytes are not whole blocks of type ", weight_type);
  interleave_rows(weight_type, weight.data_ptr<uint8_t>(), N, weight.size(1));
}

torch::Tensor quant_embedding_cpu(const torch::Tensor& ids, const torch::Tensor& weight, int64_t weight_type, int64_t dim) {
  LS_CHECK_CPU(ids);
  LS_CHECK_CPU(weight);
  LS_CHECK_DTYPE(ids, at::kLong);
  LS_CHECK_DTYPE(weight, at::kByte);
  LS_CHECK_DIM(ids, 1);
  LS_CHECK_DIM(weight, 2);
  LS_CHECK_CONTIGUOUS(weight);
  const int64_t row_bytes = row_bytes_of(weight_type, dim, "quant_embedding");
  LS_CHECK(weight.size(1) == row_bytes, "quant_embedding: weight rows must be ", row_bytes, " bytes, got ", weight.size(1));
  const int64_t T = ids.size(0), V = weight.size(0);
  LS_CHECK(!is_interleaved(weight_type) || V % 8 == 0, "quant_embedding: interleaved weights need a multiple of 8 rows, got ", V);
  auto ids_c = ids.contiguous();
  const int64_t* id = ids_c.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t) LS_CHECK(id[t] >= 0 && id[t] < V, "quant_embedding: id ", id[t], " out of [0, ", V, ")");
  auto out = torch::empty({T, dim}, torch::kFloat);
  const uint8_t* wp = weight.data_ptr<uint8_t>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, T, row_grain(dim), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) dequant_rows(weight_type, wp, row_bytes, id[t], 1, op + t * dim, dim);
  });
  return out;
}

}  // namespace lenserve
