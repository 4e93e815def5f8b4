#include <ATen/Parallel.h>

#include "cpu/common.h"
#include "cpu/rows.h"
#include "ops.h"

namespace lenserve {

using rows::copy_rows;

void reshape_and_cache_cpu(const torch::Tensor& key, const torch::Tensor& value, torch::Tensor& key_cache,
                           torch::Tensor& value_cache, const torch::Tensor& slot_mapping) {
  LS_CHECK_CPU(key);
  LS_CHECK_CPU(value);
  LS_CHECK_CPU(key_cache);
  LS_CHECK_CPU(value_cache);
  LS_CHECK_CPU(slot_mapping);
  LS_CHECK_DIM(key, 3);
  LS_CHECK_DIM(value, 3);
  LS_CHECK_DIM(key_cache, 4);
  LS_CHECK_DIM(value_cache, 4);
  LS_CHECK_DTYPE(slot_mapping, at::kLong);
  LS_CHECK_CONTIGUOUS(slot_mapping);
  LS_CHECK_CONTIGUOUS(key_cache);
  LS_CHECK_CONTIGUOUS(value_cache);
  LS_CHECK(key.sizes() == value.sizes(), "key and value shapes differ");
  LS_CHECK(key_cache.sizes() == value_cache.sizes(), "key_cache and value_cache shapes differ");
  LS_CHECK(key.scalar_type() == value.scalar_type(), "key and value dtypes differ");
  LS_CHECK(key_cache.scalar_type() == value_cache.scalar_type(), "key_cache and value_cache dtypes differ");
  LS_CHECK(key.stride(2) == 1 && key.stride(1) == key.size(2) && value.stride(2) == 1 && value.stride(1) == value.size(2),
           "key/value must be contiguous per token");
  const int64_t n = key.size(0), row = key.size(1) * key.size(2);
  LS_CHECK(slot_mapping.size(0) == n, "slot_mapping has ", slot_mapping.size(0), " entries for ", n, " tokens");
  LS_CHECK(key_cache.size(2) == key.size(1) && key_cache.size(3) == key.size(2),
           "cache [num_blocks, block_size, num_kv_heads, head_dim] does not match key [tokens, ", key.size(1), ", ",
           key.size(2), "]");
  const int64_t num_slots = key_cache.size(0) * key_cache.size(1);
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  check_cache_slots(slots, n, num_slots);
  const int64_t k_stride = key.stride(0), v_stride = value.stride(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, key.scalar_type(), "reshape_and_cache_src", [&] {
    using src_t = scalar_t;
    const src_t* k = key.data_ptr<src_t>();
    const src_t* v = value.data_ptr<src_t>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, key_cache.scalar_type(), "reshape_and_cache_dst", [&] {
      scalar_t* kc = key_cache.data_ptr<scalar_t>();
      scalar_t* vc = value_cache.data_ptr<scalar_t>();
      at::parallel_for(0, n, row_grain(2 * row), [&](int64_t begin, int64_t end) {
        for (int64_t t = begin; t < end; ++t) {
          if (slots[t] < 0) continue;
          copy_rows(k + t * k_stride, kc + slots[t] * row, row);
          copy_rows(v + t * v_stride, vc + slots[t] * row, row);
        }
      });
    });
  });
}

}  // namespace lenserve
