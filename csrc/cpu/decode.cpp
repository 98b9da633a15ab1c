#include "decode.h"

#include <ATen/Parallel.h>

#include <atomic>

namespace ssd_post {
namespace cpu {
namespace {

// Relaxed: a count, read by the tests only between op calls.
std::atomic<int64_t> decoded_boxes{0};

}  // namespace

void count_decoded_boxes(int64_t n) { decoded_boxes.fetch_add(n, std::memory_order_relaxed); }

int64_t decoded_box_count(bool reset) {
  return reset ? decoded_boxes.exchange(0, std::memory_order_relaxed)
               : decoded_boxes.load(std::memory_order_relaxed);
}

void decode_selection(const Selection& sel, const DecodeInputs& in, float* out) {
  const int64_t C = sel.num_classes;
  at::Tensor scales = at::empty({sel.size(), 2}, at::kFloat);  // (exp dw, exp dh) per candidate
  float* scale = scales.data_ptr<float>();
  at::parallel_for(0, sel.num_segments(), 16, [&](int64_t begin, int64_t end) {
    for (int64_t s = begin; s < end; ++s) {
      const int64_t first = sel.segment_begin[s];
      fill_scale_logs(sel.items.data() + first, sel.segment_begin[s + 1] - first, s / C,
                      in.params, scale + 2 * first);
    }
  });
  scales.exp_();
  at::parallel_for(0, sel.num_segments(), 16, [&](int64_t begin, int64_t end) {
    for (int64_t s = begin; s < end; ++s) {
      const int64_t first = sel.segment_begin[s];
      decode_candidates(sel.items.data() + first, sel.segment_begin[s + 1] - first, s / C,
                        in.params, scale + 2 * first, out + 4 * first);
    }
  });
}

}  // namespace cpu
}  // namespace ssd_post
