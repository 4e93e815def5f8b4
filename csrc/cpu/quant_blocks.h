// Block layouts of the GGUF (ggml) weight formats the CPU kernels read as they are in the file,
// each stated once (as ggml-common.h does), and the kernel entry points of each format family.
//
// A quantized matrix W [N, K] is N rows of K / block_elems(type) blocks, rows back to back, exactly
// the bytes of the GGUF tensor. Scales are IEEE fp16 (bf16 for BF16 rows).
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "cpu/vec.h"  // LENSERVE_AVX2

namespace lenserve {
namespace quant {

// ggml_type values, as GGUF stores them (gguf.GGMLQuantizationType).
enum Type : int64_t {
  kF32 = 0,
  kF16 = 1,
  kQ4_0 = 2,
  kQ4_1 = 3,
  kQ5_0 = 6,
  kQ5_1 = 7,
  kQ8_0 = 8,
  kQ4_K = 12,
  kQ5_K = 13,
  kQ6_K = 14,
  kBF16 = 30,
  // Added to Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 or Q4_K: rows interleaved eight at a time (quant_interleaved.cpp).
  kInterleaved = 1024,
};

constexpr int64_t QK = 32;     // elements per block of the legacy formats (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0)
constexpr int64_t QK_K = 256;  // elements per super-block of the K-quants
constexpr int64_t K_SCALE_SIZE = 12;

// Q8_0: x = d * q
struct BlockQ8_0 {
  uint16_t d;
  int8_t qs[QK];
};
// Q4_0: x = d * (q - 8); byte j holds element j (low nibble) and element j + 16 (high nibble)
struct BlockQ4_0 {
  uint16_t d;
  uint8_t qs[QK / 2];
};
// Q4_1: x = d * q + m; nibbles as Q4_0
struct BlockQ4_1 {
  uint16_t d;
  uint16_t m;
  uint8_t qs[QK / 2];
};
// Q5_0: x = d * (q - 16), q = nibble as Q4_0 | bit j of qh (little-endian, element j) << 4.
// llama.cpp's Q4_K_M falls back to Q5_0 (and Q5_K_M to Q5_1) for matrices whose rows are not
// whole 256-element super-blocks: most of SmolLM2's (576 wide) and Qwen2.5-0.5B's (896).
struct BlockQ5_0 {
  uint16_t d;
  uint8_t qh[4];
  uint8_t qs[QK / 2];
};
// Q5_1: x = d * q + m; q as Q5_0
struct BlockQ5_1 {
  uint16_t d;
  uint16_t m;
  uint8_t qh[4];
  uint8_t qs[QK / 2];
};
// Q4_K: 8 sub-blocks of 32 with 6-bit scales and mins packed in `scales` (see scale_min_k4);
// x = d * sc * q - dmin * m. Each 64 elements use 32 bytes of qs: low nibbles then high nibbles.
struct BlockQ4_K {
  uint16_t d;
  uint16_t dmin;
  uint8_t scales[K_SCALE_SIZE];
  uint8_t qs[QK_K / 2];
};
// Q5_K: Q4_K plus a fifth bit per element in qh (bit 2j and 2j+1 of qh[l] for the j-th 64 elements)
struct BlockQ5_K {
  uint16_t d;
  uint16_t dmin;
  uint8_t scales[K_SCALE_SIZE];
  uint8_t qh[QK_K / 8];
  uint8_t qs[QK_K / 2];
};
// Q6_K: 16 sub-blocks of 16 with int8 scales; x = d * sc * (q - 32), q = 4 low bits (ql) | 2 high bits (qh)
struct BlockQ6_K {
  uint8_t ql[QK_K / 2];
  uint8_t qh[QK_K / 4];
  int8_t scales[QK_K / 16];
  uint16_t d;
};
static_assert(sizeof(BlockQ8_0) == 34 && sizeof(BlockQ4_0) == 18 && sizeof(BlockQ4_1) == 20, "legacy block sizes");
static_assert(sizeof(BlockQ5_0) == 22 && sizeof(BlockQ5_1) == 24, "5-bit legacy block sizes");
static_assert(sizeof(BlockQ4_K) == 144 && sizeof(BlockQ5_K) == 176 && sizeof(BlockQ6_K) == 210, "K-quant block sizes");

// The j-th (0..7) 6-bit scale and min of a Q4_K / Q5_K super-block's packed `scales`.
inline void scale_min_k4(int j, const uint8_t* q, uint8_t* sc, uint8_t* m) {
  if (j < 4) {
    *sc = q[j] & 63;
    *m = q[j + 4] & 63;
  } else {
    *sc = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
    *m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
  }
}

// Activations of the integer dot products: one row quantized per 32 elements to int16 with
// fp32 d = max|x| / kActMax and s = d * sum(q) (llama.cpp's Q8_1 at 16 bits; quant_legacy.cpp
// says why 16).
constexpr float kActMax = 32767.f;
struct BlockQAct {
  float d;
  float s;
  int16_t qs[QK];
};

// f(std::integral_constant<int, MR>{}) for MR = min(M, 4): the row-kernel templates' register
// tile of 1-4 activation rows, picked at run time.
template <typename F>
inline void with_rows_1to4(int M, F&& f) {
  switch (M) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    default: f(std::integral_constant<int, 4>{}); break;
  }
}

// Elements per block and bytes per block of a type; 0 elements for a type the kernels do not read.
int64_t block_elems(int64_t type);
int64_t block_bytes(int64_t type);

inline float fp16_to_float(uint16_t h) {
#ifdef LENSERVE_AVX2
  return _cvtsh_ss(h);
#else
  return static_cast<float>(c10::Half(h, c10::Half::from_bits()));
#endif
}

// ---- legacy formats (quant_legacy.cpp) ----
void dequant_row_q8_0(const uint8_t* row, float* out, int64_t K);
void dequant_row_q4_0(const uint8_t* row, float* out, int64_t K);
void dequant_row_q4_1(const uint8_t* row, float* out, int64_t K);
void dequant_row_q5_0(const uint8_t* row, float* out, int64_t K);
void dequant_row_q5_1(const uint8_t* row, float* out, int64_t K);
// x [K] -> K / 32 activation blocks
void quantize_row_act(const float* x, BlockQAct* out, int64_t K);
// x [K] -> out [K] = d * q of the activation blocks quantize_row_act makes (same d, same q)
void round_row_act(const float* x, float* out, int64_t K);
// out[m * ldo] = dot(W row, x row m) for m < M (1..4), x rows as activation blocks nb apart;
// type is Q8_0, Q4_0, Q4_1, Q5_0 or Q5_1.
void dot_row_act(int64_t type, const uint8_t* row, const BlockQAct* xq, int64_t nb, int M, float* out, int64_t ldo);

// ---- legacy formats and Q4_K interleaved eight rows at a time (quant_interleaved.cpp) ----
// The layouts' sizes, shared by quant_interleaved.cpp's kernels and quant_vnni.cpp's (plain inline
// functions defined here, before any target pragma: they never take AVX-512 code with them).
constexpr bool x8_is_q5(int64_t type) { return type == kQ5_0 || type == kQ5_1; }
constexpr bool x8_has_min(int64_t type) { return type == kQ4_1 || type == kQ5_1; }
// Bytes before the chunks of an interleaved legacy block (the 8 scales, the 8 mins of Q4_1 / Q5_1,
// the fifth bits of Q5_0 / Q5_1).
constexpr int64_t x8_header_bytes(int64_t type) { return 16 + (x8_has_min(type) ? 16 : 0) + (x8_is_q5(type) ? 32 : 0); }
constexpr int64_t kQ4KHeader = 128;  // Q4_Kx8's bytes before the chunks
// Bytes of one file block of an interleavable type (block_bytes, at compile time for the kernels' templates).
constexpr int64_t file_block_bytes(int64_t type) {
  switch (type) {
    case kQ8_0: return sizeof(BlockQ8_0);
    case kQ4_0: return sizeof(BlockQ4_0);
    case kQ4_1: return sizeof(BlockQ4_1);
    case kQ5_0: return sizeof(BlockQ5_0);
    case kQ5_1: return sizeof(BlockQ5_1);
    default: return sizeof(BlockQ4_K);
  }
}
// Chunk p's fifth-bit word h[p] of an interleaved Q5_0 / Q5_1 block b.
inline uint32_t x8_chunk_high_bits(const uint8_t* b, int64_t type, int64_t p) {
  uint32_t h;
  std::memcpy(&h, b + x8_header_bytes(type) - 32 + 4 * p, sizeof(h));
  return h;
}
#ifdef LENSERVE_AVX2
// The 8 rows' d * sc and dmin * mn of sub-blocks 2t and 2t + 1 of a Q4_Kx8 super-block b, one row a
// lane (wd, wmin: the rows' d and dmin).
inline void q4k_x8_scales(const uint8_t* b, int t, __m256 wd, __m256 wmin, __m256* s0, __m256* m0, __m256* s1,
                          __m256* m1) {
  const __m256i lo0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(b + 32 + 16 * t)));
  const __m256i lo1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(b + 40 + 16 * t)));
  const __m256i hi = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(b + 96 + 8 * t)));
  const __m256i f = _mm256_set1_epi32(15), three = _mm256_set1_epi32(3);
  const auto top = [&](int shift) { return _mm256_slli_epi32(_mm256_and_si256(_mm256_srli_epi32(hi, shift), three), 4); };
  *s0 = _mm256_mul_ps(wd, _mm256_cvtepi32_ps(_mm256_or_si256(_mm256_and_si256(lo0, f), top(0))));
  *m0 = _mm256_mul_ps(wmin, _mm256_cvtepi32_ps(_mm256_or_si256(_mm256_srli_epi32(lo0, 4), top(2))));
  *s1 = _mm256_mul_ps(wd, _mm256_cvtepi32_ps(_mm256_or_si256(_mm256_and_si256(lo1, f), top(4))));
  *m1 = _mm256_mul_ps(wmin, _mm256_cvtepi32_ps(_mm256_or_si256(_mm256_srli_epi32(lo1, 4), top(6))));
}
#endif
bool is_interleaved(int64_t type);
int64_t base_type(int64_t type);  // the file type of an interleaved type (the type itself otherwise)
bool can_interleave(int64_t type);
// Activation rows per register tile of the interleaved GEMM.
constexpr int kTileRows = 4;
// In place: N (a multiple of 8) rows of `type` in file order become groups of 8 interleaved rows.
void interleave_rows(int64_t type, uint8_t* data, int64_t N, int64_t row_bytes);
// Rows r0..r1-1 (of 8) of one interleaved group as fp32: rows[(r - r0) * ldr + k].
void dequant_group_x8(int64_t type, const uint8_t* group, int64_t nb, int r0, int r1, float* rows, int64_t ldr);
// The 8 rows of one interleaved group as 8 columns of a panel: panel[k * ldp + r] for k < nb * 32,
// where the CPU has a direct kernel for the type (AVX2, Q4_K); false (nothing written) otherwise.
bool panel_from_group_x8(int64_t type, const uint8_t* group, int64_t nb, float* panel, int64_t ldp);
// out[m * N + n] = dot(W row n, x row m) for M activation rows (nb blocks each, back to back) and
// the rows n of groups g0..g1-1 (8 g0 .. 8 g1 - 1) of N (a multiple of 8) interleaved rows of
// `type` (the file type), on the calling thread (decode_cols splits the groups over threads).
void gemm_x8(int64_t type, const uint8_t* w, int64_t row_bytes, const BlockQAct* xq, int64_t nb, int64_t M, int64_t N,
             int64_t g0, int64_t g1, float* out);

