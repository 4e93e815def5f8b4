// Decode attention (paged_attention.cpp) planned once per step and run item by item: the
// paged_decode_attention op runs one plan's items over torch's threads, and the fused decode step
// (decoder_layer.cpp) runs the same plan for every layer inside its one parallel region (the
// tables and context lengths are the same for all layers, only the caches differ).
#pragma once

#include <torch/all.h>

#include <memory>

namespace lenserve {

class DecodeAttention {
 public:
  struct Scratch;  // one thread's buffers
  struct ScratchDeleter {
    void operator()(Scratch* s) const;
  };
  using ScratchPtr = std::unique_ptr<Scratch, ScratchDeleter>;

  // Checks the caches [num_blocks, block_size, num_kv_heads, head_dim], block_tables int32
  // [num_seqs, max_blocks] and context_lens int32 [num_seqs] against each other, and splits the
  // work into items: (sequence, context piece), long contexts split only when the sequences alone
  // cannot keep num_threads busy. q rows are q_stride elements apart, heads head_dim apart.
  DecodeAttention(int64_t num_seqs, int64_t num_heads, int64_t head_dim, int64_t q_stride, const torch::Tensor& k_cache,
                  const torch::Tensor& v_cache, const torch::Tensor& block_tables, const torch::Tensor& context_lens,
                  double softmax_scale, int64_t num_threads);
  ~DecodeAttention();

  int64_t num_items() const;
  // Rows (sequence, head) whose split pieces combine() merges; 0 when the items write out directly.
  int64_t num_combine_rows() const;
  ScratchPtr make_scratch() const;
  // Item i against these caches: out [num_seqs, num_heads, head_dim], or the partials of a split.
  template <typename QT>
  void run_item(int64_t i, const QT* q, const torch::Tensor& k_cache, const torch::Tensor& v_cache, QT* out,
                Scratch& sc) const;
  // Rows r0 .. r1 - 1 of out from the split pieces (after every item has run).
  template <typename QT>
  void combine(int64_t r0, int64_t r1, QT* out) const;

 private:
  struct Plan;
  std::unique_ptr<Plan> plan_;
};

}  // namespace lenserve
