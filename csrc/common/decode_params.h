// Everything needed to decode the box of (image, anchor), as raw float32 pointers:
// passed by value to the CUDA kernels and read by the CPU kernels. Free of ATen
// (the CUDA emulator builds it too); common/op_inputs.h fills it from the op's
// tensors.
#pragma once

#include <cstdint>

#include "box_math.h"

namespace ssd_post {

struct DecodeParams {
  const float* locs;         // [B, A, 4] float32, contiguous
  const float* anchors;      // [A, 4] or [B, A, 4] float32, contiguous
  const float* image_sizes;  // [B, 2] float32 (height, width), whole numbers
  int64_t num_anchors;       // A
  bool per_image_anchors;
  bool clip;
  BoxWeights weights;

  // The regressions and the anchor of (image, anchor); int64 offsets (B * A * 4
  // can pass 2^31).
  SSD_HOST_DEVICE const float* rel(int64_t image, int64_t anchor) const {
    return locs + (image * num_anchors + anchor) * 4;
  }
  SSD_HOST_DEVICE const float* anchor_box(int64_t image, int64_t anchor) const {
    return anchors + ((per_image_anchors ? image * num_anchors : 0) + anchor) * 4;
  }
};

}  // namespace ssd_post
