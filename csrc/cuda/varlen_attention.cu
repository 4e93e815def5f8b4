// Variable-length fused attention forward over packed tokens (FlashAttention-2 structure).
//
// One thread block per (query tile of 64 rows, head, sequence): the block finds its sequence's
// rows through cu_seqlens, so no token is padded. Four warps own 16 query rows each and sweep the
// sequence's keys in tiles of 64: S = Q K^T and O += P V on tensor cores (mma.sync m16n8k16,
// fp16/bf16 in, fp32 accumulate), with the softmax kept online in registers (running row max and
// row sum, base 2). Causal masking is aligned bottom-right; key tiles beyond the tile's last
// visible key are never loaded, and a tile no query of which sees any key writes zeros.
//
// Shared memory: Q, K and V tiles of 64 rows x head_dim, each row padded by 16 bytes so the eight
// rows an ldmatrix phase reads fall on distinct banks. K of the next tile streams in (cp.async)
// while P V runs, V of the next tile while the next Q K^T runs.
//
// Fragment layouts (PTX ISA, mma.m16n8k16 with .f16/.bf16): lane = 4 * g + t. A (16x16, row):
// a0 = (g, 2t..2t+1), a1 = (g+8, 2t..), a2 = (g, 2t+8..), a3 = (g+8, 2t+8..). B (16x8, col):
// b0 = (k 2t..2t+1, n g), b1 = (k 2t+8.., n g). C (16x8 f32): c0,c1 = (g, 2t..2t+1), c2,c3 = (g+8, ..).
#include "cuda/common.cuh"

