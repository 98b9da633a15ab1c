// Exact greedy NMS over boxes that arrive in rank order.
#pragma once

#include <cstdint>
#include <vector>

namespace ssd_post {
namespace cpu {

// Greedy NMS decided one box at a time: boxes are offered in rank order, each
// with its group, and a box survives when no kept box of its group overlaps it by
// more than the threshold. Each group thus gets exactly the survivors of the full
// greedy pass over its boxes, and the scan can stop after `max_kept` survivors
// over all groups without looking at the boxes that follow: the survivors so far
// are the first ones of the full pass, in the order the boxes were offered.
//
// The work per box is one IoU per kept box of its group, so a scan that stops
// after k survivors costs O(offered boxes * k), whatever the number of boxes left.
class GreedyScan {
 public:
  // Starts a new scan (no kept boxes); max_kept < 0: no limit.
  void start(double iou_threshold, int64_t max_kept);
  // Whether max_kept boxes have been kept.
  bool full() const { return max_kept_ >= 0 && kept_ >= max_kept_; }
  int64_t kept() const { return kept_; }
  // Offers box (xyxy float[4]) of group `group` in [0, 2^31), next in rank order
  // among the boxes of that group: returns whether it survives (then it joins the
  // group's kept boxes). Must not be called when full().
  bool offer(const float* box, int64_t group);

 private:
  // The kept boxes of one group as padded coordinate columns (vector reads).
  struct Kept {
    std::vector<float> x1, y1, x2, y2, area;
    int64_t count = 0;
    bool any_nan = false;
  };
  std::vector<Kept> groups_;  // [0, used_) belong to this scan; reused across scans
  int64_t used_ = 0;
  float thresh_ = 0.f;
  int64_t max_kept_ = -1;
  int64_t kept_ = 0;
};

// Per-thread scratch of nms_ranked_run, kept between runs so that a thread
// allocates it once: the boxes of one run as separate, padded coordinate arrays,
// which lets the IoU of one box against the next ones run a vector at a time.
struct NmsScratch {
  std::vector<float> x1, y1, x2, y2, area;
  GreedyScan scan;
};

// boxes: [n, 4] xyxy float32, row i ranked before row i + 1. Sets keep[i] to 1 for
// each box that survives and 0 for the others: a box is suppressed when its IoU
// with an earlier kept box is > iou_threshold. With max_kept >= 0, only the first
// max_kept survivors are kept (the full pass truncated), and the boxes after the
// last of them are not looked at.
void nms_ranked_run(const float* boxes, int64_t n, double iou_threshold, uint8_t* keep,
                    NmsScratch& scratch, int64_t max_kept = -1);

}  // namespace cpu
}  // namespace ssd_post
