// Q8_0, Q4_0, Q4_1, Q5_0 and Q5_1: unpacking to fp32 and integer dot products against int16
// activations.
//
// The dot of a weight block with an activation block (xd, xs = xd * sum(xq)) is
//   Q8_0: wd * xd * sum(wq * xq)
//   Q4_0: wd * xd * sum(wq * xq) - 8 * wd * xs
//   Q4_1: wd * xd * sum(wq * xq) + wm * xs
//   Q5_0: wd * xd * sum(wq * xq) - 16 * wd * xs   (wq the 5-bit q: nibble | qh bit << 4)
//   Q5_1: wd * xd * sum(wq * xq) + wm * xs
// with sum(wq * xq) exact in int32 lanes: the weight bytes widened to int16
// (_mm256_cvtepu8_epi16 / _mm256_cvtepi8_epi16) and _mm256_madd_epi16 against the activations.
//
// Why int16 activations rather than llama.cpp's int8 (Q8_1, _mm256_maddubs_epi16): int8 rounding
// of x moved SmolLM2's logprobs by ~0.03 nats, so greedy decoding left the fp32-dequantized
// model's tokens at margins of 0.07-0.11 nats, far from a near tie; int16 rounding is 256x finer
// and the same test agrees to the first near tie. The widening costs about three more
// instructions per block; fp32 activations would need every weight widened to int32 and
// converted to float before its FMA, measured 7x slower than the integer dot at one row
// (benchmarks/bench_quant_linear.py: unpack_all_rows against quant_linear).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>

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

namespace {

// Bits 0..31 of a Q5 block's qh: bit j is the fifth bit of element j.
inline uint32_t high_bits(const uint8_t* qh) {
  uint32_t h;
  std::memcpy(&h, qh, sizeof(h));
  return h;
}

// A Q5_0 (x = d * (q - 16)) or Q5_1 (x = d * q + m) row as fp32.
template <typename Block>
void dequant_row_q5(const uint8_t* row, float* out, int64_t K) {
  constexpr bool kHasMin = std::is_same_v<Block, BlockQ5_1>;
  const auto* b = reinterpret_cast<const Block*>(row);
  for (int64_t i = 0; i < K / QK; ++i, out += QK) {
    const float d = fp16_to_float(b[i].d);
    float m = 0.f;
    if constexpr (kHasMin) m = fp16_to_float(b[i].m);
    const uint32_t h = high_bits(b[i].qh);
    for (int j = 0; j < QK / 2; ++j) {
      int q0 = (b[i].qs[j] & 0xF) | static_cast<int>(((h >> j) & 1) << 4);
      int q1 = (b[i].qs[j] >> 4) | static_cast<int>(((h >> (j + 16)) & 1) << 4);
      if constexpr (!kHasMin) q0 -= 16, q1 -= 16;
      out[j] = d * static_cast<float>(q0) + m;
      out[j + QK / 2] = d * static_cast<float>(q1) + m;
    }
  }
}

}  // namespace

void dequant_row_q5_0(const uint8_t* row, float* out, int64_t K) { dequant_row_q5<BlockQ5_0>(row, out, K); }
void dequant_row_q5_1(const uint8_t* row, float* out, int64_t K) { dequant_row_q5<BlockQ5_1>(row, out, K); }

namespace {

#ifdef LENSERVE_AVX2
inline float hmax(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}

inline int hsum_epi32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(1, 0, 3, 2)));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(2, 3, 0, 1)));
  return _mm_cvtsi128_si32(s);
}

// One activation block's 32 values into v[0..3] and its scale d = max|x| / kActMax.
inline float load_block_act(const float* x, __m256* v) {
  const __m256 sign = _mm256_set1_ps(-0.f);
  __m256 amax = _mm256_setzero_ps();
  for (int j = 0; j < 4; ++j) {
    v[j] = _mm256_loadu_ps(x + 8 * j);
    amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[j]));
  }
  return hmax(amax) / kActMax;
}
#endif

// One block of 32: d = max|x| / kActMax and q = round-to-nearest-even(x / d), the same numbers
// on both paths (a prefill rounds x exactly as a decode does).
inline void quantize_block_act(const float* x, BlockQAct* out) {
#ifdef LENSERVE_AVX2
  __m256 v[4];
  const float d = load_block_act(x, v);
  const __m256 id = _mm256_set1_ps(d > 0.f ? 1.f / d : 0.f);
  __m256i q[4];
  for (int j = 0; j < 4; ++j) q[j] = _mm256_cvtps_epi32(_mm256_mul_ps(v[j], id));  // MXCSR: nearest-even
  const int sum = hsum_epi32(_mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3])));
  // packs interleaves the 128-bit halves of its operands; the permute puts elements back in order
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out->qs), _mm256_permute4x64_epi64(_mm256_packs_epi32(q[0], q[1]), 0xD8));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out->qs + 16), _mm256_permute4x64_epi64(_mm256_packs_epi32(q[2], q[3]), 0xD8));
#else
  float amax = 0.f;
  for (int j = 0; j < QK; ++j) amax = std::max(amax, std::fabs(x[j]));
  const float d = amax / kActMax;
  const float id = d > 0.f ? 1.f / d : 0.f;
  int sum = 0;
  for (int j = 0; j < QK; ++j) {
    const int q = static_cast<int>(std::nearbyint(x[j] * id));
    out->qs[j] = static_cast<int16_t>(q);
    sum += q;
  }
