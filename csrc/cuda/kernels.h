// Launchers of lenserve's CUDA kernels. Plain C++ on purpose: pointers, sizes, strides and a
// stream, so that the .cu files need the CUDA runtime alone and the torch binding (bindings.cpp)
// needs no CUDA header. Every launcher returns nullptr on success, else the CUDA error message of
// the launch. Strides are in elements; the last dimension of every tensor is contiguous.
#pragma once

#include <cstdint>

struct CUstream_st;  // cudaStream_t is CUstream_st*

namespace lenserve {
namespace cuda {

using Stream = CUstream_st*;

enum class DType : int { kFloat32, kFloat16, kBFloat16 };

// ---- attention -------------------------------------------------------------------------------

// q [total_q, num_heads, head_dim], k/v [total_k, num_kv_heads, head_dim] (strided views allowed:
// 16-byte aligned pointers, strides multiples of 8), out [total_q, num_heads, head_dim] contiguous.
// cu_seqlens_* int32 [num_seqs + 1] on the device; they are not read back on the host (that would
// sync the device twice a layer): the engine validates them where it builds them, on the host.
struct VarlenAttentionParams {
  const void* q;
  const void* k;
  const void* v;
  void* out;
  const int32_t* cu_seqlens_q;
  const int32_t* cu_seqlens_k;
  int64_t q_token_stride, q_head_stride;
  int64_t k_token_stride, k_head_stride;
  int64_t v_token_stride, v_head_stride;
  int num_seqs, num_heads, num_kv_heads, head_dim;
  int total_q, total_k;  // cu_seqlens entries are clamped to these, so bad metadata cannot fault
  int max_seqlen_q;      // an upper bound of the longest query run: sizes the grid (blocks past a run return)
  float softmax_scale;
  bool causal;  // aligned bottom-right: query i of a sequence sees keys j <= i + seqlen_k - seqlen_q
  DType dtype;  // kFloat16 or kBFloat16
};
const char* varlen_attention(const VarlenAttentionParams& p, Stream stream);

// Split-K (flash-decoding) plan of paged_decode_attention. One thread block handles one (KV head,
// chunk of up to 8 of its query heads, sequence, partition of the keys); a partition holds at most
// kDecodeMaxPartitionSize keys (the kernel's shared score buffer). Without splitting, batch 1 of a
// model with 8 KV heads launches 8 blocks on a GPU with 132 SMs, so the keys are split until the
// grid covers the SMs about twice over, in partitions of no fewer than kDecodeMinPartitionSize keys.
// Plain C++ (no CUDA header): the binding, the kernels and a CPU-side test share this one function.
constexpr int kDecodeMaxPartitionSize = 512;
constexpr int kDecodeMinPartitionSize = 64;
constexpr int kDecodeBlocksPerSM = 2;

// Query heads of one GQA group that one block serves: the next power of two, at most 8.
inline int paged_decode_group_tile(int64_t group) { return group <= 1 ? 1 : group == 2 ? 2 : group <= 4 ? 4 : 8; }

// Dynamic shared memory of the split-K reduce: a float weight per partition, rounded up to whole
// 16-byte words (nvcc reads the weights' tail, 1-3 floats, with one LDS.128, which
// compute-sanitizer's memcheck reports past an allocation of num_splits floats).
inline int64_t paged_decode_reduce_smem_bytes(int64_t num_splits) { return (num_splits + 3) / 4 * 16; }

struct DecodeSplit {
  int64_t num_splits;      // gridDim.z; the binding checks it against CUDA's 65535
  int64_t partition_size;  // keys per partition, a multiple of kDecodeMinPartitionSize, <= kDecodeMaxPartitionSize
};

// max_context_len: the longest context the block tables can describe (max_blocks_per_seq * block_size).
inline DecodeSplit paged_decode_split(int64_t max_context_len, int64_t num_seqs, int64_t num_kv_heads, int64_t group,
                                      int64_t num_sms) {
  const int64_t max_part = kDecodeMaxPartitionSize, min_part = kDecodeMinPartitionSize;
  if (max_context_len <= 0) return {1, max_part};
  const int64_t tile = paged_decode_group_tile(group);
  const int64_t blocks_per_split = num_kv_heads * ((group + tile - 1) / tile) * num_seqs;
  int64_t splits = (max_context_len + max_part - 1) / max_part;  // what the score buffer requires
  int64_t part = max_part;
  const int64_t target = kDecodeBlocksPerSM * num_sms;
  if (blocks_per_split > 0 && blocks_per_split * splits < target) {
    const int64_t want = (target + blocks_per_split - 1) / blocks_per_split;
    part = (max_context_len + want - 1) / want;
    part = (part + min_part - 1) / min_part * min_part;
    part = part < min_part ? min_part : (part > max_part ? max_part : part);
    splits = (max_context_len + part - 1) / part;
  }
  if (splits <= 1) return {1, max_part};
  return {splits, part};
}

// Streaming multiprocessors of a CUDA device (cached by the caller), or -1 with the error's message.
int device_multiprocessor_count(int device, const char** error);

// q [num_seqs, num_heads, head_dim] (strided), caches [num_blocks, block_size, num_kv_heads, head_dim]
// contiguous in q's dtype (the binding converts q to a cache of another dtype), block_tables int32 [num_seqs, max_blocks_per_seq], context_lens int32
// [num_seqs], out [num_seqs, num_heads, head_dim] contiguous. With num_splits > 1 the partitions write
// partial_out float [num_seqs, num_heads, num_splits, head_dim] and partial_lse float
// [num_seqs, num_heads, num_splits], and a second kernel combines them.
struct PagedDecodeParams {
  const void* q;
  const void* k_cache;
  const void* v_cache;
  void* out;
  const int32_t* block_tables;
  const int32_t* context_lens;
  float* partial_out;
  float* partial_lse;
  int64_t q_seq_stride, q_head_stride;
  int num_seqs, num_heads, num_kv_heads, head_dim;
  int num_blocks, block_size, max_blocks_per_seq;
  int num_splits;      // paged_decode_split(...).num_splits
  int partition_size;  // paged_decode_split(...).partition_size
  float softmax_scale;
  DType dtype;
};
const char* paged_decode_attention(const PagedDecodeParams& p, Stream stream);

// key/value [num_tokens, num_kv_heads, head_dim] (token stride free, rows contiguous) into caches
// [num_blocks, block_size, num_kv_heads, head_dim] at slot_mapping int64 [num_tokens]; a negative
// slot, or one past the cache, is skipped. Converts to the cache dtype.
struct ReshapeAndCacheParams {
  const void* key;
  const void* value;
  void* key_cache;
  void* value_cache;
  const int64_t* slot_mapping;
  int64_t key_token_stride, value_token_stride;
  int64_t num_slots;
  int num_tokens, num_kv_heads, head_dim;
  DType dtype, cache_dtype;
};
const char* reshape_and_cache(const ReshapeAndCacheParams& p, Stream stream);

// ---- model ops (semantics of csrc/cpu/*.cpp) ---------------------------------------------------

// out [num_tokens, hidden] = rms_norm(input) * weight; input rows may be strided.
const char* rms_norm(void* out, const void* input, const void* weight, int64_t input_row_stride, int num_tokens,
                     int hidden, float eps, DType dtype, Stream stream);
// residual += input; input = rms_norm(residual) * weight; both contiguous.
const char* fused_add_rms_norm(void* input, void* residual, const void* weight, int num_tokens, int hidden, float eps,
                               DType dtype, Stream stream);
// x [num_tokens, 2 * d] contiguous -> out [num_tokens, d] = silu(x[:, :d]) * x[:, d:]
const char* silu_and_mul(void* out, const void* x, int num_tokens, int d, DType dtype, Stream stream);
// In place on query [num_tokens, num_heads * head_dim] and key [num_tokens, num_kv_heads * head_dim]
// (row strides free); cos_sin_cache float [max_position, rot_dim]; a position outside the cache
// leaves its row untouched.
const char* rotary_embedding(const int64_t* positions, void* query, void* key, const float* cos_sin_cache,
                             int64_t query_row_stride, int64_t key_row_stride, int num_tokens, int num_heads,
                             int num_kv_heads, int head_dim, int rot_dim, int64_t max_position, bool is_neox,
                             DType dtype, Stream stream);

}  // namespace cuda
}  // namespace lenserve
