// One Llama decoder layer of a decode-only step in a single operator call (CPU).
//
// A decode step at batch 1 runs ~12 operator calls and as many tensor views per layer from
// Python; with quantized weights the kernels of a SmolLM2 layer take ~0.3 ms, and the calls,
// the dispatcher and the views around them were a large share of the step (bench_peers.py,
// step_overhead). This operator runs the same kernels in the same order, calling them directly:
//   residual += hidden; hidden = rms_norm(residual) * input_norm
//   qkv = hidden Wqkv^T (+ b); rope(q, k); k, v -> paged cache
//   attn = paged_decode_attention(q, caches)
//   h = attn Wo^T; residual += h; h = rms_norm(residual) * post_norm
//   out = silu_and_mul(h Wgu^T) Wdown^T
// so its result is the unfused layer's, bit for bit (tests/engine/test_quant_model.py,
// test_fused_decode_layer_equals_the_unfused_layer). decode_layers runs every layer of the step in
// one call: against a decode_layer call per layer from Python (the loop, the layer's forward, the
// dispatch of 20 arguments), 0.38-0.44 ms less of a ~5.3 ms batch-1 step and 0.46 ms less of a
// ~17 ms batch-8 step (SmolLM2, 2-core EPYC, both alternated in blocks in one process).
#include "cpu/common.h"
#include "ops.h"

namespace lenserve {

namespace {

constexpr int64_t kPackedFp32 = -1;  // weight type of a pack_linear_weight matrix

torch::Tensor run_linear(const torch::Tensor& x, const torch::Tensor& w, int64_t type, int64_t out_features,
                         const std::optional<torch::Tensor>& bias) {
  if (type == kPackedFp32) return packed_linear_cpu(x, w, out_features, bias);
  return quant_linear_cpu(x, w, type, out_features, bias);
}

}  // namespace

torch::Tensor decode_layer_cpu(torch::Tensor& hidden, torch::Tensor& residual, const torch::Tensor& positions,
                               const torch::Tensor& input_norm, const torch::Tensor& post_norm, double eps,
                               at::TensorList weights, at::IntArrayRef weight_types, at::IntArrayRef out_features,
                               const std::optional<torch::Tensor>& qkv_bias, int64_t num_heads, int64_t num_kv_heads,
                               int64_t head_dim, const torch::Tensor& cos_sin_cache, torch::Tensor& k_cache,
                               torch::Tensor& v_cache, const torch::Tensor& slot_mapping,
                               const torch::Tensor& block_tables, const torch::Tensor& context_lens,
                               double softmax_scale) {
  LS_CHECK(weights.size() == 4 && weight_types.size() == 4 && out_features.size() == 4,
           "decode_layer: weights, weight_types and out_features take the qkv, o, gate_up and down projections (4 each)");
  LS_CHECK_DIM(hidden, 2);
  LS_CHECK(hidden.sizes() == residual.sizes(), "decode_layer: hidden ", hidden.sizes(), " and residual ",
           residual.sizes(), " differ");
  const int64_t n = hidden.size(0);
  const int64_t q_size = num_heads * head_dim, kv_size = num_kv_heads * head_dim;
  LS_CHECK(out_features[0] == q_size + 2 * kv_size && out_features[1] == hidden.size(1) &&
               out_features[2] % 2 == 0 && out_features[3] == hidden.size(1),
           "decode_layer: projection sizes ", out_features, " do not fit ", num_heads, " heads, ", num_kv_heads,
           " kv heads of ", head_dim, " and hidden ", hidden.size(1));
  LS_CHECK(positions.size(0) == n && context_lens.size(0) == n,
           "decode_layer: one position and one context length per decoding sequence (", n, " rows)");

  fused_add_rms_norm_cpu(hidden, residual, input_norm, eps);
  auto qkv = run_linear(hidden, weights[0], weight_types[0], out_features[0], qkv_bias);
  auto q = qkv.narrow(1, 0, q_size);
  auto k = qkv.narrow(1, q_size, kv_size);
  auto v = qkv.narrow(1, q_size + kv_size, kv_size);
  rotary_embedding_cpu(positions, q, k, head_dim, cos_sin_cache, true);
  reshape_and_cache_cpu(k.view({n, num_kv_heads, head_dim}), v.view({n, num_kv_heads, head_dim}), k_cache, v_cache,
                        slot_mapping);
  auto attn = paged_decode_attention_cpu(q.view({n, num_heads, head_dim}), k_cache, v_cache, block_tables,
                                         context_lens, softmax_scale);
  auto h = run_linear(attn.view({n, q_size}), weights[1], weight_types[1], out_features[1], std::nullopt);
  fused_add_rms_norm_cpu(h, residual, post_norm, eps);
  auto gate_up = run_linear(h, weights[2], weight_types[2], out_features[2], std::nullopt);
  return run_linear(silu_and_mul_cpu(gate_up), weights[3], weight_types[3], out_features[3], std::nullopt);
}

torch::Tensor decode_layers_cpu(torch::Tensor& hidden, torch::Tensor& residual, const torch::Tensor& positions,
                                at::TensorList input_norms, at::TensorList post_norms, double eps, at::TensorList weights,
                                at::IntArrayRef weight_types, at::IntArrayRef out_features,
                                const c10::List<std::optional<at::Tensor>>& qkv_biases, int64_t num_heads,
                                int64_t num_kv_heads, int64_t head_dim, const torch::Tensor& cos_sin_cache,
                                at::TensorList k_caches, at::TensorList v_caches, const torch::Tensor& slot_mapping,
                                const torch::Tensor& block_tables, const torch::Tensor& context_lens,
                                double softmax_scale) {
  const int64_t L = static_cast<int64_t>(input_norms.size());
  LS_CHECK(static_cast<int64_t>(post_norms.size()) == L && static_cast<int64_t>(k_caches.size()) == L &&
               static_cast<int64_t>(v_caches.size()) == L,
           "decode_layers: input_norms, post_norms, k_caches and v_caches take one entry per layer, got ", L, ", ",
           post_norms.size(), ", ", k_caches.size(), " and ", v_caches.size());
  LS_CHECK(static_cast<int64_t>(weights.size()) == 4 * L && static_cast<int64_t>(weight_types.size()) == 4 * L,
           "decode_layers: weights and weight_types take 4 per layer (", 4 * L, "), got ", weights.size(), " and ",
           weight_types.size());
  LS_CHECK(qkv_biases.empty() || static_cast<int64_t>(qkv_biases.size()) == L,
           "decode_layers: qkv_biases takes one entry per layer or none, got ", qkv_biases.size());
  torch::Tensor h = hidden;
  for (int64_t l = 0; l < L; ++l) {
    torch::Tensor k_cache = k_caches[l], v_cache = v_caches[l];
    const std::optional<torch::Tensor> bias = qkv_biases.empty() ? std::nullopt : qkv_biases.get(l);
    h = decode_layer_cpu(h, residual, positions, input_norms[l], post_norms[l], eps, weights.slice(4 * l, 4),
                         weight_types.slice(4 * l, 4), out_features, bias, num_heads, num_kv_heads, head_dim,
                         cos_sin_cache, k_cache, v_cache, slot_mapping, block_tables, context_lens, softmax_scale);
  }
  return h;
}

}  // namespace lenserve
