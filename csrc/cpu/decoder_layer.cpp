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
// ~17 ms batch-8 step (SmolLM2, 2-core EPYC, both alternated in blocks in one process). On
// integer-dot weights decode_layers then runs the whole stack in one parallel region (below);
// other stacks (packed fp32, 16-bit rows, rows past the integer decode path) call decode_layer
// layer by layer.
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <memory>
#include <vector>

#include "cpu/common.h"
#include "cpu/decode_attention.h"
#include "cpu/quant_blocks.h"
#include "cpu/rows.h"
#include "cpu/spin_barrier.h"
#include "ops.h"

namespace lenserve {

namespace {

constexpr int64_t kPackedFp32 = -1;  // weight type of a pack_linear_weight matrix

// [begin, end) of `count` units for thread t of nt: contiguous, sizes differing by at most one.
inline std::pair<int64_t, int64_t> share(int64_t count, int t, int nt) {
  const int64_t base = count / nt, extra = count % nt;
  const int64_t begin = t * base + std::min<int64_t>(t, extra);
  return {begin, begin + base + (t < extra ? 1 : 0)};
}

// ---- the whole decode stack in one parallel region ----
//
// decode_layers on integer-dot weights (quant_linear's decode path for every projection) runs all
// layers inside one OpenMP region: the threads split each projection's columns and the attention's
// work items, do their share of the row-wise ops, and meet at a barrier between phases. Calling
// the ops one after another forked and joined torch's thread pool ~5 times a layer (150 times a
// SmolLM2 step) and allocated every intermediate tensor afresh; a barrier between two spinning
// threads costs a fraction of a fork and join. The kernels and their order are the ops', so the
// result equals the per-layer path bit for bit (tests/csrc/test_decode_layers.py). Against that
// path, in one process in alternating blocks of steps (SmolLM2 Q4_1, 2-core EPYC with AVX-512):
// 0.94x the step time at batch 1 (~4.5 ms), 0.91x at batch 8 (~15 ms). Still measured there and
// not kept: cutting a short context's attention into 64-96-key pieces (3-7 items on 2 threads:
// 1.07-1.08x slower at batch 1; one piece per thread, kept, is paged_attention.cpp's
// kMinBalanceKeys), and a thread without rows in a row-wise phase
// prefetching the start of its share of the next projection (16-64 KiB: no change), and fewer
// barriers (each sequence's rotary, cache write, attention and quantization by the thread taking
// its item; each thread's gate and up columns followed by their SiLU: 7 a layer instead of 10, no
// change at batch 1 or 8), so the barriers' own cost is small beside the waiting at them; and
// at batch 1, each row-wise op split over the threads by heads or activation blocks (1.00x). The
// barriers are spin_barrier.h's: libgomp's ended each with a futex_wake system call. Against it,
// medians of alternating blocks of steps: batch 1 0.983, 0.984 and 0.991x the time (12-16 pairs
// of blocks each, single pairs 0.88-1.06x), batch 8 0.989 and 0.981x, batch 32 0.997x.

struct Projection {
  const uint8_t* w;
  int64_t type, row_bytes, n;
};

// The projections' sizes against the heads and the hidden size.
void check_projection_sizes(at::IntArrayRef out_features, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                            int64_t hidden_size) {
  const int64_t q_size = num_heads * head_dim, kv_size = num_kv_heads * head_dim;
  LS_CHECK(out_features[0] == q_size + 2 * kv_size && out_features[1] == hidden_size && out_features[2] % 2 == 0 &&
               out_features[3] == hidden_size,
           "decode_layer: projection sizes ", out_features, " do not fit ", num_heads, " heads, ", num_kv_heads,
           " kv heads of ", head_dim, " and hidden ", hidden_size);
}

// The shapes a decode layer's arguments must agree on (decode_layer, and decode_layers' one region).
void check_layer_shapes(const torch::Tensor& hidden, const torch::Tensor& residual, const torch::Tensor& positions,
                        const torch::Tensor& context_lens, at::IntArrayRef out_features, int64_t num_heads,
                        int64_t num_kv_heads, int64_t head_dim) {
  LS_CHECK_DIM(hidden, 2);
  LS_CHECK(hidden.sizes() == residual.sizes(), "decode_layer: hidden ", hidden.sizes(), " and residual ",
           residual.sizes(), " differ");
  const int64_t n = hidden.size(0);
  check_projection_sizes(out_features, num_heads, num_kv_heads, head_dim, hidden.size(1));
  LS_CHECK(positions.size(0) == n && context_lens.size(0) == n,
           "decode_layer: one position and one context length per decoding sequence (", n, " rows)");
}

void check_fp32_vector(const torch::Tensor& t, int64_t size, const char* what) {
  LS_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.dim() == 1 && t.size(0) == size && t.is_contiguous(),
           "decode_layers: ", what, " must be a contiguous fp32 CPU vector of ", size, ", got ", t.sizes(), " ",
           t.scalar_type());
}

// Writes key and value rows of token t (fp32, in qkv) to their cache slot.
template <typename CT>
void cache_row(const float* k, const float* v, void* k_cache, void* v_cache, int64_t slot, int64_t row) {
  rows::copy_rows(k, static_cast<CT*>(k_cache) + slot * row, row);
  rows::copy_rows(v, static_cast<CT*>(v_cache) + slot * row, row);
}

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
  check_layer_shapes(hidden, residual, positions, context_lens, out_features, num_heads, num_kv_heads, head_dim);
  const int64_t n = hidden.size(0);
  const int64_t q_size = num_heads * head_dim, kv_size = num_kv_heads * head_dim;

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

struct DecodeLayers::Bound {
  std::vector<torch::Tensor> input_norms, post_norms, weights, k_caches, v_caches;
  c10::List<std::optional<at::Tensor>> qkv_biases;
  std::vector<int64_t> weight_types, out_features;
  torch::Tensor cos_sin_cache;
  double eps = 0, softmax_scale = 0;
  int64_t L = 0, num_heads = 0, num_kv_heads = 0, head_dim = 0;
  // What the one region reads, set when every weight is a byte matrix of an integer-dot type
  bool integer_weights = false;
  std::vector<int64_t> distinct_types;
  std::vector<Projection> proj;  // 4 per layer
  std::vector<const float*> in_norm, post_norm, bias;
  std::vector<void*> kc, vc;
  at::ScalarType cache_dtype = at::kFloat;

