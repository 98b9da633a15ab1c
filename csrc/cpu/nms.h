// Exact greedy NMS over one run of boxes that is already in rank order.
#pragma once

#include <cstdint>
#include <vector>

namespace ssd_post {
namespace cpu {

// boxes: [n, 4] xyxy float32, row i ranked before row i + 1. Sets keep[i] to 1 for
// each box that survives: a box is suppressed when its IoU with an earlier kept box
// is > iou_threshold. `areas` is scratch space, resized as needed.
void nms_ranked_run(const float* boxes, int64_t n, double iou_threshold, uint8_t* keep,
                    std::vector<float>& areas);

}  // namespace cpu
}  // namespace ssd_post
