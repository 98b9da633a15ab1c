// Box decoding of one candidate on the device, through the shared box_math.h.
// Device code only, like the *_kernels.cuh headers that include it.
#pragma once

#include <cstdint>

#include "../common/box_math.h"
#include "../common/decode_params.h"

namespace ssd_post {
namespace gpu {

__device__ __forceinline__ void decode_candidate(const DecodeParams& p, int64_t image,
                                                 int64_t anchor, float box[4]) {
  decode_box(p.rel(image, anchor), p.anchor_box(image, anchor), p.weights, box);
  if (p.clip) clip_box(box, p.image_sizes[2 * image], p.image_sizes[2 * image + 1]);
}

}  // namespace gpu
}  // namespace ssd_post
