// Dynamic scheduling over torch's intra-op threads for kernels whose work items differ in cost.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

namespace lenserve {

// Runs fn(i, state) for every i in [0, n): each thread makes its own state (scratch buffers) once,
// then takes the next unclaimed item. With items sorted by decreasing cost this is
// longest-processing-time-first, which keeps one long sequence among many short ones from
// leaving the other threads idle at the end.
template <typename MakeState, typename Fn>
void parallel_dynamic(int64_t n, const MakeState& make_state, const Fn& fn) {
  if (n <= 0) return;
  std::atomic<int64_t> next{0};
  const int64_t num_threads = std::min<int64_t>(at::get_num_threads(), n);
  at::parallel_for(0, num_threads, 1, [&](int64_t, int64_t) {
    auto state = make_state();
    for (int64_t i = next.fetch_add(1, std::memory_order_relaxed); i < n; i = next.fetch_add(1, std::memory_order_relaxed))
      fn(i, state);
  });
}

}  // namespace lenserve
