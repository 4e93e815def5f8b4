// Decode attention on the CPU: one new query token per sequence against its paged KV cache.
//
// A work item is (sequence, context split) and covers every head: a cache slot holds the keys of
// all KV heads side by side, so the item copies whole contiguous runs of a block, as stored, into
// a tile buffer, and converts them to fp32 in registers, each vector once for up to three query
// heads of its KV head's group (the scores four keys at a time, 12 accumulators; P V 32 columns
// at a time). An earlier version staged each tile in fp32 and ran the products over that copy:
// its conversions' stores and reloads made it 1.2-1.3x slower, with the cache in L3 or read from
// DRAM (SmolLM2's 9 / 3 heads of 64, 1-32 sequences of 250-400 keys). When there are fewer
// sequences than threads, long contexts are split across threads (flash-decoding) and the
// partial results combined by their softmax statistics.
#include <algorithm>
#include <numeric>
#include <cstring>
#include <limits>
#include <vector>

#include "cpu/common.h"
#include "cpu/decode_attention.h"
#include "cpu/tile_gemm.h"
#include "cpu/vec.h"
#include "cpu/work_queue.h"
#include "ops.h"

namespace lenserve {
namespace {

constexpr int64_t kTileK = 32;          // keys per tile (may span several cache blocks)
constexpr int64_t kMinSplitKeys = 256;  // shortest context piece worth its own work item
// Shortest piece when a split only balances a few sequences over the threads. SmolLM2 decode
// steps on 2 threads, contexts of 200-490 keys, alternating in one process: at batch 1, 0.87x the
// step time with 2 pieces against 1 (one thread idled through every layer's attention), where
// pieces of 64-96 keys (3-7 of them, so 2 + 1 items per thread) had been 1.07x slower; at batch 3,
// 0.95x (6 items against 3); at batch 5, 0.99x.
constexpr int64_t kMinBalanceKeys = 64;
constexpr int64_t kItemsPerThread = 4;     // items per thread to aim for when splitting, so pieces balance
constexpr int64_t kMaxHeadDim = 256;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

struct Problem {
  const int32_t* block_tables;
  const int32_t* context_lens;
  int64_t max_blocks, block_size, num_heads, num_kv_heads, head_dim, group;
  int64_t q_stride;
  int64_t split_keys;  // keys per split; a multiple of kTileK
  int64_t num_splits;  // splits of the longest context; 1 means no split
  float scale_log2;
};

struct WorkItem {
  int64_t seq, split, key_start, key_end;
};

// The next tile's cache lines, requested into L2 (prefetcht1) a few at a time between this tile's
// P V products: a tile's ~400 lines requested at once made the thread wait for the memory to
// take them all before it computed anything, so the copies and the products did not overlap
// (cold, the layer took the DRAM time plus the compute time). Spread out, from DRAM (30 layers'
// caches, SmolLM2's heads, 2-core EPYC, alternating in one process): 0.85x the time with 8
// sequences of ~190 keys, 0.84x with 32, 0.78x with 32 of ~530, against the burst 1-2 tiles ahead
// (which had been 0.8x no prefetch). Prefetching 2 tiles ahead spread: 0.90 / 0.86 / 0.80x; into
// L1 (prefetcht0): 1.2-1.5x slower; issued in the score loop too: no change.
struct LinePrefetcher {
  std::vector<const char*> lines;
  size_t next = 0;
  int64_t per_call = 0;
  void issue() {
    for (int64_t i = 0; i < per_call && next < lines.size(); ++i) __builtin_prefetch(lines[next++], 0, 2);
  }
  // Requests what the last tile left (its products made fewer calls than planned), then empties.
  void restart() {
    while (next < lines.size()) __builtin_prefetch(lines[next++], 0, 2);
    lines.clear();
    next = 0;
  }
};

}  // namespace

struct DecodeAttention::Scratch {
  Scratch(int64_t num_heads, int64_t num_kv_heads, int64_t group, int64_t head_dim, int64_t cache_elem_bytes)
      : q(num_heads * head_dim), s(group * kTileK), o(num_heads * head_dim), m(num_heads), l(num_heads),
        alpha(num_heads), k_tile(kTileK * num_kv_heads * head_dim * cache_elem_bytes),
        v_tile(kTileK * num_kv_heads * head_dim * cache_elem_bytes) {
    next_tile.lines.reserve(2 * ceil_div(kTileK * num_kv_heads * head_dim * cache_elem_bytes, 64) + 2 * kTileK);
  }
  std::vector<float> q;           // [num_heads, head_dim] pre-scaled queries
  std::vector<float> s;           // [group, kTileK] scores of one KV head's queries, then probabilities
  std::vector<float> o;           // [num_heads, head_dim] unnormalised output
  std::vector<float> m, l, alpha; // [num_heads]
  std::vector<char> k_tile, v_tile;  // [kTileK, num_kv_heads, head_dim] cache rows of the tile, as stored
  LinePrefetcher next_tile;
};

namespace {

using Scratch = DecodeAttention::Scratch;

// Partial results of split items: o [num_seqs, num_heads, num_splits, head_dim], m and l
// [num_seqs, num_heads, num_splits]. Unused when num_splits == 1.
struct Partials {
  float* o;
  float* m;
  float* l;
};

// Scores of GH query heads (pre-scaled, q) against four keys (k[jj], head_dim D, any float type):
// s[g * ld + jj] = q_g . k_jj. Each key vector is converted once and used by every head.
template <int GH, typename CT>
inline void scores4(const float* q, int64_t D, const CT* const k[4], float* s, int64_t ld) {
  using namespace vec;
  Vec8 acc[GH][4];
  for (int g = 0; g < GH; ++g)
    for (int jj = 0; jj < 4; ++jj) acc[g][jj] = zero();
  for (int64_t d = 0; d < D; d += kWidth) {
    for (int jj = 0; jj < 4; ++jj) {
      const Vec8 kv = vload(k[jj] + d);
      for (int g = 0; g < GH; ++g) acc[g][jj] = fma(vload(q + g * D + d), kv, acc[g][jj]);
    }
  }
  for (int g = 0; g < GH; ++g) reduce_add4(acc[g], s + g * ld);
}

// o_g[d0 : d0 + NV * 8] = alpha_g * o_g + sum_j p[g * ld + j] * v_j for GH heads (rows of o D apart).
template <int GH, int NV, typename CT>
inline void accumulate_pv(const float* p, int64_t ld, const CT* const* v, int64_t num_keys, int64_t d0, float* o,
                          int64_t D, const float* alpha, LinePrefetcher& next_tile) {
  using namespace vec;
  Vec8 acc[GH][NV];
  for (int g = 0; g < GH; ++g) {
    const Vec8 a = set1(alpha[g]);
    for (int c = 0; c < NV; ++c) acc[g][c] = mul(vload(o + g * D + d0 + c * kWidth), a);
  }
  for (int64_t j = 0; j < num_keys; ++j) {
    next_tile.issue();
    Vec8 pj[GH];
    for (int g = 0; g < GH; ++g) pj[g] = set1(p[g * ld + j]);
    for (int c = 0; c < NV; ++c) {
      const Vec8 vv = vload(v[j] + d0 + c * kWidth);
      for (int g = 0; g < GH; ++g) acc[g][c] = fma(pj[g], vv, acc[g][c]);
    }
  }
  for (int g = 0; g < GH; ++g)
    for (int c = 0; c < NV; ++c) vstore(o + g * D + d0 + c * kWidth, acc[g][c]);
}

// One tile of keys for GH query heads h0.. of one KV head (k_rows[j], v_rows[j] point at the KV
// head's D values of key j in the tile buffer).
template <int GH, typename CT>
void tile_heads(const CT* const* k_rows, const CT* const* v_rows, int64_t num_keys, int64_t D, int64_t h0, Scratch& sc) {
  using namespace vec;
  const float* qh = sc.q.data() + h0 * D;
  const int64_t padded_keys = round_up(num_keys, kWidth);
  for (int64_t j = 0; j < num_keys; j += 4) {
    const CT* k4[4];
    for (int jj = 0; jj < 4; ++jj) k4[jj] = k_rows[std::min<int64_t>(j + jj, num_keys - 1)];
    scores4<GH>(qh, D, k4, sc.s.data() + j, kTileK);
  }
  for (int g = 0; g < GH; ++g) {
    const int64_t h = h0 + g;
    float* sg = sc.s.data() + g * kTileK;
    std::fill(sg + num_keys, sg + padded_keys, kNegInf);
    Vec8 mx = set1(sc.m[h]);
    for (int64_t j = 0; j < padded_keys; j += kWidth) mx = max(mx, vload(sg + j));
    const float m_new = reduce_max(mx);  // finite: the tile has at least one key
    const Vec8 m_vec = set1(m_new);
    Vec8 sum = zero();
    for (int64_t j = 0; j < padded_keys; j += kWidth) {
      const Vec8 e = exp2(sub(vload(sg + j), m_vec));
      vstore(sg + j, e);
      sum = add(sum, e);
    }
    sc.alpha[h] = sc.m[h] == kNegInf ? 0.f : std::exp2(sc.m[h] - m_new);
    sc.l[h] = sc.l[h] * sc.alpha[h] + reduce_add(sum);
    sc.m[h] = m_new;
  }
  float* o = sc.o.data() + h0 * D;
  const float* alpha = sc.alpha.data() + h0;
  int64_t d0 = 0;
  for (; d0 + 4 * kWidth <= D; d0 += 4 * kWidth) accumulate_pv<GH, 4>(sc.s.data(), kTileK, v_rows, num_keys, d0, o, D, alpha, sc.next_tile);
  for (; d0 < D; d0 += 2 * kWidth) accumulate_pv<GH, 2>(sc.s.data(), kTileK, v_rows, num_keys, d0, o, D, alpha, sc.next_tile);
}

template <typename QT, typename CT>
void attend(const Problem& p, const WorkItem& w, const QT* q, const CT* k_cache, const CT* v_cache, QT* out,
            const Partials& part, Scratch& sc) {
  using namespace vec;
  const int64_t D = p.head_dim, G = p.group, H = p.num_heads;
  const int32_t* table = p.block_tables + w.seq * p.max_blocks;
  const int64_t row_stride = p.num_kv_heads * D;  // elements between consecutive slots of the cache

  for (int64_t h = 0; h < H; ++h) {
    const QT* src = q + w.seq * p.q_stride + h * D;
    for (int64_t d = 0; d < D; d += kWidth) vstore(sc.q.data() + h * D + d, mul(vload(src + d), set1(p.scale_log2)));
  }
  std::fill(sc.m.begin(), sc.m.end(), kNegInf);
  std::fill(sc.l.begin(), sc.l.end(), 0.f);
  std::fill(sc.o.begin(), sc.o.end(), 0.f);

  // Each tile's cache rows (every KV head of a slot, row_stride elements) are first copied as
  // they are, run by run of consecutive slots, into a tile buffer: the copy streams through
  // contiguous memory, which the hardware prefetcher follows, where the products below read each
  // KV head's part of a row, a strided pattern across scattered blocks that left them waiting on
  // memory (1.7x slower from DRAM than the copy, and still 1.6x with software prefetch of the
  // next tile).
  CT* k_tile = reinterpret_cast<CT*>(sc.k_tile.data());
  CT* v_tile = reinterpret_cast<CT*>(sc.v_tile.data());
  const int64_t row_bytes = row_stride * static_cast<int64_t>(sizeof(CT));
  auto slot_of = [&](int64_t pos) {
    return static_cast<int64_t>(table[pos / p.block_size]) * p.block_size + pos % p.block_size;
  };
  for (int64_t t0 = w.key_start; t0 < w.key_end; t0 += kTileK) {
    const int64_t num_keys = std::min(kTileK, w.key_end - t0);
    for (int64_t j = 0; j < num_keys;) {
      const int64_t pos = t0 + j, run = std::min(num_keys - j, p.block_size - pos % p.block_size);
      const int64_t slot = slot_of(pos);
      std::memcpy(k_tile + j * row_stride, k_cache + slot * row_stride, run * row_bytes);
      std::memcpy(v_tile + j * row_stride, v_cache + slot * row_stride, run * row_bytes);
      j += run;
    }
    // the next tile's rows, requested during this tile's products (LinePrefetcher)
    LinePrefetcher& pf = sc.next_tile;
    pf.restart();
    const int64_t n1 = std::min(w.key_end, t0 + 2 * kTileK);
    for (int64_t pos = t0 + kTileK; pos < n1;) {
      const int64_t run = std::min(n1 - pos, p.block_size - pos % p.block_size);
      const int64_t slot = slot_of(pos);
      const char* kb = reinterpret_cast<const char*>(k_cache + slot * row_stride);
      const char* vb = reinterpret_cast<const char*>(v_cache + slot * row_stride);
      for (int64_t b = 0; b < run * row_bytes; b += 64) {
        pf.lines.push_back(kb + b);
        pf.lines.push_back(vb + b);
      }
      pos += run;
    }
    // accumulate_pv's calls this tile: one per key, per 32 (or 16) dims, per group of <= 3 query heads
    const int64_t pv_calls = num_keys * p.num_kv_heads * ceil_div(D, 4 * kWidth) * ceil_div(G, 3);
    pf.per_call = ceil_div(static_cast<int64_t>(pf.lines.size()), std::max<int64_t>(1, pv_calls));
    for (int64_t kvh = 0; kvh < p.num_kv_heads; ++kvh) {
      // this KV head's part of the tile's rows, each vector converted to fp32 in registers once
      // for up to three query heads (no fp32 copy of the tile)
      const CT* kh[kTileK];
      const CT* vh[kTileK];
      for (int64_t j = 0; j < num_keys; ++j) {
        kh[j] = k_tile + j * row_stride + kvh * D;
        vh[j] = v_tile + j * row_stride + kvh * D;
      }
      for (int64_t g0 = 0; g0 < G;) {
        const int64_t gh = std::min<int64_t>(3, G - g0);
        const int64_t h0 = kvh * G + g0;
        if (gh == 3) tile_heads<3>(kh, vh, num_keys, D, h0, sc);
        else if (gh == 2) tile_heads<2>(kh, vh, num_keys, D, h0, sc);
        else tile_heads<1>(kh, vh, num_keys, D, h0, sc);
        g0 += gh;
      }
    }
  }

  if (p.num_splits == 1) {
    for (int64_t h = 0; h < H; ++h) {
      const Vec8 inv = safe_reciprocal(set1(sc.l[h]));  // an empty context outputs zeros
      QT* dst = out + (w.seq * H + h) * D;
      for (int64_t d = 0; d < D; d += kWidth) vstore(dst + d, mul(vload(sc.o.data() + h * D + d), inv));
    }
    return;
  }
  for (int64_t h = 0; h < H; ++h) {
    const int64_t idx = (w.seq * H + h) * p.num_splits + w.split;
    std::copy(sc.o.begin() + h * D, sc.o.begin() + (h + 1) * D, part.o + idx * D);
    part.m[idx] = sc.m[h];
    part.l[idx] = sc.l[h];
  }
}

// out[seq, head] = sum_c 2^(m_c - M) o_c / sum_c 2^(m_c - M) l_c over the splits c of the context,
// for rows sh = seq * num_heads + head in [r0, r1).
template <typename QT>
void combine_splits(const Problem& p, int64_t r0, int64_t r1, const Partials& part, QT* out) {
  using namespace vec;
  const int64_t D = p.head_dim;
  float acc[kMaxHeadDim];
  for (int64_t sh = r0; sh < r1; ++sh) {
    const int64_t used = ceil_div(p.context_lens[sh / p.num_heads], p.split_keys);
    const float* m = part.m + sh * p.num_splits;
    const float* l = part.l + sh * p.num_splits;
    float m_max = kNegInf;
    for (int64_t c = 0; c < used; ++c) m_max = std::max(m_max, m[c]);
    std::fill(acc, acc + D, 0.f);
    float denom = 0.f;
    for (int64_t c = 0; c < used; ++c) {
      const float w = std::exp2(m[c] - m_max);
      denom += w * l[c];
      const float* o = part.o + (sh * p.num_splits + c) * D;
      for (int64_t d = 0; d < D; d += kWidth) vstore(acc + d, fma(vload(o + d), set1(w), vload(acc + d)));
    }
    const Vec8 inv = safe_reciprocal(set1(denom));
    for (int64_t d = 0; d < D; d += kWidth) vstore(out + sh * D + d, mul(vload(acc + d), inv));
  }
}

}  // namespace

struct DecodeAttention::Plan {
  Problem p;
  int64_t num_seqs;
  std::vector<WorkItem> items;
  torch::Tensor partials;  // the split pieces' o, m and l (Partials), when contexts are split
  Partials part{nullptr, nullptr, nullptr};
  at::ScalarType cache_dtype;
};

void DecodeAttention::ScratchDeleter::operator()(Scratch* s) const { delete s; }

DecodeAttention::DecodeAttention(int64_t num_seqs, int64_t num_heads, int64_t head_dim, int64_t q_stride,
                                 const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                                 const torch::Tensor& block_tables, const torch::Tensor& context_lens,
                                 double softmax_scale, int64_t num_threads)
    : plan_(std::make_unique<Plan>()) {
  LS_CHECK_CPU(k_cache);
  LS_CHECK_CPU(v_cache);
  LS_CHECK_CPU(block_tables);
  LS_CHECK_CPU(context_lens);
  LS_CHECK(k_cache.dim() == 4, "paged_decode_attention: k_cache must be [num_blocks, block_size, num_kv_heads, head_dim]");
  LS_CHECK(k_cache.sizes() == v_cache.sizes(), "paged_decode_attention: k_cache ", k_cache.sizes(), " and v_cache ",
           v_cache.sizes(), " shapes differ");
  LS_CHECK(k_cache.scalar_type() == v_cache.scalar_type(), "paged_decode_attention: k_cache and v_cache dtypes differ");
  LS_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "paged_decode_attention: k_cache and v_cache must be contiguous");
  LS_CHECK(block_tables.scalar_type() == at::kInt && block_tables.dim() == 2 && block_tables.is_contiguous(),
           "paged_decode_attention: block_tables must be a contiguous int32 [num_seqs, max_blocks] tensor");
  LS_CHECK(context_lens.scalar_type() == at::kInt && context_lens.dim() == 1 && context_lens.is_contiguous(),
           "paged_decode_attention: context_lens must be a contiguous int32 [num_seqs] tensor");
  const int64_t num_blocks = k_cache.size(0), block_size = k_cache.size(1), num_kv_heads = k_cache.size(2);
  LS_CHECK(k_cache.size(3) == head_dim, "paged_decode_attention: cache head_dim ", k_cache.size(3),
           " != q head_dim ", head_dim);
  LS_CHECK(head_dim % kGemmNR == 0 && head_dim > 0 && head_dim <= kMaxHeadDim,
           "paged_decode_attention: head_dim must be a multiple of ", kGemmNR, " up to ", kMaxHeadDim, ", got ",
           head_dim);
  LS_CHECK(num_kv_heads > 0 && num_heads % num_kv_heads == 0, "paged_decode_attention: num_heads (", num_heads,
           ") must be a multiple of num_kv_heads (", num_kv_heads, ")");
  LS_CHECK(block_tables.size(0) == num_seqs && context_lens.size(0) == num_seqs,
           "paged_decode_attention: block_tables and context_lens must have one row per sequence (", num_seqs,
           "), got ", block_tables.size(0), " and ", context_lens.size(0));
  LS_CHECK(block_size > 0, "paged_decode_attention: block_size must be positive");

