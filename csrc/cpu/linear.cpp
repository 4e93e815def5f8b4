// fp32 linear layer y = x Wᵀ + b over weights packed once into 16-row panels.
//
// Layout: W [N, K] becomes P = ceil(N / 16) panels, panel p holding rows 16p..16p+15 interleaved
// by k: packed[p][k][0..15] = W[16p + 0..15][k] (rows past N are zero). A panel is read front to
// back, so decode (a few rows of x) streams the weights sequentially at memory bandwidth, and a
// larger batch reuses each panel from cache for every row block of x.
//
// Micro-kernel: MR (1..6) rows of x times one panel, 2 x MR eight-lane accumulators, one pass over
// K: per k two panel loads, MR broadcasts of x, 2 x MR FMAs (the BLIS 6x16 shape for AVX2).
// Threads split panels; for a large batch the rows of x are blocked so a block stays in L2 while
// the panels stream past it.
#include <ATen/Parallel.h>
#include <sys/mman.h>

#include <cstdlib>
#include <cstring>

#include "cpu/common.h"
#include "cpu/vec.h"  // LENSERVE_AVX2

namespace lenserve {
namespace {

constexpr int64_t kPanel = 16;
constexpr int kMaxMR = 6;

// Stores MR x 16 results (plus bias), only `ncols` columns of them for a matrix's last panel.
template <int MR>
inline void store_tile(const float (*acc)[kPanel], const float* __restrict__ bias, float* __restrict__ out,
                       int64_t ldo, int64_t ncols) {
  for (int m = 0; m < MR; ++m)
    for (int64_t j = 0; j < ncols; ++j) out[m * ldo + j] = acc[m][j] + (bias != nullptr ? bias[j] : 0.f);
}

#ifdef LENSERVE_AVX2
template <int MR>
inline void micro_kernel(const float* __restrict__ x, int64_t ldx, const float* __restrict__ panel, int64_t K,
                         const float* __restrict__ bias, float* __restrict__ out, int64_t ldo, int64_t ncols) {
  // Plain __m256 locals, fully unrolled over MR, so the 2 x MR accumulators live in registers.
  __m256 c0[MR], c1[MR];
#pragma GCC unroll 6
  for (int m = 0; m < MR; ++m) c0[m] = c1[m] = _mm256_setzero_ps();
  const float* w = panel;
  int64_t k = 0;
  if constexpr (MR == 1) {
    // One row of x (decode): a second pair of accumulators over odd k doubles the independent
    // FMA chains, so the loop runs at the speed memory delivers the panel, not at FMA latency.
    __m256 d0 = _mm256_setzero_ps(), d1 = _mm256_setzero_ps();
    for (; k + 2 <= K; k += 2, w += 2 * kPanel) {
      const __m256 xa = _mm256_broadcast_ss(x + k), xb = _mm256_broadcast_ss(x + k + 1);
      c0[0] = _mm256_fmadd_ps(xa, _mm256_loadu_ps(w), c0[0]);
      c1[0] = _mm256_fmadd_ps(xa, _mm256_loadu_ps(w + 8), c1[0]);
      d0 = _mm256_fmadd_ps(xb, _mm256_loadu_ps(w + 16), d0);
      d1 = _mm256_fmadd_ps(xb, _mm256_loadu_ps(w + 24), d1);
    }
    c0[0] = _mm256_add_ps(c0[0], d0);
    c1[0] = _mm256_add_ps(c1[0], d1);
  }
  for (; k < K; ++k, w += kPanel) {
    if constexpr (MR > 1) _mm_prefetch(reinterpret_cast<const char*>(w + 16 * kPanel), _MM_HINT_T0);
    const __m256 w0 = _mm256_loadu_ps(w), w1 = _mm256_loadu_ps(w + 8);
#pragma GCC unroll 6
    for (int m = 0; m < MR; ++m) {
      const __m256 xb = _mm256_broadcast_ss(x + m * ldx + k);
      c0[m] = _mm256_fmadd_ps(xb, w0, c0[m]);
      c1[m] = _mm256_fmadd_ps(xb, w1, c1[m]);
    }
  }
  if (ncols == kPanel) {
    const __m256 b0 = bias != nullptr ? _mm256_loadu_ps(bias) : _mm256_setzero_ps();
    const __m256 b1 = bias != nullptr ? _mm256_loadu_ps(bias + 8) : _mm256_setzero_ps();
#pragma GCC unroll 6
    for (int m = 0; m < MR; ++m) {
      _mm256_storeu_ps(out + m * ldo, _mm256_add_ps(c0[m], b0));
      _mm256_storeu_ps(out + m * ldo + 8, _mm256_add_ps(c1[m], b1));
    }
    return;
  }
  float acc[MR][kPanel];
#pragma GCC unroll 6
  for (int m = 0; m < MR; ++m) {
    _mm256_storeu_ps(acc[m], c0[m]);
    _mm256_storeu_ps(acc[m] + 8, c1[m]);
  }
  store_tile<MR>(acc, bias, out, ldo, ncols);
}
#else
template <int MR>
inline void micro_kernel(const float* __restrict__ x, int64_t ldx, const float* __restrict__ panel, int64_t K,
                         const float* __restrict__ bias, float* __restrict__ out, int64_t ldo, int64_t ncols) {
  float acc[MR][kPanel] = {};
  const float* w = panel;
  for (int64_t k = 0; k < K; ++k, w += kPanel)
    for (int m = 0; m < MR; ++m) {
      const float xv = x[m * ldx + k];
      for (int64_t j = 0; j < kPanel; ++j) acc[m][j] += xv * w[j];
    }
  store_tile<MR>(acc, bias, out, ldo, ncols);
}
#endif

// Rows [m0, m1) of x times panel p.
inline void panel_rows(const float* x, int64_t ldx, const float* packed, int64_t K, int64_t N, const float* bias,
                       float* out, int64_t p, int64_t m0, int64_t m1) {
  const float* panel = packed + p * K * kPanel;
  const int64_t n0 = p * kPanel;
  const int64_t ncols = std::min<int64_t>(kPanel, N - n0);
  const float* b = bias != nullptr ? bias + n0 : nullptr;
  int64_t m = m0;
  for (; m + kMaxMR <= m1; m += kMaxMR) micro_kernel<kMaxMR>(x + m * ldx, ldx, panel, K, b, out + m * N + n0, N, ncols);
  const float* xm = x + m * ldx;
  float* om = out + m * N + n0;
  switch (m1 - m) {
    case 5: micro_kernel<5>(xm, ldx, panel, K, b, om, N, ncols); break;
    case 4: micro_kernel<4>(xm, ldx, panel, K, b, om, N, ncols); break;
    case 3: micro_kernel<3>(xm, ldx, panel, K, b, om, N, ncols); break;
    case 2: micro_kernel<2>(xm, ldx, panel, K, b, om, N, ncols); break;
    case 1: micro_kernel<1>(xm, ldx, panel, K, b, om, N, ncols); break;
    default: break;
  }
}

// Zeroed fp32 storage for packed weights. Large ones are 2 MiB aligned and their whole 2 MiB
// stretches advised into transparent huge pages, so streaming them at decode does not walk the
// TLB every 4 KiB; the tail stays in small pages, so no memory is spent on rounding up.
torch::Tensor alloc_weights(at::IntArrayRef sizes) {
  int64_t numel = 1;
  for (auto s : sizes) numel *= s;
  const size_t bytes = static_cast<size_t>(numel) * sizeof(float);
  constexpr size_t kHuge = size_t{2} << 20;
  if (bytes < kHuge) return torch::zeros(sizes, torch::kFloat);
  void* ptr = nullptr;
  TORCH_CHECK(posix_memalign(&ptr, kHuge, bytes) == 0, "pack_linear_weight: out of memory (", bytes, " bytes)");
#ifdef MADV_HUGEPAGE
  madvise(ptr, bytes / kHuge * kHuge, MADV_HUGEPAGE);  // advice only: without THP, ordinary pages
#endif
  std::memset(ptr, 0, bytes);
  return torch::from_blob(ptr, sizes, [](void* p) { std::free(p); }, torch::TensorOptions().dtype(torch::kFloat));
}

}  // namespace

torch::Tensor pack_linear_weight_cpu(const torch::Tensor& weight) {
  LS_CHECK_CPU(weight);
  LS_CHECK_DIM(weight, 2);
  LS_CHECK_DTYPE(weight, at::kFloat);
  const int64_t N = weight.size(0), K = weight.size(1);
  TORCH_CHECK(N > 0 && K > 0, "pack_linear_weight: empty weight ", weight.sizes());
  const int64_t P = ceil_div(N, kPanel);
  auto w = weight.contiguous();
  auto packed = alloc_weights({P, K, kPanel});
  const float* src = w.data_ptr<float>();
  float* dst = packed.data_ptr<float>();
  at::parallel_for(0, P, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p)
      for (int64_t r = 0; r < kPanel && p * kPanel + r < N; ++r) {
        const float* row = src + (p * kPanel + r) * K;
        float* col = dst + p * K * kPanel + r;
        for (int64_t k = 0; k < K; ++k) col[k * kPanel] = row[k];
      }
  });
  return packed;
}

