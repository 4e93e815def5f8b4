// Q8_0, Q4_0 and Q4_1: unpacking to fp32 and integer dot products against int8 activations.
//
// The dot of a weight block with an activation block (xd, xs = xd * sum(xq)) is
//   Q8_0: wd * xd * sum(wq * xq)
//   Q4_0: wd * xd * sum(wq * xq) - 8 * wd * xs
//   Q4_1: wd * xd * sum(wq * xq) + wm * xs
// with sum(wq * xq) in int16/int32 lanes: _mm256_maddubs_epi16 (unsigned x signed bytes, pairs
// summed to int16; at most 2 * 128 * 127, so no saturation) then _mm256_madd_epi16 against ones.
#include <algorithm>
#include <cmath>
#include <cstring>

#include "cpu/quant_blocks.h"

namespace lenserve {
namespace quant {

void dequant_row_q8_0(const uint8_t* row, float* out, int64_t K) {
  const auto* b = reinterpret_cast<const BlockQ8_0*>(row);
  for (int64_t i = 0; i < K / QK; ++i, out += QK) {
    const float d = fp16_to_float(b[i].d);
    for (int j = 0; j < QK; ++j) out[j] = d * static_cast<float>(b[i].qs[j]);
  }
}

void dequant_row_q4_0(const uint8_t* row, float* out, int64_t K) {
  const auto* b = reinterpret_cast<const BlockQ4_0*>(row);
  for (int64_t i = 0; i < K / QK; ++i, out += QK) {
    const float d = fp16_to_float(b[i].d);
    for (int j = 0; j < QK / 2; ++j) {
      out[j] = d * static_cast<float>((b[i].qs[j] & 0xF) - 8);
      out[j + QK / 2] = d * static_cast<float>((b[i].qs[j] >> 4) - 8);
    }
  }
}

void dequant_row_q4_1(const uint8_t* row, float* out, int64_t K) {
  const auto* b = reinterpret_cast<const BlockQ4_1*>(row);
  for (int64_t i = 0; i < K / QK; ++i, out += QK) {
    const float d = fp16_to_float(b[i].d), m = fp16_to_float(b[i].m);
    for (int j = 0; j < QK / 2; ++j) {
      out[j] = d * static_cast<float>(b[i].qs[j] & 0xF) + m;
      out[j + QK / 2] = d * static_cast<float>(b[i].qs[j] >> 4) + m;
    }
  }
}

void quantize_row_q8_act(const float* x, BlockQ8Act* out, int64_t K) {
  for (int64_t i = 0; i < K / QK; ++i, x += QK) {
    float amax = 0.f;
    for (int j = 0; j < QK; ++j) amax = std::max(amax, std::fabs(x[j]));
    const float d = amax / 127.f;
    const float id = d > 0.f ? 1.f / d : 0.f;
    int sum = 0;
    for (int j = 0; j < QK; ++j) {
      const int q = static_cast<int>(std::nearbyint(x[j] * id));
      out[i].qs[j] = static_cast<int8_t>(q);
      sum += q;
    }
    out[i].d = d;
    out[i].s = d * static_cast<float>(sum);
  }
}

namespace {

#ifdef LENSERVE_AVX2
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// 16 bytes of nibbles -> 32 bytes 0..15 in element order (low nibbles are elements 0..15).
inline __m256i unpack_nibbles(const uint8_t* qs) {
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs));
  const __m128i mask = _mm_set1_epi8(0xF);
  return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(b, 4), mask), _mm_and_si128(b, mask));
}

// sum over 32 lanes of u * s (u unsigned, s signed bytes) as 8 float partial sums
inline __m256 dot_u8_s8(__m256i u, __m256i s) {
  const __m256i p16 = _mm256_maddubs_epi16(u, s);
  return _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, _mm256_set1_epi16(1)));
}

