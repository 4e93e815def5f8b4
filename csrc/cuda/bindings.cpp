// CUDA implementations of the lenserve operators (schemas in csrc/torch_bindings.cpp): each
// checks its tensors, then hands pointers, sizes, strides and the current CUDA stream to a
// launcher in cuda/kernels.h. No CUDA header is needed here: the stream comes through c10's
// device-generic guard interface, so this file also compiles against a CPU build of torch.
//
// Values that live on the device are never read back here: a read-back is a device sync, and
// varlen_attention runs once a layer. The engine validates the step's metadata on the host where
// it builds it (engine/attention.py's check_cu_seqlens), and the kernels clamp or skip
// out-of-range entries (cu_seqlens, slot_mapping, block tables, context lengths, positions)
// instead of faulting. max_seqlen_q is an upper bound that sizes the varlen grid.
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/VirtualGuardImpl.h>
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>

#include "check.h"
#include "cuda/kernels.h"

namespace lenserve {
namespace {

#define LS_CHECK_CUDA(x) LS_CHECK((x).device().is_cuda(), #x " must be a CUDA tensor, got ", (x).device())
#define LS_CHECK_SAME_DEVICE(x, y)                                                                              \
  LS_CHECK((x).device() == (y).device(), #x " (", (x).device(), ") and " #y " (", (y).device(), \
           ") must be on the same device")
#define LS_CHECK_DIM(x, d) LS_CHECK((x).dim() == (d), #x " must have ", d, " dimensions, got ", (x).dim())
#define LS_CHECK_DTYPE(x, t) LS_CHECK((x).scalar_type() == (t), #x " must be ", t, ", got ", (x).scalar_type())
#define LS_CHECK_CONTIGUOUS(x) LS_CHECK((x).is_contiguous(), #x " must be contiguous")
#define LS_CHECK_SHAPE(x, ...)                                                                           \
  LS_CHECK((x).sizes() == at::IntArrayRef({__VA_ARGS__}), #x " must have shape (" #__VA_ARGS__ "), got ", \
           (x).sizes())

constexpr int64_t kMaxGridYZ = 65535;  // CUDA's limit on gridDim.y and gridDim.z
constexpr int64_t kMaxReduceSharedBytes = 48 * 1024;  // the split-K reduce keeps a float per partition

cuda::DType to_kernel_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return cuda::DType::kFloat32;
    case at::kHalf:
      return cuda::DType::kFloat16;
    case at::kBFloat16:
      return cuda::DType::kBFloat16;
    default:
      LS_CHECK(false, "lenserve CUDA kernels take float32, float16 or bfloat16 tensors, got ", t);
  }
}

bool is_float_type(at::ScalarType t) { return t == at::kFloat || t == at::kHalf || t == at::kBFloat16; }

// The current CUDA stream of `device` (what at::cuda::getCurrentCUDAStream returns), as cudaStream_t.
cuda::Stream current_stream(const at::Device& device) {
  const c10::impl::VirtualGuardImpl impl(device.type());
  return static_cast<cuda::Stream>(impl.getStream(device).native_handle());
}

void check_launch(const char* error, const char* op) {
  LS_CHECK(error == nullptr, op, ": CUDA kernel launch failed: ", error);
}

int32_t checked_int(int64_t v, const char* what) {
  LS_CHECK(v <= std::numeric_limits<int32_t>::max(), what, " (", v, ") exceeds the kernels' int32 range");
  return static_cast<int32_t>(v);
}

// [tokens, heads, head_dim] read with 16-byte vector loads: last dim contiguous, the other strides
// multiples of 8 elements, the start 16-byte aligned. The stride of a dimension of size 1 is never
// used (its only index is 0), so any value is legal there (torch gives num_kv_heads = 1 views
// strides such as 1).
bool row_stride_ok(const at::Tensor& x, int64_t dim) { return x.size(dim) <= 1 || x.stride(dim) % 8 == 0; }

