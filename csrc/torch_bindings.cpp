// Registers the lenserve operators with the PyTorch dispatcher (namespace `lenserve`) and exposes
// build information to Python. Importing lenserve._C is what makes torch.ops.lenserve.* exist.
#include <ATen/record_function.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <vector>

#include "check.h"
#include "cuda/kernels.h"
#include "ops.h"

namespace {
// The CUDA decode kernel's split-K plan (cuda/kernels.h), callable on any build so that CPU tests
// check the very function the CUDA binding uses: [num_splits, partition_size].
std::vector<int64_t> paged_decode_split(int64_t max_context_len, int64_t num_seqs, int64_t num_kv_heads,
                                        int64_t group, int64_t num_sms) {
  LS_CHECK(num_seqs >= 0 && num_kv_heads > 0 && group > 0 && num_sms > 0,
           "paged_decode_split: num_seqs >= 0, num_kv_heads, group and num_sms > 0");
  const auto split = lenserve::cuda::paged_decode_split(max_context_len, num_seqs, num_kv_heads, group, num_sms);
  return {split.num_splits, split.partition_size};
}

// decode_layers with its per-model arguments bound once (lenserve::DecodeLayers): every layer's
// norms, weights, biases and caches (364 tensors for SmolLM2) were converted from Python lists on
// every decode step, ~0.13 ms of a ~3.5 ms batch-1 step (a zero-row call's time), and checked
// again each step (~6.5 us: a zero-row call on one thread 13.0 -> 6.6 us once they were checked at
// binding). run() takes and checks only what changes a step.
class DecodeStack {
 public:
  DecodeStack(std::vector<at::Tensor> input_norms, std::vector<at::Tensor> post_norms, double eps,
              std::vector<at::Tensor> weights, std::vector<int64_t> weight_types, std::vector<int64_t> out_features,
              const std::vector<std::optional<at::Tensor>>& qkv_biases, int64_t num_heads, int64_t num_kv_heads,
              int64_t head_dim, at::Tensor cos_sin_cache, std::vector<at::Tensor> k_caches,
              std::vector<at::Tensor> v_caches, double softmax_scale)
      : layers_(std::move(input_norms), std::move(post_norms), eps, std::move(weights), std::move(weight_types),
                std::move(out_features), to_list(qkv_biases), num_heads, num_kv_heads, head_dim,
                std::move(cos_sin_cache), std::move(k_caches), std::move(v_caches), softmax_scale) {}

  at::Tensor run(at::Tensor hidden, at::Tensor residual, const at::Tensor& positions, const at::Tensor& slot_mapping,
                 const at::Tensor& block_tables, const at::Tensor& context_lens) {
    // the op's name in torch.profiler, as when the op is called through the dispatcher
    RECORD_FUNCTION("lenserve::decode_layers", std::vector<c10::IValue>{});
    return layers_.run(hidden, residual, positions, slot_mapping, block_tables, context_lens);
  }

 private:
  static c10::List<std::optional<at::Tensor>> to_list(const std::vector<std::optional<at::Tensor>>& biases) {
    c10::List<std::optional<at::Tensor>> out;
    for (const auto& b : biases) out.push_back(b);
    return out;
  }
  lenserve::DecodeLayers layers_;
};
}  // namespace

