// A barrier for the threads of one OpenMP region that spins in user space.
#pragma once

#include <sched.h>

#include <atomic>
#include <thread>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

namespace lenserve {

// libgomp's `#pragma omp barrier` ends with a futex_wake system call by the last thread to arrive,
// whether or not anyone sleeps; decode_layers' region meets ~330 times a SmolLM2 step, and in a VM
// each call is a good part of the barrier's cost. Here the last thread only bumps a generation
// counter that the others spin on, pausing (and yielding after kYieldAfter pauses). That is only
// right while every thread has a CPU of its own: with more threads than the process's CPUs a
// spinning thread holds the CPU that the one it waits for needs (a batch-1 step with 3 threads on
// 2 CPUs took 1.2-1.3x the time of libgomp's barrier), so then wait() is libgomp's barrier.
// Every thread of the team must call wait() the same number of times; `reset` sets the team
// size once, before the first wait.
class SpinBarrier {
 public:
  void reset(int num_threads) {
    count_.store(0, std::memory_order_relaxed);
    num_threads_ = num_threads;
    static const int cpus = usable_cpus();  // once a process: reset runs every decode step
    spin_ = num_threads <= cpus;
  }

  void wait() {
    if (!spin_) {
#pragma omp barrier
      return;
    }
    const unsigned gen = generation_.load(std::memory_order_relaxed);
    if (count_.fetch_add(1, std::memory_order_acq_rel) == num_threads_ - 1) {
      count_.store(0, std::memory_order_relaxed);
      generation_.store(gen + 1, std::memory_order_release);
      return;
    }
    for (int spins = 0; generation_.load(std::memory_order_acquire) == gen;) {
      if (++spins < kYieldAfter) {
        pause();
      } else {
        std::this_thread::yield();
      }
    }
  }

 private:
  static constexpr int kYieldAfter = 2048;  // ~50 us of pauses on Zen 4 (~25 ns each)
  static void pause() {
#if defined(__x86_64__) || defined(_M_X64)
    _mm_pause();
#endif
  }
  static int usable_cpus() {
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof(set), &set) != 0) return static_cast<int>(std::thread::hardware_concurrency());
    return CPU_COUNT(&set);
  }
  alignas(64) std::atomic<int> count_{0};
  alignas(64) std::atomic<unsigned> generation_{0};
  int num_threads_ = 1;
  bool spin_ = false;
};

}  // namespace lenserve
