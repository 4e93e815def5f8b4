// Helpers shared by the CPU kernels.
#pragma once

#include <torch/all.h>

#include "check.h"

#include <algorithm>

#define LS_CHECK_CPU(x) LS_CHECK((x).device().is_cpu(), #x " must be a CPU tensor, got ", (x).device())
#define LS_CHECK_CONTIGUOUS(x) LS_CHECK((x).is_contiguous(), #x " must be contiguous")
#define LS_CHECK_DIM(x, d) LS_CHECK((x).dim() == (d), #x " must have ", d, " dimensions, got ", (x).dim())
#define LS_CHECK_DTYPE(x, t) LS_CHECK((x).scalar_type() == (t), #x " must be ", t, ", got ", (x).scalar_type())

namespace lenserve {

// Float conversion for the element types the CPU kernels take.
template <typename T>
inline float to_float(T v) {
  return static_cast<float>(v);
}

template <typename T>
inline T from_float(float v) {
  return static_cast<T>(v);
}

}  // namespace lenserve

namespace lenserve {

// Calls fn(T{}) with T the C++ type of a float32, bfloat16 or float16 dtype; other dtypes raise.
// (A plain switch, since #pragma lines cannot appear inside AT_DISPATCH macro arguments.)
template <typename Fn>
void dispatch_float_types(at::ScalarType t, const char* what, Fn&& fn) {
  switch (t) {
    case at::kFloat: fn(float{}); break;
    case at::kBFloat16: fn(c10::BFloat16{}); break;
    case at::kHalf: fn(c10::Half{}); break;
    default: LS_CHECK(false, what, " must be float32, bfloat16 or float16, got ", t);
  }
}

// Rows per at::parallel_for chunk for elementwise/row-wise ops: at least ~32K elements, so the
// few rows of a decode step (a few microseconds of work) stay on the calling thread instead of
// paying a thread wake-up and barrier, which on a loaded machine can cost milliseconds.
constexpr int64_t kParallelElementsPerChunk = 1 << 15;
inline int64_t row_grain(int64_t elements_per_row) {
  return std::max<int64_t>(1, kParallelElementsPerChunk / std::max<int64_t>(elements_per_row, 1));
}

// Raises unless the rotary cos/sin table's width (rot_dim) fits a head and every one of the n
// positions indexes one of its max_pos rows (rotary_embedding and the fused decode stack).
inline void check_rotary_positions(const int64_t* pos, int64_t n, int64_t max_pos, int64_t rot_dim, int64_t head_dim) {
  LS_CHECK(rot_dim % 2 == 0 && rot_dim <= head_dim, "bad cos_sin_cache width ", rot_dim);
  for (int64_t i = 0; i < n; ++i)
    LS_CHECK(pos[i] >= 0 && pos[i] < max_pos, "position ", pos[i], " outside the rotary cache of ", max_pos);
}

// Raises on a slot past a cache of num_slots (a negative slot is a padding row, not written).
inline void check_cache_slots(const int64_t* slots, int64_t n, int64_t num_slots) {
  for (int64_t i = 0; i < n; ++i) LS_CHECK(slots[i] < num_slots, "slot ", slots[i], " outside the cache of ", num_slots);
}

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }
inline int64_t ceil_div(int64_t x, int64_t m) { return (x + m - 1) / m; }

}  // namespace lenserve
