// Event counters of the CPU kernels, summed over all threads, for the tests (op
// ssd_post::_debug_counters): they check that a stage does only the work it needs
// by counting that work, never by timing it.
#pragma once

#include <cstdint>
#include <vector>

namespace ssd_post {
namespace cpu {

enum class Counter : int {
  kDecodedBoxes = 0,  // boxes decoded
  kImageRescans = 1,  // images scanned a second time after the image cut was too high
  kCount = 2,
};

void count_event(Counter counter, int64_t n);

// The counters, in Counter order; reset: set them back to 0 after reading.
std::vector<int64_t> read_counters(bool reset);

}  // namespace cpu
}  // namespace ssd_post