#endif
  out->d = d;
  out->s = d * static_cast<float>(sum);
}

// The same rounding, written back as floats d * q (a prefill's x: quant_linear.cpp).
inline void round_block_act(const float* x, float* out) {
#ifdef LENSERVE_AVX2
  __m256 v[4];
  const float d = load_block_act(x, v);
  const __m256 id = _mm256_set1_ps(d > 0.f ? 1.f / d : 0.f), vd = _mm256_set1_ps(d);
  for (int j = 0; j < 4; ++j)
    _mm256_storeu_ps(out + 8 * j, _mm256_mul_ps(vd, _mm256_cvtepi32_ps(_mm256_cvtps_epi32(_mm256_mul_ps(v[j], id)))));
#else
  BlockQAct q;
  quantize_block_act(x, &q);
  for (int j = 0; j < QK; ++j) out[j] = q.d * static_cast<float>(q.qs[j]);
#endif
}

}  // namespace

void quantize_row_act(const float* x, BlockQAct* out, int64_t K) {
  for (int64_t i = 0; i < K / QK; ++i) quantize_block_act(x + i * QK, out + i);
}

void round_row_act(const float* x, float* out, int64_t K) {
  for (int64_t i = 0; i < K / QK; ++i) round_block_act(x + i * QK, out + i * QK);
}

namespace {

#ifdef LENSERVE_AVX2
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

#endif

// Block i's scale *wd and the coefficient *wc of the activation block's sum (Q4_0: -8 wd, Q5_0:
// -16 wd, Q4_1 / Q5_1: m, Q8_0: none); its quant bytes *qs and, for Q5_0 / Q5_1, the fifth bits *qh.
template <int64_t TYPE>
inline void block_fields(const uint8_t* row, int64_t i, const uint8_t** qs, const uint8_t** qh, float* wd, float* wc) {
  auto take = [&](const auto& b, float offset) {
    *qs = reinterpret_cast<const uint8_t*>(b.qs);
    *wd = fp16_to_float(b.d);
    if constexpr (TYPE == kQ4_1 || TYPE == kQ5_1) *wc = fp16_to_float(b.m);
    else *wc = offset * *wd;
    if constexpr (TYPE == kQ5_0 || TYPE == kQ5_1) *qh = b.qh;
  };
  if constexpr (TYPE == kQ8_0) take(reinterpret_cast<const BlockQ8_0*>(row)[i], 0.f);
  else if constexpr (TYPE == kQ4_0) take(reinterpret_cast<const BlockQ4_0*>(row)[i], -8.f);
  else if constexpr (TYPE == kQ4_1) take(reinterpret_cast<const BlockQ4_1*>(row)[i], 0.f);
  else if constexpr (TYPE == kQ5_0) take(reinterpret_cast<const BlockQ5_0*>(row)[i], -16.f);
  else take(reinterpret_cast<const BlockQ5_1*>(row)[i], 0.f);
}

#ifdef LENSERVE_AVX2
// 16 fifth bits (bit j for int16 lane j) as 16 in the lanes whose bit is set.
inline __m256i fifth_bits(uint32_t bits16) {
  const __m256i bit = _mm256_setr_epi16(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, -32768);
  const __m256i set = _mm256_cmpeq_epi16(_mm256_and_si256(_mm256_set1_epi16(static_cast<int16_t>(bits16)), bit), bit);
  return _mm256_and_si256(set, _mm256_set1_epi16(16));
}

// The 32 weights of block i as int16: elements 0..15 in lo, 16..31 in hi; *wd, *wc as block_fields.
template <int64_t TYPE>
inline void load_block(const uint8_t* row, int64_t i, __m256i* lo, __m256i* hi, float* wd, float* wc) {
  const uint8_t* qs;
  const uint8_t* qh = nullptr;
  block_fields<TYPE>(row, i, &qs, &qh, wd, wc);
  if constexpr (TYPE == kQ8_0) {
    *lo = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qs)));
    *hi = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qs + 16)));
  } else {
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs));
    const __m128i mask = _mm_set1_epi8(0xF);
    *lo = _mm256_cvtepu8_epi16(_mm_and_si128(v, mask));
    *hi = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(v, 4), mask));
    if constexpr (TYPE == kQ5_0 || TYPE == kQ5_1) {
      const uint32_t h = high_bits(qh);
      *lo = _mm256_or_si256(*lo, fifth_bits(h & 0xFFFF));
      *hi = _mm256_or_si256(*hi, fifth_bits(h >> 16));
    }
  }
}