void check_token_rows(const at::Tensor& x, const char* name) {
  LS_CHECK(x.size(2) <= 1 || x.stride(2) == 1, name, " must be contiguous in its last dimension");
  LS_CHECK(row_stride_ok(x, 0) && row_stride_ok(x, 1), name, " strides ", x.strides(),
           " must be multiples of 8 elements");
  LS_CHECK(reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0, name, " must start 16-byte aligned");
}

// A stride the kernels take: that of a size-1 dimension is unused, so pass 0 rather than a stray value.
int64_t used_stride(const at::Tensor& x, int64_t dim) { return x.size(dim) <= 1 ? 0 : x.stride(dim); }

// Streaming multiprocessors of a device, asked once per device.
int64_t multiprocessor_count(const at::Device& device) {
  static std::atomic<int> counts[64] = {};
  const int index = device.has_index() ? device.index() : 0;
  LS_CHECK(index >= 0 && index < 64, "CUDA device index ", index, " out of range");
  int n = counts[index].load(std::memory_order_relaxed);
  if (n <= 0) {
    const char* error = nullptr;
    n = cuda::device_multiprocessor_count(index, &error);
    LS_CHECK(error == nullptr, "cudaDeviceGetAttribute(MultiProcessorCount) failed: ", error);
    counts[index].store(n, std::memory_order_relaxed);
  }
  return n;
}

// q [total_q, num_heads, head_dim], k/v [total_k, num_kv_heads, head_dim] -> [total_q, num_heads, head_dim]
at::Tensor varlen_attention_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
                                 int64_t max_seqlen_k, double softmax_scale, bool causal) {
  LS_CHECK_CUDA(q);
  LS_CHECK_SAME_DEVICE(q, k);
  LS_CHECK_SAME_DEVICE(q, v);
  LS_CHECK_SAME_DEVICE(q, cu_seqlens_q);
  LS_CHECK_SAME_DEVICE(q, cu_seqlens_k);
  LS_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16,
           "varlen_attention on CUDA takes float16 or bfloat16 q/k/v, got ", q.scalar_type());
  LS_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), "q (", q.scalar_type(),
           "), k (", k.scalar_type(), ") and v (", v.scalar_type(), ") must have the same dtype");
  LS_CHECK_DIM(q, 3);
  LS_CHECK_DIM(k, 3);
  LS_CHECK_DIM(v, 3);
  const int64_t total_q = q.size(0), num_heads = q.size(1), head_dim = q.size(2);
  const int64_t total_k = k.size(0), num_kv_heads = k.size(1);
  LS_CHECK(head_dim == 64 || head_dim == 128, "varlen_attention on CUDA supports head_dim 64 and 128, got ",
           head_dim);
  LS_CHECK_SHAPE(k, total_k, num_kv_heads, head_dim);
  LS_CHECK_SHAPE(v, total_k, num_kv_heads, head_dim);
  LS_CHECK(num_kv_heads > 0 && num_heads % num_kv_heads == 0, "num_heads (", num_heads,
           ") must be a multiple of num_kv_heads (", num_kv_heads, ")");
  LS_CHECK(num_heads <= kMaxGridYZ, "num_heads (", num_heads, ") exceeds ", kMaxGridYZ);
  check_token_rows(q, "q");
  check_token_rows(k, "k");
  check_token_rows(v, "v");
  LS_CHECK_DTYPE(cu_seqlens_q, at::kInt);
  LS_CHECK_DTYPE(cu_seqlens_k, at::kInt);
  LS_CHECK_DIM(cu_seqlens_q, 1);
  LS_CHECK_DIM(cu_seqlens_k, 1);
  LS_CHECK_CONTIGUOUS(cu_seqlens_q);
  LS_CHECK_CONTIGUOUS(cu_seqlens_k);
  LS_CHECK(cu_seqlens_q.size(0) >= 1 && cu_seqlens_q.size(0) == cu_seqlens_k.size(0),
           "cu_seqlens_q and cu_seqlens_k must both have num_seqs + 1 entries, got ", cu_seqlens_q.size(0), " and ",
           cu_seqlens_k.size(0));
  const int64_t num_seqs = cu_seqlens_q.size(0) - 1;
  LS_CHECK(num_seqs <= kMaxGridYZ, "varlen_attention takes at most ", kMaxGridYZ, " sequences, got ", num_seqs);
  checked_int(total_q, "total_q");
  checked_int(total_k, "total_k");
  LS_CHECK(std::isfinite(softmax_scale), "softmax_scale must be finite, got ", softmax_scale);

  LS_CHECK(max_seqlen_q >= 0 && max_seqlen_k >= 0, "max_seqlen_q (", max_seqlen_q, ") and max_seqlen_k (",
           max_seqlen_k, ") must be >= 0");
  // The grid covers max_seqlen_q rows of every sequence; it need not exceed the tokens there are.
  const int64_t grid_rows = std::min(max_seqlen_q, total_q);

  at::Tensor out = at::empty({total_q, num_heads, head_dim}, q.options());
  if (total_q == 0) return out;
  const c10::DeviceGuard guard(q.device());
  cuda::VarlenAttentionParams p{};
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.out = out.data_ptr();
  p.cu_seqlens_q = cu_seqlens_q.data_ptr<int32_t>();
  p.cu_seqlens_k = cu_seqlens_k.data_ptr<int32_t>();
  p.q_token_stride = used_stride(q, 0);
  p.q_head_stride = used_stride(q, 1);
  p.k_token_stride = used_stride(k, 0);
  p.k_head_stride = used_stride(k, 1);
  p.v_token_stride = used_stride(v, 0);
  p.v_head_stride = used_stride(v, 1);
  p.num_seqs = static_cast<int>(num_seqs);
  p.num_heads = static_cast<int>(num_heads);
  p.num_kv_heads = static_cast<int>(num_kv_heads);
  p.head_dim = static_cast<int>(head_dim);
  p.total_q = static_cast<int>(total_q);
  p.total_k = static_cast<int>(total_k);
  p.max_seqlen_q = static_cast<int>(grid_rows);
  p.softmax_scale = static_cast<float>(softmax_scale);
  p.causal = causal;
  p.dtype = to_kernel_dtype(q.scalar_type());
  check_launch(cuda::varlen_attention(p, current_stream(q.device())), "varlen_attention");
  return out;
}

