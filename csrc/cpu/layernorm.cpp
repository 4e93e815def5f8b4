#include <ATen/Parallel.h>
#include <cmath>

#include "cpu/common.h"
#include "cpu/rows.h"
#include "ops.h"

namespace lenserve {
namespace {

using rows::add_rms_norm_row;
using rows::rms_norm_row;

void check_norm_inputs(const torch::Tensor& input, const torch::Tensor& weight) {
  LS_CHECK_CPU(input);
  LS_CHECK_CPU(weight);
  LS_CHECK_DIM(input, 2);
  LS_CHECK_DIM(weight, 1);
  LS_CHECK(input.stride(1) == 1, "input rows must be contiguous");
  LS_CHECK_CONTIGUOUS(weight);
  LS_CHECK(input.size(1) == weight.size(0), "input hidden size ", input.size(1), " != weight size ", weight.size(0));
  LS_CHECK(input.scalar_type() == weight.scalar_type(), "input and weight dtypes differ");
}

}  // namespace

torch::Tensor rms_norm_cpu(const torch::Tensor& input, const torch::Tensor& weight, double eps) {
  check_norm_inputs(input, weight);
  auto out = torch::empty({input.size(0), input.size(1)}, input.options());
  const int64_t n = input.size(0), d = input.size(1), stride = input.stride(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "rms_norm_cpu", [&] {
    const scalar_t* x = input.data_ptr<scalar_t>();
    const scalar_t* w = weight.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, n, row_grain(d), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) rms_norm_row(x + r * stride, w, o + r * d, d, static_cast<float>(eps));
    });
  });
  return out;
}

void fused_add_rms_norm_cpu(torch::Tensor& input, torch::Tensor& residual, const torch::Tensor& weight, double eps) {
  check_norm_inputs(input, weight);
  LS_CHECK_CPU(residual);
  LS_CHECK_CONTIGUOUS(input);
  LS_CHECK_CONTIGUOUS(residual);
  LS_CHECK(input.sizes() == residual.sizes(), "input and residual shapes differ");
  LS_CHECK(input.scalar_type() == residual.scalar_type(), "input and residual dtypes differ");
  const int64_t n = input.size(0), d = input.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "fused_add_rms_norm_cpu", [&] {
    scalar_t* x = input.data_ptr<scalar_t>();
    scalar_t* res = residual.data_ptr<scalar_t>();
    const scalar_t* w = weight.data_ptr<scalar_t>();
    at::parallel_for(0, n, row_grain(d), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) add_rms_norm_row(x + r * d, res + r * d, w, d, static_cast<float>(eps));
    });
  });
}

}  // namespace lenserve
