// Q4_K, Q5_K and Q6_K (256-element super-blocks): unpacking to fp32 (the panel path of prefill,
// embedding rows), and integer dot products against int16 activation blocks (decode).
//
// Decode. Every 32-element run of a super-block lines up with one activation block
// (BlockQAct: xd, xs = xd * sum(xq)), so with the run's int32 dot sum(q * xq):
//   Q4_K / Q5_K (one 6-bit scale sc and min mn per run):  d * sc * xd * dot - dmin * mn * xs
//   Q6_K (two int8 scales per run, one per 16 elements, q - 32 stored signed):
//        d * xd * (sc0 * dot(first 16) + sc1 * dot(last 16))
// The dots are exact (_mm256_madd_epi16 of the weights widened to int16 against the
// activations), as for Q8_0 / Q4_0 / Q4_1 (quant_legacy.cpp says why int16 activations). Before
// these, decode unpacked each row to fp32 in L1 and dotted it with fp32 x. The integer dots are
// 2.7-4.3x faster at 1 row of x, 2.2-3.2x at 4 and 1.6-2.1x at 16 (Q6_K gains most: its 6-bit
// unpacking to fp32 was the slowest), on SmolLM2's down projection and a 1B Llama's shapes
// (benchmarks/bench_quant_linear.py --kquants, 2-core AVX-512 EPYC; LENSERVE_KQUANT_DOTS=fp32
// runs the old path). Past kMaxDecodeRows rows prefill unpacks panels to fp32 as for every type.
#include <cstring>
#include <vector>

#include "cpu/quant_blocks.h"