// One weight block against MR activation blocks (nb apart): acc[m] += wd * xd * dot, off[m] += wc * xs.
template <int64_t TYPE, int MR>
inline void block_step(const uint8_t* row, const BlockQAct* xq, int64_t nb, int64_t i, __m256* acc, float* off) {
  __m256i lo, hi;
  float wd, wc;
  load_block<TYPE>(row, i, &lo, &hi, &wd, &wc);
#pragma GCC unroll 4
  for (int m = 0; m < MR; ++m) {
    const BlockQAct& a = xq[m * nb + i];
    const __m256i x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.qs));
    const __m256i x1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.qs + 16));
    const __m256i dot = _mm256_add_epi32(_mm256_madd_epi16(lo, x0), _mm256_madd_epi16(hi, x1));
    acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(wd * a.d), acc[m]);
    if constexpr (TYPE != kQ8_0) off[m] += wc * a.s;
  }
}

// MR activation rows against one weight row; each weight block is widened once for all rows.
// Even and odd blocks go to separate accumulators, so at one row the FMA latency chain does
// not set the pace.
template <int64_t TYPE, int MR>
void dot_rows(const uint8_t* row, const BlockQAct* xq, int64_t nb, float* out, int64_t ldo) {
  __m256 acc0[MR], acc1[MR];
  float off0[MR], off1[MR];
  for (int m = 0; m < MR; ++m) {
    acc0[m] = acc1[m] = _mm256_setzero_ps();
    off0[m] = off1[m] = 0.f;
  }
  int64_t i = 0;
  for (; i + 2 <= nb; i += 2) {
    block_step<TYPE, MR>(row, xq, nb, i, acc0, off0);
    block_step<TYPE, MR>(row, xq, nb, i + 1, acc1, off1);
  }
  if (i < nb) block_step<TYPE, MR>(row, xq, nb, i, acc0, off0);
  for (int m = 0; m < MR; ++m) out[m * ldo] = hsum(_mm256_add_ps(acc0[m], acc1[m])) + (off0[m] + off1[m]);
}
#else
// Element j of block i's integer weights (Q8_0: int8; Q4: nibble; Q5: nibble | fifth bit << 4).
template <int64_t TYPE>
inline int weight_q(const uint8_t* qs, const uint8_t* qh, int j) {
  if constexpr (TYPE == kQ8_0) return static_cast<int8_t>(qs[j]);
  const int nibble = j < QK / 2 ? (qs[j] & 0xF) : (qs[j - QK / 2] >> 4);
  if constexpr (TYPE == kQ5_0 || TYPE == kQ5_1) return nibble | static_cast<int>(((high_bits(qh) >> j) & 1) << 4);
  return nibble;
}

template <int64_t TYPE, int MR>
void dot_rows(const uint8_t* row, const BlockQAct* xq, int64_t nb, float* out, int64_t ldo) {
  for (int m = 0; m < MR; ++m) {
    float sum = 0.f;
    for (int64_t i = 0; i < nb; ++i) {
      const BlockQAct& a = xq[m * nb + i];
      const uint8_t* qs;
      const uint8_t* qh = nullptr;
      float wd, wc;
      block_fields<TYPE>(row, i, &qs, &qh, &wd, &wc);
      int dot = 0;
      for (int j = 0; j < QK; ++j) dot += weight_q<TYPE>(qs, qh, j) * a.qs[j];
      sum += wd * a.d * static_cast<float>(dot) + wc * a.s;
    }
    out[m * ldo] = sum;
  }
}
#endif

template <int64_t TYPE>
void dot_type(const uint8_t* row, const BlockQAct* xq, int64_t nb, int M, float* out, int64_t ldo) {
  with_rows_1to4(M, [&](auto mr) { dot_rows<TYPE, decltype(mr)::value>(row, xq, nb, out, ldo); });
}

}  // namespace

void dot_row_act(int64_t type, const uint8_t* row, const BlockQAct* xq, int64_t nb, int M, float* out, int64_t ldo) {
  switch (type) {
    case kQ8_0: dot_type<kQ8_0>(row, xq, nb, M, out, ldo); break;
    case kQ4_0: dot_type<kQ4_0>(row, xq, nb, M, out, ldo); break;
    case kQ4_1: dot_type<kQ4_1>(row, xq, nb, M, out, ldo); break;
    case kQ5_0: dot_type<kQ5_0>(row, xq, nb, M, out, ldo); break;
    default: dot_type<kQ5_1>(row, xq, nb, M, out, ldo); break;
  }
}

}  // namespace quant
}  // namespace lenserve
