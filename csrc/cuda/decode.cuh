// Box decoding of one candidate on the device, through the shared box_math.h.
#pragma once

#include <cstdint>

#include "../common/box_math.h"

namespace ssd_post {
namespace gpu {

// Everything needed to decode the box of (image, anchor); passed by value to kernels.
struct DecodeParams {
  const float* locs;         // [B, A, 4] float32, contiguous
  const float* anchors;      // [A, 4] or [B, A, 4] float32, contiguous
  const float* image_sizes;  // [B, 2] float32 (height, width)
  int64_t num_anchors;       // A
  bool per_image_anchors;
  bool clip;
  BoxWeights weights;
};

#if defined(__CUDACC__) || defined(SSD_POST_CUDA_EMULATION)
__device__ __forceinline__ void decode_candidate(const DecodeParams& p, int64_t image,
                                                 int64_t anchor, float box[4]) {
  const float* rel = p.locs + (image * p.num_anchors + anchor) * 4;
  const float* anchor_box =
      p.anchors + ((p.per_image_anchors ? image * p.num_anchors : 0) + anchor) * 4;
  decode_box(rel, anchor_box, p.weights, box);
  if (p.clip) clip_box(box, p.image_sizes[2 * image], p.image_sizes[2 * image + 1]);
}
#endif

}  // namespace gpu
}  // namespace ssd_post
