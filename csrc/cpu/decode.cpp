#include "decode.h"

#include <ATen/Parallel.h>

namespace ssd_post {
namespace cpu {

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
