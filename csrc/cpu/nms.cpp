#include "nms.h"

#include "../common/box_math.h"

namespace ssd_post {
namespace cpu {

void nms_ranked_run(const float* boxes, int64_t n, double iou_threshold, uint8_t* keep,
                    std::vector<float>& areas) {
  areas.resize(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    areas[i] = box_area(boxes + 4 * i);
    keep[i] = 1;
  }
  for (int64_t i = 0; i < n; ++i) {
    if (!keep[i]) continue;
    const float* box_i = boxes + 4 * i;
    for (int64_t j = i + 1; j < n; ++j) {
      if (keep[j] && suppresses(box_iou(box_i, areas[i], boxes + 4 * j, areas[j]), iou_threshold)) {
        keep[j] = 0;
      }
    }
  }
}

}  // namespace cpu
}  // namespace ssd_post
