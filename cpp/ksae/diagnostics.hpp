// Diagnostics of the machine the kernels run on: plain C++17, no bindings here.
#pragma once

#include "common.hpp"

#include <atomic>
#include <chrono>
#include <vector>

namespace ksae {

// The median time, in nanoseconds, for one cache line to go from the kernels' thread 0 to
// thread 1 and back: `trips` round trips per repeat, the median of `repeats` repeats. About
// the latency of a store to a line the other core holds, which every line one thread writes
// and another reads costs twice a step. Where two cores share an L3 it is tens of
// nanoseconds; between AMD CCDs or sockets, hundreds (measured on this project's 2-vCPU Zen 4
// VM: about 50 ns or about 320 ns, as the host moved the vCPUs). Returns 0 without OpenMP,
// with fewer than two processors available, or when the runtime starts fewer than two
// threads (a lone spinning thread would wait for ever).
inline double thread_round_trip_ns(int trips, int repeats) {
#ifdef KSAE_HAVE_OPENMP
  if (trips < 1 || repeats < 1 || omp_get_num_procs() < 2) return 0.0;
  struct alignas(64) Ball {
    std::atomic<int> value{0};
    char pad[64 - sizeof(std::atomic<int>)];
  };
  Ball ball;
  std::vector<double> times;
  using Clock = std::chrono::steady_clock;
  for (int repeat = 0; repeat < repeats; ++repeat) {
    ball.value.store(0);
    bool both = false;
    Clock::time_point start, stop;
#pragma omp parallel num_threads(2)
    {
      if (omp_get_num_threads() == 2) {
        const bool first = omp_get_thread_num() == 0;
        if (first) {
          both = true;
          start = Clock::now();
        }
        for (int i = 0; i < trips; ++i) {
          if (first) {
            ball.value.store(2 * i + 1, std::memory_order_release);
            while (ball.value.load(std::memory_order_acquire) != 2 * i + 2) {
            }
          } else {
            while (ball.value.load(std::memory_order_acquire) != 2 * i + 1) {
            }
            ball.value.store(2 * i + 2, std::memory_order_release);
          }
        }
        if (first) stop = Clock::now();
      }
    }
    if (!both) return 0.0;
    times.push_back(std::chrono::duration<double, std::nano>(stop - start).count() / trips);
  }
  std::nth_element(times.begin(), times.begin() + times.size() / 2, times.end());
  return times[times.size() / 2];
#else
  (void)trips;
  (void)repeats;
  return 0.0;
#endif
}

}  // namespace ksae