  // Whether a step of these rows runs in the one region: fp32 activations, every type on
  // quant_linear's integer-dot decode path at this many rows.
  bool one_region(const torch::Tensor& hidden) const {
    if (!integer_weights || hidden.scalar_type() != at::kFloat || hidden.dim() != 2) return false;
    for (int64_t type : distinct_types)
      if (!quant::on_integer_decode_path(type, hidden.size(0))) return false;
    return true;
  }

  // The model arguments the one region reads, checked, and their pointers (nothing inside the
  // region may throw).
  void bind_one_region() {
    const int64_t d = out_features[3];
    const int64_t q_size = num_heads * head_dim, inter = out_features[2] / 2, qkv_out = out_features[0];
    check_projection_sizes(out_features, num_heads, num_kv_heads, head_dim, d);
    for (int64_t l = 0; l < L; ++l) {
      check_fp32_vector(input_norms[l], d, "input_norms");
      check_fp32_vector(post_norms[l], d, "post_norms");
      if (!qkv_biases.empty() && qkv_biases.get(l).has_value()) check_fp32_vector(*qkv_biases.get(l), qkv_out, "qkv_biases");
    }
    const int64_t in_features[4] = {d, q_size, d, inter};
    for (int64_t i = 0; i < 4 * L; ++i) {
      const torch::Tensor& w = weights[i];
      const int64_t type = weight_types[i], K = in_features[i % 4], N = out_features[i % 4];
      const int64_t row_bytes = quant::row_bytes_of(type, K, "decode_layers");
      LS_CHECK(w.device().is_cpu() && w.is_contiguous() && w.dim() == 2 && w.size(0) == N && w.size(1) == row_bytes,
               "decode_layers: weight ", i, " must be a contiguous CPU [", N, ", ", row_bytes, "] bytes for ", N,
               " rows of ", K, " features of type ", type, ", got ", w.sizes());
      LS_CHECK(N % quant::decode_cols_unit(type) == 0, "decode_layers: weight ", i, " of type ", type,
               " needs a multiple of ", quant::decode_cols_unit(type), " rows, got ", N);
      proj.push_back({w.data_ptr<uint8_t>(), type, row_bytes, N});
    }
    LS_CHECK_CPU(cos_sin_cache);
    LS_CHECK(cos_sin_cache.scalar_type() == at::kFloat && cos_sin_cache.is_contiguous() && cos_sin_cache.dim() == 2,
             "decode_layers: cos_sin_cache must be a contiguous fp32 [positions, rot_dim] tensor");
    // every layer's caches like the first layer's, which each step's DecodeAttention checks
    const torch::Tensor& k0 = k_caches[0];
    LS_CHECK(k0.dim() == 4 && k0.size(2) == num_kv_heads, "decode_layers: the caches hold ",
             k0.dim() == 4 ? k0.size(2) : -1, " KV heads, the layers ", num_kv_heads);
    cache_dtype = k0.scalar_type();
    LS_CHECK(cache_dtype == at::kFloat || cache_dtype == at::kBFloat16 || cache_dtype == at::kHalf,
             "decode_layers: caches must be float32, bfloat16 or float16, got ", cache_dtype);
    for (int64_t l = 0; l < L; ++l) {
      for (const torch::Tensor* c : {&k_caches[l], &v_caches[l]})
        LS_CHECK(c->device().is_cpu() && c->is_contiguous() && c->sizes() == k0.sizes() && c->scalar_type() == cache_dtype,
                 "decode_layers: every layer's caches must be contiguous CPU tensors of shape ", k0.sizes(),
                 " and dtype ", cache_dtype, ", got ", c->sizes(), " ", c->scalar_type(), " (layer ", l, ")");
      kc.push_back(k_caches[l].data_ptr());
      vc.push_back(v_caches[l].data_ptr());
      in_norm.push_back(input_norms[l].data_ptr<float>());
      post_norm.push_back(post_norms[l].data_ptr<float>());
      bias.push_back(!qkv_biases.empty() && qkv_biases.get(l).has_value() ? qkv_biases.get(l)->data_ptr<float>() : nullptr);
    }
  }