namespace lenserve {
namespace quant {
void dequant_row_q4_k(const uint8_t* row, float* out, int64_t K) {
  const auto* blocks = reinterpret_cast<const BlockQ4_K*>(row);
  for (int64_t i = 0; i < K / QK_K; ++i) {
    const BlockQ4_K& b = blocks[i];
    const float d = fp16_to_float(b.d), dmin = fp16_to_float(b.dmin);
    const uint8_t* q = b.qs;
    for (int j = 0; j < QK_K / 64; ++j, q += 32, out += 64) {
      uint8_t sc0, m0, sc1, m1;
      scale_min_k4(2 * j, b.scales, &sc0, &m0);
      scale_min_k4(2 * j + 1, b.scales, &sc1, &m1);
      const float d0 = d * sc0, c0 = dmin * m0, d1 = d * sc1, c1 = dmin * m1;
      for (int l = 0; l < 32; ++l) out[l] = d0 * static_cast<float>(q[l] & 0xF) - c0;
      for (int l = 0; l < 32; ++l) out[l + 32] = d1 * static_cast<float>(q[l] >> 4) - c1;
    }
  }
}

void dequant_row_q5_k(const uint8_t* row, float* out, int64_t K) {
  const auto* blocks = reinterpret_cast<const BlockQ5_K*>(row);
  for (int64_t i = 0; i < K / QK_K; ++i) {
    const BlockQ5_K& b = blocks[i];
    const float d = fp16_to_float(b.d), dmin = fp16_to_float(b.dmin);
    const uint8_t* q = b.qs;
    for (int j = 0; j < QK_K / 64; ++j, q += 32, out += 64) {
      uint8_t sc0, m0, sc1, m1;
      scale_min_k4(2 * j, b.scales, &sc0, &m0);
      scale_min_k4(2 * j + 1, b.scales, &sc1, &m1);
      const float d0 = d * sc0, c0 = dmin * m0, d1 = d * sc1, c1 = dmin * m1;
      const int lo_bit = 2 * j, hi_bit = 2 * j + 1;
      for (int l = 0; l < 32; ++l)
        out[l] = d0 * static_cast<float>((q[l] & 0xF) | (((b.qh[l] >> lo_bit) & 1) << 4)) - c0;
      for (int l = 0; l < 32; ++l)
        out[l + 32] = d1 * static_cast<float>((q[l] >> 4) | (((b.qh[l] >> hi_bit) & 1) << 4)) - c1;
    }
  }
}

void dequant_row_q6_k(const uint8_t* row, float* out, int64_t K) {
  const auto* blocks = reinterpret_cast<const BlockQ6_K*>(row);
  for (int64_t i = 0; i < K / QK_K; ++i) {
    const BlockQ6_K& b = blocks[i];
    const float d = fp16_to_float(b.d);
    const uint8_t* ql = b.ql;
    const uint8_t* qh = b.qh;
    const int8_t* sc = b.scales;
    // Each 128 elements: four runs of 32, run r from ql[0..63] nibbles and 2 bits of qh[0..31].
    for (int n = 0; n < QK_K / 128; ++n, ql += 64, qh += 32, sc += 8, out += 128) {
      for (int half = 0; half < 2; ++half) {
        const int l0 = 16 * half;
        const float s0 = d * sc[half], s1 = d * sc[half + 2], s2 = d * sc[half + 4], s3 = d * sc[half + 6];
        for (int l = l0; l < l0 + 16; ++l) {
          out[l] = s0 * static_cast<float>(static_cast<int>((ql[l] & 0xF) | ((qh[l] & 3) << 4)) - 32);
          out[l + 32] = s1 * static_cast<float>(static_cast<int>((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32);
          out[l + 64] = s2 * static_cast<float>(static_cast<int>((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32);
          out[l + 96] = s3 * static_cast<float>(static_cast<int>((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32);
        }
      }
    }
  }
}

namespace {

// The 8 scales and 8 mins (6 bits each) of a Q4_K / Q5_K super-block.
inline void scales_mins_k4(const uint8_t* q, uint8_t* sc, uint8_t* mn) {
  for (int j = 0; j < 8; ++j) scale_min_k4(j, q, sc + j, mn + j);
}

#ifdef LENSERVE_AVX2
inline float hsum_ps(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// 32 weights (bytes, int8 or uint8 values < 64) against one activation block: 8 int32 partial sums
// of elements 0..15 (lo) and 16..31 (hi) separately.
template <bool SIGNED>
inline void dot32(__m256i q, const BlockQAct& a, __m256i* lo, __m256i* hi) {
  const __m128i q0 = _mm256_castsi256_si128(q), q1 = _mm256_extracti128_si256(q, 1);
  const __m256i w0 = SIGNED ? _mm256_cvtepi8_epi16(q0) : _mm256_cvtepu8_epi16(q0);
  const __m256i w1 = SIGNED ? _mm256_cvtepi8_epi16(q1) : _mm256_cvtepu8_epi16(q1);
  *lo = _mm256_madd_epi16(w0, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.qs)));
  *hi = _mm256_madd_epi16(w1, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.qs + 16)));
}

// The four (Q6_K: per 128 elements) or two (Q4_K / Q5_K: per 64) 32-element runs of a super-block
// as bytes, run r of part `part`.
template <int64_t TYPE>
inline void runs_of(const uint8_t* block, int part, __m256i* runs) {
  const __m256i m4 = _mm256_set1_epi8(0xF);
  if constexpr (TYPE == kQ6_K) {
    const auto& b = *reinterpret_cast<const BlockQ6_K*>(block);
    const uint8_t* ql = b.ql + 64 * part;
    const __m256i l0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ql));
    const __m256i l1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ql + 32));
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b.qh + 32 * part));
    const __m256i m2 = _mm256_set1_epi8(0x30), k32 = _mm256_set1_epi8(32);
    // bits 4-5 of each 6-bit q from qh's 2-bit fields 0, 1, 2, 3 (16-bit shifts, then the byte mask)
    runs[0] = _mm256_or_si256(_mm256_and_si256(l0, m4), _mm256_and_si256(_mm256_slli_epi16(h, 4), m2));
    runs[1] = _mm256_or_si256(_mm256_and_si256(l1, m4), _mm256_and_si256(_mm256_slli_epi16(h, 2), m2));
    runs[2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l0, 4), m4), _mm256_and_si256(h, m2));
    runs[3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l1, 4), m4), _mm256_and_si256(_mm256_srli_epi16(h, 2), m2));
    for (int r = 0; r < 4; ++r) runs[r] = _mm256_sub_epi8(runs[r], k32);
  } else {
    const uint8_t* qs = TYPE == kQ4_K ? reinterpret_cast<const BlockQ4_K*>(block)->qs
                                      : reinterpret_cast<const BlockQ5_K*>(block)->qs;
    const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qs + 32 * part));
    runs[0] = _mm256_and_si256(q, m4);
    runs[1] = _mm256_and_si256(_mm256_srli_epi16(q, 4), m4);
    if constexpr (TYPE == kQ5_K) {
      // the fifth bit of run 2 * part (+1) is bit 2 * part (+1) of qh[l]
      const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(reinterpret_cast<const BlockQ5_K*>(block)->qh));
      const __m256i b0 = _mm256_set1_epi8(static_cast<char>(1 << (2 * part))), b1 = _mm256_set1_epi8(static_cast<char>(2 << (2 * part)));
      const __m256i k16 = _mm256_set1_epi8(16);
      runs[0] = _mm256_or_si256(runs[0], _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(h, b0), b0), k16));
      runs[1] = _mm256_or_si256(runs[1], _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(h, b1), b1), k16));
    }
  }
}

