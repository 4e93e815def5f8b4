#include <ATen/Parallel.h>
#include <cmath>
#include <type_traits>

#include "cpu/common.h"
#include "cpu/rows.h"
#include "cpu/vec.h"
#include "ops.h"

namespace lenserve {

using rows::silu_and_mul_row;

torch::Tensor silu_and_mul_cpu(const torch::Tensor& x) {
  LS_CHECK_CPU(x);
  LS_CHECK_DIM(x, 2);
  LS_CHECK_CONTIGUOUS(x);
  LS_CHECK(x.size(1) % 2 == 0, "silu_and_mul: last dimension must be even, got ", x.size(1));
  const int64_t n = x.size(0), d = x.size(1) / 2;
  auto out = torch::empty({n, d}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "silu_and_mul_cpu", [&] {
    const scalar_t* in = x.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, n, row_grain(3 * d), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) silu_and_mul_row(in + r * 2 * d, in + r * 2 * d + d, o + r * d, d);
    });
  });
  return out;
}

}  // namespace lenserve