  const int64_t max_blocks = block_tables.size(1);
  const int32_t* tables = block_tables.data_ptr<int32_t>();
  const int32_t* lens = context_lens.data_ptr<int32_t>();
  int64_t max_len = 0;
  for (int64_t s = 0; s < num_seqs; ++s) {
    LS_CHECK(lens[s] >= 0 && lens[s] <= max_blocks * block_size, "paged_decode_attention: context_lens[", s,
             "] = ", lens[s], " outside [0, max_blocks * block_size = ", max_blocks * block_size, "]");
    for (int64_t b = 0; b < ceil_div(lens[s], block_size); ++b) {
      const int32_t block = tables[s * max_blocks + b];
      LS_CHECK(block >= 0 && block < num_blocks, "paged_decode_attention: block_tables[", s, ", ", b, "] = ", block,
               " outside the cache of ", num_blocks, " blocks");
    }
    max_len = std::max<int64_t>(max_len, lens[s]);
  }

  const int64_t group = num_heads / num_kv_heads;
  // Split contexts only when the sequences alone cannot keep every thread busy.
  const int64_t want_splits = ceil_div(kItemsPerThread * num_threads, std::max<int64_t>(num_seqs, 1));
  const int64_t max_splits = std::max<int64_t>(1, max_len / kMinSplitKeys);
  int64_t num_splits = std::clamp<int64_t>(want_splits, 1, max_splits);
  if (num_seqs % num_threads != 0 && num_seqs < kItemsPerThread * num_threads) {
    // A few sequences that do not divide among the threads (one sequence on two, three on two):
    // each is cut into `balance` pieces, down to kMinBalanceKeys, so the pieces do divide, and
    // extra pieces come in multiples of it.
    const int64_t balance = num_threads / std::gcd(num_seqs, num_threads);
    const int64_t fit = std::min(balance, std::max<int64_t>(1, max_len / kMinBalanceKeys));
    num_splits = std::max(fit, num_splits / balance * balance);
  }
  const int64_t split_keys = num_splits == 1 ? std::max<int64_t>(max_len, 1) : round_up(ceil_div(max_len, num_splits), kTileK);
  Plan& plan = *plan_;
  plan.p = Problem{tables,       lens,     max_blocks, block_size, num_heads,
                   num_kv_heads, head_dim, group,      q_stride,   split_keys,
                   ceil_div(std::max<int64_t>(max_len, 1), split_keys), static_cast<float>(softmax_scale) * vec::kLog2e};
  plan.num_seqs = num_seqs;
  for (int64_t s = 0; s < num_seqs; ++s) {
    const int64_t pieces = std::max<int64_t>(1, ceil_div(lens[s], split_keys));
    for (int64_t c = 0; c < pieces; ++c)
      plan.items.push_back({s, c, c * split_keys, std::min<int64_t>(lens[s], (c + 1) * split_keys)});
  }
  // longest first: the dynamic queue then balances them (work_queue.h)
  std::stable_sort(plan.items.begin(), plan.items.end(),
                   [](const WorkItem& a, const WorkItem& b) { return a.key_end - a.key_start > b.key_end - b.key_start; });
  if (plan.p.num_splits > 1) {
    const int64_t rows = num_seqs * num_heads * plan.p.num_splits;
    plan.partials = torch::empty({rows * (head_dim + 2)}, k_cache.options().dtype(at::kFloat));
    float* base = plan.partials.data_ptr<float>();
    plan.part = {base, base + rows * head_dim, base + rows * (head_dim + 1)};
  }
  plan.cache_dtype = k_cache.scalar_type();
}

