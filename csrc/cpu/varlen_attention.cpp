// Variable-length attention over packed tokens on the CPU: FlashAttention-2's algorithm on tiles.
//
// A work item is (sequence, kv head, query tile). The `group` query heads that share one KV head
// are stacked into the item's rows, so each key/value tile is read (and converted) once for all of
// them. Scores are computed transposed, S^T = K Q^T [keys, rows], which puts the online-softmax
// statistics of the rows in vector lanes (no horizontal reductions), lets fp32 keys and values be
// read in place through their token stride, and leaves only the queries to be packed, once per
// item. Memory per thread is O(tile): nothing of size L^2 exists.
#include <algorithm>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu/common.h"
#include "cpu/tile_gemm.h"
#include "cpu/vec.h"
#include "cpu/work_queue.h"
#include "ops.h"

namespace lenserve {
namespace {

constexpr int64_t kBlockK = 64;           // keys per tile
constexpr int64_t kTargetRows = 128;      // rows (query positions x heads of a group) per item
constexpr int64_t kMaxHeadDim = 256;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

struct Problem {
  const int32_t* cu_seqlens_q;
  const int32_t* cu_seqlens_k;
  int64_t num_heads, head_dim, group;
  int64_t q_stride, k_stride, v_stride;  // elements between consecutive tokens
  float scale_log2;                      // softmax_scale * log2(e): scores live in base 2
  bool causal;
};

struct WorkItem {
  int64_t seq, kv_head, q_start, q_len, cost;
};

struct Scratch {
  Scratch(int64_t max_ld, int64_t head_dim)
      : qt(head_dim * max_ld), s(kBlockK * max_ld), o(max_ld * head_dim), m(max_ld), l(max_ld), alpha(max_ld),
        q_limit(max_ld), kbuf(kBlockK * head_dim), vbuf(kBlockK * head_dim) {}
  std::vector<float> qt;       // [head_dim, ld] queries of the item, transposed and pre-scaled
  std::vector<float> s;        // [kBlockK, ld] scores of one key tile, then probabilities
  std::vector<float> o;        // [rows, head_dim] unnormalised output
  std::vector<float> m, l;     // [ld] running max and sum of each row
  std::vector<float> alpha;    // [ld] rescale of each row's output for the current tile
  std::vector<float> q_limit;  // [ld] last key position each row may see (causal)
  std::vector<float> kbuf, vbuf;  // [kBlockK, head_dim] keys/values converted to fp32
};

// Online-softmax step over one tile of scores s [num_keys, ld] (column = row of the item).
void softmax_update(float* s, int64_t num_keys, int64_t ld, int64_t key_start, bool masked, Scratch& sc) {
  using namespace vec;
  const Vec8 neg_inf = set1(kNegInf);
  for (int64_t c = 0; c < ld; c += kWidth) {
    const Vec8 m_old = vload(sc.m.data() + c);
    Vec8 m_new = m_old;
    if (masked) {
      const Vec8 limit = vload(sc.q_limit.data() + c);
      for (int64_t j = 0; j < num_keys; ++j) {
        float* row = s + j * ld + c;
        const Vec8 x = select_le(set1(static_cast<float>(key_start + j)), limit, vload(row), neg_inf);
        vstore(row, x);
        m_new = max(m_new, x);
      }
    } else {
      for (int64_t j = 0; j < num_keys; ++j) m_new = max(m_new, vload(s + j * ld + c));
    }
    // A row that has seen no visible key yet keeps m = -inf; subtracting 0 keeps its p = 0.
    const Vec8 m_use = replace_neg_inf(m_new, zero());
    const Vec8 alpha = exp2(sub(m_old, m_use));
    Vec8 sum = zero();
    for (int64_t j = 0; j < num_keys; ++j) {
      float* row = s + j * ld + c;
      const Vec8 p = exp2(sub(vload(row), m_use));
      vstore(row, p);
      sum = add(sum, p);
    }
    vstore(sc.l.data() + c, fma(vload(sc.l.data() + c), alpha, sum));
    vstore(sc.alpha.data() + c, alpha);
    vstore(sc.m.data() + c, m_new);
  }
}

// `k_index` (nullptr: none): key position j of sequence s reads row k_index[cu_seqlens_k[s] + j] of
// k and v (a paged cache flattened to [slots, kv_heads, head_dim]), converted to fp32 tile by tile,
// so a prompt chunk attends to its cached context without a gathered copy of it.
template <typename T, typename TKV>
void attend(const Problem& p, const WorkItem& w, const T* q, const TKV* k, const TKV* v, T* out, Scratch& sc,
            const int64_t* k_index) {
  using namespace vec;
  const int64_t D = p.head_dim, G = p.group;
  const int64_t q_begin = p.cu_seqlens_q[w.seq], k_begin = p.cu_seqlens_k[w.seq];
  const int64_t len_q = p.cu_seqlens_q[w.seq + 1] - q_begin, len_k = p.cu_seqlens_k[w.seq + 1] - k_begin;
  const int64_t rows = G * w.q_len, ld = round_up(rows, kGemmNR);
  const int64_t offset = len_k - len_q;  // bottom-right causal alignment: query i sees keys j <= i + offset
  const int64_t key_end = p.causal ? std::clamp<int64_t>(w.q_start + w.q_len + offset, 0, len_k) : len_k;

  // Row h * q_len + i of the item is query position q_start + i of query head kv_head * G + h.
  float* qt = sc.qt.data();
  for (int64_t h = 0; h < G; ++h) {
    for (int64_t i = 0; i < w.q_len; ++i) {
      const T* src = q + (q_begin + w.q_start + i) * p.q_stride + (w.kv_head * G + h) * D;
      const int64_t col = h * w.q_len + i;
      for (int64_t d = 0; d < D; ++d) qt[d * ld + col] = static_cast<float>(src[d]) * p.scale_log2;
      sc.q_limit[col] = static_cast<float>(w.q_start + i + offset);
    }
  }
  for (int64_t d = 0; d < D; ++d) std::fill(qt + d * ld + rows, qt + (d + 1) * ld, 0.f);
  std::fill(sc.q_limit.begin() + rows, sc.q_limit.begin() + ld, std::numeric_limits<float>::max());
  std::fill(sc.m.begin(), sc.m.begin() + ld, kNegInf);
  std::fill(sc.l.begin(), sc.l.begin() + ld, 0.f);
  std::fill(sc.o.begin(), sc.o.begin() + rows * D, 0.f);

  for (int64_t j0 = 0; j0 < key_end; j0 += kBlockK) {
    const int64_t num_keys = std::min(kBlockK, key_end - j0);
    const float *kt, *vt;
    int64_t k_ld, v_ld;
    if (std::is_same_v<TKV, float> && k_index == nullptr) {  // fp32 keys and values read in place
      kt = reinterpret_cast<const float*>(k + (k_begin + j0) * p.k_stride + w.kv_head * D);
      vt = reinterpret_cast<const float*>(v + (k_begin + j0) * p.v_stride + w.kv_head * D);
      k_ld = p.k_stride, v_ld = p.v_stride;
    } else {
      for (int64_t j = 0; j < num_keys; ++j) {
        const int64_t row = k_index != nullptr ? k_index[k_begin + j0 + j] : k_begin + j0 + j;
        convert(k + row * p.k_stride + w.kv_head * D, sc.kbuf.data() + j * D, D);
        convert(v + row * p.v_stride + w.kv_head * D, sc.vbuf.data() + j * D, D);
      }
      kt = sc.kbuf.data(), vt = sc.vbuf.data(), k_ld = D, v_ld = D;
    }
    // S^T [num_keys, ld] = K [num_keys, D] Q^T [D, ld]
    tile_gemm(num_keys, ld, D, kt, k_ld, 1, qt, ld, sc.s.data(), ld, nullptr);
    const bool masked = p.causal && j0 + num_keys - 1 > w.q_start + offset;
    softmax_update(sc.s.data(), num_keys, ld, j0, masked, sc);
    // O [rows, D] = alpha * O + P [rows, num_keys] V [num_keys, D], P read from S^T
    tile_gemm(rows, D, num_keys, sc.s.data(), 1, ld, vt, v_ld, sc.o.data(), D, sc.alpha.data());
  }

  for (int64_t h = 0; h < G; ++h) {
    for (int64_t i = 0; i < w.q_len; ++i) {
      const int64_t row = h * w.q_len + i;
      const Vec8 inv = safe_reciprocal(set1(sc.l[row]));  // no visible key: l = 0, output zeros
      T* dst = out + ((q_begin + w.q_start + i) * p.num_heads + w.kv_head * G + h) * D;
      for (int64_t d = 0; d < D; d += kWidth) vstore(dst + d, mul(vload(sc.o.data() + row * D + d), inv));
    }
  }
}

void check_rows(const torch::Tensor& x, const char* name) {
  LS_CHECK_CPU(x);
  LS_CHECK(x.dim() == 3, "varlen_attention: ", name, " must be [tokens, heads, head_dim], got ", x.dim(), " dimensions");
  LS_CHECK(x.stride(2) == 1 && (x.size(1) <= 1 || x.stride(1) == x.size(2)),
           "varlen_attention: ", name, " must have contiguous [heads, head_dim] rows (the token stride may be larger)");
  LS_CHECK(x.size(0) <= 1 || x.stride(0) >= x.size(1) * x.size(2), "varlen_attention: ", name, "'s token stride ",
           x.stride(0), " overlaps its rows");
}

// cu_seqlens int32 [num_seqs + 1]: 0, non-decreasing, last == total. Returns the longest sequence.
int64_t check_cu_seqlens(const torch::Tensor& cu, const char* name, int64_t total) {
  LS_CHECK_CPU(cu);
  LS_CHECK(cu.scalar_type() == at::kInt, "varlen_attention: ", name, " must be int32, got ", cu.scalar_type());
  LS_CHECK(cu.dim() == 1 && cu.size(0) >= 1, "varlen_attention: ", name, " must be 1-D [num_seqs + 1]");
  LS_CHECK(cu.is_contiguous(), "varlen_attention: ", name, " must be contiguous");
  const int32_t* c = cu.data_ptr<int32_t>();
  LS_CHECK(c[0] == 0, "varlen_attention: ", name, "[0] must be 0, got ", c[0]);
  int64_t longest = 0;
  for (int64_t i = 0; i + 1 < cu.size(0); ++i) {
    LS_CHECK(c[i + 1] >= c[i], "varlen_attention: ", name, " must be non-decreasing, but ", name, "[", i + 1,
             "] = ", c[i + 1], " < ", c[i]);
    longest = std::max<int64_t>(longest, c[i + 1] - c[i]);
  }
  LS_CHECK(c[cu.size(0) - 1] == total, "varlen_attention: the last entry of ", name, " (", c[cu.size(0) - 1],
           ") must equal the number of tokens (", total, ")");
  return longest;
}

}  // namespace

namespace {

torch::Tensor varlen_attention_impl(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                                    const torch::Tensor* k_index, const torch::Tensor& cu_seqlens_q,
                                    const torch::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
                                    double softmax_scale, bool causal) {
  check_rows(q, "q");
  check_rows(k, "k");
  check_rows(v, "v");
  if (k_index == nullptr) {
    LS_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
             "varlen_attention: q, k, v must share a dtype, got ", q.scalar_type(), ", ", k.scalar_type(), ", ",
             v.scalar_type());
  } else {
    LS_CHECK(v.scalar_type() == k.scalar_type(), "varlen_attention_indexed: k and v must share a dtype, got ",
             k.scalar_type(), ", ", v.scalar_type());
  }
  LS_CHECK(k.sizes() == v.sizes(), "varlen_attention: k ", k.sizes(), " and v ", v.sizes(), " shapes differ");
  const int64_t total_q = q.size(0), num_heads = q.size(1), head_dim = q.size(2);
  const int64_t num_kv_heads = k.size(1);
  int64_t total_k = k.size(0);
  if (k_index != nullptr) {
    const torch::Tensor& idx = *k_index;
    LS_CHECK_CPU(idx);
    LS_CHECK(idx.scalar_type() == at::kLong && idx.dim() == 1 && idx.is_contiguous(),
             "varlen_attention_indexed: k_index must be a contiguous 1-D int64 tensor");
    const int64_t* ix = idx.data_ptr<int64_t>();
    for (int64_t i = 0; i < idx.size(0); ++i) {
      LS_CHECK(ix[i] >= 0 && ix[i] < k.size(0), "varlen_attention_indexed: k_index[", i, "] = ", ix[i],
               " is outside k's ", k.size(0), " rows");
    }
    total_k = idx.size(0);  // the keys are the indexed rows
  }
  LS_CHECK(k.size(2) == head_dim, "varlen_attention: q head_dim ", head_dim, " != k head_dim ", k.size(2));
  LS_CHECK(head_dim % kGemmNR == 0 && head_dim > 0 && head_dim <= kMaxHeadDim,
           "varlen_attention: head_dim must be a multiple of ", kGemmNR, " up to ", kMaxHeadDim,
           " (64, 80, 96, 128, ...), got ", head_dim);
  LS_CHECK(num_kv_heads > 0 && num_heads % num_kv_heads == 0, "varlen_attention: num_heads (", num_heads,
           ") must be a multiple of num_kv_heads (", num_kv_heads, ")");
  LS_CHECK(cu_seqlens_q.sizes() == cu_seqlens_k.sizes(), "varlen_attention: cu_seqlens_q ", cu_seqlens_q.sizes(),
           " and cu_seqlens_k ", cu_seqlens_k.sizes(), " must both be [num_seqs + 1]");
  const int64_t longest_q = check_cu_seqlens(cu_seqlens_q, "cu_seqlens_q", total_q);
  const int64_t longest_k = check_cu_seqlens(cu_seqlens_k, "cu_seqlens_k", total_k);
  LS_CHECK(longest_q <= max_seqlen_q, "varlen_attention: max_seqlen_q (", max_seqlen_q,
           ") is shorter than the longest query sequence (", longest_q, ")");
  LS_CHECK(longest_k <= max_seqlen_k, "varlen_attention: max_seqlen_k (", max_seqlen_k,
           ") is shorter than the longest key sequence (", longest_k, ")");

