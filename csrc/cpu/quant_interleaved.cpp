// Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 and Q4_K rows interleaved eight at a time (as llama.cpp's Q4_0x8 and
// Q4_Kx8 repacks do), and the decode-shaped integer GEMM over them.
//
// Why interleave. With rows as the file stores them, every (weight row, block, activation row)
// dot ends in scalar work: two fp16 scales converted, multiplied, broadcast, an FMA into that
// row's partial sums and a horizontal sum at the end, ~10 of the ~25 instructions of a block
// (quant_legacy.cpp). Interleaved, the 8 rows of a group sit in the 8 int32 lanes of one
// register: a block's scales are one 8-wide fp16 load and conversion, the 8 dots are exact int32
// sums in lanes (_mm256_madd_epi16 of the 8 rows' element pairs against one broadcast pair of
// activations), and the scale is one 8-wide FMA per block and activation row. Each unpacked
// weight register feeds up to kTileRows activation rows.
//
// Layout of one group of 8 rows (r = 0..7), block after block; a group takes exactly the bytes
// of its 8 rows in the file (8 * row_bytes), so the interleaving is done in place:
//   Q8_0x8 (272 B / block): d[8] fp16 | 16 chunks p of 16 B: byte 2r + e = element 2p + e of row r
//   Q4_0x8 (144 B / block): d[8] fp16 | 8 chunks p of 16 B: byte 2r + e = file byte 2p + e of row r
//                           (low nibble: element 2p + e; high nibble: element 16 + 2p + e)
//   Q4_1x8 (160 B / block): d[8] fp16 | m[8] fp16 | 8 chunks as Q4_0x8
//   Q5_0x8 (176 B / block): d[8] fp16 | h[8] uint32 | 8 chunks as Q4_0x8
//   Q5_1x8 (192 B / block): d[8] fp16 | m[8] fp16 | h[8] uint32 | 8 chunks as Q4_0x8
//                           h[p] holds chunk p's fifth bits: bit 16 e + r that of row r's element
//                           2p + e (the low nibble of byte 2r + e), bit 16 e + 8 + r that of its
//                           element 16 + 2p + e (the high nibble)
//   Q4_Kx8 (1152 B / super-block of 256): d[8] fp16 | dmin[8] fp16 | lo[8][8] | hi[4][8] |
//                           64 chunks of 16 B
//                           lo[j][r] = (sc & 15) | (mn & 15) << 4 of row r's sub-block j, hi[t][r] =
//                           sc >> 4 | (mn >> 4) << 2 of sub-block 2t, and of 2t + 1 shifted by 4 (the
//                           file's 12 packed bytes of 6-bit scales and mins, arranged by row);
//                           chunk 16 t + p: byte 2r + e = file qs byte 32 t + 2p + e of row r (low
//                           nibble: element 2p + e of sub-block 2t; high: of sub-block 2t + 1)
// A 16-byte chunk widened to int16 is then the 8 rows' element pairs, one pair per 32-bit lane.
// h[p] broadcast to every 32-bit lane puts, in int16 lane 2r + e, the half e of it that holds both
// fifth bits of that lane: one AND against a constant per lane (bit r, or bit 8 + r) finds them.
#include <ATen/Parallel.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "cpu/common.h"
#include "cpu/quant_blocks.h"
#include "ops.h"