// ---- the same GEMM with AVX-512 VNNI (quant_vnni.cpp) ----
// Activation rows per register tile there (32 vector registers).
constexpr int kVnniTileRows = 8;
// Whether this CPU runs quant_vnni.cpp's kernels (AVX512F/BW/VL + AVX512_VNNI), asked at run time.
bool vnni_supported();
// out[m * ldo + r] for M activation rows against one group of 8 interleaved rows of `type`
// (the file type), as gemm_x8 does per group; equal to the AVX2 kernel's bit for bit.
void group_rows_vnni(int64_t type, const uint8_t* group, const BlockQAct* xq, int64_t nb, int64_t M, float* out,
                     int64_t ldo);
// Whether gemm_x8 runs quant_vnni.cpp's kernels: where vnni_supported() and not turned off
// (LENSERVE_CPU_ISA=avx2 at start, or the quant_kernel_isa op, ops.h).
bool use_vnni();

// ---- the decode path of quant_linear (quant_linear.cpp), a range of columns at a time ----
// Bytes of one row of K elements; raises (naming `what`) on a type or K the kernels do not take.
int64_t row_bytes_of(int64_t type, int64_t K, const char* what);
// Whether quant_linear computes M rows of x against `type` on its integer-dot decode path (x
// quantized to activation blocks by quantize_row_act, then decode_cols).
bool on_integer_decode_path(int64_t type, int64_t M);
// Columns are split in multiples of this (8 for interleaved rows: one group).
int64_t decode_cols_unit(int64_t type);
// out[m * N + n] for n in [n0, n1) (multiples of decode_cols_unit) and m < M, from x's activation
// blocks (nb per row, rows back to back), on the calling thread: what quant_linear's decode path
// computes for those columns, bit for bit.
void decode_cols(int64_t type, const uint8_t* w, int64_t row_bytes, const BlockQAct* xq, int64_t nb, int64_t M,
                 int64_t N, int64_t n0, int64_t n1, float* out);

// ---- K-quants (quant_kquants.cpp) ----
void dequant_row_q4_k(const uint8_t* row, float* out, int64_t K);
void dequant_row_q5_k(const uint8_t* row, float* out, int64_t K);
void dequant_row_q6_k(const uint8_t* row, float* out, int64_t K);
// As dot_row_act, for a row of Q4_K, Q5_K or Q6_K super-blocks (nb activation blocks of 32).
void dot_row_act_k(int64_t type, const uint8_t* row, const BlockQAct* xq, int64_t nb, int M, float* out, int64_t ldo);

}  // namespace quant
}  // namespace lenserve