torch::Tensor packed_linear_cpu(const torch::Tensor& x, const torch::Tensor& packed, int64_t out_features,
                                const std::optional<torch::Tensor>& bias) {
  LS_CHECK_CPU(x);
  LS_CHECK_CPU(packed);
  LS_CHECK_DTYPE(x, at::kFloat);
  LS_CHECK_DTYPE(packed, at::kFloat);
  LS_CHECK_DIM(x, 2);
  LS_CHECK_DIM(packed, 3);
  LS_CHECK_CONTIGUOUS(packed);
  const int64_t M = x.size(0), K = x.size(1), N = out_features, P = packed.size(0);
  TORCH_CHECK(packed.size(2) == kPanel, "packed_linear: weight must come from pack_linear_weight (panels of 16)");
  TORCH_CHECK(packed.size(1) == K, "packed_linear: x has ", K, " features, the weight ", packed.size(1));
  TORCH_CHECK(N > (P - 1) * kPanel && N <= P * kPanel, "packed_linear: out_features ", N, " does not match ", P, " panels");
  TORCH_CHECK(x.stride(1) == 1 || K == 1, "packed_linear: x rows must be contiguous");
  const float* b = nullptr;
  if (bias.has_value()) {
    LS_CHECK_CPU(*bias);
    LS_CHECK_DTYPE(*bias, at::kFloat);
    LS_CHECK_CONTIGUOUS(*bias);
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, "packed_linear: bias must be [", N, "]");
    b = bias->data_ptr<float>();
  }
  auto out = torch::empty({M, N}, x.options().memory_format(at::MemoryFormat::Contiguous));
  if (M == 0) return out;
  const float* xp = x.data_ptr<float>();
  const int64_t ldx = x.stride(0);
  const float* wp = packed.data_ptr<float>();
  float* op = out.data_ptr<float>();
  // Rows of x per block: a block (MB x K floats) stays in L2 while panels stream past it.
  const int64_t MB = std::max<int64_t>(kMaxMR, (64 * 1024 / K) / kMaxMR * kMaxMR);
  const int64_t num_mblocks = ceil_div(M, MB);
  // Work items are (row block, panel); a thread takes a contiguous run of panels within a block.
  // Small matrices at small batch run on one thread: waking the other costs more than it saves.
  const int64_t flops_per_panel = 2 * std::min(M, MB) * K * kPanel;
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 18) / flops_per_panel);
  at::parallel_for(0, num_mblocks * P, grain, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t mb = i / P, p = i % P;
      const int64_t m0 = mb * MB, m1 = std::min(M, m0 + MB);
      panel_rows(xp, ldx, wp, K, N, b, op, p, m0, m1);
    }
  });
  return out;
}

}  // namespace lenserve
