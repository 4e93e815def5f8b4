// Variable-length fused attention forward over packed tokens (FlashAttention-2 structure).
//
// One thread block per (query tile, head, sequence): the block finds its sequence's rows through
// cu_seqlens, so no token is padded. Four warps own 16 (head_dim 64) or 32 (head_dim 128) query
// rows each, so a tile is 64 or 128 rows, and sweep the sequence's keys in tiles of 64: S = Q K^T and O += P V on tensor cores (mma.sync m16n8k16,
// fp16/bf16 in, fp32 accumulate), with the softmax kept online in registers (running row max and
// row sum, base 2). Causal masking is aligned bottom-right; key tiles beyond the tile's last
// visible key are never loaded, and a tile no query of which sees any key writes zeros.
//
// At head_dim 128 a warp takes two 16-row m-tiles, as FlashAttention-2's 128 x 64 tiles do there:
// each K and V fragment read from shared memory feeds two MMAs instead of one, and each key tile
// loaded serves 128 query rows. (Measured on an H200 with one m-tile: 0.70x FA2 varlen, at 174
// registers and two blocks per SM, bound by shared-memory reads.)
//
// Shared memory: a Q tile of the block's rows and K and V tiles of 64 rows, x head_dim, each row
// padded by 16 bytes so the eight rows an ldmatrix phase reads fall on distinct banks. K of the next tile streams in (cp.async)
// while P V runs, V of the next tile while the next Q K^T runs.
//
// Fragment layouts (PTX ISA, mma.m16n8k16 with .f16/.bf16): lane = 4 * g + t. A (16x16, row):
// a0 = (g, 2t..2t+1), a1 = (g+8, 2t..), a2 = (g, 2t+8..), a3 = (g+8, 2t+8..). B (16x8, col):
// b0 = (k 2t..2t+1, n g), b1 = (k 2t+8.., n g). C (16x8 f32): c0,c1 = (g, 2t..2t+1), c2,c3 = (g+8, ..).
#include <cstdlib>
#include <cstring>

#include "cuda/common.cuh"

