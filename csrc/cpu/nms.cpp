#include "nms.h"

#include <cmath>

#include "../common/box_math.h"
#include "vector_kernels.h"

namespace ssd_post {
namespace cpu {
namespace {

// The largest float t with (x > t) == (double(x) > iou_threshold) for every float x:
// the threshold rounded down to float. Lets the vector code compare in float with
// the same outcome as torchvision's double comparison.
float float_threshold(double iou_threshold) {
  float t = static_cast<float>(iou_threshold);
  if (static_cast<double>(t) > iou_threshold) t = std::nextafter(t, -INFINITY);
  return t;
}

}  // namespace

void nms_ranked_run(const float* boxes, int64_t n, double iou_threshold, uint8_t* keep,
                    NmsScratch& s) {
  if (n <= 0) return;
  const size_t padded = static_cast<size_t>(n + kVectorPad);
  s.x1.resize(padded);
  s.y1.resize(padded);
  s.x2.resize(padded);
  s.y2.resize(padded);
  s.area.resize(padded);
  bool any_nan = false;
  for (int64_t i = 0; i < n; ++i) {
    const float* box = boxes + 4 * i;
    any_nan |= std::isnan(box[0]) || std::isnan(box[1]) || std::isnan(box[2]) || std::isnan(box[3]);
    s.x1[i] = boxes[4 * i];
    s.y1[i] = boxes[4 * i + 1];
    s.x2[i] = boxes[4 * i + 2];
    s.y2[i] = boxes[4 * i + 3];
    s.area[i] = box_area(boxes + 4 * i);
    keep[i] = 1;
  }
  // Padding boxes have zero size: IoU 0 (or NaN against a zero-area box), which
  // never passes the threshold, so the vector loops may read past n freely. Their
  // suppression bits are never set, so keep[] is never written past n.
  for (size_t i = static_cast<size_t>(n); i < padded; ++i) {
    s.x1[i] = s.y1[i] = s.x2[i] = s.y2[i] = s.area[i] = 0.f;
  }
  const BoxColumns columns{s.x1.data(), s.y1.data(), s.x2.data(), s.y2.data(), s.area.data()};
  vector_kernels().greedy_nms(columns, n, float_threshold(iou_threshold), any_nan, keep);
}

}  // namespace cpu
}  // namespace ssd_post
