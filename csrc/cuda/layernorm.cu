// RMSNorm and residual-add + RMSNorm, one thread block per token. Rounding follows
// csrc/cpu/layernorm.cpp: the normalised value is rounded to the tensor's dtype before the weight
// multiplies it, and the fused kernel normalises the residual as stored (rounded).
#include "cuda/common.cuh"

namespace lenserve {
namespace cuda {
namespace {

constexpr int kNumThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kNumThreads)
    rms_norm_kernel(T* __restrict__ out, const T* __restrict__ input, const T* __restrict__ weight,
                    int64_t input_row_stride, int hidden, float eps) {
  __shared__ float s_scratch[32];
  const T* x = input + blockIdx.x * input_row_stride;
  T* o = out + static_cast<int64_t>(blockIdx.x) * hidden;
  float sum_sq = 0.f;
  for (int i = threadIdx.x; i < hidden; i += kNumThreads) {
    const float v = to_float(x[i]);
    sum_sq += v * v;
  }
  const float inv_rms = rsqrtf(block_sum(sum_sq, s_scratch) / static_cast<float>(hidden) + eps);
  for (int i = threadIdx.x; i < hidden; i += kNumThreads)
    o[i] = from_float<T>(to_float(weight[i]) * round_to<T>(to_float(x[i]) * inv_rms));
}

template <typename T>
__global__ void __launch_bounds__(kNumThreads)
    fused_add_rms_norm_kernel(T* __restrict__ input, T* __restrict__ residual, const T* __restrict__ weight,
                              int hidden, float eps) {
  __shared__ float s_scratch[32];
  const int64_t offset = static_cast<int64_t>(blockIdx.x) * hidden;
  T* x = input + offset;
  T* res = residual + offset;
  float sum_sq = 0.f;
  for (int i = threadIdx.x; i < hidden; i += kNumThreads) {
    const T r = from_float<T>(to_float(res[i]) + to_float(x[i]));
    res[i] = r;
    const float v = to_float(r);
    sum_sq += v * v;
  }
  const float inv_rms = rsqrtf(block_sum(sum_sq, s_scratch) / static_cast<float>(hidden) + eps);
  // Each thread reads back only the residual elements it wrote itself.
  for (int i = threadIdx.x; i < hidden; i += kNumThreads)
    x[i] = from_float<T>(to_float(weight[i]) * round_to<T>(to_float(res[i]) * inv_rms));
}

}  // namespace

const char* rms_norm(void* out, const void* input, const void* weight, int64_t input_row_stride, int num_tokens,
                     int hidden, float eps, DType dtype, Stream stream) {
  if (num_tokens == 0) return nullptr;
  return dispatch_float_types(dtype, [&](auto zero) -> const char* {
    using T = decltype(zero);
    rms_norm_kernel<T><<<num_tokens, kNumThreads, 0, stream>>>(
        static_cast<T*>(out), static_cast<const T*>(input), static_cast<const T*>(weight), input_row_stride, hidden,
        eps);
    return launch_error();
  });
}

const char* fused_add_rms_norm(void* input, void* residual, const void* weight, int num_tokens, int hidden, float eps,
                               DType dtype, Stream stream) {
  if (num_tokens == 0) return nullptr;
  return dispatch_float_types(dtype, [&](auto zero) -> const char* {
    using T = decltype(zero);
    fused_add_rms_norm_kernel<T><<<num_tokens, kNumThreads, 0, stream>>>(
        static_cast<T*>(input), static_cast<T*>(residual), static_cast<const T*>(weight), hidden, eps);
    return launch_error();
  });
}

}  // namespace cuda
}  // namespace lenserve
