// Single-token (decode) attention over the paged KV cache, split-K (flash-decoding) for long contexts.
//
// One thread block per (KV head, chunk of up to 8 of its query heads, sequence, partition of up to
// 512 keys; kernels.h's paged_decode_split sizes the partitions from the SM count): every K and V row the block loads serves all the query heads of its KV head (GQA). The
// block computes the partition's scores into shared memory, takes their softmax there, and
// accumulates P V. With one partition the block writes the output; with several it writes the
// partition's normalised output and log-sum-exp (base 2), and paged_decode_reduce_kernel combines
// the partitions of each (sequence, head).
//
// Thread layout: a key row of head_dim elements is read by head_dim / 8 consecutive lanes, 8
// elements (16 bytes of fp16/bf16) each, so a warp reads whole rows; partial dot products are
// summed across those lanes with shuffles. In P V the same lanes own the same 8 output dims, and
// the token lanes are summed by shuffles, then across warps through shared memory.
#include "cuda/common.cuh"

namespace lenserve {
namespace cuda {
namespace {

constexpr int kNumThreads = 128;
constexpr int kNumWarps = kNumThreads / 32;
constexpr int kPartition = kDecodeMaxPartitionSize;  // the score buffer; p.partition_size <= it
constexpr int kUnroll = 4;  // tokens per thread whose loads are in flight together
constexpr int kMinBlocksPerSM = 4;  // caps registers at 128 a thread; also keeps ptxas from spilling at 64
constexpr int kReduceThreads = 128;
constexpr float kLog2e = 1.4426950408889634f;

struct DecodeWork {
  int kv_head, head0, num_heads_here, seq, split, context_len, tok_begin, tok_end;
};

template <int kGroupTile>
__device__ __forceinline__ DecodeWork decode_work(const PagedDecodeParams& p, int num_head_chunks) {
  DecodeWork w;
  const int group = p.num_heads / p.num_kv_heads;
  const int chunk = blockIdx.x % num_head_chunks;
  w.kv_head = blockIdx.x / num_head_chunks;
  w.head0 = w.kv_head * group + chunk * kGroupTile;
  w.num_heads_here = min(kGroupTile, group - chunk * kGroupTile);
  w.seq = blockIdx.y;
  w.split = blockIdx.z;
  // Lengths past the block table are clamped so that no read leaves the sequence's blocks.
  w.context_len = min(max(p.context_lens[w.seq], 0), p.max_blocks_per_seq * p.block_size);
  w.tok_begin = w.split * p.partition_size;
  w.tok_end = min(w.context_len, w.tok_begin + p.partition_size);
  return w;
}

// Element offset of token t's row for this KV head. Block ids outside the cache are clamped: the
// binding cannot read the table without a device sync, and a wild id must not fault the context.
__device__ __forceinline__ int64_t slot_offset(const int32_t* table, int t, const PagedDecodeParams& p) {
  const int block = min(max(table[t / p.block_size], 0), p.num_blocks - 1);
  return (static_cast<int64_t>(block) * p.block_size + t % p.block_size) * p.num_kv_heads * p.head_dim;
}

template <typename T, int kHeadDim, int kGroupTile>
__global__ void __launch_bounds__(kNumThreads, kMinBlocksPerSM)
    paged_decode_kernel(const PagedDecodeParams p, int num_head_chunks) {
  constexpr int kLanesPerToken = kHeadDim / 8;
  constexpr int kTokenLanes = kNumThreads / kLanesPerToken;  // tokens per block step and unroll slot
  static_assert(kGroupTile <= kLanesPerToken, "one writer lane per (token, head)");
  static_assert(kNumWarps * kHeadDim <= kPartition, "the P V reduction reuses the scores' space");

  __shared__ float s_scores[kGroupTile][kPartition];
  __shared__ float s_max[kGroupTile], s_sum[kGroupTile];

  const DecodeWork w = decode_work<kGroupTile>(p, num_head_chunks);
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int64_t out_row = static_cast<int64_t>(w.seq) * p.num_heads + w.head0;  // row of [seqs * heads, head_dim]
  if (w.tok_begin >= w.tok_end) {
    // Past the context. With one partition the context is empty and the output is zeros; with
    // several, the reduce kernel reads only partitions inside the context.
    if (p.num_splits == 1) {
      T* out = static_cast<T*>(p.out) + out_row * kHeadDim;
      for (int idx = tid; idx < w.num_heads_here * kHeadDim; idx += kNumThreads) out[idx] = from_float<T>(0.f);
    }
    return;
  }

  const int dim0 = (lane % kLanesPerToken) * 8;  // this thread's 8 dims
  const int tok_lane = tid / kLanesPerToken;
  const int32_t* table = p.block_tables + static_cast<int64_t>(w.seq) * p.max_blocks_per_seq;
  const T* k_cache = static_cast<const T*>(p.k_cache) + w.kv_head * kHeadDim + dim0;
  const T* v_cache = static_cast<const T*>(p.v_cache) + w.kv_head * kHeadDim + dim0;

  // Queries pre-scaled to base-2 logits; heads past the group are zeros.
  float q[kGroupTile][8];
  const float scale_log2 = p.softmax_scale * kLog2e;
#pragma unroll
  for (int g = 0; g < kGroupTile; ++g) {
#pragma unroll
    for (int i = 0; i < 8; ++i) q[g][i] = 0.f;
    if (g < w.num_heads_here) {
      const T* qp = static_cast<const T*>(p.q) + w.seq * p.q_seq_stride + (w.head0 + g) * p.q_head_stride + dim0;
#pragma unroll
      for (int i = 0; i < 8; ++i) q[g][i] = to_float(qp[i]) * scale_log2;
    }
  }

  // Scores of the partition's keys.
  for (int base = w.tok_begin; base < w.tok_end; base += kTokenLanes * kUnroll) {
    float k[kUnroll][8];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int t = base + u * kTokenLanes + tok_lane;
      if (t < w.tok_end) {
        load8(k_cache + slot_offset(table, t, p), k[u]);
      } else {
#pragma unroll
        for (int i = 0; i < 8; ++i) k[u][i] = 0.f;
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int t = base + u * kTokenLanes + tok_lane;
      float dot[kGroupTile];
#pragma unroll
      for (int g = 0; g < kGroupTile; ++g) {
        dot[g] = 0.f;
#pragma unroll
        for (int i = 0; i < 8; ++i) dot[g] = fmaf(q[g][i], k[u][i], dot[g]);
#pragma unroll
        for (int off = kLanesPerToken / 2; off > 0; off >>= 1) dot[g] += __shfl_xor_sync(kFullMask, dot[g], off);
      }
      if (t < w.tok_end) {
#pragma unroll
        for (int g = 0; g < kGroupTile; ++g)
          if (lane % kLanesPerToken == g) s_scores[g][t - w.tok_begin] = dot[g];
      }
    }
  }
  __syncthreads();

  // Softmax over the partition, one warp per head.
  const int num_tokens = w.tok_end - w.tok_begin;
  for (int g = warp; g < kGroupTile; g += kNumWarps) {
    float mx = -INFINITY;
    for (int i = lane; i < num_tokens; i += 32) mx = fmaxf(mx, s_scores[g][i]);
    mx = warp_max(mx);
    float sum = 0.f;
    for (int i = lane; i < num_tokens; i += 32) {
      const float e = exp2f(s_scores[g][i] - mx);
      s_scores[g][i] = e;
      sum += e;
    }
    sum = warp_sum(sum);
    if (lane == 0) {
      s_max[g] = mx;
      s_sum[g] = sum;
    }
  }
  __syncthreads();

  // Unnormalised P V.
  float acc[kGroupTile][8];
#pragma unroll
  for (int g = 0; g < kGroupTile; ++g)
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[g][i] = 0.f;
  for (int base = w.tok_begin; base < w.tok_end; base += kTokenLanes * kUnroll) {
    float v[kUnroll][8];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int t = base + u * kTokenLanes + tok_lane;
      if (t < w.tok_end) load8(v_cache + slot_offset(table, t, p), v[u]);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int t = base + u * kTokenLanes + tok_lane;
      if (t < w.tok_end) {
#pragma unroll
        for (int g = 0; g < kGroupTile; ++g) {
          const float pw = s_scores[g][t - w.tok_begin];
#pragma unroll
          for (int i = 0; i < 8; ++i) acc[g][i] = fmaf(pw, v[u][i], acc[g][i]);
        }
      }
    }
  }
  // Sum the token lanes of the warp that own the same dims...
#pragma unroll
  for (int g = 0; g < kGroupTile; ++g)
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
      for (int off = kLanesPerToken; off < 32; off <<= 1) acc[g][i] += __shfl_xor_sync(kFullMask, acc[g][i], off);
  // ...then the warps, through the scores' shared memory: [warp][head][dim].
  float* s_partial = &s_scores[0][0];
  __syncthreads();  // every warp is done reading the scores
  if (lane < kLanesPerToken) {
#pragma unroll
    for (int g = 0; g < kGroupTile; ++g)
#pragma unroll
      for (int i = 0; i < 8; ++i) s_partial[(warp * kGroupTile + g) * kHeadDim + dim0 + i] = acc[g][i];
  }
  __syncthreads();