namespace lenserve {
namespace cuda {
namespace {

constexpr int kBlockM = 64;  // query rows per thread block
constexpr int kBlockN = 64;  // keys per tile
constexpr int kNumWarps = 4;
constexpr int kNumThreads = kNumWarps * 32;
constexpr float kLog2e = 1.4426950408889634f;

template <int kHeadDim>
struct VarlenTraits {
  static constexpr int kRowStride = kHeadDim + 8;  // elements; +16 bytes against bank conflicts
  static constexpr int kChunksPerRow = kHeadDim / 8;  // 16-byte chunks
  static constexpr int kTileElems = kBlockM * kRowStride;
  static constexpr int kSmemBytes = 3 * kTileElems * 2;  // Q, K, V in 16-bit elements
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

// Copies rows [0, num_rows) of a 64 x kHeadDim tile into shared memory; rows past num_rows are
// zero-filled, so padded keys hold zeros (never NaN garbage that 0 * x would spread).
template <typename T, int kHeadDim>
__device__ __forceinline__ void load_tile_async(T* smem, const T* gmem, int64_t token_stride, int num_rows) {
  using Tr = VarlenTraits<kHeadDim>;
#pragma unroll
  for (int i = 0; i < kBlockM * Tr::kChunksPerRow / kNumThreads; ++i) {
    const int idx = i * kNumThreads + threadIdx.x;
    const int row = idx / Tr::kChunksPerRow, chunk = idx % Tr::kChunksPerRow;
    const bool valid = row < num_rows;
    const T* src = gmem + (valid ? row * token_stride : 0) + chunk * 8;
    cp_async_16(smem + row * Tr::kRowStride + chunk * 8, src, valid);
  }
}

template <typename T, int kHeadDim>
__global__ void __launch_bounds__(kNumThreads) varlen_attention_kernel(const VarlenAttentionParams p) {
  using Tr = VarlenTraits<kHeadDim>;
  constexpr int kStride = Tr::kRowStride;
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
  T* s_k = s_q + Tr::kTileElems;
  T* s_v = s_k + Tr::kTileElems;

  const T* q = static_cast<const T*>(p.q) + (static_cast<int64_t>(q_begin) + m_start) * p.q_token_stride +
               static_cast<int64_t>(head) * p.q_head_stride;
  const T* k = static_cast<const T*>(p.k) + static_cast<int64_t>(k_begin) * p.k_token_stride +
               static_cast<int64_t>(kv_head) * p.k_head_stride;
  const T* v = static_cast<const T*>(p.v) + static_cast<int64_t>(k_begin) * p.v_token_stride +
               static_cast<int64_t>(kv_head) * p.v_head_stride;

  // Groups in flight: [Q, K0] then [V0]; each iteration commits exactly one K and one V group
  // (possibly empty), so "wait until one group is pending" always means "the older one landed".
  load_tile_async<T, kHeadDim>(s_q, q, p.q_token_stride, rows_in_tile);
  load_tile_async<T, kHeadDim>(s_k, k, p.k_token_stride, min(kBlockN, seqlen_k));
  cp_async_commit();
  load_tile_async<T, kHeadDim>(s_v, v, p.v_token_stride, min(kBlockN, seqlen_k));
  cp_async_commit();

  const int g = lane / 4, t = lane % 4;
  const int row0 = m_start + warp * 16 + g;  // this thread's two rows: row0 and row0 + 8
  const float scale_log2 = p.softmax_scale * kLog2e;

  // Per-lane ldmatrix addresses (bytes); the loops below add compile-time offsets.
  // Q (A operand) matrices: (rows 0-7, dims 0-7), (rows 8-15, dims 0-7), (rows 0-7, dims 8-15), (rows 8-15, dims 8-15).
  const uint32_t q_addr = smem_addr(s_q + (warp * 16 + lane % 16) * kStride + (lane / 16) * 8);
  // K (B operand of Q K^T): (keys 0-7, dims 0-7), (keys 0-7, dims 8-15), (keys 8-15, dims 0-7), (keys 8-15, dims 8-15).
  const uint32_t k_addr = smem_addr(s_k + (lane % 8 + (lane / 16) * 8) * kStride + ((lane / 8) % 2) * 8);
  // V (B operand of P V, transposed): (keys 0-7, dims 0-7), (keys 8-15, dims 0-7), (keys 0-7, dims 8-15), (keys 8-15, dims 8-15).
  const uint32_t v_addr = smem_addr(s_v + (lane % 16) * kStride + (lane / 16) * 8);

  float o_acc[kDTiles][4];
#pragma unroll
  for (int i = 0; i < kDTiles; ++i) o_acc[i][0] = o_acc[i][1] = o_acc[i][2] = o_acc[i][3] = 0.f;
  float row_max[2] = {-INFINITY, -INFINITY};
  float row_sum[2] = {0.f, 0.f};  // this thread's share; the quad's sum is taken at the end

  for (int n_tile = 0; n_tile < num_n_tiles; ++n_tile) {
    const int n_start = n_tile * kBlockN;
    cp_async_wait<1>();  // K of this tile (and Q) landed
    __syncthreads();

    // S = Q K^T for this warp's 16 rows x 64 keys. Q fragments are re-read from shared memory at
    // each k-step rather than held in registers, which head_dim 128 could not afford.
    float s[kNTiles][4];
#pragma unroll
    for (int i = 0; i < kNTiles; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < kKSteps; ++kk) {
      uint32_t a[4];
      ldmatrix_x4(a, q_addr + kk * 16 * 2);
#pragma unroll
      for (int np = 0; np < kNTiles / 2; ++np) {
        uint32_t b[4];
        ldmatrix_x4(b, k_addr + (np * 16 * kStride + kk * 16) * 2);
        mma_16816<T>(s[2 * np], a, b[0], b[1]);
        mma_16816<T>(s[2 * np + 1], a, b[2], b[3]);
      }
    }
    __syncthreads();  // every warp is done with s_k
    if (n_tile + 1 < num_n_tiles)
      load_tile_async<T, kHeadDim>(s_k, k + static_cast<int64_t>(n_start + kBlockN) * p.k_token_stride,
                                   p.k_token_stride, min(kBlockN, seqlen_k - n_start - kBlockN));
    cp_async_commit();

    // Scale to base 2 and mask; only the tiles that cross the sequence end or the diagonal need it.
    const bool need_mask =
        n_start + kBlockN > seqlen_k || (p.causal && n_start + kBlockN - 1 > m_start + diag);
#pragma unroll
    for (int nt = 0; nt < kNTiles; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        s[nt][e] *= scale_log2;
        if (need_mask) {
          const int col = n_start + nt * 8 + 2 * t + (e & 1);
          const int row = row0 + (e >= 2 ? 8 : 0);
          if (col >= seqlen_k || (p.causal && col > row + diag)) s[nt][e] = -INFINITY;
        }
      }
    }

    // Online softmax. A row with every key so far masked keeps max -inf; it then uses 0 as the
    // reference so that exp2(-inf - ref) = 0 instead of NaN.
    float ref[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      float mx = row_max[i];
#pragma unroll
      for (int nt = 0; nt < kNTiles; ++nt) mx = fmaxf(mx, fmaxf(s[nt][2 * i], s[nt][2 * i + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(kFullMask, mx, 1));  // the 4 lanes of a quad share a row
      mx = fmaxf(mx, __shfl_xor_sync(kFullMask, mx, 2));
      ref[i] = mx == -INFINITY ? 0.f : mx;
      const float correction = exp2f(row_max[i] - ref[i]);
      row_max[i] = mx;
      row_sum[i] *= correction;
#pragma unroll
      for (int dt = 0; dt < kDTiles; ++dt) {
        o_acc[dt][2 * i] *= correction;
        o_acc[dt][2 * i + 1] *= correction;
      }
    }
#pragma unroll
    for (int nt = 0; nt < kNTiles; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        s[nt][e] = exp2f(s[nt][e] - ref[e / 2]);
        row_sum[e / 2] += s[nt][e];
      }
    }

    cp_async_wait<1>();  // V of this tile landed (the next K may still be in flight)
    __syncthreads();

    // O += P V: P comes straight from the S accumulators (C layout of two n-tiles = A layout).
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk) {
      uint32_t a[4];
      a[0] = pack2<T>(s[2 * kk][0], s[2 * kk][1]);
      a[1] = pack2<T>(s[2 * kk][2], s[2 * kk][3]);
      a[2] = pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]);
      a[3] = pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
      for (int dp = 0; dp < kDTiles / 2; ++dp) {
        uint32_t b[4];
        ldmatrix_x4_trans(b, v_addr + (kk * 16 * kStride + dp * 16) * 2);
        mma_16816<T>(o_acc[2 * dp], a, b[0], b[1]);
        mma_16816<T>(o_acc[2 * dp + 1], a, b[2], b[3]);
      }
    }
    __syncthreads();  // every warp is done with s_v
    if (n_tile + 1 < num_n_tiles)
      load_tile_async<T, kHeadDim>(s_v, v + static_cast<int64_t>(n_start + kBlockN) * p.v_token_stride,
                                   p.v_token_stride, min(kBlockN, seqlen_k - n_start - kBlockN));
    cp_async_commit();
  }

