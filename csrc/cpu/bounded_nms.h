// Stage 2 of the CPU postprocess, bounded by its output: the detections_per_img
// best NMS survivors of one image, found by one scan of the image's candidates in
// rank order that stops once enough boxes are kept.
//
// Why one scan gives the full pipeline's answer: greedy NMS inside a class only
// looks at the higher-ranked boxes of that class, and the per-class top-k cut
// (applied before, candidates.h) only at the higher-ranked candidates of that
// class. So walking the image's candidates in the output order (score descending,
// then class, then rank within the class) with a list of kept boxes per class
// meets the survivors in exactly the order the full pipeline would write them, and
// the first K survivors met are the answer. Only the boxes the scan reaches are
// decoded; the candidates are put in order a chunk at a time (nth_element, then a
// sort of the chunk), never all of them.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <limits>
#include <vector>

#include "../common/decode_params.h"
#include "candidates.h"
#include "nms.h"

namespace ssd_post {
namespace cpu {

// The `trust` of candidates collected without an image cut.
inline constexpr float kNoCut = -std::numeric_limits<float>::infinity();

// One candidate of an image, with its class.
struct ImageCandidate {
  float score;
  int32_t anchor;
  int32_t label;
};

// The padded outputs of postprocess.
struct PostprocessOutputs {
  float* boxes;      // [B, K, 4]
  float* scores;     // [B, K]
  int64_t* labels;   // [B, K]
  int64_t* anchors;  // [B, K]: the anchor row of each detection, -1 in padding rows
  int64_t* counts;   // [B]
  int64_t K;
};

// What one thread needs to scan images one after the other; its buffers are
// allocated once per thread and reused.
class BoundedNms {
 public:
  explicit BoundedNms(double nms_thresh);

  // Appends the candidates of class `label` (any order; the top-k cut applied).
  void add_class(const std::vector<Candidate>& ranked, int64_t label);

  // Writes the out.K best survivors of image b, from the candidates added since
  // the last run, to out, and forgets the candidates. The candidates need only be
  // complete above `trust` (CandidateScanner::image_floor; kNoCut: complete):
  // returns false, with nothing written, when the scan would have to go below it
  // before out.K survive.
  bool run(int64_t b, const DecodeParams& params, const PostprocessOutputs& out, float trust);

 private:
  // Clears the count slots run wrote for image b and the candidates; returns false.
  bool undo(int64_t b, int64_t count, const PostprocessOutputs& out);

  double nms_thresh_;
  std::vector<ImageCandidate> candidates_;
  // The kept boxes of the current image, one group per class (the greedy scan of
  // batched_nms's max_kept, whose IoU test runs a vector of kept boxes at a time).
  GreedyScan kept_;
  at::Tensor scales_;         // (dw, dh) of a chunk, exp'd in place by torch
  std::vector<float> boxes_;  // [chunk, 4] decoded boxes of a chunk
};

}  // namespace cpu
}  // namespace ssd_post
