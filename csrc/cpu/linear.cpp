// fp32 linear layer y = x Wᵀ + b over weights packed once into 16-row panels.
//
// Layout: W [N, K] becomes P = ceil(N / 16) panels, panel p holding rows 16p..16p+15 interleaved
// by k: packed[p][k][0..15] = W[16p + 0..15][k] (rows past N are zero). A panel is read front to
// back, so decode (a few rows of x) streams the weights sequentially at memory bandwidth, and a
// larger batch reuses each panel from cache for every row block of x.
//
// The 6x16 micro-kernel over a panel lives in panel_kernel.h (shared with quant_linear.cpp).
// Threads split panels; for a large batch the rows of x are blocked so a block stays in L2 while
// the panels stream past it.
#include <ATen/Parallel.h>
#include <sys/mman.h>

#include <cstdlib>
#include <cstring>

#include "cpu/common.h"
#include "cpu/panel_kernel.h"

namespace lenserve {
namespace {

// Zeroed fp32 storage for packed weights. Large ones are 2 MiB aligned and their whole 2 MiB
// stretches advised into transparent huge pages, so streaming them at decode does not walk the
// TLB every 4 KiB; the tail stays in small pages, so no memory is spent on rounding up.
torch::Tensor alloc_weights(at::IntArrayRef sizes) {
  int64_t numel = 1;
  for (auto s : sizes) numel *= s;
  const size_t bytes = static_cast<size_t>(numel) * sizeof(float);
  constexpr size_t kHuge = size_t{2} << 20;
  if (bytes < kHuge) return torch::zeros(sizes, torch::kFloat);
  void* ptr = nullptr;
  LS_CHECK(posix_memalign(&ptr, kHuge, bytes) == 0, "pack_linear_weight: out of memory (", bytes, " bytes)");
#ifdef MADV_HUGEPAGE
  madvise(ptr, bytes / kHuge * kHuge, MADV_HUGEPAGE);  // advice only: without THP, ordinary pages
#endif
  std::memset(ptr, 0, bytes);
  return torch::from_blob(ptr, sizes, [](void* p) { std::free(p); }, torch::TensorOptions().dtype(torch::kFloat));
}

}  // namespace

torch::Tensor pack_linear_weight_cpu(const torch::Tensor& weight) {
  LS_CHECK_CPU(weight);
  LS_CHECK_DIM(weight, 2);
  LS_CHECK_DTYPE(weight, at::kFloat);
  const int64_t N = weight.size(0), K = weight.size(1);
  LS_CHECK(N > 0 && K > 0, "pack_linear_weight: empty weight ", weight.sizes());
  const int64_t P = ceil_div(N, kPanel);
  auto w = weight.contiguous();
  auto packed = alloc_weights({P, K, kPanel});
  const float* src = w.data_ptr<float>();
  float* dst = packed.data_ptr<float>();
  at::parallel_for(0, P, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p)
      for (int64_t r = 0; r < kPanel && p * kPanel + r < N; ++r) {
        const float* row = src + (p * kPanel + r) * K;
        float* col = dst + p * K * kPanel + r;
        for (int64_t k = 0; k < K; ++k) col[k * kPanel] = row[k];
      }
  });
  return packed;
}

torch::Tensor packed_linear_cpu(const torch::Tensor& x, const torch::Tensor& packed, int64_t out_features,
                                const std::optional<torch::Tensor>& bias) {
  LS_CHECK_CPU(x);
  LS_CHECK_CPU(packed);
  LS_CHECK_DTYPE(x, at::kFloat);
  LS_CHECK_DTYPE(packed, at::kFloat);
  LS_CHECK_DIM(x, 2);
  LS_CHECK_DIM(packed, 3);
  LS_CHECK_CONTIGUOUS(packed);
  const int64_t M = x.size(0), K = x.size(1), N = out_features, P = packed.size(0);
  LS_CHECK(packed.size(2) == kPanel, "packed_linear: weight must come from pack_linear_weight (panels of 16)");
  LS_CHECK(packed.size(1) == K, "packed_linear: x has ", K, " features, the weight ", packed.size(1));
  LS_CHECK(N > (P - 1) * kPanel && N <= P * kPanel, "packed_linear: out_features ", N, " does not match ", P, " panels");
  LS_CHECK(x.stride(1) == 1 || K == 1, "packed_linear: x rows must be contiguous");
  const float* b = nullptr;
  if (bias.has_value()) {
    LS_CHECK_CPU(*bias);
    LS_CHECK_DTYPE(*bias, at::kFloat);
    LS_CHECK_CONTIGUOUS(*bias);
    LS_CHECK(bias->dim() == 1 && bias->size(0) == N, "packed_linear: bias must be [", N, "]");
    b = bias->data_ptr<float>();
  }
  auto out = torch::empty({M, N}, x.options().memory_format(at::MemoryFormat::Contiguous));
  if (M == 0) return out;
  const float* xp = x.data_ptr<float>();
  const int64_t ldx = x.stride(0);
  const float* wp = packed.data_ptr<float>();
  float* op = out.data_ptr<float>();
  // Rows of x per block: a block (MB x K floats) stays in L2 while panels stream past it.
  const int64_t MB = std::max<int64_t>(kMaxMR, (64 * 1024 / K) / kMaxMR * kMaxMR);
  const int64_t num_mblocks = ceil_div(M, MB);
  // Work items are (row block, panel); a thread takes a contiguous run of panels within a block.
  // Small matrices at small batch run on one thread: waking the other costs more than it saves.
  const int64_t flops_per_panel = 2 * std::min(M, MB) * K * kPanel;
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 18) / flops_per_panel);
  at::parallel_for(0, num_mblocks * P, grain, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t mb = i / P, p = i % P;
      const int64_t m0 = mb * MB, m1 = std::min(M, m0 + MB);
      panel_rows(xp, ldx, wp + p * K * kPanel, K, N, p * kPanel, b, op, m0, m1);
    }
  });
  return out;
}

}  // namespace lenserve