namespace lenserve {
namespace quant {

bool is_interleaved(int64_t type) { return (type & kInterleaved) != 0; }
int64_t base_type(int64_t type) { return type & ~kInterleaved; }
bool can_interleave(int64_t type) {
  return type == kQ8_0 || type == kQ4_0 || type == kQ4_1 || type == kQ5_0 || type == kQ5_1 || type == kQ4_K;
}

namespace {

// Chunks of 16 bytes in an interleaved block.
constexpr int64_t num_chunks(int64_t type) { return type == kQ8_0 ? 16 : 8; }

struct BlockFields {
  const uint8_t* d;
  const uint8_t* m;   // Q4_1 / Q5_1 only
  const uint8_t* qs;
  int64_t qs_bytes;
  const uint8_t* qh;  // Q5_0 / Q5_1 only
};

// Where the scale, min and quants of one file block lie.
BlockFields fields_of(int64_t type, const uint8_t* block) {
  switch (type) {
    case kQ8_0: {
      const auto* b = reinterpret_cast<const BlockQ8_0*>(block);
      return {reinterpret_cast<const uint8_t*>(&b->d), nullptr, reinterpret_cast<const uint8_t*>(b->qs), QK, nullptr};
    }
    case kQ4_0: {
      const auto* b = reinterpret_cast<const BlockQ4_0*>(block);
      return {reinterpret_cast<const uint8_t*>(&b->d), nullptr, b->qs, QK / 2, nullptr};
    }
    case kQ4_1: {
      const auto* b = reinterpret_cast<const BlockQ4_1*>(block);
      return {reinterpret_cast<const uint8_t*>(&b->d), reinterpret_cast<const uint8_t*>(&b->m), b->qs, QK / 2, nullptr};
    }
    case kQ5_0: {
      const auto* b = reinterpret_cast<const BlockQ5_0*>(block);
      return {reinterpret_cast<const uint8_t*>(&b->d), nullptr, b->qs, QK / 2, b->qh};
    }
    default: {
      const auto* b = reinterpret_cast<const BlockQ5_1*>(block);
      return {reinterpret_cast<const uint8_t*>(&b->d), reinterpret_cast<const uint8_t*>(&b->m), b->qs, QK / 2, b->qh};
    }
  }
}

// One Q4_K super-block of 8 file rows (block i of rows[r] -> row r) into the Q4_Kx8 layout at dst.
void interleave_q4k(const uint8_t* rows, int64_t row_bytes, int64_t i, uint8_t* dst) {
  std::memset(dst + 96, 0, 32);
  for (int r = 0; r < 8; ++r) {
    const auto& b = reinterpret_cast<const BlockQ4_K*>(rows + r * row_bytes)[i];
    std::memcpy(dst + 2 * r, &b.d, 2);
    std::memcpy(dst + 16 + 2 * r, &b.dmin, 2);
    for (int j = 0; j < 8; ++j) {
      uint8_t sc, mn;
      scale_min_k4(j, b.scales, &sc, &mn);
      dst[32 + 8 * j + r] = static_cast<uint8_t>((sc & 15) | (mn & 15) << 4);
      dst[96 + 8 * (j / 2) + r] |= static_cast<uint8_t>(((sc >> 4) | (mn >> 4) << 2) << (4 * (j % 2)));
    }
    for (int t = 0; t < 4; ++t)
      for (int p = 0; p < 16; ++p) std::memcpy(dst + kQ4KHeader + 16 * (16 * t + p) + 2 * r, b.qs + 32 * t + 2 * p, 2);
  }
}

// One group: 8 file rows (rows[r] -> row r) into the interleaved layout at out.
void interleave_group(int64_t type, const uint8_t* rows, int64_t row_bytes, int64_t nb, uint8_t* out) {
  const int64_t bb = block_bytes(type), hb = x8_header_bytes(type);
  if (type == kQ4_K) {
    for (int64_t i = 0; i < nb; ++i) interleave_q4k(rows, row_bytes, i, out + i * 8 * bb);
    return;
  }
  for (int64_t i = 0; i < nb; ++i) {
    uint8_t* dst = out + i * 8 * bb;
    uint32_t h[8] = {};
    for (int r = 0; r < 8; ++r) {
      const BlockFields f = fields_of(type, rows + r * row_bytes + i * bb);
      std::memcpy(dst + 2 * r, f.d, 2);
      if (f.m != nullptr) std::memcpy(dst + 16 + 2 * r, f.m, 2);
      for (int64_t p = 0; p < f.qs_bytes / 2; ++p) std::memcpy(dst + hb + 16 * p + 2 * r, f.qs + 2 * p, 2);
      if (f.qh == nullptr) continue;
      uint32_t fifth;  // bit j: element j's fifth bit
      std::memcpy(&fifth, f.qh, sizeof(fifth));
      for (int p = 0; p < 8; ++p)
        for (int e = 0; e < 2; ++e) {
          h[p] |= ((fifth >> (2 * p + e)) & 1u) << (16 * e + r);
          h[p] |= ((fifth >> (16 + 2 * p + e)) & 1u) << (16 * e + 8 + r);
        }
    }
    if (x8_is_q5(type)) std::memcpy(dst + hb - 32, h, sizeof(h));
  }
}

}  // namespace

void interleave_rows(int64_t type, uint8_t* data, int64_t N, int64_t row_bytes) {
  const int64_t nb = row_bytes / block_bytes(type);
  at::parallel_for(0, N / 8, 1, [&](int64_t g0, int64_t g1) {
    std::vector<uint8_t> rows(8 * row_bytes);
    for (int64_t g = g0; g < g1; ++g) {
      uint8_t* group = data + g * 8 * row_bytes;
      std::memcpy(rows.data(), group, rows.size());
      interleave_group(type, rows.data(), row_bytes, nb, group);
    }
  });
}

namespace {

// Row r's 6-bit scale and min of sub-block j of a Q4_Kx8 super-block b.
inline void q4k_scale_min(const uint8_t* b, int r, int j, int* sc, int* mn) {
  const int lo = b[32 + 8 * j + r], hi = b[96 + 8 * (j / 2) + r] >> (4 * (j % 2));
  *sc = (lo & 15) | (hi & 3) << 4;
  *mn = lo >> 4 | ((hi >> 2) & 3) << 4;
}

}  // namespace

void dequant_group_x8(int64_t type, const uint8_t* group, int64_t nb, int r0, int r1, float* rows, int64_t ldr) {
  const int64_t bb = block_bytes(type), hb = x8_header_bytes(type);
  if (type == kQ4_K) {  // nb counts blocks of 32: nb / 8 super-blocks; as dequant_row_q4_k computes
    for (int64_t i = 0; i < nb / 8; ++i) {
      const uint8_t* b = group + i * 8 * bb;
      const auto* d = reinterpret_cast<const uint16_t*>(b);
      const auto* dmin = reinterpret_cast<const uint16_t*>(b + 16);
      for (int r = r0; r < r1; ++r) {
        float* out = rows + (r - r0) * ldr + i * QK_K;
        const float dr = fp16_to_float(d[r]), mr = fp16_to_float(dmin[r]);
        for (int j = 0; j < 8; ++j) {
          int sc, mn;
          q4k_scale_min(b, r, j, &sc, &mn);
          const float dj = dr * static_cast<float>(sc), cj = mr * static_cast<float>(mn);
          const int t = j / 2, shift = 4 * (j % 2);
          for (int p = 0; p < 16; ++p)
            for (int e = 0; e < 2; ++e) {
              const uint8_t q = b[kQ4KHeader + 16 * (16 * t + p) + 2 * r + e];
              out[32 * j + 2 * p + e] = dj * static_cast<float>((q >> shift) & 15) - cj;
            }
        }
      }
    }
    return;
  }
  for (int64_t i = 0; i < nb; ++i) {
    const uint8_t* b = group + i * 8 * bb;
    const auto* d = reinterpret_cast<const uint16_t*>(b);
    const auto* mn = reinterpret_cast<const uint16_t*>(b + 16);
    const uint8_t* qs = b + hb;
    for (int r = r0; r < r1; ++r) {
      float* out = rows + (r - r0) * ldr + i * QK;
      const float dr = fp16_to_float(d[r]);
      if (type == kQ8_0) {
        for (int64_t p = 0; p < 16; ++p)
          for (int e = 0; e < 2; ++e) out[2 * p + e] = dr * static_cast<float>(static_cast<int8_t>(qs[16 * p + 2 * r + e]));
        continue;
      }
      // as the file-row dequantizers compute each type (the same floats: tested)
      const int offset = type == kQ4_0 ? 8 : (type == kQ5_0 ? 16 : 0);
      const float mr = x8_has_min(type) ? fp16_to_float(mn[r]) : 0.f;
      for (int64_t p = 0; p < 8; ++p) {
        const uint32_t h = x8_is_q5(type) ? x8_chunk_high_bits(b, type, p) : 0u;
        for (int e = 0; e < 2; ++e) {
          const uint8_t q = qs[16 * p + 2 * r + e];
          const int q0 = (q & 0xF) | static_cast<int>(((h >> (16 * e + r)) & 1u) << 4);
          const int q1 = (q >> 4) | static_cast<int>(((h >> (16 * e + 8 + r)) & 1u) << 4);
          out[2 * p + e] = dr * static_cast<float>(q0 - offset) + mr;
          out[16 + 2 * p + e] = dr * static_cast<float>(q1 - offset) + mr;
        }
      }
    }
  }
}

namespace {

#ifdef LENSERVE_AVX2
// MR activation rows against one group of 8 interleaved Q4_K rows: out[m * ldo + r]. Per sub-block
// j of super-block i and row: d * sc * xd * dot - dmin * mn * xs, as the file-row kernel.
template <int MR>
void group_tile_q4k(const uint8_t* group, const BlockQAct* xq, int64_t nb, float* out, int64_t ldo) {
  __m256 accf[MR];
  for (int m = 0; m < MR; ++m) accf[m] = _mm256_setzero_ps();
  const __m128i mask = _mm_set1_epi8(0xF);
  for (int64_t i = 0; i < nb / 8; ++i) {
    const uint8_t* b = group + i * 8 * sizeof(BlockQ4_K);
    const __m256 wd = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b)));
    const __m256 wmin = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 16)));
    for (int t = 0; t < 4; ++t) {
      const uint8_t* qs = b + kQ4KHeader + 256 * t;
      const BlockQAct* x0 = xq + 8 * i + 2 * t;  // sub-block 2t of row m: x0[m * nb], 2t + 1: x0[m * nb + 1]
      __m256i acc0[MR], acc1[MR];
      for (int m = 0; m < MR; ++m) acc0[m] = acc1[m] = _mm256_setzero_si256();
#pragma GCC unroll 2
      for (int p = 0; p < 16; ++p) {
        const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs + 16 * p));
        const __m256i lo = _mm256_cvtepu8_epi16(_mm_and_si128(v, mask));
        const __m256i hi = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(v, 4), mask));
        for (int m = 0; m < MR; ++m) {
          int32_t p0, p1;
          std::memcpy(&p0, x0[m * nb].qs + 2 * p, 4);
          std::memcpy(&p1, x0[m * nb + 1].qs + 2 * p, 4);
          acc0[m] = _mm256_add_epi32(acc0[m], _mm256_madd_epi16(lo, _mm256_set1_epi32(p0)));
          acc1[m] = _mm256_add_epi32(acc1[m], _mm256_madd_epi16(hi, _mm256_set1_epi32(p1)));
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
#else
template <int MR>
void group_tile_q4k(const uint8_t* group, const BlockQAct* xq, int64_t nb, float* out, int64_t ldo) {
  float acc[MR][8] = {};
  for (int64_t i = 0; i < nb / 8; ++i) {
    const uint8_t* b = group + i * 8 * sizeof(BlockQ4_K);
    const auto* d = reinterpret_cast<const uint16_t*>(b);
    const auto* dmin = reinterpret_cast<const uint16_t*>(b + 16);
    for (int r = 0; r < 8; ++r)
      for (int j = 0; j < 8; ++j) {
        int sc, mn;
        q4k_scale_min(b, r, j, &sc, &mn);
        const float dj = fp16_to_float(d[r]) * static_cast<float>(sc), cj = fp16_to_float(dmin[r]) * static_cast<float>(mn);
        const int t = j / 2, shift = 4 * (j % 2);
        for (int m = 0; m < MR; ++m) {
          const BlockQAct& a = xq[m * nb + 8 * i + j];
          int dot = 0;
          for (int p = 0; p < 16; ++p)
            for (int e = 0; e < 2; ++e) dot += ((b[kQ4KHeader + 16 * (16 * t + p) + 2 * r + e] >> shift) & 15) * a.qs[2 * p + e];
          acc[m][r] += dj * a.d * static_cast<float>(dot) - cj * a.s;
        }
      }
  }
  for (int m = 0; m < MR; ++m) std::memcpy(out + m * ldo, acc[m], 8 * sizeof(float));
}
#endif

#ifdef LENSERVE_AVX2
// MR activation rows (xq, nb blocks apart) against one group of 8 interleaved rows: out[m * ldo + r].
template <int64_t TYPE, int MR>
void group_tile(const uint8_t* group, const BlockQAct* xq, int64_t nb, float* out, int64_t ldo) {
  constexpr int64_t bb = file_block_bytes(TYPE);
  constexpr int64_t hb = x8_header_bytes(TYPE);
  __m256 accf[MR];
  for (int m = 0; m < MR; ++m) accf[m] = _mm256_setzero_ps();
  const __m128i mask = _mm_set1_epi8(0xF);
  for (int64_t i = 0; i < nb; ++i) {
    const uint8_t* b = group + i * 8 * bb;
    const uint8_t* qs = b + hb;
    const __m256 wd = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b)));
    __m256i acc[MR];
    for (int m = 0; m < MR; ++m) acc[m] = _mm256_setzero_si256();
    const int16_t* xs[MR];
    for (int m = 0; m < MR; ++m) xs[m] = xq[m * nb + i].qs;
    // Each 16-byte chunk widened to int16 is the 8 rows' element pairs (one per int32 lane),
    // dotted with every activation row's matching pair while in a register.
    if constexpr (TYPE == kQ8_0) {
#pragma GCC unroll 4
      for (int p = 0; p < 16; ++p) {
        const __m256i w = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qs + 16 * p)));
        for (int m = 0; m < MR; ++m) {
          int32_t pair;
          std::memcpy(&pair, xs[m] + 2 * p, 4);
          acc[m] = _mm256_add_epi32(acc[m], _mm256_madd_epi16(w, _mm256_set1_epi32(pair)));
        }
      }
    } else {
#pragma GCC unroll 2
      for (int p = 0; p < 8; ++p) {
        const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs + 16 * p));
        __m256i lo = _mm256_cvtepu8_epi16(_mm_and_si128(v, mask));
        __m256i hi = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(v, 4), mask));
        if constexpr (x8_is_q5(TYPE)) {
          // lane 2r + e: bit r (low nibble's fifth bit) and bit 8 + r (high nibble's) of h[p]'s half e
          const __m256i bit_lo = _mm256_setr_epi16(1, 1, 2, 2, 4, 4, 8, 8, 16, 16, 32, 32, 64, 64, 128, 128);
          const __m256i bit_hi = _mm256_slli_epi16(bit_lo, 8);
          const __m256i sixteen = _mm256_set1_epi16(16);
          const __m256i h = _mm256_set1_epi32(static_cast<int32_t>(x8_chunk_high_bits(b, TYPE, p)));
          lo = _mm256_or_si256(lo, _mm256_and_si256(_mm256_cmpeq_epi16(_mm256_and_si256(h, bit_lo), bit_lo), sixteen));
          hi = _mm256_or_si256(hi, _mm256_and_si256(_mm256_cmpeq_epi16(_mm256_and_si256(h, bit_hi), bit_hi), sixteen));
        }
        for (int m = 0; m < MR; ++m) {
          int32_t plo, phi;
          std::memcpy(&plo, xs[m] + 2 * p, 4);
          std::memcpy(&phi, xs[m] + 16 + 2 * p, 4);
          acc[m] = _mm256_add_epi32(acc[m], _mm256_add_epi32(_mm256_madd_epi16(lo, _mm256_set1_epi32(plo)),
                                                             _mm256_madd_epi16(hi, _mm256_set1_epi32(phi))));
        }
      }
    }
    if constexpr (TYPE == kQ8_0) {
      for (int m = 0; m < MR; ++m)
        accf[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[m]), _mm256_mul_ps(wd, _mm256_set1_ps(xq[m * nb + i].d)), accf[m]);
    } else {
      const __m256 wc = x8_has_min(TYPE) ? _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 16)))
                                      : _mm256_mul_ps(wd, _mm256_set1_ps(TYPE == kQ4_0 ? -8.f : -16.f));
      for (int m = 0; m < MR; ++m) {
        const BlockQAct& a = xq[m * nb + i];
        accf[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[m]), _mm256_mul_ps(wd, _mm256_set1_ps(a.d)), accf[m]);
        accf[m] = _mm256_fmadd_ps(wc, _mm256_set1_ps(a.s), accf[m]);
      }
    }
  }
  for (int m = 0; m < MR; ++m) _mm256_storeu_ps(out + m * ldo, accf[m]);
}
#else
template <int64_t TYPE, int MR>
void group_tile(const uint8_t* group, const BlockQAct* xq, int64_t nb, float* out, int64_t ldo) {
  constexpr int64_t bb = file_block_bytes(TYPE);
  constexpr int64_t hb = x8_header_bytes(TYPE);
  float acc[MR][8] = {};
  for (int64_t i = 0; i < nb; ++i) {
    const uint8_t* b = group + i * 8 * bb;
    const auto* d = reinterpret_cast<const uint16_t*>(b);
    const auto* mn = reinterpret_cast<const uint16_t*>(b + 16);
    const uint8_t* qs = b + hb;
    for (int r = 0; r < 8; ++r) {
      const float wd = fp16_to_float(d[r]);
      const float wc = x8_has_min(TYPE) ? fp16_to_float(mn[r]) : (TYPE == kQ8_0 ? 0.f : (TYPE == kQ4_0 ? -8.f : -16.f) * wd);
      for (int m = 0; m < MR; ++m) {
        const BlockQAct& a = xq[m * nb + i];
        int dot = 0;
        for (int p = 0; p < num_chunks(TYPE); ++p) {
          const uint32_t h = x8_is_q5(TYPE) ? x8_chunk_high_bits(b, TYPE, p) : 0u;
          for (int e = 0; e < 2; ++e) {
            const uint8_t q = qs[16 * p + 2 * r + e];
            if constexpr (TYPE == kQ8_0) {
              dot += static_cast<int8_t>(q) * a.qs[2 * p + e];
            } else {
              const int q0 = (q & 0xF) | static_cast<int>(((h >> (16 * e + r)) & 1u) << 4);
              const int q1 = (q >> 4) | static_cast<int>(((h >> (16 * e + 8 + r)) & 1u) << 4);
              dot += q0 * a.qs[2 * p + e] + q1 * a.qs[16 + 2 * p + e];
            }
          }
        }
        acc[m][r] += wd * a.d * static_cast<float>(dot) + wc * a.s;
      }
    }
  }
  for (int m = 0; m < MR; ++m) std::memcpy(out + m * ldo, acc[m], 8 * sizeof(float));
}
#endif

