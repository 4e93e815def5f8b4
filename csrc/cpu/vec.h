// Eight-lane float vector for the CPU kernels: AVX2 + FMA + F16C intrinsics when the compiler
// targets them (-march=x86-64-v3), else a plain array the compiler vectorises as it can. Kernels
// are written once against these helpers, so the portable build runs the same algorithm.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define LENSERVE_AVX2 1
#include <immintrin.h>
#endif

namespace lenserve {
namespace vec {

constexpr int kWidth = 8;
constexpr float kLog2e = 1.4426950408889634f;

#ifdef LENSERVE_AVX2

struct Vec8 {
  __m256 v;
};

inline Vec8 zero() { return {_mm256_setzero_ps()}; }
inline Vec8 set1(float x) { return {_mm256_set1_ps(x)}; }
inline Vec8 add(Vec8 a, Vec8 b) { return {_mm256_add_ps(a.v, b.v)}; }
inline Vec8 sub(Vec8 a, Vec8 b) { return {_mm256_sub_ps(a.v, b.v)}; }
inline Vec8 mul(Vec8 a, Vec8 b) { return {_mm256_mul_ps(a.v, b.v)}; }
inline Vec8 div(Vec8 a, Vec8 b) { return {_mm256_div_ps(a.v, b.v)}; }
inline Vec8 max(Vec8 a, Vec8 b) { return {_mm256_max_ps(a.v, b.v)}; }
inline Vec8 min(Vec8 a, Vec8 b) { return {_mm256_min_ps(a.v, b.v)}; }
// a * b + c
inline Vec8 fma(Vec8 a, Vec8 b, Vec8 c) { return {_mm256_fmadd_ps(a.v, b.v, c.v)}; }
// lanes where a <= b keep x, the others take y
inline Vec8 select_le(Vec8 a, Vec8 b, Vec8 x, Vec8 y) {
  return {_mm256_blendv_ps(y.v, x.v, _mm256_cmp_ps(a.v, b.v, _CMP_LE_OQ))};
}
// lanes equal to -inf take y
inline Vec8 replace_neg_inf(Vec8 a, Vec8 y) {
  const __m256 is_inf = _mm256_cmp_ps(a.v, _mm256_set1_ps(-std::numeric_limits<float>::infinity()), _CMP_EQ_OQ);
  return {_mm256_blendv_ps(a.v, y.v, is_inf)};
}
// lanes where a > 0 take 1 / a, the others 0
inline Vec8 safe_reciprocal(Vec8 a) {
  const __m256 pos = _mm256_cmp_ps(a.v, _mm256_setzero_ps(), _CMP_GT_OQ);
  return {_mm256_and_ps(pos, _mm256_div_ps(_mm256_set1_ps(1.f), a.v))};
}

inline Vec8 vload(const float* p) { return {_mm256_loadu_ps(p)}; }
inline Vec8 vload(const c10::BFloat16* p) {
  const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return {_mm256_castsi256_ps(_mm256_slli_epi32(w, 16))};
}
inline Vec8 vload(const c10::Half* p) { return {_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))}; }

inline void vstore(float* p, Vec8 a) { _mm256_storeu_ps(p, a.v); }
// Round to nearest even, as c10::BFloat16's constructor does (NaN aside).
inline void vstore(c10::BFloat16* p, Vec8 a) {
  const __m256i bits = _mm256_castps_si256(a.v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(bits, _mm256_set1_epi32(0x7fff)), lsb), 16);
  const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(rounded), _mm256_extracti128_si256(rounded, 1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), packed);
}
inline void vstore(c10::Half* p, Vec8 a) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(a.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

inline float reduce_add(Vec8 a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a.v), _mm256_extractf128_ps(a.v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
inline float reduce_max(Vec8 a) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(a.v), _mm256_extractf128_ps(a.v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
// {reduce_add(a[0]), ..., reduce_add(a[7])} in one vector.
inline Vec8 transpose_sum(const Vec8 a[8]) {
  const __m256 t0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0].v, a[1].v), _mm256_hadd_ps(a[2].v, a[3].v));
  const __m256 t1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4].v, a[5].v), _mm256_hadd_ps(a[6].v, a[7].v));
  return {_mm256_add_ps(_mm256_permute2f128_ps(t0, t1, 0x20), _mm256_permute2f128_ps(t0, t1, 0x31))};
}

// out[i] = reduce_add(a[i]) for i < 4.
inline void reduce_add4(const Vec8 a[4], float* out) {
  const __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(a[0].v, a[1].v), _mm256_hadd_ps(a[2].v, a[3].v));
  _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1)));
}