  torch::Tensor run_one_region(torch::Tensor& hidden, torch::Tensor& residual, const torch::Tensor& positions,
                               const torch::Tensor& slot_mapping, const torch::Tensor& block_tables,
                               const torch::Tensor& context_lens) const;
};

DecodeLayers::DecodeLayers(std::vector<torch::Tensor> input_norms, std::vector<torch::Tensor> post_norms, double eps,
                           std::vector<torch::Tensor> weights, std::vector<int64_t> weight_types,
                           std::vector<int64_t> out_features, c10::List<std::optional<at::Tensor>> qkv_biases,
                           int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, torch::Tensor cos_sin_cache,
                           std::vector<torch::Tensor> k_caches, std::vector<torch::Tensor> v_caches,
                           double softmax_scale)
    : b_(std::make_unique<Bound>()) {
  Bound& b = *b_;
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
  LS_CHECK(L == 0 || out_features.size() == 4,
           "decode_layers: out_features takes the qkv, o, gate_up and down projections' (4), got ", out_features.size());
  b.input_norms = std::move(input_norms);
  b.post_norms = std::move(post_norms);
  b.weights = std::move(weights);
  b.k_caches = std::move(k_caches);
  b.v_caches = std::move(v_caches);
  b.qkv_biases = std::move(qkv_biases);
  b.weight_types = std::move(weight_types);
  b.out_features = std::move(out_features);
  b.cos_sin_cache = std::move(cos_sin_cache);
  b.eps = eps;
  b.softmax_scale = softmax_scale;
  b.L = L;
  b.num_heads = num_heads;
  b.num_kv_heads = num_kv_heads;
  b.head_dim = head_dim;
  b.integer_weights = L > 0;
  for (int64_t i = 0; i < 4 * L; ++i) {
    const int64_t type = b.weight_types[i];
    b.integer_weights = b.integer_weights && b.weights[i].scalar_type() == at::kByte && quant::on_integer_decode_path(type, 1);
    if (std::find(b.distinct_types.begin(), b.distinct_types.end(), type) == b.distinct_types.end())
      b.distinct_types.push_back(type);
  }
  if (b.integer_weights) b.bind_one_region();
}

DecodeLayers::~DecodeLayers() = default;

torch::Tensor DecodeLayers::run(torch::Tensor& hidden, torch::Tensor& residual, const torch::Tensor& positions,
                                const torch::Tensor& slot_mapping, const torch::Tensor& block_tables,
                                const torch::Tensor& context_lens) const {
  const Bound& b = *b_;
  if (b.one_region(hidden)) {
    check_layer_shapes(hidden, residual, positions, context_lens, b.out_features, b.num_heads, b.num_kv_heads,
                       b.head_dim);
    return b.run_one_region(hidden, residual, positions, slot_mapping, block_tables, context_lens);
  }
  torch::Tensor h = hidden;
  const at::TensorList weights(b.weights);
  const at::IntArrayRef types(b.weight_types);
  for (int64_t l = 0; l < b.L; ++l) {
    torch::Tensor k_cache = b.k_caches[l], v_cache = b.v_caches[l];
    const std::optional<torch::Tensor> bias = b.qkv_biases.empty() ? std::nullopt : b.qkv_biases.get(l);
    h = decode_layer_cpu(h, residual, positions, b.input_norms[l], b.post_norms[l], b.eps, weights.slice(4 * l, 4),
                         types.slice(4 * l, 4), b.out_features, bias, b.num_heads, b.num_kv_heads, b.head_dim,
                         b.cos_sin_cache, k_cache, v_cache, slot_mapping, block_tables, context_lens, b.softmax_scale);
  }
  return h;
}

torch::Tensor DecodeLayers::Bound::run_one_region(torch::Tensor& hidden, torch::Tensor& residual,
                                                  const torch::Tensor& positions, const torch::Tensor& slot_mapping,
                                                  const torch::Tensor& block_tables,
                                                  const torch::Tensor& context_lens) const {
  // The step's own tensors, checked here, before the region: nothing inside it may throw.
  const int64_t n = hidden.size(0), d = hidden.size(1);
  const int64_t q_size = num_heads * head_dim, kv_size = num_kv_heads * head_dim;
  const int64_t qkv_out = out_features[0], inter = out_features[2] / 2;
  LS_CHECK_CPU(hidden);
  LS_CHECK_CPU(residual);
  LS_CHECK(hidden.is_contiguous() && residual.is_contiguous() && residual.scalar_type() == at::kFloat,
           "decode_layers: hidden and residual must be contiguous fp32");
  LS_CHECK_CPU(positions);
  LS_CHECK_CPU(slot_mapping);
  LS_CHECK(positions.scalar_type() == at::kLong && positions.is_contiguous(), "decode_layers: positions must be contiguous int64");
  LS_CHECK(slot_mapping.scalar_type() == at::kLong && slot_mapping.is_contiguous() && slot_mapping.size(0) == n,
           "decode_layers: slot_mapping must be contiguous int64 with one slot per sequence (", n, ")");
  const int64_t rot_dim = cos_sin_cache.size(1);
  const int64_t* pos = positions.data_ptr<int64_t>();
  check_rotary_positions(pos, n, cos_sin_cache.size(0), rot_dim, head_dim);
  const DecodeAttention attn(n, num_heads, head_dim, qkv_out, k_caches[0], v_caches[0], block_tables, context_lens,
                             softmax_scale, at::get_num_threads());
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  check_cache_slots(slots, n, k_caches[0].size(0) * k_caches[0].size(1));

  auto opts = hidden.options();
  auto out = torch::empty({n, d}, opts);
  // one buffer for the projections' outputs: qkv [n, qkv_out], attention [n, q_size], o [n, d],
  // gate_up [n, 2 inter], silu [n, inter]
  auto work = torch::empty({n * (qkv_out + q_size + d + 3 * inter)}, opts);
  float* qkv = work.data_ptr<float>();
  float* att = qkv + n * qkv_out;
  float* ho = att + n * q_size;
  float* gu = ho + n * d;
  float* act = gu + n * 2 * inter;
  const int64_t max_k = std::max({d, q_size, inter});
  std::unique_ptr<quant::BlockQAct[]> xq_buf(new quant::BlockQAct[n * (max_k / quant::QK)]);
  quant::BlockQAct* xq = xq_buf.get();
  float* res = residual.data_ptr<float>();
  float* out_p = out.data_ptr<float>();
  const float eps_f = static_cast<float>(eps);
  const float* cs = cos_sin_cache.data_ptr<float>();
  const int64_t half = rot_dim / 2;
  const int threads = std::max(1, at::get_num_threads());
  std::vector<DecodeAttention::ScratchPtr> scratch;
  for (int t = 0; t < threads; ++t) scratch.push_back(attn.make_scratch());
  std::unique_ptr<std::atomic<int64_t>[]> next_item(new std::atomic<int64_t>[L]);
  for (int64_t l = 0; l < L; ++l) next_item[l].store(0, std::memory_order_relaxed);
  const int64_t num_items = attn.num_items(), combine_rows = attn.num_combine_rows();

  SpinBarrier barrier;  // between the phases below (spin_barrier.h: no system call per barrier)
#pragma omp parallel num_threads(threads)
  {
    const int t = omp_get_thread_num(), nt = omp_get_num_threads();
#pragma omp single
    barrier.reset(nt);  // the team may be smaller than asked; single's own barrier publishes it
    const auto [r0, r1] = share(n, t, nt);  // this thread's rows for the row-wise ops
    auto linear = [&](const Projection& p, int64_t nb, float* y) {
      const int64_t unit = quant::decode_cols_unit(p.type);
      const auto [u0, u1] = share(p.n / unit, t, nt);
      if (u1 > u0) quant::decode_cols(p.type, p.w, p.row_bytes, xq, nb, n, p.n, u0 * unit, u1 * unit, y);
    };
    // residual += x; x = rms_norm(residual) * norm, quantized; then y = x W^T
    auto norm_then_linear = [&](float* x, const float* norm, const Projection& p, float* y) {
      for (int64_t r = r0; r < r1; ++r) {
        rows::add_rms_norm_row(x + r * d, res + r * d, norm, d, eps_f);
        quant::quantize_row_act(x + r * d, xq + r * (d / quant::QK), d);
      }
      barrier.wait();
      linear(p, d / quant::QK, y);
      barrier.wait();
    };
    float* h = hidden.data_ptr<float>();
    for (int64_t l = 0; l < L; ++l) {
      const Projection* P = proj.data() + 4 * l;
      norm_then_linear(h, in_norm[l], P[0], qkv);
      for (int64_t r = r0; r < r1; ++r) {
        float* row = qkv + r * qkv_out;
        if (bias[l] != nullptr)
          for (int64_t j = 0; j < qkv_out; ++j) row[j] += bias[l][j];
        const float* cos = cs + pos[r] * rot_dim;
        for (int64_t hh = 0; hh < num_heads + num_kv_heads; ++hh)
          rows::rotate_head(row + hh * head_dim, cos, cos + half, half, true);
        if (slots[r] < 0) continue;
        const float* k = row + q_size;
        switch (cache_dtype) {
          case at::kFloat: cache_row<float>(k, k + kv_size, kc[l], vc[l], slots[r], kv_size); break;
          case at::kBFloat16: cache_row<c10::BFloat16>(k, k + kv_size, kc[l], vc[l], slots[r], kv_size); break;
          default: cache_row<c10::Half>(k, k + kv_size, kc[l], vc[l], slots[r], kv_size); break;
        }
      }
      barrier.wait();
      for (int64_t i = next_item[l].fetch_add(1, std::memory_order_relaxed); i < num_items;
           i = next_item[l].fetch_add(1, std::memory_order_relaxed))
        attn.run_item<float>(i, qkv, k_caches[l], v_caches[l], att, *scratch[t]);
      barrier.wait();
      if (combine_rows > 0) {
        const auto [c0, c1] = share(combine_rows, t, nt);
        attn.combine<float>(c0, c1, att);
        barrier.wait();
      }
      for (int64_t r = r0; r < r1; ++r) quant::quantize_row_act(att + r * q_size, xq + r * (q_size / quant::QK), q_size);
      barrier.wait();
      linear(P[1], q_size / quant::QK, ho);
      barrier.wait();
      norm_then_linear(ho, post_norm[l], P[2], gu);
      for (int64_t r = r0; r < r1; ++r) {
        rows::silu_and_mul_row(gu + r * 2 * inter, gu + r * 2 * inter + inter, act + r * inter, inter);
        quant::quantize_row_act(act + r * inter, xq + r * (inter / quant::QK), inter);
      }
      barrier.wait();
      linear(P[3], inter / quant::QK, out_p);
      barrier.wait();
      h = out_p;
    }
  }
  return out;
}

torch::Tensor decode_layers_cpu(torch::Tensor& hidden, torch::Tensor& residual, const torch::Tensor& positions,
                                at::TensorList input_norms, at::TensorList post_norms, double eps, at::TensorList weights,
                                at::IntArrayRef weight_types, at::IntArrayRef out_features,
                                const c10::List<std::optional<at::Tensor>>& qkv_biases, int64_t num_heads,
                                int64_t num_kv_heads, int64_t head_dim, const torch::Tensor& cos_sin_cache,
                                at::TensorList k_caches, at::TensorList v_caches, const torch::Tensor& slot_mapping,
                                const torch::Tensor& block_tables, const torch::Tensor& context_lens,
                                double softmax_scale) {
  const DecodeLayers layers(input_norms.vec(), post_norms.vec(), eps, weights.vec(), weight_types.vec(),
                            out_features.vec(), qkv_biases, num_heads, num_kv_heads, head_dim, cos_sin_cache,
                            k_caches.vec(), v_caches.vec(), softmax_scale);
  return layers.run(hidden, residual, positions, slot_mapping, block_tables, context_lens);
}

}  // namespace lenserve
