// The interleaved integer GEMM (quant_interleaved.cpp) with AVX-512 VNNI: `vpdpwssd` multiplies
// int16 pairs and adds them into int32 lanes in one instruction, where AVX2 needs
// `_mm256_madd_epi16` and then `_mm256_add_epi32`. The sums are the same exact integers, so the
// outputs equal the AVX2 kernel's bit for bit (tests/csrc/test_quant_linear.py checks it); the
// activations stay int16 for the accuracy reasons in quant_legacy.cpp.
//
// The instructions are 256-bit (AVX512VL encodings): on AMD Zen 4 a 512-bit op takes two 256-bit
// slots, so wider registers would not add throughput, but EVEX gives 32 vector registers, which
// lets a tile keep kVnniTileRows = 8 activation rows (16 int32 accumulators for Q4_0 / Q4_1's low
// and high nibbles, 8 fp32 sums) where AVX2's 16 registers hold 4. Each unpacked weight register
// then feeds twice as many rows.
//
// Only this file is compiled for AVX-512 (the pragma below), and only its own internal functions:
// no header template is instantiated inside the region, so no AVX-512 copy of a shared inline
// function can reach code that runs on a CPU without it. The plain inline functions it calls from
// quant_blocks.h (the interleaved layouts' sizes, the Q4_Kx8 scale unpack) are defined before the
// pragma, so their own code is compiled for the base instruction set. quant::vnni_supported() decides at run
// time whether gemm_x8 calls in here.
#include "cpu/quant_blocks.h"

#include <cstring>