namespace lenserve {
namespace cuda {
namespace {

constexpr int kNumWarps = 4;
constexpr int kNumThreads = kNumWarps * 32;
constexpr float kLog2e = 1.4426950408889634f;

// kMTiles: 16-row m-tiles per warp; kBlockN: keys per tile.
template <int kHeadDim, int kMTiles_, int kBlockN_>
struct VarlenTraits {
  static constexpr int kMTiles = kMTiles_;
  static constexpr int kBlockN = kBlockN_;
  static constexpr int kWarpRows = 16 * kMTiles;
  static constexpr int kBlockM = kNumWarps * kWarpRows;  // query rows per thread block
  static constexpr int kRowStride = kHeadDim + 8;  // elements; +16 bytes against bank conflicts
  static constexpr int kChunksPerRow = kHeadDim / 8;  // 16-byte chunks
  static constexpr int kQElems = kBlockM * kRowStride;
  static constexpr int kKVElems = kBlockN * kRowStride;
  static constexpr int kSmemBytes = (kQElems + 2 * kKVElems) * 2;  // Q, K, V in 16-bit elements
};

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared, asynchronously; zero-filled when !valid (src is then not read).
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
               "r"(valid ? 16 : 0)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

// Four 8x8 matrices of 16-bit elements; lane i gives the shared address of row i % 8 of matrix i / 8.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// c += a * b for one 16x8x16 tile.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);
template <>
__device__ __forceinline__ void mma_16816<__half>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                                         uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two floats as one 32-bit register of T pairs, the lower index in the low half.
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  const __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
}
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
}

// Copies rows [0, num_rows) of a kRows x kHeadDim tile into shared memory; rows past num_rows are
// zero-filled, so padded keys hold zeros (never NaN garbage that 0 * x would spread).
template <typename T, int kHeadDim, int kRows>
__device__ __forceinline__ void load_tile_async(T* smem, const T* gmem, int64_t token_stride, int num_rows) {
  constexpr int kChunksPerRow = kHeadDim / 8, kRowStride = kHeadDim + 8;
  static_assert(kRows * kChunksPerRow % kNumThreads == 0, "tile chunks must split evenly over the threads");
#pragma unroll
  for (int i = 0; i < kRows * kChunksPerRow / kNumThreads; ++i) {
    const int idx = i * kNumThreads + threadIdx.x;
    const int row = idx / kChunksPerRow, chunk = idx % kChunksPerRow;
    const bool valid = row < num_rows;
    const T* src = gmem + (valid ? row * token_stride : 0) + chunk * 8;
    cp_async_16(smem + row * kRowStride + chunk * 8, src, valid);
  }
}

template <typename T, int kHeadDim, int kMTiles_, int kBlockN_>
__global__ void __launch_bounds__(kNumThreads) varlen_attention_kernel(const VarlenAttentionParams p) {
  using Tr = VarlenTraits<kHeadDim, kMTiles_, kBlockN_>;
  constexpr int kStride = Tr::kRowStride;
  constexpr int kMTiles = Tr::kMTiles, kBlockM = Tr::kBlockM, kBlockN = Tr::kBlockN, kWarpRows = Tr::kWarpRows;
  constexpr int kKSteps = kHeadDim / 16;  // k-steps of S = Q K^T
  constexpr int kNTiles = kBlockN / 8;    // 8-key column tiles of S
  constexpr int kDTiles = kHeadDim / 8;   // 8-wide column tiles of O

  const int seq = blockIdx.z, head = blockIdx.y;
  // Highest query tiles first: under causal masking they have the most keys to visit.
  const int m_block = gridDim.x - 1 - blockIdx.x;
  // Entries are clamped into [0, total]: metadata is validated on the host, never read back here.
  const int q_begin = min(max(p.cu_seqlens_q[seq], 0), p.total_q);
  const int seqlen_q = min(max(p.cu_seqlens_q[seq + 1], q_begin), p.total_q) - q_begin;
  const int m_start = m_block * kBlockM;
  if (m_start >= seqlen_q) return;
  const int k_begin = min(max(p.cu_seqlens_k[seq], 0), p.total_k);
  const int seqlen_k = min(max(p.cu_seqlens_k[seq + 1], k_begin), p.total_k) - k_begin;
  const int kv_head = head / (p.num_heads / p.num_kv_heads);
  const int rows_in_tile = min(kBlockM, seqlen_q - m_start);
  const int diag = seqlen_k - seqlen_q;  // causal: row i sees keys j <= i + diag

  int n_end = seqlen_k;  // keys [0, n_end) are visible to some row of this tile
  if (p.causal) n_end = min(n_end, m_start + rows_in_tile + diag);
  const int num_n_tiles = n_end > 0 ? ceil_div(n_end, kBlockN) : 0;

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  T* out = static_cast<T*>(p.out) + (static_cast<int64_t>(q_begin) + m_start) * p.num_heads * kHeadDim +
           static_cast<int64_t>(head) * kHeadDim;
  const int64_t out_token_stride = static_cast<int64_t>(p.num_heads) * kHeadDim;

  if (num_n_tiles == 0) {  // no row of the tile sees a key
    for (int idx = tid; idx < rows_in_tile * Tr::kChunksPerRow; idx += kNumThreads) {
      const int row = idx / Tr::kChunksPerRow, chunk = idx % Tr::kChunksPerRow;
      *reinterpret_cast<uint4*>(out + row * out_token_stride + chunk * 8) = make_uint4(0, 0, 0, 0);
    }
    return;
  }

  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* s_q = reinterpret_cast<T*>(smem_raw);
  T* s_k = s_q + Tr::kQElems;
  T* s_v = s_k + Tr::kKVElems;

  const T* q = static_cast<const T*>(p.q) + (static_cast<int64_t>(q_begin) + m_start) * p.q_token_stride +
               static_cast<int64_t>(head) * p.q_head_stride;
  const T* k = static_cast<const T*>(p.k) + static_cast<int64_t>(k_begin) * p.k_token_stride +
               static_cast<int64_t>(kv_head) * p.k_head_stride;
  const T* v = static_cast<const T*>(p.v) + static_cast<int64_t>(k_begin) * p.v_token_stride +
               static_cast<int64_t>(kv_head) * p.v_head_stride;

  // Groups in flight: [Q, K0] then [V0]; each iteration commits exactly one K and one V group
  // (possibly empty), so "wait until one group is pending" always means "the older one landed".
  load_tile_async<T, kHeadDim, kBlockM>(s_q, q, p.q_token_stride, rows_in_tile);
  load_tile_async<T, kHeadDim, kBlockN>(s_k, k, p.k_token_stride, min(kBlockN, seqlen_k));
  cp_async_commit();
  load_tile_async<T, kHeadDim, kBlockN>(s_v, v, p.v_token_stride, min(kBlockN, seqlen_k));
  cp_async_commit();

  const int g = lane / 4, t = lane % 4;
  // This thread's rows: row0 + 16 mt and row0 + 16 mt + 8 for each m-tile mt.
  const int row0 = m_start + warp * kWarpRows + g;
  const float scale_log2 = p.softmax_scale * kLog2e;

  // Per-lane ldmatrix addresses (bytes); the loops below add compile-time offsets.
  // Q (A operand) matrices: (rows 0-7, dims 0-7), (rows 8-15, dims 0-7), (rows 0-7, dims 8-15), (rows 8-15, dims 8-15).
  // m-tile mt adds 16 rows.
  const uint32_t q_addr = smem_addr(s_q + (warp * kWarpRows + lane % 16) * kStride + (lane / 16) * 8);
  // K (B operand of Q K^T): (keys 0-7, dims 0-7), (keys 0-7, dims 8-15), (keys 8-15, dims 0-7), (keys 8-15, dims 8-15).
  const uint32_t k_addr = smem_addr(s_k + (lane % 8 + (lane / 16) * 8) * kStride + ((lane / 8) % 2) * 8);
  // V (B operand of P V, transposed): (keys 0-7, dims 0-7), (keys 8-15, dims 0-7), (keys 0-7, dims 8-15), (keys 8-15, dims 8-15).
  const uint32_t v_addr = smem_addr(s_v + (lane % 16) * kStride + (lane / 16) * 8);

  float o_acc[kMTiles][kDTiles][4];
  float row_max[kMTiles][2], row_sum[kMTiles][2];  // row_sum: this thread's share; the quad's at the end
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
    for (int i = 0; i < kDTiles; ++i) o_acc[mt][i][0] = o_acc[mt][i][1] = o_acc[mt][i][2] = o_acc[mt][i][3] = 0.f;
    row_max[mt][0] = row_max[mt][1] = -INFINITY;
    row_sum[mt][0] = row_sum[mt][1] = 0.f;
  }

