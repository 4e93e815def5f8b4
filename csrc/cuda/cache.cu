// Writes the new tokens' keys and values into the paged KV cache (one thread block per token).
#include "cuda/common.cuh"

namespace lenserve {
namespace cuda {
namespace {

constexpr int kNumThreads = 256;

template <typename T, typename C>
__global__ void __launch_bounds__(kNumThreads) reshape_and_cache_kernel(const ReshapeAndCacheParams p) {
  const int token = blockIdx.x;
  const int64_t slot = p.slot_mapping[token];
  if (slot < 0 || slot >= p.num_slots) return;  // padding token, or a slot past the cache
  const int row = p.num_kv_heads * p.head_dim;
  const T* key = static_cast<const T*>(p.key) + token * p.key_token_stride;
  const T* value = static_cast<const T*>(p.value) + token * p.value_token_stride;
  C* key_cache = static_cast<C*>(p.key_cache) + slot * row;
  C* value_cache = static_cast<C*>(p.value_cache) + slot * row;
  for (int i = threadIdx.x; i < row; i += kNumThreads) {
    key_cache[i] = from_float<C>(to_float(key[i]));
    value_cache[i] = from_float<C>(to_float(value[i]));
  }
}

}  // namespace

const char* reshape_and_cache(const ReshapeAndCacheParams& p, Stream stream) {
  if (p.num_tokens == 0) return nullptr;
  return dispatch_float_types(p.dtype, [&](auto src) -> const char* {
    return dispatch_float_types(p.cache_dtype, [&](auto dst) -> const char* {
      reshape_and_cache_kernel<decltype(src), decltype(dst)><<<p.num_tokens, kNumThreads, 0, stream>>>(p);
      return launch_error();
    });
  });
}

}  // namespace cuda
}  // namespace lenserve