  for (int idx = tid; idx < w.num_heads_here * kHeadDim; idx += kNumThreads) {
    const int g = idx / kHeadDim, d = idx % kHeadDim;
    float o = 0.f;
#pragma unroll
    for (int wp = 0; wp < kNumWarps; ++wp) o += s_partial[(wp * kGroupTile + g) * kHeadDim + d];
    o /= s_sum[g];
    if (p.num_splits == 1) {
      static_cast<T*>(p.out)[(out_row + g) * kHeadDim + d] = from_float<T>(o);
    } else {
      const int64_t part = (out_row + g) * p.num_splits + w.split;
      p.partial_out[part * kHeadDim + d] = o;
      if (d == 0) p.partial_lse[part] = s_max[g] + log2f(s_sum[g]);
    }
  }
}

// Combines the partitions of one (head, sequence): weights exp2(lse - max lse), normalised.
template <typename T, int kHeadDim>
__global__ void __launch_bounds__(kReduceThreads) paged_decode_reduce_kernel(const PagedDecodeParams p) {
  extern __shared__ float s_weight[];  // [num_splits]
  __shared__ float s_scratch[32];
  const int head = blockIdx.x, seq = blockIdx.y, tid = threadIdx.x;
  const int context_len = min(max(p.context_lens[seq], 0), p.max_blocks_per_seq * p.block_size);
  const int num_parts = ceil_div(context_len, p.partition_size);
  const int64_t row = static_cast<int64_t>(seq) * p.num_heads + head;
  T* out = static_cast<T*>(p.out) + row * kHeadDim;
  if (num_parts == 0) {
    for (int d = tid; d < kHeadDim; d += kReduceThreads) out[d] = from_float<T>(0.f);
    return;
  }
  const float* lse = p.partial_lse + row * p.num_splits;
  const float* partial = p.partial_out + row * p.num_splits * kHeadDim;

  float mx = -INFINITY;
  for (int s = tid; s < num_parts; s += kReduceThreads) mx = fmaxf(mx, lse[s]);
  mx = block_max(mx, s_scratch);
  float sum = 0.f;
  for (int s = tid; s < num_parts; s += kReduceThreads) {
    const float wgt = exp2f(lse[s] - mx);
    s_weight[s] = wgt;
    sum += wgt;
  }
  sum = block_sum(sum, s_scratch);  // its barriers also publish s_weight
  const float inv_sum = 1.f / sum;
  for (int d = tid; d < kHeadDim; d += kReduceThreads) {
    float o = 0.f;
    for (int s = 0; s < num_parts; ++s) o = fmaf(s_weight[s], partial[s * kHeadDim + d], o);
    out[d] = from_float<T>(o * inv_sum);
  }
}

template <typename T, int kHeadDim, int kGroupTile>
const char* launch(const PagedDecodeParams& p, cudaStream_t stream) {
  const int group = p.num_heads / p.num_kv_heads;
  const int num_head_chunks = ceil_div(group, kGroupTile);
  const dim3 grid(p.num_kv_heads * num_head_chunks, p.num_seqs, p.num_splits);
  paged_decode_kernel<T, kHeadDim, kGroupTile><<<grid, kNumThreads, 0, stream>>>(p, num_head_chunks);
  if (const char* err = launch_error()) return err;
  if (p.num_splits > 1) {
    const dim3 reduce_grid(p.num_heads, p.num_seqs);
    const size_t smem = static_cast<size_t>(paged_decode_reduce_smem_bytes(p.num_splits));
    paged_decode_reduce_kernel<T, kHeadDim><<<reduce_grid, kReduceThreads, smem, stream>>>(p);
    return launch_error();
  }
  return nullptr;
}

// The group tile is the next power of two of the GQA group, at most 8 (larger groups take chunks).
template <typename T, int kHeadDim>
const char* launch_for_group(const PagedDecodeParams& p, cudaStream_t stream) {
  switch (paged_decode_group_tile(p.num_heads / p.num_kv_heads)) {
    case 1:
      return launch<T, kHeadDim, 1>(p, stream);
    case 2:
      return launch<T, kHeadDim, 2>(p, stream);
    case 4:
      return launch<T, kHeadDim, 4>(p, stream);
    default:
      return launch<T, kHeadDim, 8>(p, stream);
  }
}

}  // namespace

int device_multiprocessor_count(int device, const char** error) {
  int count = 0;
  const cudaError_t err = cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device);
  *error = err == cudaSuccess ? nullptr : cudaGetErrorString(err);
  return err == cudaSuccess ? count : -1;
}

const char* paged_decode_attention(const PagedDecodeParams& p, Stream stream) {
  if (p.num_seqs == 0) return nullptr;
  if (p.partition_size <= 0 || p.partition_size > kPartition)
    return "paged_decode_attention: partition_size must be in [1, 512]";
  if (p.head_dim != 64 && p.head_dim != 128) return "paged_decode_attention: head_dim must be 64 or 128";
  return dispatch_float_types(p.dtype, [&](auto zero) -> const char* {
    using T = decltype(zero);
    return p.head_dim == 64 ? launch_for_group<T, 64>(p, stream) : launch_for_group<T, 128>(p, stream);
  });
}

}  // namespace cuda
}  // namespace lenserve