DecodeAttention::~DecodeAttention() = default;

int64_t DecodeAttention::num_items() const { return static_cast<int64_t>(plan_->items.size()); }

int64_t DecodeAttention::num_combine_rows() const {
  return plan_->p.num_splits > 1 ? plan_->num_seqs * plan_->p.num_heads : 0;
}

DecodeAttention::ScratchPtr DecodeAttention::make_scratch() const {
  const Problem& p = plan_->p;
  return ScratchPtr(new Scratch(p.num_heads, p.num_kv_heads, p.group, p.head_dim, c10::elementSize(plan_->cache_dtype)));
}

template <typename QT>
void DecodeAttention::run_item(int64_t i, const QT* q, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                               QT* out, Scratch& sc) const {
  const Plan& plan = *plan_;
  dispatch_float_types(plan.cache_dtype, "paged_decode_attention: k_cache", [&](auto c_tag) {
    using CT = decltype(c_tag);
    attend<QT, CT>(plan.p, plan.items[i], q, static_cast<const CT*>(k_cache.const_data_ptr()),
                   static_cast<const CT*>(v_cache.const_data_ptr()), out, plan.part, sc);
  });
}

template <typename QT>
void DecodeAttention::combine(int64_t r0, int64_t r1, QT* out) const {
  combine_splits<QT>(plan_->p, r0, r1, plan_->part, out);
}

