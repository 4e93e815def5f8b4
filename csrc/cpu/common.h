// Helpers shared by the CPU kernels.
#pragma once

#include <torch/all.h>

#include <sstream>

#define LS_CHECK_CPU(x) TORCH_CHECK((x).device().is_cpu(), #x " must be a CPU tensor, got ", (x).device())
#define LS_CHECK_CONTIGUOUS(x) TORCH_CHECK((x).is_contiguous(), #x " must be contiguous")
#define LS_CHECK_DIM(x, d) TORCH_CHECK((x).dim() == (d), #x " must have ", d, " dimensions, got ", (x).dim())
#define LS_CHECK_DTYPE(x, t) TORCH_CHECK((x).scalar_type() == (t), #x " must be ", t, ", got ", (x).scalar_type())

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
