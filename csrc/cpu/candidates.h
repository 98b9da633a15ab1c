// Stage 1 of the CPU pipeline: one read of the logits that applies the activation
// and the score threshold and keeps, per (image, class), the topk_candidates best.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

#include "../common/score_bounds.h"

namespace ssd_post {
namespace cpu {

struct Candidate {
  float score;
  int32_t anchor;
};

// Higher score first; equal scores in anchor order, so every result is unique.
inline bool ranks_before(const Candidate& a, const Candidate& b) {
  return a.score > b.score || (a.score == b.score && a.anchor < b.anchor);
}

// Candidates of all B * C segments, segment s = image * C + class, each segment
// ranked by ranks_before and holding at most topk_candidates entries. Background
// segments are empty.
struct Selection {
  std::vector<Candidate> items;
  std::vector<int64_t> segment_begin;  // [B * C + 1]
  int64_t num_classes = 0;

  int64_t num_segments() const { return static_cast<int64_t>(segment_begin.size()) - 1; }
  int64_t size() const { return static_cast<int64_t>(items.size()); }
};

struct SelectParams {
  Activation activation;
  float score_thresh;       // compared as float32, as torch compares a tensor to a Python float
  ScoreBound bound;         // pruning bound derived from score_thresh
  int64_t topk_candidates;
  int64_t background_class;  // -1: every column is a class
};

// logits: [B, A, C] on the CPU, any strides (made contiguous in the last dim).
Selection select_candidates(const at::Tensor& logits, const SelectParams& params);

}  // namespace cpu
}  // namespace ssd_post
