// Q4_K, Q5_K and Q6_K (256-element super-blocks): unpacking to fp32. The quantized linear uses
// these for every batch size (fp32 activations against unpacked rows); the loops are written
// per 32-element run so the compiler vectorises them.
#include "cpu/quant_blocks.h"

namespace lenserve {
namespace quant {
namespace {

// The j-th (0..7) 6-bit scale and min of a Q4_K / Q5_K super-block.
inline void scale_min_k4(int j, const uint8_t* q, uint8_t* sc, uint8_t* m) {
  if (j < 4) {
    *sc = q[j] & 63;
    *m = q[j + 4] & 63;
  } else {
    *sc = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
    *m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
  }
}

}  // namespace

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

}  // namespace quant
}  // namespace lenserve
