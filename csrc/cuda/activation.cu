// SiLU-and-multiply of the gated MLP: out = silu(x[:, :d]) * x[:, d:], rounded once, as on CPU.
#include "cuda/common.cuh"

namespace lenserve {
namespace cuda {
namespace {

constexpr int kNumThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kNumThreads) silu_and_mul_kernel(T* __restrict__ out, const T* __restrict__ x, int d) {
  const T* gate = x + static_cast<int64_t>(blockIdx.x) * 2 * d;
  const T* up = gate + d;
  T* o = out + static_cast<int64_t>(blockIdx.x) * d;
  for (int i = threadIdx.x; i < d; i += kNumThreads) {
    const float g = to_float(gate[i]);
    o[i] = from_float<T>(g / (1.f + expf(-g)) * to_float(up[i]));
  }
}

}  // namespace

const char* silu_and_mul(void* out, const void* x, int num_tokens, int d, DType dtype, Stream stream) {
  if (num_tokens == 0 || d == 0) return nullptr;
  return dispatch_float_types(dtype, [&](auto zero) -> const char* {
    using T = decltype(zero);
    silu_and_mul_kernel<T><<<num_tokens, kNumThreads, 0, stream>>>(static_cast<T*>(out), static_cast<const T*>(x), d);
    return launch_error();
  });
}

}  // namespace cuda
}  // namespace lenserve
