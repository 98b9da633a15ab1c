#include "debug_counters.h"

#include <atomic>

namespace ssd_post {
namespace cpu {
namespace {

// Relaxed: counts, read by the tests only between op calls.
std::atomic<int64_t> counters[static_cast<int>(Counter::kCount)];

}  // namespace

void count_event(Counter counter, int64_t n) {
  counters[static_cast<int>(counter)].fetch_add(n, std::memory_order_relaxed);
}

std::vector<int64_t> read_counters(bool reset) {
  std::vector<int64_t> values;
  for (std::atomic<int64_t>& counter : counters) {
    values.push_back(reset ? counter.exchange(0, std::memory_order_relaxed)
                           : counter.load(std::memory_order_relaxed));
  }
  return values;
}

}  // namespace cpu
}  // namespace ssd_post