  auto out = torch::empty({total_q, num_heads, head_dim}, q.options().memory_format(at::MemoryFormat::Contiguous));
  const int64_t group = num_heads / num_kv_heads;
  const int64_t num_seqs = cu_seqlens_q.size(0) - 1;
  const Problem p{cu_seqlens_q.data_ptr<int32_t>(),
                  cu_seqlens_k.data_ptr<int32_t>(),
                  num_heads,
                  head_dim,
                  group,
                  q.stride(0),
                  k.stride(0),
                  v.stride(0),
                  static_cast<float>(softmax_scale) * vec::kLog2e,
                  causal};

  // Query tiles sized so an item holds about kTargetRows rows; costliest items are handed out first.
  const int64_t block_q = std::clamp<int64_t>(kTargetRows / group, 8, 64);
  std::vector<WorkItem> items;
  for (int64_t s = 0; s < num_seqs; ++s) {
    const int64_t len_q = p.cu_seqlens_q[s + 1] - p.cu_seqlens_q[s], len_k = p.cu_seqlens_k[s + 1] - p.cu_seqlens_k[s];
    for (int64_t q_start = 0; q_start < len_q; q_start += block_q) {
      const int64_t q_len = std::min(block_q, len_q - q_start);
      const int64_t keys = causal ? std::clamp<int64_t>(q_start + q_len + len_k - len_q, 0, len_k) : len_k;
      for (int64_t h = 0; h < num_kv_heads; ++h) items.push_back({s, h, q_start, q_len, q_len * (keys + kBlockK)});
    }
  }
  std::stable_sort(items.begin(), items.end(), [](const WorkItem& a, const WorkItem& b) { return a.cost > b.cost; });
  const int64_t max_ld = round_up(group * block_q, kGemmNR);