namespace lenserve {
namespace quant {

#if defined(__x86_64__) && defined(__GNUC__) && defined(LENSERVE_AVX2)

bool vnni_supported() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
}

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vnni")

namespace {

typedef int32_t __attribute__((may_alias)) pair_t;

// acc + dpwssd(w, the int16 pair at x broadcast to every lane), the broadcast folded into the
// instruction's memory operand ({1to8}): one instruction where the intrinsics give two
// (vpbroadcastd, then vpdpwssd), GCC having no broadcast form of vpdpwssd.
inline __m256i dp_pair(__m256i acc, __m256i w, const int16_t* x) {
  asm("vpdpwssd %2%{1to8%}, %1, %0" : "+v"(acc) : "v"(w), "m"(*reinterpret_cast<const pair_t*>(x)));
  return acc;
}

// MR activation rows (xq, nb blocks apart) against one group of 8 interleaved rows: out[m * ldo + r].
template <int64_t TYPE, int MR>
void group_tile_vnni(const uint8_t* group, const BlockQAct* xq, int64_t nb, float* out, int64_t ldo) {
  constexpr int64_t bb = file_block_bytes(TYPE);
  constexpr int64_t hb = x8_header_bytes(TYPE);
  __m256 accf[MR];
  for (int m = 0; m < MR; ++m) accf[m] = _mm256_setzero_ps();
  const __m128i mask = _mm_set1_epi8(0xF);
  for (int64_t i = 0; i < nb; ++i) {
    const uint8_t* b = group + i * 8 * bb;
    const uint8_t* qs = b + hb;
    const __m256 wd = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b)));
    // two int32 sums per row (even and odd chunks, or low and high nibbles): two dependency chains
    __m256i acc0[MR], acc1[MR];
    for (int m = 0; m < MR; ++m) acc0[m] = acc1[m] = _mm256_setzero_si256();
    const int16_t* xs[MR];
    for (int m = 0; m < MR; ++m) xs[m] = xq[m * nb + i].qs;
    if constexpr (TYPE == kQ8_0) {
#pragma GCC unroll 8
      for (int p = 0; p < 16; p += 2) {
        const __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qs + 16 * p)));
        const __m256i w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qs + 16 * p + 16)));
        for (int m = 0; m < MR; ++m) {
          acc0[m] = dp_pair(acc0[m], w0, xs[m] + 2 * p);
          acc1[m] = dp_pair(acc1[m], w1, xs[m] + 2 * p + 2);
        }
      }
    } else {
#pragma GCC unroll 8
      for (int p = 0; p < 8; ++p) {
        const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs + 16 * p));
        __m256i lo = _mm256_cvtepu8_epi16(_mm_and_si128(v, mask));
        __m256i hi = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(v, 4), mask));
        if constexpr (x8_is_q5(TYPE)) {
          // the fifth bits (quant_interleaved.cpp's layout): a mask of the lanes whose bit is set
          // (vptestmw), and 16 added in those lanes
          const __m256i bit_lo = _mm256_setr_epi16(1, 1, 2, 2, 4, 4, 8, 8, 16, 16, 32, 32, 64, 64, 128, 128);
          const __m256i bit_hi = _mm256_slli_epi16(bit_lo, 8);
          const __m256i sixteen = _mm256_set1_epi16(16);
          const __m256i h = _mm256_set1_epi32(static_cast<int32_t>(x8_chunk_high_bits(b, TYPE, p)));
          lo = _mm256_mask_add_epi16(lo, _mm256_test_epi16_mask(h, bit_lo), lo, sixteen);
          hi = _mm256_mask_add_epi16(hi, _mm256_test_epi16_mask(h, bit_hi), hi, sixteen);
        }
        for (int m = 0; m < MR; ++m) {
          acc0[m] = dp_pair(acc0[m], lo, xs[m] + 2 * p);
          acc1[m] = dp_pair(acc1[m], hi, xs[m] + 16 + 2 * p);
        }
      }
    }
    // AVX2 adds the chunks' products into one int32 sum in the same order of exact integer
    // additions; int32 addition is associative, so acc0 + acc1 is that sum.
    if constexpr (TYPE == kQ8_0) {
      for (int m = 0; m < MR; ++m)
        accf[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(acc0[m], acc1[m])),
                                  _mm256_mul_ps(wd, _mm256_set1_ps(xq[m * nb + i].d)), accf[m]);
    } else {
      const __m256 wc = x8_has_min(TYPE) ? _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 16)))
                                        : _mm256_mul_ps(wd, _mm256_set1_ps(TYPE == kQ4_0 ? -8.f : -16.f));
      for (int m = 0; m < MR; ++m) {
        const BlockQAct& a = xq[m * nb + i];
        accf[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(acc0[m], acc1[m])),
                                  _mm256_mul_ps(wd, _mm256_set1_ps(a.d)), accf[m]);
        accf[m] = _mm256_fmadd_ps(wc, _mm256_set1_ps(a.s), accf[m]);
      }
    }
  }
  for (int m = 0; m < MR; ++m) _mm256_storeu_ps(out + m * ldo, accf[m]);
}

// MR activation rows against one group of 8 interleaved Q4_K rows (quant_interleaved.cpp's layout
// and sums: d * sc * xd * dot - dmin * mn * xs per sub-block and row), bit for bit the AVX2 kernel.
template <int MR>
void group_tile_vnni_q4k(const uint8_t* group, const BlockQAct* xq, int64_t nb, float* out, int64_t ldo) {
  __m256 accf[MR];
  for (int m = 0; m < MR; ++m) accf[m] = _mm256_setzero_ps();
  const __m128i mask = _mm_set1_epi8(0xF);
  for (int64_t i = 0; i < nb / 8; ++i) {
    const uint8_t* b = group + i * 8 * sizeof(BlockQ4_K);
    const __m256 wd = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b)));
    const __m256 wmin = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 16)));
    for (int t = 0; t < 4; ++t) {
      const uint8_t* qs = b + kQ4KHeader + 256 * t;
      const BlockQAct* x0 = xq + 8 * i + 2 * t;
      __m256i acc0[MR], acc1[MR];
      for (int m = 0; m < MR; ++m) acc0[m] = acc1[m] = _mm256_setzero_si256();
#pragma GCC unroll 4
      for (int p = 0; p < 16; ++p) {
        const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs + 16 * p));
        const __m256i lo = _mm256_cvtepu8_epi16(_mm_and_si128(v, mask));
        const __m256i hi = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(v, 4), mask));
        for (int m = 0; m < MR; ++m) {
          acc0[m] = dp_pair(acc0[m], lo, x0[m * nb].qs + 2 * p);
          acc1[m] = dp_pair(acc1[m], hi, x0[m * nb + 1].qs + 2 * p);
        }
      }
      __m256 s0, m0, s1, m1;
      q4k_x8_scales(b, t, wd, wmin, &s0, &m0, &s1, &m1);
      for (int m = 0; m < MR; ++m) {
        const BlockQAct& a0 = x0[m * nb];
        const BlockQAct& a1 = x0[m * nb + 1];
        accf[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc0[m]), _mm256_mul_ps(s0, _mm256_set1_ps(a0.d)), accf[m]);
        accf[m] = _mm256_fnmadd_ps(m0, _mm256_set1_ps(a0.s), accf[m]);
        accf[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc1[m]), _mm256_mul_ps(s1, _mm256_set1_ps(a1.d)), accf[m]);
        accf[m] = _mm256_fnmadd_ps(m1, _mm256_set1_ps(a1.s), accf[m]);
      }
    }
  }
  for (int m = 0; m < MR; ++m) _mm256_storeu_ps(out + m * ldo, accf[m]);
}