  // Normalise; a row that saw no key has sum 0 and outputs zeros.
  float inv_sum[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    float sum = row_sum[i];
    sum += __shfl_xor_sync(kFullMask, sum, 1);
    sum += __shfl_xor_sync(kFullMask, sum, 2);
    inv_sum[i] = sum > 0.f ? 1.f / sum : 0.f;
  }

  // Stage this warp's 16 rows in its own rows of s_q (no other warp reads them), then write them
  // out as 16-byte stores.
  T* s_o = s_q + warp * 16 * kStride;
#pragma unroll
  for (int dt = 0; dt < kDTiles; ++dt) {
    *reinterpret_cast<uint32_t*>(s_o + g * kStride + dt * 8 + 2 * t) =
        pack2<T>(o_acc[dt][0] * inv_sum[0], o_acc[dt][1] * inv_sum[0]);
    *reinterpret_cast<uint32_t*>(s_o + (g + 8) * kStride + dt * 8 + 2 * t) =
        pack2<T>(o_acc[dt][2] * inv_sum[1], o_acc[dt][3] * inv_sum[1]);
  }
  __syncwarp();
  const int warp_rows = min(16, rows_in_tile - warp * 16);
  T* out_warp = out + static_cast<int64_t>(warp * 16) * out_token_stride;
  for (int idx = lane; idx < warp_rows * Tr::kChunksPerRow; idx += 32) {
    const int row = idx / Tr::kChunksPerRow, chunk = idx % Tr::kChunksPerRow;
    *reinterpret_cast<uint4*>(out_warp + row * out_token_stride + chunk * 8) =
        *reinterpret_cast<const uint4*>(s_o + row * kStride + chunk * 8);
  }
}

template <typename T, int kHeadDim>
const char* launch(const VarlenAttentionParams& p, cudaStream_t stream) {
  constexpr int smem = VarlenTraits<kHeadDim>::kSmemBytes;
  auto kernel = varlen_attention_kernel<T, kHeadDim>;
  if (smem > 48 * 1024) {
    const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (err != cudaSuccess) return cudaGetErrorString(err);
  }
  const dim3 grid(ceil_div(p.max_seqlen_q, kBlockM), p.num_heads, p.num_seqs);
  kernel<<<grid, kNumThreads, smem, stream>>>(p);
  return launch_error();
}

}  // namespace

const char* varlen_attention(const VarlenAttentionParams& p, Stream stream) {
  if (p.num_seqs == 0 || p.max_seqlen_q == 0) return nullptr;
  if (p.head_dim != 64 && p.head_dim != 128) return "varlen_attention: head_dim must be 64 or 128";
  if (p.dtype == DType::kFloat16)
    return p.head_dim == 64 ? launch<__half, 64>(p, stream) : launch<__half, 128>(p, stream);
  if (p.dtype == DType::kBFloat16)
    return p.head_dim == 64 ? launch<__nv_bfloat16, 64>(p, stream) : launch<__nv_bfloat16, 128>(p, stream);
  return "varlen_attention: dtype must be float16 or bfloat16";
}

}  // namespace cuda
}  // namespace lenserve
