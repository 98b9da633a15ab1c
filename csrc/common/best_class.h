// The best class of one anchor from its C class scores, each read through `load`
// (host and device, no ATen): the largest score, equal scores to the lower class,
// and NaN as the best score when any score is NaN (torch.max's answer, so a NaN
// anchor never passes a threshold). The op best_class runs it per anchor on CUDA
// and on the CPU's scalar tail; the CPU's vector loop (vector_kernels.cpp) applies
// the same comparisons a vector of anchors at a time.
#pragma once

#include <cstdint>
#include <limits>

#include "macros.h"

namespace ssd_post {

template <typename Load>
SSD_HOST_DEVICE void best_class_of(const Load& load, int64_t num_classes, float* best_out,
                                   int64_t* label_out) {
  float best = load(0);
  int64_t label = 0;
  bool nan = best != best;
  for (int64_t c = 1; c < num_classes; ++c) {
    const float v = load(c);
    if (v > best) {  // strict: equal scores stay with the lower class; NaN never wins
      best = v;
      label = c;
    }
    nan = nan || v != v;
  }
  *best_out = nan ? std::numeric_limits<float>::quiet_NaN() : best;
  *label_out = label;
}

}  // namespace ssd_post