template <int64_t TYPE, int MR>
void tile(const uint8_t* group, const BlockQAct* xq, int64_t nb, float* out, int64_t ldo) {
  if constexpr (TYPE == kQ4_K) group_tile_q4k<MR>(group, xq, nb, out, ldo);
  else group_tile<TYPE, MR>(group, xq, nb, out, ldo);
}

template <int64_t TYPE>
void group_rows(const uint8_t* group, const BlockQAct* xq, int64_t nb, int64_t M, float* out, int64_t ldo) {
  int64_t m = 0;
  for (; m + kTileRows <= M; m += kTileRows) tile<TYPE, kTileRows>(group, xq + m * nb, nb, out + m * ldo, ldo);
  switch (M - m) {
    case 1: tile<TYPE, 1>(group, xq + m * nb, nb, out + m * ldo, ldo); break;
    case 2: tile<TYPE, 2>(group, xq + m * nb, nb, out + m * ldo, ldo); break;
    case 3: tile<TYPE, 3>(group, xq + m * nb, nb, out + m * ldo, ldo); break;
    default: break;
  }
}

constexpr int64_t kActBlockBytes = int64_t{128} << 10;  // gemm_x8's block of activation rows

// 1: quant_vnni.cpp's kernels, 0: this file's. Chosen once from the CPU and LENSERVE_CPU_ISA.
std::atomic<int>& vnni_flag() {
  static std::atomic<int> flag([] {
    const char* env = std::getenv("LENSERVE_CPU_ISA");
    const bool off = env != nullptr && std::string(env) == "avx2";
    return vnni_supported() && !off ? 1 : 0;
  }());
  return flag;
}

