// Small fp32 matrix products for the attention kernels' tiles (a few dozen rows, N <= 256),
// register-blocked as 6 rows x 16 columns: 12 accumulators, two loads of B and six broadcasts of
// A per k, which keeps AVX2's two FMA ports busy. A is read element by element (broadcast), so it
// may be laid out either way round (rs_a, cs_a); B and C are row-major.
#pragma once

#include <cstdint>

#include "cpu/vec.h"

namespace lenserve {

constexpr int64_t kGemmNR = 16;  // columns per micro-kernel call; N must be a multiple of it

namespace detail {

template <int MR>
inline void gemm_micro(int64_t K, const float* __restrict__ A, int64_t rs_a, int64_t cs_a, const float* __restrict__ B,
                       int64_t ldb, float* __restrict__ C, int64_t ldc, const float* __restrict__ alpha) {
  using namespace vec;
  Vec8 acc[MR][2];
  for (int r = 0; r < MR; ++r) {
    if (alpha) {
      const Vec8 a = set1(alpha[r]);
      acc[r][0] = mul(vload(C + r * ldc), a);
      acc[r][1] = mul(vload(C + r * ldc + kWidth), a);
    } else {
      acc[r][0] = zero();
      acc[r][1] = zero();
    }
  }
  for (int64_t k = 0; k < K; ++k) {
    const Vec8 b0 = vload(B + k * ldb);
    const Vec8 b1 = vload(B + k * ldb + kWidth);
    const float* a_k = A + k * cs_a;
    for (int r = 0; r < MR; ++r) {
      const Vec8 a = set1(a_k[r * rs_a]);
      acc[r][0] = fma(a, b0, acc[r][0]);
      acc[r][1] = fma(a, b1, acc[r][1]);
    }
  }
  for (int r = 0; r < MR; ++r) {
    vstore(C + r * ldc, acc[r][0]);
    vstore(C + r * ldc + kWidth, acc[r][1]);
  }
}

}  // namespace detail

// C[m, n] = alpha[m] * C[m, n] + sum_k A[m * rs_a + k * cs_a] * B[k * ldb + n]  for m < M, n < N.
// alpha == nullptr overwrites C instead. N must be a multiple of kGemmNR.
inline void tile_gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t rs_a, int64_t cs_a, const float* B,
                      int64_t ldb, float* C, int64_t ldc, const float* alpha) {
  constexpr int MR = 6;
  for (int64_t n0 = 0; n0 < N; n0 += kGemmNR) {
    int64_t m0 = 0;
    for (; m0 + MR <= M; m0 += MR)
      detail::gemm_micro<MR>(K, A + m0 * rs_a, rs_a, cs_a, B + n0, ldb, C + m0 * ldc + n0, ldc, alpha ? alpha + m0 : nullptr);
    const float* a = A + m0 * rs_a;
    float* c = C + m0 * ldc + n0;
    const float* al = alpha ? alpha + m0 : nullptr;
    switch (M - m0) {
      case 5: detail::gemm_micro<5>(K, a, rs_a, cs_a, B + n0, ldb, c, ldc, al); break;
      case 4: detail::gemm_micro<4>(K, a, rs_a, cs_a, B + n0, ldb, c, ldc, al); break;
      case 3: detail::gemm_micro<3>(K, a, rs_a, cs_a, B + n0, ldb, c, ldc, al); break;
      case 2: detail::gemm_micro<2>(K, a, rs_a, cs_a, B + n0, ldb, c, ldc, al); break;
      case 1: detail::gemm_micro<1>(K, a, rs_a, cs_a, B + n0, ldb, c, ldc, al); break;
      default: break;
    }
  }
}

}  // namespace lenserve