#define LENSERVE_DECODE_ATTENTION_FOR(QT)                                                                           \
  template void DecodeAttention::run_item<QT>(int64_t, const QT*, const torch::Tensor&, const torch::Tensor&, QT*, \
                                              Scratch&) const;                                                     \
  template void DecodeAttention::combine<QT>(int64_t, int64_t, QT*) const;
LENSERVE_DECODE_ATTENTION_FOR(float)
LENSERVE_DECODE_ATTENTION_FOR(c10::BFloat16)
LENSERVE_DECODE_ATTENTION_FOR(c10::Half)
#undef LENSERVE_DECODE_ATTENTION_FOR

torch::Tensor paged_decode_attention_cpu(const torch::Tensor& q, const torch::Tensor& k_cache,
                                         const torch::Tensor& v_cache, const torch::Tensor& block_tables,
                                         const torch::Tensor& context_lens, double softmax_scale) {
  LS_CHECK_CPU(q);
  LS_CHECK(q.dim() == 3, "paged_decode_attention: q must be [num_seqs, num_heads, head_dim], got ", q.dim(),
           " dimensions");
  LS_CHECK(q.stride(2) == 1 && (q.size(1) <= 1 || q.stride(1) == q.size(2)),
           "paged_decode_attention: q must have contiguous [num_heads, head_dim] rows");
  const int64_t num_seqs = q.size(0), num_heads = q.size(1), head_dim = q.size(2);
  const DecodeAttention attn(num_seqs, num_heads, head_dim, q.stride(0), k_cache, v_cache, block_tables, context_lens,
                             softmax_scale, at::get_num_threads());
  auto out = torch::empty({num_seqs, num_heads, head_dim}, q.options().memory_format(at::MemoryFormat::Contiguous));
  dispatch_float_types(q.scalar_type(), "paged_decode_attention: q", [&](auto q_tag) {
    using QT = decltype(q_tag);
    const QT* qp = q.data_ptr<QT>();
    QT* op = out.data_ptr<QT>();
    parallel_dynamic(
        attn.num_items(), [&] { return attn.make_scratch(); },
        [&](int64_t i, DecodeAttention::ScratchPtr& sc) { attn.run_item<QT>(i, qp, k_cache, v_cache, op, *sc); });
    if (const int64_t rows = attn.num_combine_rows(); rows > 0)
      at::parallel_for(0, rows, 8, [&](int64_t r0, int64_t r1) { attn.combine<QT>(r0, r1, op); });
  });
  return out;
}

}  // namespace lenserve