// q [num_seqs, num_heads, head_dim]; caches [num_blocks, block_size, num_kv_heads, head_dim]
at::Tensor paged_decode_attention_cuda(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                       const at::Tensor& block_tables, const at::Tensor& context_lens,
                                       double softmax_scale) {
  LS_CHECK_CUDA(q);
  LS_CHECK_SAME_DEVICE(q, k_cache);
  LS_CHECK_SAME_DEVICE(q, v_cache);
  LS_CHECK_SAME_DEVICE(q, block_tables);
  LS_CHECK_SAME_DEVICE(q, context_lens);
  LS_CHECK(is_float_type(q.scalar_type()), "paged_decode_attention on CUDA takes float32, float16 or bfloat16 q, got ",
           q.scalar_type());
  LS_CHECK(is_float_type(k_cache.scalar_type()) && v_cache.scalar_type() == k_cache.scalar_type(),
           "paged_decode_attention on CUDA takes k_cache and v_cache of one float dtype, got k_cache ",
           k_cache.scalar_type(), " and v_cache ", v_cache.scalar_type());
  LS_CHECK_DIM(q, 3);
  LS_CHECK_DIM(k_cache, 4);
  LS_CHECK_DIM(v_cache, 4);
  const int64_t num_seqs = q.size(0), num_heads = q.size(1), head_dim = q.size(2);
  const int64_t num_blocks = k_cache.size(0), block_size = k_cache.size(1), num_kv_heads = k_cache.size(2);
  LS_CHECK(head_dim == 64 || head_dim == 128, "paged_decode_attention on CUDA supports head_dim 64 and 128, got ",
           head_dim);
  LS_CHECK_SHAPE(k_cache, num_blocks, block_size, num_kv_heads, head_dim);
  LS_CHECK_SHAPE(v_cache, num_blocks, block_size, num_kv_heads, head_dim);
  LS_CHECK(num_kv_heads > 0 && num_heads % num_kv_heads == 0, "num_heads (", num_heads,
           ") must be a multiple of num_kv_heads (", num_kv_heads, ")");
  LS_CHECK(num_blocks > 0 && block_size > 0, "the KV cache is empty: shape ", k_cache.sizes());
  LS_CHECK(q.stride(2) == 1, "q must be contiguous in its last dimension");
  LS_CHECK_CONTIGUOUS(k_cache);
  LS_CHECK_CONTIGUOUS(v_cache);
  LS_CHECK(reinterpret_cast<uintptr_t>(k_cache.data_ptr()) % 16 == 0 &&
                  reinterpret_cast<uintptr_t>(v_cache.data_ptr()) % 16 == 0,
           "k_cache and v_cache must start 16-byte aligned");
  LS_CHECK_DTYPE(block_tables, at::kInt);
  LS_CHECK_DTYPE(context_lens, at::kInt);
  LS_CHECK_DIM(block_tables, 2);
  LS_CHECK_DIM(context_lens, 1);
  LS_CHECK_CONTIGUOUS(block_tables);
  LS_CHECK_CONTIGUOUS(context_lens);
  LS_CHECK(block_tables.size(0) == num_seqs, "block_tables has ", block_tables.size(0), " rows for ", num_seqs,
           " sequences");
  LS_CHECK(context_lens.size(0) == num_seqs, "context_lens has ", context_lens.size(0), " entries for ", num_seqs,
           " sequences");
  LS_CHECK(num_seqs <= kMaxGridYZ, "paged_decode_attention takes at most ", kMaxGridYZ, " sequences, got ",
           num_seqs);
  const int64_t max_blocks_per_seq = block_tables.size(1);
  checked_int(max_blocks_per_seq * block_size, "max_blocks_per_seq * block_size");
  checked_int(num_blocks * block_size, "the number of cache slots");
  LS_CHECK(std::isfinite(softmax_scale), "softmax_scale must be finite, got ", softmax_scale);

  // The kernel reads q and the caches in one dtype: a cache stored in another (--kv-cache-dtype
  // float16 under bfloat16 weights) takes q converted to it, and the output converted back. q is one
  // row per sequence, so that costs two tiny casts, not a pass over the cache.
  const at::ScalarType cache_type = k_cache.scalar_type();
  if (q.scalar_type() != cache_type) {
    return paged_decode_attention_cuda(q.to(cache_type), k_cache, v_cache, block_tables, context_lens, softmax_scale)
        .to(q.scalar_type());
  }

  at::Tensor out = at::empty({num_seqs, num_heads, head_dim}, q.options());
  if (num_seqs == 0) return out;
  const cuda::DecodeSplit split = cuda::paged_decode_split(max_blocks_per_seq * block_size, num_seqs, num_kv_heads,
                                                           num_heads / num_kv_heads, multiprocessor_count(q.device()));
  LS_CHECK(split.num_splits <= kMaxGridYZ && cuda::paged_decode_reduce_smem_bytes(split.num_splits) <= kMaxReduceSharedBytes,
           "paged_decode_attention: block tables of ", max_blocks_per_seq, " blocks x ", block_size,
           " tokens need ", split.num_splits, " split-K partitions, more than the kernels take (",
           kMaxReduceSharedBytes / 4, ")");
  const int num_splits = static_cast<int>(split.num_splits);
  at::Tensor partial_out, partial_lse;
  if (num_splits > 1) {
    const auto f32 = q.options().dtype(at::kFloat);
    partial_out = at::empty({num_seqs, num_heads, num_splits, head_dim}, f32);
    partial_lse = at::empty({num_seqs, num_heads, num_splits}, f32);
  }
  const c10::DeviceGuard guard(q.device());
  cuda::PagedDecodeParams p{};
  p.q = q.data_ptr();
  p.k_cache = k_cache.data_ptr();
  p.v_cache = v_cache.data_ptr();
  p.out = out.data_ptr();
  p.block_tables = block_tables.data_ptr<int32_t>();
  p.context_lens = context_lens.data_ptr<int32_t>();
  p.partial_out = num_splits > 1 ? partial_out.data_ptr<float>() : nullptr;
  p.partial_lse = num_splits > 1 ? partial_lse.data_ptr<float>() : nullptr;
  p.q_seq_stride = used_stride(q, 0);
  p.q_head_stride = used_stride(q, 1);
  p.num_seqs = static_cast<int>(num_seqs);
  p.num_heads = static_cast<int>(num_heads);
  p.num_kv_heads = static_cast<int>(num_kv_heads);
  p.head_dim = static_cast<int>(head_dim);
  p.num_blocks = static_cast<int>(num_blocks);
  p.block_size = static_cast<int>(block_size);
  p.max_blocks_per_seq = static_cast<int>(max_blocks_per_seq);
  p.num_splits = num_splits;
  p.partition_size = static_cast<int>(split.partition_size);
  p.softmax_scale = static_cast<float>(softmax_scale);
  p.dtype = to_kernel_dtype(q.scalar_type());
  check_launch(cuda::paged_decode_attention(p, current_stream(q.device())), "paged_decode_attention");
  return out;
}

