// Row kernels of the elementwise ops (norms, SiLU, rotary embedding, cache writes), one row at a
// time: the ops (layernorm.cpp, activation.cpp, pos_encoding.cpp, cache.cpp) run them over their
// rows with at::parallel_for, and the fused decode step (decoder_layer.cpp) over its share of the
// rows inside its one parallel region, so both compute the same values.
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "cpu/common.h"
#include "cpu/vec.h"

namespace lenserve {
namespace rows {

template <typename T>
inline void rms_norm_row(const T* __restrict__ x, const T* __restrict__ w, T* __restrict__ out, int64_t d, float eps) {
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < d; ++i) {
    const float v = to_float(x[i]);
    sum += v * v;
  }
  const float inv = 1.f / std::sqrt(sum / static_cast<float>(d) + eps);
#pragma omp simd
  for (int64_t i = 0; i < d; ++i) out[i] = from_float<T>(to_float(w[i]) * from_float<T>(to_float(x[i]) * inv));
}

template <typename T>
inline void add_rms_norm_row(T* __restrict__ x, T* __restrict__ res, const T* __restrict__ w, int64_t d, float eps) {
#pragma omp simd
  for (int64_t i = 0; i < d; ++i) res[i] = from_float<T>(to_float(res[i]) + to_float(x[i]));
  rms_norm_row(res, w, x, d, eps);
}

// silu(g) * u = g / (1 + e^-g) * u in fp32, rounded once to T. The vector exp keeps this at a few
// cycles per element where libm's scalar expf dominated the MLP at decode batch sizes.
template <typename T>
inline void silu_and_mul_row(const T* __restrict__ gate, const T* __restrict__ up, T* __restrict__ out, int64_t d) {
  using namespace vec;
  [[maybe_unused]] const Vec8 one = set1(1.f);
  int64_t i = 0;
  if constexpr (!std::is_same_v<T, double>) {
    for (; i + kWidth <= d; i += kWidth) {
      const Vec8 g = vload(gate + i);
      const Vec8 silu = div(g, add(one, exp(sub(zero(), g))));
      vstore(out + i, mul(silu, vload(up + i)));
    }
  }
  for (; i < d; ++i) {
    const float g = to_float(gate[i]);
    out[i] = from_float<T>(g / (1.f + std::exp(-g)) * to_float(up[i]));
  }
}

// Rotates one head in place. NeoX style pairs element i with i + rot_dim / 2 (what HF Llama and
// Qwen2 use); GPT-J style pairs 2i with 2i + 1.
template <typename T>
inline void rotate_head(T* __restrict__ h, const float* __restrict__ cos, const float* __restrict__ sin, int64_t half,
                        bool is_neox) {
  if (is_neox) {
#pragma omp simd
    for (int64_t i = 0; i < half; ++i) {
      const float x1 = to_float(h[i]), x2 = to_float(h[i + half]);
      h[i] = from_float<T>(x1 * cos[i] - x2 * sin[i]);
      h[i + half] = from_float<T>(x2 * cos[i] + x1 * sin[i]);
    }
  } else {
    for (int64_t i = 0; i < half; ++i) {
      const float x1 = to_float(h[2 * i]), x2 = to_float(h[2 * i + 1]);
      h[2 * i] = from_float<T>(x1 * cos[i] - x2 * sin[i]);
      h[2 * i + 1] = from_float<T>(x2 * cos[i] + x1 * sin[i]);
    }
  }
}

template <typename src_t, typename dst_t>
inline void copy_rows(const src_t* __restrict__ src, dst_t* __restrict__ dst, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = from_float<dst_t>(to_float(src[i]));
}

}  // namespace rows
}  // namespace lenserve