std::string kernel_isa() {
#ifdef LENSERVE_AVX2
  return use_vnni() ? "avx512_vnni" : "avx2";
#else
  return "scalar";
#endif
}

}  // namespace

bool use_vnni() { return vnni_flag().load(std::memory_order_relaxed) != 0; }

bool panel_from_group_x8(int64_t type, const uint8_t* group, int64_t nb, float* panel, int64_t ldp) {
#ifdef LENSERVE_AVX2
  if (type != kQ4_K) return false;
  // A chunk's byte 2r + e holds element 2p + e of row r: its even bytes are one element of the 8
  // rows, its odd bytes the next, which are 8 consecutive floats of two panel rows.
  const __m128i even_odd = _mm_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
  const __m128i mask = _mm_set1_epi8(0xF);
  const auto put = [&](float* dst, __m128i q8, __m256 scale, __m256 offset) {  // d * sc * q - dmin * mn, as dequant_row_q4_k
    _mm256_storeu_ps(dst, _mm256_sub_ps(_mm256_mul_ps(scale, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(q8))), offset));
  };
  for (int64_t i = 0; i < nb / 8; ++i) {
    const uint8_t* b = group + i * 8 * sizeof(BlockQ4_K);
    const __m256 wd = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b)));
    const __m256 wmin = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 16)));
    for (int t = 0; t < 4; ++t) {
      __m256 s0, m0, s1, m1;
      q4k_x8_scales(b, t, wd, wmin, &s0, &m0, &s1, &m1);
      float* dst = panel + (QK_K * i + 64 * t) * ldp;  // element 0 of sub-block 2t; 2t + 1 is 32 further
      for (int p = 0; p < 16; ++p, dst += 2 * ldp) {
        const __m128i v = _mm_shuffle_epi8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + kQ4KHeader + 256 * t + 16 * p)), even_odd);
        const __m128i lo = _mm_and_si128(v, mask), hi = _mm_and_si128(_mm_srli_epi16(v, 4), mask);
        put(dst, lo, s0, m0);
        put(dst + ldp, _mm_srli_si128(lo, 8), s0, m0);
        put(dst + 32 * ldp, hi, s1, m1);
        put(dst + 33 * ldp, _mm_srli_si128(hi, 8), s1, m1);
      }
    }
  }
  return true;