// key/value [num_tokens, num_kv_heads, head_dim]; caches [num_blocks, block_size, num_kv_heads, head_dim]
void reshape_and_cache_cuda(const at::Tensor& key, const at::Tensor& value, at::Tensor& key_cache,
                            at::Tensor& value_cache, const at::Tensor& slot_mapping) {
  LS_CHECK_CUDA(key);
  LS_CHECK_SAME_DEVICE(key, value);
  LS_CHECK_SAME_DEVICE(key, key_cache);
  LS_CHECK_SAME_DEVICE(key, value_cache);
  LS_CHECK_SAME_DEVICE(key, slot_mapping);
  LS_CHECK_DIM(key, 3);
  LS_CHECK_DIM(value, 3);
  LS_CHECK_DIM(key_cache, 4);
  LS_CHECK_DIM(value_cache, 4);
  LS_CHECK_DTYPE(slot_mapping, at::kLong);
  LS_CHECK_DIM(slot_mapping, 1);
  LS_CHECK_CONTIGUOUS(slot_mapping);
  LS_CHECK_CONTIGUOUS(key_cache);
  LS_CHECK_CONTIGUOUS(value_cache);
  LS_CHECK(is_float_type(key.scalar_type()) && is_float_type(key_cache.scalar_type()),
           "reshape_and_cache takes float32, float16 or bfloat16 tensors, got key ", key.scalar_type(),
           " and key_cache ", key_cache.scalar_type());
  LS_CHECK(key.sizes() == value.sizes(), "key ", key.sizes(), " and value ", value.sizes(), " shapes differ");
  LS_CHECK(key_cache.sizes() == value_cache.sizes(), "key_cache and value_cache shapes differ");
  LS_CHECK(key.scalar_type() == value.scalar_type(), "key and value dtypes differ");
  LS_CHECK(key_cache.scalar_type() == value_cache.scalar_type(), "key_cache and value_cache dtypes differ");
  LS_CHECK(key.stride(2) == 1 && key.stride(1) == key.size(2) && value.stride(2) == 1 &&
                  value.stride(1) == value.size(2),
           "key/value must be contiguous per token");
  const int64_t num_tokens = key.size(0);
  LS_CHECK(slot_mapping.size(0) == num_tokens, "slot_mapping has ", slot_mapping.size(0), " entries for ",
           num_tokens, " tokens");
  LS_CHECK(key_cache.size(2) == key.size(1) && key_cache.size(3) == key.size(2),
           "cache [num_blocks, block_size, num_kv_heads, head_dim] ", key_cache.sizes(), " does not match key ",
           key.sizes());
  if (num_tokens == 0) return;
  const c10::DeviceGuard guard(key.device());
  cuda::ReshapeAndCacheParams p{};
  p.key = key.data_ptr();
  p.value = value.data_ptr();
  p.key_cache = key_cache.data_ptr();
  p.value_cache = value_cache.data_ptr();
  p.slot_mapping = slot_mapping.data_ptr<int64_t>();
  p.key_token_stride = key.stride(0);
  p.value_token_stride = value.stride(0);
  p.num_slots = key_cache.size(0) * key_cache.size(1);
  p.num_tokens = checked_int(num_tokens, "num_tokens");
  p.num_kv_heads = static_cast<int>(key.size(1));
  p.head_dim = static_cast<int>(key.size(2));
  p.dtype = to_kernel_dtype(key.scalar_type());
  p.cache_dtype = to_kernel_dtype(key_cache.scalar_type());
  check_launch(cuda::reshape_and_cache(p, current_stream(key.device())), "reshape_and_cache");
}