  for (int n_tile = 0; n_tile < num_n_tiles; ++n_tile) {
    const int n_start = n_tile * kBlockN;
    cp_async_wait<1>();  // K of this tile (and Q) landed
    __syncthreads();

    // S = Q K^T for this warp's rows x 64 keys. Q fragments are re-read from shared memory at
    // each k-step rather than held in registers, which head_dim 128 could not afford; each K
    // fragment serves every m-tile.
    float s[kMTiles][kNTiles][4];
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
      for (int i = 0; i < kNTiles; ++i) s[mt][i][0] = s[mt][i][1] = s[mt][i][2] = s[mt][i][3] = 0.f;
#pragma unroll(kMTiles == 1 ? kKSteps : 2)  // fully unrolled at two m-tiles, loads hoist into spills
    for (int kk = 0; kk < kKSteps; ++kk) {
      uint32_t a[kMTiles][4];
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt) ldmatrix_x4(a[mt], q_addr + (mt * 16 * kStride + kk * 16) * 2);
#pragma unroll
      for (int np = 0; np < kNTiles / 2; ++np) {
        uint32_t b[4];
        ldmatrix_x4(b, k_addr + (np * 16 * kStride + kk * 16) * 2);
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt) {
          mma_16816<T>(s[mt][2 * np], a[mt], b[0], b[1]);
          mma_16816<T>(s[mt][2 * np + 1], a[mt], b[2], b[3]);
        }
      }
    }
    __syncthreads();  // every warp is done with s_k
    if (n_tile + 1 < num_n_tiles)
      load_tile_async<T, kHeadDim, kBlockN>(s_k, k + static_cast<int64_t>(n_start + kBlockN) * p.k_token_stride,
                                   p.k_token_stride, min(kBlockN, seqlen_k - n_start - kBlockN));
    cp_async_commit();

    // Scale to base 2 and mask; only the tiles that cross the sequence end or the diagonal need it.
    const bool need_mask =
        n_start + kBlockN > seqlen_k || (p.causal && n_start + kBlockN - 1 > m_start + diag);
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
      for (int nt = 0; nt < kNTiles; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          s[mt][nt][e] *= scale_log2;
          if (need_mask) {
            const int col = n_start + nt * 8 + 2 * t + (e & 1);
            const int row = row0 + mt * 16 + (e >= 2 ? 8 : 0);
            if (col >= seqlen_k || (p.causal && col > row + diag)) s[mt][nt][e] = -INFINITY;
          }
        }
      }

    // Online softmax. A row with every key so far masked keeps max -inf; it then uses 0 as the
    // reference so that exp2(-inf - ref) = 0 instead of NaN.
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt) {
      float ref[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        float mx = row_max[mt][i];
#pragma unroll
        for (int nt = 0; nt < kNTiles; ++nt) mx = fmaxf(mx, fmaxf(s[mt][nt][2 * i], s[mt][nt][2 * i + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(kFullMask, mx, 1));  // the 4 lanes of a quad share a row
        mx = fmaxf(mx, __shfl_xor_sync(kFullMask, mx, 2));
        ref[i] = mx == -INFINITY ? 0.f : mx;
        const float correction = exp2f(row_max[mt][i] - ref[i]);
        row_max[mt][i] = mx;
        row_sum[mt][i] *= correction;
#pragma unroll
        for (int dt = 0; dt < kDTiles; ++dt) {
          o_acc[mt][dt][2 * i] *= correction;
          o_acc[mt][dt][2 * i + 1] *= correction;
        }
      }
#pragma unroll
      for (int nt = 0; nt < kNTiles; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          s[mt][nt][e] = exp2f(s[mt][nt][e] - ref[e / 2]);
          row_sum[mt][e / 2] += s[mt][nt][e];
        }
      }
    }

    cp_async_wait<1>();  // V of this tile landed (the next K may still be in flight)
    __syncthreads();

    // O += P V: P comes straight from the S accumulators (C layout of two n-tiles = A layout).
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk) {
      uint32_t a[kMTiles][4];
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt) {
        a[mt][0] = pack2<T>(s[mt][2 * kk][0], s[mt][2 * kk][1]);
        a[mt][1] = pack2<T>(s[mt][2 * kk][2], s[mt][2 * kk][3]);
        a[mt][2] = pack2<T>(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
        a[mt][3] = pack2<T>(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
      }
#pragma unroll
      for (int dp = 0; dp < kDTiles / 2; ++dp) {
        uint32_t b[4];
        ldmatrix_x4_trans(b, v_addr + (kk * 16 * kStride + dp * 16) * 2);
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt) {
          mma_16816<T>(o_acc[mt][2 * dp], a[mt], b[0], b[1]);
          mma_16816<T>(o_acc[mt][2 * dp + 1], a[mt], b[2], b[3]);
        }
      }
    }
    __syncthreads();  // every warp is done with s_v
    if (n_tile + 1 < num_n_tiles)
      load_tile_async<T, kHeadDim, kBlockN>(s_v, v + static_cast<int64_t>(n_start + kBlockN) * p.v_token_stride,
                                   p.v_token_stride, min(kBlockN, seqlen_k - n_start - kBlockN));
    cp_async_commit();
  }

  // Normalise; a row that saw no key has sum 0 and outputs zeros.
  // Stage this warp's rows in its own rows of s_q (no other warp reads them), then write them out
  // as 16-byte stores.
  T* s_o = s_q + warp * kWarpRows * kStride;
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt) {
    float inv_sum[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      float sum = row_sum[mt][i];
      sum += __shfl_xor_sync(kFullMask, sum, 1);
      sum += __shfl_xor_sync(kFullMask, sum, 2);
      inv_sum[i] = sum > 0.f ? 1.f / sum : 0.f;
    }
    T* s_o_mt = s_o + mt * 16 * kStride;
#pragma unroll
    for (int dt = 0; dt < kDTiles; ++dt) {
      *reinterpret_cast<uint32_t*>(s_o_mt + g * kStride + dt * 8 + 2 * t) =
          pack2<T>(o_acc[mt][dt][0] * inv_sum[0], o_acc[mt][dt][1] * inv_sum[0]);
      *reinterpret_cast<uint32_t*>(s_o_mt + (g + 8) * kStride + dt * 8 + 2 * t) =
          pack2<T>(o_acc[mt][dt][2] * inv_sum[1], o_acc[mt][dt][3] * inv_sum[1]);
    }
  }
  __syncwarp();
  const int warp_rows = min(kWarpRows, rows_in_tile - warp * kWarpRows);
  T* out_warp = out + static_cast<int64_t>(warp * kWarpRows) * out_token_stride;
  for (int idx = lane; idx < warp_rows * Tr::kChunksPerRow; idx += 32) {
    const int row = idx / Tr::kChunksPerRow, chunk = idx % Tr::kChunksPerRow;
    *reinterpret_cast<uint4*>(out_warp + row * out_token_stride + chunk * 8) =
        *reinterpret_cast<const uint4*>(s_o + row * kStride + chunk * 8);
  }
}