template <int64_t TYPE, int MR>
void tile_vnni(const uint8_t* group, const BlockQAct* xq, int64_t nb, float* out, int64_t ldo) {
  if constexpr (TYPE == kQ4_K) group_tile_vnni_q4k<MR>(group, xq, nb, out, ldo);
  else group_tile_vnni<TYPE, MR>(group, xq, nb, out, ldo);
}

template <int64_t TYPE>
void group_rows_vnni_t(const uint8_t* group, const BlockQAct* xq, int64_t nb, int64_t M, float* out, int64_t ldo) {
  int64_t m = 0;
  for (; m + kVnniTileRows <= M; m += kVnniTileRows)
    tile_vnni<TYPE, kVnniTileRows>(group, xq + m * nb, nb, out + m * ldo, ldo);
  const BlockQAct* x = xq + m * nb;
  float* o = out + m * ldo;
  switch (M - m) {
    case 1: tile_vnni<TYPE, 1>(group, x, nb, o, ldo); break;
    case 2: tile_vnni<TYPE, 2>(group, x, nb, o, ldo); break;
    case 3: tile_vnni<TYPE, 3>(group, x, nb, o, ldo); break;
    case 4: tile_vnni<TYPE, 4>(group, x, nb, o, ldo); break;
    case 5: tile_vnni<TYPE, 5>(group, x, nb, o, ldo); break;
    case 6: tile_vnni<TYPE, 6>(group, x, nb, o, ldo); break;
    case 7: tile_vnni<TYPE, 7>(group, x, nb, o, ldo); break;
    default: break;
  }
}

}  // namespace

void group_rows_vnni(int64_t type, const uint8_t* group, const BlockQAct* xq, int64_t nb, int64_t M, float* out,
                     int64_t ldo) {
  switch (type) {
    case kQ8_0: group_rows_vnni_t<kQ8_0>(group, xq, nb, M, out, ldo); break;
    case kQ4_0: group_rows_vnni_t<kQ4_0>(group, xq, nb, M, out, ldo); break;
    case kQ4_1: group_rows_vnni_t<kQ4_1>(group, xq, nb, M, out, ldo); break;
    case kQ5_0: group_rows_vnni_t<kQ5_0>(group, xq, nb, M, out, ldo); break;
    case kQ5_1: group_rows_vnni_t<kQ5_1>(group, xq, nb, M, out, ldo); break;
    default: group_rows_vnni_t<kQ4_K>(group, xq, nb, M, out, ldo); break;
  }
}

#pragma GCC pop_options

#else

bool vnni_supported() { return false; }

void group_rows_vnni(int64_t, const uint8_t*, const BlockQAct*, int64_t, int64_t, float*, int64_t) {}

#endif

}  // namespace quant
}  // namespace lenserve
