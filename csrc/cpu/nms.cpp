#include "nms.h"

#include <algorithm>
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

bool has_nan(const float* box) {
  return std::isnan(box[0]) || std::isnan(box[1]) || std::isnan(box[2]) || std::isnan(box[3]);
}

}  // namespace

void GreedyScan::start(double iou_threshold, int64_t max_kept) {
  used_ = 0;
  thresh_ = float_threshold(iou_threshold);
  max_kept_ = max_kept;
  kept_ = 0;
}

bool GreedyScan::offer(const float* box, int64_t group) {
  if (group >= used_) {
    if (static_cast<int64_t>(groups_.size()) <= group) groups_.resize(static_cast<size_t>(group + 1));
    for (int64_t g = used_; g <= group; ++g) {
      groups_[g].count = 0;
      groups_[g].any_nan = false;
    }
    used_ = group + 1;
  }
  Kept& k = groups_[group];
  const float candidate[5] = {box[0], box[1], box[2], box[3], box_area(box)};
  const bool nan = has_nan(box);
  const BoxColumns columns{k.x1.data(), k.y1.data(), k.x2.data(), k.y2.data(), k.area.data()};
  if (k.count > 0 &&
      vector_kernels().any_suppresses(columns, k.count, candidate, thresh_, nan || k.any_nan)) {
    return false;
  }
  // Room for one vector read past the last kept box (its lanes are masked off).
  const size_t needed = static_cast<size_t>(k.count + 1 + kVectorPad);
  if (k.x1.size() < needed) {
    const size_t grown = std::max(needed, 2 * k.x1.size());
    for (std::vector<float>* column : {&k.x1, &k.y1, &k.x2, &k.y2, &k.area}) column->resize(grown);
  }
  k.x1[k.count] = candidate[0];
  k.y1[k.count] = candidate[1];
  k.x2[k.count] = candidate[2];
  k.y2[k.count] = candidate[3];
  k.area[k.count] = candidate[4];
  ++k.count;
  k.any_nan |= nan;
  ++kept_;
  return true;
}

void nms_ranked_run(const float* boxes, int64_t n, double iou_threshold, uint8_t* keep,
                    NmsScratch& s, int64_t max_kept) {
  if (n <= 0) return;
  if (max_kept >= 0) {
    // Bounded: decided box by box, against the (at most max_kept) kept boxes.
    s.scan.start(iou_threshold, max_kept);
    int64_t i = 0;
    for (; i < n && !s.scan.full(); ++i) keep[i] = s.scan.offer(boxes + 4 * i, 0) ? 1 : 0;
    std::fill(keep + i, keep + n, uint8_t{0});
    return;
  }
  // Unbounded: each kept box suppresses the later boxes a vector at a time, which
  // is faster than the scan when most boxes have to be looked at anyway.
  const size_t padded = static_cast<size_t>(n + kVectorPad);
  s.x1.resize(padded);
  s.y1.resize(padded);
  s.x2.resize(padded);
  s.y2.resize(padded);
  s.area.resize(padded);
  bool any_nan = false;
  for (int64_t i = 0; i < n; ++i) {
    const float* box = boxes + 4 * i;
    any_nan |= has_nan(box);
    s.x1[i] = box[0];
    s.y1[i] = box[1];
    s.x2[i] = box[2];
    s.y2[i] = box[3];
    s.area[i] = box_area(box);
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
