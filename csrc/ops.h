// Declarations of lenserve._C operators. Every op is registered in torch_bindings.cpp under the
// `lenserve` namespace; CPU implementations live in cpu/, CUDA ones in cuda/.
#pragma once

#include <torch/all.h>
#include <memory>
#include <string>
#include <vector>

namespace lenserve {

// ---- CPU -------------------------------------------------------------------------------------
// input [num_tokens, hidden]; weight [hidden] -> [num_tokens, hidden]
torch::Tensor rms_norm_cpu(const torch::Tensor& input, const torch::Tensor& weight, double eps);
// residual += input; input = rms_norm(residual) * weight (both in place)
void fused_add_rms_norm_cpu(torch::Tensor& input, torch::Tensor& residual, const torch::Tensor& weight, double eps);
// x [num_tokens, 2 * d] -> silu(x[:, :d]) * x[:, d:]  [num_tokens, d]
torch::Tensor silu_and_mul_cpu(const torch::Tensor& x);
// positions int64 [num_tokens]; query [num_tokens, num_heads * head_dim] and key
// [num_tokens, num_kv_heads * head_dim] (rows may be strided views); cos_sin_cache
// [max_position, rot_dim] with cos in the first rot_dim / 2 columns, sin in the rest. In place.
void rotary_embedding_cpu(const torch::Tensor& positions, torch::Tensor& query, torch::Tensor& key, int64_t head_dim,
                          const torch::Tensor& cos_sin_cache, bool is_neox);
// key/value [num_tokens, num_kv_heads, head_dim]; caches [num_blocks, block_size, num_kv_heads, head_dim];
// slot_mapping int64 [num_tokens] (negative = skip). Converts to the cache dtype.
void reshape_and_cache_cpu(const torch::Tensor& key, const torch::Tensor& value, torch::Tensor& key_cache,
                           torch::Tensor& value_cache, const torch::Tensor& slot_mapping);
// q [total_q, num_heads, head_dim]; k, v [total_k, num_kv_heads, head_dim] (rows may be strided
// views: only [heads, head_dim] must be contiguous); cu_seqlens_q/k int32 [num_seqs + 1].
// Causal is aligned bottom-right; a query that sees no key outputs zeros. -> [total_q, num_heads, head_dim]
torch::Tensor varlen_attention_cpu(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                                   const torch::Tensor& cu_seqlens_q, const torch::Tensor& cu_seqlens_k,
                                   int64_t max_seqlen_q, int64_t max_seqlen_k, double softmax_scale, bool causal);
// varlen_attention whose keys are rows of k, v picked by k_index int64 [total_k] (a paged cache
// flattened to [slots, num_kv_heads, head_dim], in any of float32/bfloat16/float16 independent of
// q's dtype): a prompt chunk attends to its cached context without a gathered copy (CPU only).
torch::Tensor varlen_attention_indexed_cpu(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                                           const torch::Tensor& k_index, const torch::Tensor& cu_seqlens_q,
                                           const torch::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
                                           int64_t max_seqlen_k, double softmax_scale, bool causal);
// q [num_seqs, num_heads, head_dim]; caches [num_blocks, block_size, num_kv_heads, head_dim] (any of
// float32/bfloat16/float16, independent of q's dtype); block_tables int32 [num_seqs, max_blocks];
// context_lens int32 [num_seqs]. -> [num_seqs, num_heads, head_dim]
torch::Tensor paged_decode_attention_cpu(const torch::Tensor& q, const torch::Tensor& k_cache,
                                         const torch::Tensor& v_cache, const torch::Tensor& block_tables,
                                         const torch::Tensor& context_lens, double softmax_scale);

// weight fp32 [N, K] -> [ceil(N / 16), K, 16]: 16-row panels interleaved by k (zero-padded rows)
torch::Tensor pack_linear_weight_cpu(const torch::Tensor& weight);
// x fp32 [M, K] (rows contiguous); packed from pack_linear_weight; bias [N] -> x Wᵀ + b  [M, N]
torch::Tensor packed_linear_cpu(const torch::Tensor& x, const torch::Tensor& packed, int64_t out_features,
                                const std::optional<torch::Tensor>& bias);
// x fp32 [M, K] (rows contiguous); weight uint8 [N, row bytes]: the GGUF rows of ggml type
// weight_type (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K); bias [N] -> x Wᵀ + b  [M, N]
torch::Tensor quant_linear_cpu(const torch::Tensor& x, const torch::Tensor& weight, int64_t weight_type,
                               int64_t out_features, const std::optional<torch::Tensor>& bias);
void quant_interleave_cpu(torch::Tensor& weight, int64_t weight_type);
// ids int64 [T]; weight uint8 [V, row bytes] of ggml type weight_type with `dim` elements a row -> fp32 [T, dim]
torch::Tensor quant_embedding_cpu(const torch::Tensor& ids, const torch::Tensor& weight, int64_t weight_type, int64_t dim);
// The integer GEMM's instruction set ("avx512_vnni", "avx2" or "scalar"); a non-empty isa switches
// to it (only VNNI can be turned off and on) and the previous one is returned (cpu/quant_interleaved.cpp).
std::string quant_kernel_isa(const std::string& isa);
// One decoder layer of a decode-only step (cpu/decoder_layer.cpp): weights / weight_types /
// out_features of the qkv, o, gate_up and down projections (type -1: a pack_linear_weight matrix,
// else a ggml type as quant_linear takes). hidden and residual are updated in place as the unfused
// layer does; returns the layer's output [num_seqs, hidden].
torch::Tensor decode_layer_cpu(torch::Tensor& hidden, torch::Tensor& residual, const torch::Tensor& positions,
                               const torch::Tensor& input_norm, const torch::Tensor& post_norm, double eps,
                               at::TensorList weights, at::IntArrayRef weight_types, at::IntArrayRef out_features,
                               const std::optional<torch::Tensor>& qkv_bias, int64_t num_heads, int64_t num_kv_heads,
                               int64_t head_dim, const torch::Tensor& cos_sin_cache, torch::Tensor& k_cache,
                               torch::Tensor& v_cache, const torch::Tensor& slot_mapping,
                               const torch::Tensor& block_tables, const torch::Tensor& context_lens,
                               double softmax_scale);
// Every layer of a decode-only step in one call: decode_layer_cpu for layer l with input_norms[l],
// post_norms[l], weights / weight_types [4 l, 4 l + 4), qkv_biases[l] (or none when the list is
// empty) and the caches of layer l; out_features are every layer's. Returns the last layer's output.
// On integer-dot weights the layers run inside one parallel region (same results, bit for bit).
torch::Tensor decode_layers_cpu(torch::Tensor& hidden, torch::Tensor& residual, const torch::Tensor& positions,
                                at::TensorList input_norms, at::TensorList post_norms, double eps, at::TensorList weights,
                                at::IntArrayRef weight_types, at::IntArrayRef out_features,
                                const c10::List<std::optional<at::Tensor>>& qkv_biases, int64_t num_heads,
                                int64_t num_kv_heads, int64_t head_dim, const torch::Tensor& cos_sin_cache,
                                at::TensorList k_caches, at::TensorList v_caches, const torch::Tensor& slot_mapping,
                                const torch::Tensor& block_tables, const torch::Tensor& context_lens,
                                double softmax_scale);
// decode_layers with its model arguments (every layer's norms, weights, biases, the rotary table
// and the caches) checked once, at construction: run() checks only the step's own tensors and
// computes what decode_layers_cpu does with the same arguments, bit for bit. The tensors are held
// (not copied) for the object's life.
class DecodeLayers {
 public:
  DecodeLayers(std::vector<torch::Tensor> input_norms, std::vector<torch::Tensor> post_norms, double eps,
               std::vector<torch::Tensor> weights, std::vector<int64_t> weight_types, std::vector<int64_t> out_features,
               c10::List<std::optional<at::Tensor>> qkv_biases, int64_t num_heads, int64_t num_kv_heads,
               int64_t head_dim, torch::Tensor cos_sin_cache, std::vector<torch::Tensor> k_caches,
               std::vector<torch::Tensor> v_caches, double softmax_scale);
  ~DecodeLayers();
  torch::Tensor run(torch::Tensor& hidden, torch::Tensor& residual, const torch::Tensor& positions,
                    const torch::Tensor& slot_mapping, const torch::Tensor& block_tables,
                    const torch::Tensor& context_lens) const;

 private:
  struct Bound;
  std::unique_ptr<Bound> b_;
};

}  // namespace lenserve