// MR activation rows against one weight row; the weight block is unpacked once for all rows.
template <int64_t TYPE, int MR>
void dot_rows(const uint8_t* row, const BlockQ8Act* xq, int64_t nb, float* out, int64_t ldo) {
  __m256 acc[MR];
  float offset[MR];
  for (int m = 0; m < MR; ++m) {
    acc[m] = _mm256_setzero_ps();
    offset[m] = 0.f;
  }
  for (int64_t i = 0; i < nb; ++i) {
    __m256i u;
    __m256i sign_src;
    float wd, wc = 0.f;  // wc: coefficient of xs (the -8 of Q4_0 or Q4_1's m)
    if constexpr (TYPE == kQ8_0) {
      const auto& b = reinterpret_cast<const BlockQ8_0*>(row)[i];
      const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b.qs));
      u = _mm256_sign_epi8(w, w);  // |w| (as unsigned: -128 -> 128)
      sign_src = w;
      wd = fp16_to_float(b.d);
    } else if constexpr (TYPE == kQ4_0) {
      const auto& b = reinterpret_cast<const BlockQ4_0*>(row)[i];
      u = unpack_nibbles(b.qs);
      wd = fp16_to_float(b.d);
      wc = -8.f * wd;
    } else {
      const auto& b = reinterpret_cast<const BlockQ4_1*>(row)[i];
      u = unpack_nibbles(b.qs);
      wd = fp16_to_float(b.d);
      wc = fp16_to_float(b.m);
    }
#pragma GCC unroll 4
    for (int m = 0; m < MR; ++m) {
      const BlockQ8Act& a = xq[m * nb + i];
      __m256i s = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.qs));
      if constexpr (TYPE == kQ8_0) s = _mm256_sign_epi8(s, sign_src);
      acc[m] = _mm256_fmadd_ps(dot_u8_s8(u, s), _mm256_set1_ps(wd * a.d), acc[m]);
      if constexpr (TYPE != kQ8_0) offset[m] += wc * a.s;
    }
  }
  for (int m = 0; m < MR; ++m) out[m * ldo] = hsum(acc[m]) + offset[m];
}
#else
template <int64_t TYPE, int MR>
void dot_rows(const uint8_t* row, const BlockQ8Act* xq, int64_t nb, float* out, int64_t ldo) {
  for (int m = 0; m < MR; ++m) {
    float sum = 0.f;
    for (int64_t i = 0; i < nb; ++i) {
      const BlockQ8Act& a = xq[m * nb + i];
      int dot = 0;
      float wd, wc = 0.f;
      if constexpr (TYPE == kQ8_0) {
        const auto& b = reinterpret_cast<const BlockQ8_0*>(row)[i];
        for (int j = 0; j < QK; ++j) dot += b.qs[j] * a.qs[j];
        wd = fp16_to_float(b.d);
      } else {
        const uint8_t* qs;
        if constexpr (TYPE == kQ4_0) {
          const auto& b = reinterpret_cast<const BlockQ4_0*>(row)[i];
          qs = b.qs;
          wd = fp16_to_float(b.d);
          wc = -8.f * wd;
        } else {
          const auto& b = reinterpret_cast<const BlockQ4_1*>(row)[i];
          qs = b.qs;
          wd = fp16_to_float(b.d);
          wc = fp16_to_float(b.m);
        }
        for (int j = 0; j < QK / 2; ++j) dot += (qs[j] & 0xF) * a.qs[j] + (qs[j] >> 4) * a.qs[j + QK / 2];
      }
      sum += wd * a.d * static_cast<float>(dot) + wc * a.s;
    }
    out[m * ldo] = sum;
  }
}
#endif

template <int64_t TYPE>
void dot_type(const uint8_t* row, const BlockQ8Act* xq, int64_t nb, int M, float* out, int64_t ldo) {
  switch (M) {
    case 1: dot_rows<TYPE, 1>(row, xq, nb, out, ldo); break;
    case 2: dot_rows<TYPE, 2>(row, xq, nb, out, ldo); break;
    case 3: dot_rows<TYPE, 3>(row, xq, nb, out, ldo); break;
    default: dot_rows<TYPE, 4>(row, xq, nb, out, ldo); break;
  }
}

}  // namespace

void dot_row_q8_act(int64_t type, const uint8_t* row, const BlockQ8Act* xq, int64_t nb, int M, float* out, int64_t ldo) {
  switch (type) {
    case kQ8_0: dot_type<kQ8_0>(row, xq, nb, M, out, ldo); break;
    case kQ4_0: dot_type<kQ4_0>(row, xq, nb, M, out, ldo); break;
    default: dot_type<kQ4_1>(row, xq, nb, M, out, ldo); break;
  }
}

}  // namespace quant
}  // namespace lenserve