TORCH_LIBRARY(lenserve, m) {
  m.def("rms_norm(Tensor input, Tensor weight, float eps) -> Tensor");
  m.def("fused_add_rms_norm(Tensor(a!) input, Tensor(b!) residual, Tensor weight, float eps) -> ()");
  m.def("silu_and_mul(Tensor x) -> Tensor");
  m.def(
      "rotary_embedding(Tensor positions, Tensor(a!) query, Tensor(b!) key, int head_dim, Tensor cos_sin_cache, "
      "bool is_neox) -> ()");
  m.def("reshape_and_cache(Tensor key, Tensor value, Tensor(a!) key_cache, Tensor(b!) value_cache, Tensor slot_mapping) -> ()");
  m.def(
      "varlen_attention(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, int max_seqlen_q, "
      "int max_seqlen_k, float softmax_scale, bool causal) -> Tensor");
  m.def(
      "varlen_attention_indexed(Tensor q, Tensor k, Tensor v, Tensor k_index, Tensor cu_seqlens_q, Tensor cu_seqlens_k, "
      "int max_seqlen_q, int max_seqlen_k, float softmax_scale, bool causal) -> Tensor");
  m.def(
      "paged_decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor context_lens, "
      "float softmax_scale) -> Tensor");
  m.def("pack_linear_weight(Tensor weight) -> Tensor");
  m.def("packed_linear(Tensor x, Tensor packed, int out_features, Tensor? bias) -> Tensor");
  m.def("quant_linear(Tensor x, Tensor weight, int weight_type, int out_features, Tensor? bias) -> Tensor");
  m.def("quant_embedding(Tensor ids, Tensor weight, int weight_type, int dim) -> Tensor");
  m.def("quant_interleave(Tensor(a!) weight, int weight_type) -> ()");
  m.def(
      "decode_layer(Tensor(a!) hidden, Tensor(b!) residual, Tensor positions, Tensor input_norm, Tensor post_norm, "
      "float eps, Tensor[] weights, int[] weight_types, int[] out_features, Tensor? qkv_bias, int num_heads, "
      "int num_kv_heads, int head_dim, Tensor cos_sin_cache, Tensor(c!) k_cache, Tensor(d!) v_cache, "
      "Tensor slot_mapping, Tensor block_tables, Tensor context_lens, float softmax_scale) -> Tensor");
  m.def(
      "decode_layers(Tensor(a!) hidden, Tensor(b!) residual, Tensor positions, Tensor[] input_norms, "
      "Tensor[] post_norms, float eps, Tensor[] weights, int[] weight_types, int[] out_features, Tensor?[] qkv_biases, "
      "int num_heads, int num_kv_heads, int head_dim, Tensor cos_sin_cache, Tensor(c!)[] k_caches, "
      "Tensor(d!)[] v_caches, Tensor slot_mapping, Tensor block_tables, Tensor context_lens, float softmax_scale) "
      "-> Tensor");
  m.def("quant_kernel_isa(str isa) -> str", &lenserve::quant_kernel_isa);
  m.def("paged_decode_split(int max_context_len, int num_seqs, int num_kv_heads, int group, int num_sms) -> int[]",
        &paged_decode_split);
}

TORCH_LIBRARY_IMPL(lenserve, CPU, m) {
  m.impl("rms_norm", &lenserve::rms_norm_cpu);
  m.impl("fused_add_rms_norm", &lenserve::fused_add_rms_norm_cpu);
  m.impl("silu_and_mul", &lenserve::silu_and_mul_cpu);
  m.impl("rotary_embedding", &lenserve::rotary_embedding_cpu);
  m.impl("reshape_and_cache", &lenserve::reshape_and_cache_cpu);
  m.impl("varlen_attention", &lenserve::varlen_attention_cpu);
  m.impl("varlen_attention_indexed", &lenserve::varlen_attention_indexed_cpu);
  m.impl("paged_decode_attention", &lenserve::paged_decode_attention_cpu);
  m.impl("pack_linear_weight", &lenserve::pack_linear_weight_cpu);
  m.impl("packed_linear", &lenserve::packed_linear_cpu);
  m.impl("quant_linear", &lenserve::quant_linear_cpu);
  m.impl("quant_embedding", &lenserve::quant_embedding_cpu);
  m.impl("quant_interleave", &lenserve::quant_interleave_cpu);
  m.impl("decode_layer", &lenserve::decode_layer_cpu);
  m.impl("decode_layers", &lenserve::decode_layers_cpu);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "lenserve C++/CUDA kernels (ops are registered under torch.ops.lenserve)";
  pybind11::class_<DecodeStack>(m, "DecodeStack")
      .def(pybind11::init<std::vector<at::Tensor>, std::vector<at::Tensor>, double, std::vector<at::Tensor>,
                          std::vector<int64_t>, std::vector<int64_t>, const std::vector<std::optional<at::Tensor>>&,
                          int64_t, int64_t, int64_t, at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>,
                          double>())
      .def("run", &DecodeStack::run, pybind11::call_guard<pybind11::gil_scoped_release>());
#ifdef LENSERVE_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
#ifdef _OPENMP
  m.attr("with_openmp") = true;
#else
  m.attr("with_openmp") = false;
#endif
}