template <typename T, int kHeadDim, int kMTiles, int kBlockN>
const char* launch(const VarlenAttentionParams& p, cudaStream_t stream) {
  using Tr = VarlenTraits<kHeadDim, kMTiles, kBlockN>;
  constexpr int smem = Tr::kSmemBytes;
  auto kernel = varlen_attention_kernel<T, kHeadDim, kMTiles, kBlockN>;
  if (smem > 48 * 1024) {
    const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (err != cudaSuccess) return cudaGetErrorString(err);
  }
  const dim3 grid(ceil_div(p.max_seqlen_q, Tr::kBlockM), p.num_heads, p.num_seqs);
  kernel<<<grid, kNumThreads, smem, stream>>>(p);
  return launch_error();
}

// Tiles per head_dim: 64 -> 64 x 64 (one m-tile per warp); 128 -> 128 x 32 (two m-tiles per warp;
// 128 x 64 spills past 255 registers). LENSERVE_VARLEN_TILES=64x64 selects the one-m-tile 64 x 64
// kernel at head_dim 128 too, so benchmarks/gpu/kernels.py can time both in one run. It is read
// at each call (a prefill launch, never inside a CUDA graph).
template <typename T>
const char* launch_for_head_dim(const VarlenAttentionParams& p, cudaStream_t stream) {
  if (p.head_dim == 64) return launch<T, 64, 1, 64>(p, stream);
  const char* tiles = std::getenv("LENSERVE_VARLEN_TILES");
  if (tiles != nullptr && std::strcmp(tiles, "64x64") == 0) return launch<T, 128, 1, 64>(p, stream);
  return launch<T, 128, 2, 32>(p, stream);
}

}  // namespace

const char* varlen_attention(const VarlenAttentionParams& p, Stream stream) {
  if (p.num_seqs == 0 || p.max_seqlen_q == 0) return nullptr;
  if (p.head_dim != 64 && p.head_dim != 128) return "varlen_attention: head_dim must be 64 or 128";
  if (p.dtype == DType::kFloat16) return launch_for_head_dim<__half>(p, stream);
  if (p.dtype == DType::kBFloat16) return launch_for_head_dim<__nv_bfloat16>(p, stream);
  return "varlen_attention: dtype must be float16 or bfloat16";
}

}  // namespace cuda
}  // namespace lenserve
