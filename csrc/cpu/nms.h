// Exact greedy NMS over one run of boxes that is already in rank order.
#pragma once

#include <cstdint>
#include <vector>

namespace ssd_post {
namespace cpu {

// Per-thread scratch of nms_ranked_run, kept between runs so that a thread
// allocates it once: the boxes of one run as separate, padded coordinate arrays,
// which lets the IoU of one box against the next ones run a vector at a time.
struct NmsScratch {
  std::vector<float> x1, y1, x2, y2, area;
};

// boxes: [n, 4] xyxy float32, row i ranked before row i + 1. Sets keep[i] to 1 for
// each box that survives and 0 for the others: a box is suppressed when its IoU
// with an earlier kept box is > iou_threshold.
void nms_ranked_run(const float* boxes, int64_t n, double iou_threshold, uint8_t* keep,
                    NmsScratch& scratch);

}  // namespace cpu
}  // namespace ssd_post