#else
  (void)type, (void)group, (void)nb, (void)panel, (void)ldp;
  return false;
#endif
}

void gemm_x8(int64_t type, const uint8_t* w, int64_t row_bytes, const BlockQAct* xq, int64_t nb, int64_t M, int64_t N,
             int64_t g0, int64_t g1, float* out) {
  const bool vnni = use_vnni();
  // Rows of x in blocks of ~kActBlockBytes, every group of [g0, g1) against one block before the
  // next: a prefill's activations (2048 rows: 2.6-7 MB) then stay in L2 across the groups instead
  // of streaming from L3 once per group of 8 columns. SmolLM2's qkv, gate_up and down at 2048 rows,
  // 2-core EPYC with VNNI, alternating in one process: 0.92-0.94x the time at 128 KiB (32-512
  // KiB alike); no change at 256 rows, whose activations fit L2 anyway.
  const int64_t MB = std::max<int64_t>(kVnniTileRows, kActBlockBytes / (nb * static_cast<int64_t>(sizeof(BlockQAct))) /
                                                          kVnniTileRows * kVnniTileRows);
  for (int64_t m0 = 0; m0 < M; m0 += MB) {
    const int64_t rows = std::min(MB, M - m0);
    const BlockQAct* x = xq + m0 * nb;
    float* o = out + m0 * N;
    for (int64_t g = g0; g < g1; ++g) {
      const uint8_t* group = w + g * 8 * row_bytes;
      if (vnni) {
        group_rows_vnni(type, group, x, nb, rows, o + g * 8, N);
        continue;
      }
      switch (type) {
        case kQ8_0: group_rows<kQ8_0>(group, x, nb, rows, o + g * 8, N); break;
        case kQ4_0: group_rows<kQ4_0>(group, x, nb, rows, o + g * 8, N); break;
        case kQ4_1: group_rows<kQ4_1>(group, x, nb, rows, o + g * 8, N); break;
        case kQ5_0: group_rows<kQ5_0>(group, x, nb, rows, o + g * 8, N); break;
        case kQ5_1: group_rows<kQ5_1>(group, x, nb, rows, o + g * 8, N); break;
        default: group_rows<kQ4_K>(group, x, nb, rows, o + g * 8, N); break;
      }
    }
  }
}

}  // namespace quant

std::string quant_kernel_isa(const std::string& isa) {
  using namespace quant;
  const std::string before = kernel_isa();
  if (isa.empty()) return before;
  if (isa == "avx512_vnni") {
    LS_CHECK(vnni_supported(), "quant_kernel_isa: this CPU lacks AVX-512 VNNI (or the build lacks AVX2)");
    vnni_flag().store(1);
  } else {
    LS_CHECK(isa == "avx2" || isa == "scalar", "quant_kernel_isa: unknown instruction set '", isa,
             "' (avx512_vnni, avx2, or empty to ask)");
    LS_CHECK(isa == before || (isa == "avx2" && before == "avx512_vnni"), "quant_kernel_isa: this build runs '",
             before, "', it cannot switch to '", isa, "'");
    vnni_flag().store(0);
  }
  return before;
}

}  // namespace lenserve
