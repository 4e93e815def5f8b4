// Rotary position embedding in place, one thread block per token; each thread owns whole
// (element, partner) pairs, so the in-place update needs no barrier. NeoX style pairs element i
// with i + rot_dim / 2, GPT-J style 2i with 2i + 1 (as csrc/cpu/pos_encoding.cpp).
#include "cuda/common.cuh"

namespace lenserve {
namespace cuda {
namespace {

constexpr int kNumThreads = 128;

template <typename T>
__global__ void __launch_bounds__(kNumThreads)
    rotary_embedding_kernel(const int64_t* __restrict__ positions, T* __restrict__ query, T* __restrict__ key,
                            const float* __restrict__ cos_sin_cache, int64_t query_row_stride, int64_t key_row_stride,
                            int num_heads, int num_kv_heads, int head_dim, int rot_dim, int64_t max_position,
                            bool is_neox) {
  const int token = blockIdx.x;
  const int64_t pos = positions[token];
  if (pos < 0 || pos >= max_position) return;
  const int half = rot_dim / 2;
  const float* cos = cos_sin_cache + pos * rot_dim;
  const float* sin = cos + half;
  for (int idx = threadIdx.x; idx < (num_heads + num_kv_heads) * half; idx += kNumThreads) {
    const int head = idx / half, i = idx % half;
    T* h = head < num_heads ? query + token * query_row_stride + head * head_dim
                            : key + token * key_row_stride + (head - num_heads) * head_dim;
    const int i1 = is_neox ? i : 2 * i;
    const int i2 = is_neox ? i + half : 2 * i + 1;
    const float x1 = to_float(h[i1]), x2 = to_float(h[i2]);
    h[i1] = from_float<T>(x1 * cos[i] - x2 * sin[i]);
    h[i2] = from_float<T>(x2 * cos[i] + x1 * sin[i]);
  }
}

}  // namespace

const char* rotary_embedding(const int64_t* positions, void* query, void* key, const float* cos_sin_cache,
                             int64_t query_row_stride, int64_t key_row_stride, int num_tokens, int num_heads,
                             int num_kv_heads, int head_dim, int rot_dim, int64_t max_position, bool is_neox,
                             DType dtype, Stream stream) {
  if (num_tokens == 0) return nullptr;
  return dispatch_float_types(dtype, [&](auto zero) -> const char* {
    using T = decltype(zero);
    rotary_embedding_kernel<T><<<num_tokens, kNumThreads, 0, stream>>>(
        positions, static_cast<T*>(query), static_cast<T*>(key), cos_sin_cache, query_row_stride, key_row_stride,
        num_heads, num_kv_heads, head_dim, rot_dim, max_position, is_neox);
    return launch_error();
  });
}

}  // namespace cuda
}  // namespace lenserve