void check_norm_inputs(const at::Tensor& input, const at::Tensor& weight) {
  LS_CHECK_CUDA(input);
  LS_CHECK_SAME_DEVICE(input, weight);
  LS_CHECK_DIM(input, 2);
  LS_CHECK_DIM(weight, 1);
  LS_CHECK(is_float_type(input.scalar_type()), "input must be float32, float16 or bfloat16, got ",
           input.scalar_type());
  LS_CHECK(input.stride(1) == 1, "input rows must be contiguous");
  LS_CHECK_CONTIGUOUS(weight);
  LS_CHECK(input.size(1) == weight.size(0), "input hidden size ", input.size(1), " != weight size ",
           weight.size(0));
  LS_CHECK(input.scalar_type() == weight.scalar_type(), "input (", input.scalar_type(), ") and weight (",
           weight.scalar_type(), ") dtypes differ");
  checked_int(input.size(0), "num_tokens");
  checked_int(input.size(1), "hidden size");
}

// input [num_tokens, hidden]; weight [hidden] -> [num_tokens, hidden]
at::Tensor rms_norm_cuda(const at::Tensor& input, const at::Tensor& weight, double eps) {
  check_norm_inputs(input, weight);
  at::Tensor out = at::empty({input.size(0), input.size(1)}, input.options());
  const c10::DeviceGuard guard(input.device());
  check_launch(cuda::rms_norm(out.data_ptr(), input.data_ptr(), weight.data_ptr(), input.stride(0),
                              static_cast<int>(input.size(0)), static_cast<int>(input.size(1)),
                              static_cast<float>(eps), to_kernel_dtype(input.scalar_type()),
                              current_stream(input.device())),
               "rms_norm");
  return out;
}