// 2^x for x in [-126, 127] with a relative error of ~2 ulp; below -126 (and -inf) gives 0.
inline Vec8 exp2(Vec8 x) {
  const __m256 clamped = _mm256_min_ps(_mm256_max_ps(x.v, _mm256_set1_ps(-127.f)), _mm256_set1_ps(127.f));
  const __m256 n = _mm256_round_ps(clamped, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_sub_ps(clamped, n);  // [-0.5, 0.5]
  __m256 p = _mm256_set1_ps(1.525273380405984e-05f);
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.5403530393381606e-04f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.3333558146428443e-03f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(9.618129107628477e-03f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(5.550410866482158e-02f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(2.402265069591007e-01f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(6.931471805599453e-01f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  const __m256 r = _mm256_mul_ps(p, _mm256_castsi256_ps(e));
  return {_mm256_and_ps(r, _mm256_cmp_ps(x.v, _mm256_set1_ps(-126.f), _CMP_GE_OQ))};
}

#else  // portable

struct Vec8 {
  float v[kWidth];
};

#define LS_VEC_MAP(expr)                               \
  Vec8 r;                                              \
  for (int i = 0; i < kWidth; ++i) r.v[i] = (expr);    \
  return r

inline Vec8 zero() { LS_VEC_MAP(0.f); }
inline Vec8 set1(float x) { LS_VEC_MAP(x); }
inline Vec8 add(Vec8 a, Vec8 b) { LS_VEC_MAP(a.v[i] + b.v[i]); }
inline Vec8 sub(Vec8 a, Vec8 b) { LS_VEC_MAP(a.v[i] - b.v[i]); }
inline Vec8 mul(Vec8 a, Vec8 b) { LS_VEC_MAP(a.v[i] * b.v[i]); }
inline Vec8 div(Vec8 a, Vec8 b) { LS_VEC_MAP(a.v[i] / b.v[i]); }
inline Vec8 max(Vec8 a, Vec8 b) { LS_VEC_MAP(a.v[i] > b.v[i] ? a.v[i] : b.v[i]); }
inline Vec8 min(Vec8 a, Vec8 b) { LS_VEC_MAP(a.v[i] < b.v[i] ? a.v[i] : b.v[i]); }
inline Vec8 fma(Vec8 a, Vec8 b, Vec8 c) { LS_VEC_MAP(a.v[i] * b.v[i] + c.v[i]); }
inline Vec8 select_le(Vec8 a, Vec8 b, Vec8 x, Vec8 y) { LS_VEC_MAP(a.v[i] <= b.v[i] ? x.v[i] : y.v[i]); }
inline Vec8 replace_neg_inf(Vec8 a, Vec8 y) { LS_VEC_MAP(a.v[i] == -std::numeric_limits<float>::infinity() ? y.v[i] : a.v[i]); }
inline Vec8 safe_reciprocal(Vec8 a) { LS_VEC_MAP(a.v[i] > 0.f ? 1.f / a.v[i] : 0.f); }
template <typename T>
inline Vec8 vload(const T* p) { LS_VEC_MAP(static_cast<float>(p[i])); }
template <typename T>
inline void vstore(T* p, Vec8 a) {
  for (int i = 0; i < kWidth; ++i) p[i] = static_cast<T>(a.v[i]);
}
inline float reduce_add(Vec8 a) {
  float s = 0.f;
  for (int i = 0; i < kWidth; ++i) s += a.v[i];
  return s;
}
inline float reduce_max(Vec8 a) {
  float s = a.v[0];
  for (int i = 1; i < kWidth; ++i) s = a.v[i] > s ? a.v[i] : s;
  return s;
}
inline Vec8 transpose_sum(const Vec8 a[8]) { LS_VEC_MAP(reduce_add(a[i])); }
inline void reduce_add4(const Vec8 a[4], float* out) {
  for (int i = 0; i < 4; ++i) out[i] = reduce_add(a[i]);
}
inline Vec8 exp2(Vec8 x) { LS_VEC_MAP(x.v[i] < -126.f ? 0.f : std::exp2(x.v[i] > 127.f ? 127.f : x.v[i])); }

#undef LS_VEC_MAP

#endif  // LENSERVE_AVX2

// e^x with the same accuracy and range as exp2 (in units of x * log2(e)).
inline Vec8 exp(Vec8 x) { return exp2(mul(x, set1(kLog2e))); }

// dst[0:n] = src[0:n] converted; n a multiple of kWidth.
template <typename S, typename D>
inline void convert(const S* __restrict__ src, D* __restrict__ dst, int64_t n) {
  for (int64_t i = 0; i < n; i += kWidth) vstore(dst + i, vload(src + i));
}

}  // namespace vec
}  // namespace lenserve