  const int64_t* ix = k_index != nullptr ? k_index->data_ptr<int64_t>() : nullptr;
  dispatch_float_types(q.scalar_type(), "varlen_attention: q", [&](auto tag) {
    using T = decltype(tag);
    const T* qp = q.data_ptr<T>();
    T* op = out.data_ptr<T>();
    auto run = [&](auto kv_tag) {
      using TKV = decltype(kv_tag);
      const TKV* kp = k.data_ptr<TKV>();
      const TKV* vp = v.data_ptr<TKV>();
      parallel_dynamic(
          static_cast<int64_t>(items.size()), [&] { return Scratch(max_ld, head_dim); },
          [&](int64_t i, Scratch& sc) { attend<T, TKV>(p, items[i], qp, kp, vp, op, sc, ix); });
    };
    if (ix == nullptr) {
      run(T{});  // one dtype
    } else {
      dispatch_float_types(k.scalar_type(), "varlen_attention_indexed: k", run);
    }
  });
  return out;
}

}  // namespace

torch::Tensor varlen_attention_cpu(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                                   const torch::Tensor& cu_seqlens_q, const torch::Tensor& cu_seqlens_k,
                                   int64_t max_seqlen_q, int64_t max_seqlen_k, double softmax_scale, bool causal) {
  return varlen_attention_impl(q, k, v, nullptr, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
                               causal);
}

torch::Tensor varlen_attention_indexed_cpu(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                                           const torch::Tensor& k_index, const torch::Tensor& cu_seqlens_q,
                                           const torch::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
                                           int64_t max_seqlen_k, double softmax_scale, bool causal) {
  return varlen_attention_impl(q, k, v, &k_index, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                               softmax_scale, causal);
}

}  // namespace lenserve
