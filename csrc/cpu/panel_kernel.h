// The fp32 panel micro-kernel shared by the packed fp32 linear (linear.cpp) and the quantized
// linear's large-batch path (quant_linear.cpp), which unpacks quantized rows into the same panels.
//
// Panel layout: 16 output rows interleaved by k, panel[k][0..15] = W[n0 + 0..15][k] (rows past N
// are zero). Micro-kernel: MR (1..6) rows of x times one panel, 2 x MR eight-lane accumulators,
// one pass over K: per k two panel loads, MR broadcasts of x, 2 x MR FMAs (the BLIS 6x16 shape
// for AVX2).
#pragma once

#include <algorithm>
#include <cstdint>

#include "cpu/vec.h"  // LENSERVE_AVX2

namespace lenserve {

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

// Rows [m0, m1) of x times one panel whose first output column is n0 (bias: the whole [N] or null).
inline void panel_rows(const float* x, int64_t ldx, const float* panel, int64_t K, int64_t N, int64_t n0,
                       const float* bias, float* out, int64_t m0, int64_t m1) {
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

}  // namespace lenserve