// residual += input; input = rms_norm(residual) * weight (both in place)
void fused_add_rms_norm_cuda(at::Tensor& input, at::Tensor& residual, const at::Tensor& weight, double eps) {
  check_norm_inputs(input, weight);
  LS_CHECK_SAME_DEVICE(input, residual);
  LS_CHECK_CONTIGUOUS(input);
  LS_CHECK_CONTIGUOUS(residual);
  LS_CHECK(input.sizes() == residual.sizes(), "input ", input.sizes(), " and residual ", residual.sizes(),
           " shapes differ");
  LS_CHECK(input.scalar_type() == residual.scalar_type(), "input and residual dtypes differ");
  const c10::DeviceGuard guard(input.device());
  check_launch(cuda::fused_add_rms_norm(input.data_ptr(), residual.data_ptr(), weight.data_ptr(),
                                        static_cast<int>(input.size(0)), static_cast<int>(input.size(1)),
                                        static_cast<float>(eps), to_kernel_dtype(input.scalar_type()),
                                        current_stream(input.device())),
               "fused_add_rms_norm");
}

// x [num_tokens, 2 * d] -> [num_tokens, d]
at::Tensor silu_and_mul_cuda(const at::Tensor& x) {
  LS_CHECK_CUDA(x);
  LS_CHECK_DIM(x, 2);
  LS_CHECK_CONTIGUOUS(x);
  LS_CHECK(is_float_type(x.scalar_type()), "x must be float32, float16 or bfloat16, got ", x.scalar_type());
  LS_CHECK(x.size(1) % 2 == 0, "silu_and_mul: last dimension must be even, got ", x.size(1));
  const int64_t num_tokens = x.size(0), d = x.size(1) / 2;
  at::Tensor out = at::empty({num_tokens, d}, x.options());
  const c10::DeviceGuard guard(x.device());
  check_launch(cuda::silu_and_mul(out.data_ptr(), x.data_ptr(), checked_int(num_tokens, "num_tokens"),
                                  checked_int(d, "d"), to_kernel_dtype(x.scalar_type()), current_stream(x.device())),
               "silu_and_mul");
  return out;
}