// MR activation rows (nb blocks apart) against one row of super-blocks: out[m * ldo].
template <int64_t TYPE, int MR>
void dot_rows_k(const uint8_t* row, const BlockQAct* xq, int64_t nb, float* out, int64_t ldo) {
  constexpr int64_t bb = TYPE == kQ4_K ? sizeof(BlockQ4_K) : (TYPE == kQ5_K ? sizeof(BlockQ5_K) : sizeof(BlockQ6_K));
  constexpr int kParts = TYPE == kQ6_K ? 2 : 4;        // parts of a super-block
  constexpr int kRuns = TYPE == kQ6_K ? 4 : 2;         // 32-element runs of a part
  __m256 acc[MR];
  float off[MR];
  for (int m = 0; m < MR; ++m) {
    acc[m] = _mm256_setzero_ps();
    off[m] = 0.f;
  }
  const int64_t nsb = nb / (QK_K / QK);
  for (int64_t i = 0; i < nsb; ++i) {
    const uint8_t* block = row + i * bb;
    float d, dmin = 0.f;
    uint8_t sc[8], mn[8];
    const int8_t* sc6 = nullptr;
    if constexpr (TYPE == kQ6_K) {
      const auto& b = *reinterpret_cast<const BlockQ6_K*>(block);
      d = fp16_to_float(b.d);
      sc6 = b.scales;
    } else {
      const auto& b = *reinterpret_cast<const BlockQ4_K*>(block);  // Q5_K starts with the same fields
      d = fp16_to_float(b.d);
      dmin = fp16_to_float(b.dmin);
      scales_mins_k4(b.scales, sc, mn);
    }
    for (int part = 0; part < kParts; ++part) {
      __m256i runs[kRuns];
      runs_of<TYPE>(block, part, runs);
      for (int r = 0; r < kRuns; ++r) {
        const int run = part * kRuns + r;  // 0..7: the run's activation block within the super-block
        for (int m = 0; m < MR; ++m) {
          const BlockQAct& a = xq[m * nb + i * (QK_K / QK) + run];
          __m256i lo, hi;
          dot32<TYPE == kQ6_K>(runs[r], a, &lo, &hi);
          if constexpr (TYPE == kQ6_K) {
            // Q6_K's scales: 16 per super-block, part p's run r uses scales 8p + 2r and 8p + 2r + 1
            const float s = d * a.d;
            acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(lo), _mm256_set1_ps(s * sc6[8 * part + 2 * r]), acc[m]);
            acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(hi), _mm256_set1_ps(s * sc6[8 * part + 2 * r + 1]), acc[m]);
          } else {
            acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(lo, hi)), _mm256_set1_ps(d * sc[run] * a.d), acc[m]);
            off[m] += dmin * mn[run] * a.s;
          }
        }
      }
    }
  }
  for (int m = 0; m < MR; ++m) out[m * ldo] = hsum_ps(acc[m]) - off[m];
}
#else
// Without AVX2: the row unpacked to fp32 against x as the activation blocks hold it (d * q).
template <int64_t TYPE, int MR>
void dot_rows_k(const uint8_t* row, const BlockQAct* xq, int64_t nb, float* out, int64_t ldo) {
  const int64_t K = nb * QK;
  std::vector<float> w(K);
  if (TYPE == kQ4_K) dequant_row_q4_k(row, w.data(), K);
  else if (TYPE == kQ5_K) dequant_row_q5_k(row, w.data(), K);
  else dequant_row_q6_k(row, w.data(), K);
  for (int m = 0; m < MR; ++m) {
    float sum = 0.f;
    for (int64_t i = 0; i < nb; ++i) {
      const BlockQAct& a = xq[m * nb + i];
      for (int j = 0; j < QK; ++j) sum += w[i * QK + j] * (a.d * static_cast<float>(a.qs[j]));
    }
    out[m * ldo] = sum;
  }
}
#endif

template <int64_t TYPE>
void dot_type_k(const uint8_t* row, const BlockQAct* xq, int64_t nb, int M, float* out, int64_t ldo) {
  with_rows_1to4(M, [&](auto mr) { dot_rows_k<TYPE, decltype(mr)::value>(row, xq, nb, out, ldo); });
}

}  // namespace

void dot_row_act_k(int64_t type, const uint8_t* row, const BlockQAct* xq, int64_t nb, int M, float* out, int64_t ldo) {
  switch (type) {
    case kQ4_K: dot_type_k<kQ4_K>(row, xq, nb, M, out, ldo); break;
    case kQ5_K: dot_type_k<kQ5_K>(row, xq, nb, M, out, ldo); break;
    default: dot_type_k<kQ6_K>(row, xq, nb, M, out, ldo); break;
  }
}

}  // namespace quant
}  // namespace lenserve
