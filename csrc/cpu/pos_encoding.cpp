#include <ATen/Parallel.h>

#include "cpu/common.h"
#include "cpu/rows.h"
#include "ops.h"

namespace lenserve {

using rows::rotate_head;

void rotary_embedding_cpu(const torch::Tensor& positions, torch::Tensor& query, torch::Tensor& key, int64_t head_dim,
                          const torch::Tensor& cos_sin_cache, bool is_neox) {
  LS_CHECK_CPU(positions);
  LS_CHECK_CPU(query);
  LS_CHECK_CPU(key);
  LS_CHECK_CPU(cos_sin_cache);
  LS_CHECK_DTYPE(positions, at::kLong);
  LS_CHECK_DTYPE(cos_sin_cache, at::kFloat);
  LS_CHECK_CONTIGUOUS(positions);
  LS_CHECK_CONTIGUOUS(cos_sin_cache);
  LS_CHECK_DIM(query, 2);
  LS_CHECK_DIM(key, 2);
  LS_CHECK(query.stride(1) == 1 && key.stride(1) == 1, "query and key rows must be contiguous");
  LS_CHECK(query.scalar_type() == key.scalar_type(), "query and key dtypes differ");
  const int64_t n = positions.size(0);
  LS_CHECK(query.size(0) == n && key.size(0) == n, "query/key must have one row per position");
  LS_CHECK(head_dim > 0 && query.size(1) % head_dim == 0 && key.size(1) % head_dim == 0,
           "query/key widths must be multiples of head_dim ", head_dim);
  const int64_t rot_dim = cos_sin_cache.size(1);
  const int64_t* pos = positions.data_ptr<int64_t>();
  check_rotary_positions(pos, n, cos_sin_cache.size(0), rot_dim, head_dim);
  const int64_t num_heads = query.size(1) / head_dim, num_kv_heads = key.size(1) / head_dim;
  const int64_t qs = query.stride(0), ks = key.stride(0), half = rot_dim / 2;
  const float* cache = cos_sin_cache.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, query.scalar_type(), "rotary_embedding_cpu", [&] {
    scalar_t* q = query.data_ptr<scalar_t>();
    scalar_t* k = key.data_ptr<scalar_t>();
    at::parallel_for(0, n, row_grain((num_heads + num_kv_heads) * rot_dim), [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const float* cos = cache + pos[t] * rot_dim;
        const float* sin = cos + half;
        for (int64_t h = 0; h < num_heads; ++h) rotate_head(q + t * qs + h * head_dim, cos, sin, half, is_neox);
        for (int64_t h = 0; h < num_kv_heads; ++h) rotate_head(k + t * ks + h * head_dim, cos, sin, half, is_neox);
      }
    });
  });
}

}  // namespace lenserve