// positions int64 [num_tokens]; query [num_tokens, num_heads * head_dim], key [num_tokens,
// num_kv_heads * head_dim] (rows may be strided views); cos_sin_cache float32 [max_position, rot_dim].
void rotary_embedding_cuda(const at::Tensor& positions, at::Tensor& query, at::Tensor& key, int64_t head_dim,
                           const at::Tensor& cos_sin_cache, bool is_neox) {
  LS_CHECK_CUDA(query);
  LS_CHECK_SAME_DEVICE(query, positions);
  LS_CHECK_SAME_DEVICE(query, key);
  LS_CHECK_SAME_DEVICE(query, cos_sin_cache);
  LS_CHECK_DTYPE(positions, at::kLong);
  LS_CHECK_DTYPE(cos_sin_cache, at::kFloat);
  LS_CHECK_DIM(positions, 1);
  LS_CHECK_CONTIGUOUS(positions);
  LS_CHECK_DIM(cos_sin_cache, 2);
  LS_CHECK_CONTIGUOUS(cos_sin_cache);
  LS_CHECK_DIM(query, 2);
  LS_CHECK_DIM(key, 2);
  LS_CHECK(is_float_type(query.scalar_type()), "query must be float32, float16 or bfloat16, got ",
           query.scalar_type());
  LS_CHECK(query.stride(1) == 1 && key.stride(1) == 1, "query and key rows must be contiguous");
  LS_CHECK(query.scalar_type() == key.scalar_type(), "query and key dtypes differ");
  const int64_t num_tokens = positions.size(0);
  LS_CHECK(query.size(0) == num_tokens && key.size(0) == num_tokens, "query/key must have one row per position");
  LS_CHECK(head_dim > 0 && query.size(1) % head_dim == 0 && key.size(1) % head_dim == 0,
           "query/key widths must be multiples of head_dim ", head_dim);
  const int64_t rot_dim = cos_sin_cache.size(1);
  LS_CHECK(rot_dim > 0 && rot_dim % 2 == 0 && rot_dim <= head_dim, "cos_sin_cache width ", rot_dim,
           " must be even and at most head_dim ", head_dim);
  const c10::DeviceGuard guard(query.device());
  check_launch(cuda::rotary_embedding(positions.data_ptr<int64_t>(), query.data_ptr(), key.data_ptr(),
                                      cos_sin_cache.data_ptr<float>(), query.stride(0), key.stride(0),
                                      checked_int(num_tokens, "num_tokens"),
                                      checked_int(query.size(1) / head_dim, "num_heads"),
                                      checked_int(key.size(1) / head_dim, "num_kv_heads"),
                                      checked_int(head_dim, "head_dim"), static_cast<int>(rot_dim),
                                      cos_sin_cache.size(0), is_neox, to_kernel_dtype(query.scalar_type()),
                                      current_stream(query.device())),
               "rotary_embedding");
}

}  // namespace
}  // namespace lenserve

TORCH_LIBRARY_IMPL(lenserve, CUDA, m) {
  m.impl("varlen_attention", &lenserve::varlen_attention_cuda);
  m.impl("paged_decode_attention", &lenserve::paged_decode_attention_cuda);
  m.impl("reshape_and_cache", &lenserve::reshape_and_cache_cuda);
  m.impl("rms_norm", &lenserve::rms_norm_cuda);
  m.impl("fused_add_rms_norm", &lenserve::fused_add_rms_norm_cuda);
  m.impl("silu_and_mul", &lenserve::silu_and_mul_cuda);
  m.impl("rotary_embedding", &lenserve::rotary_embedding_cuda);
}
