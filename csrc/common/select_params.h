// The parameters of stage 1 (activation, threshold, per-class top-k), shared by the
// CPU kernels, the CUDA kernels and the CUDA emulator. Free of ATen so that the
// emulator (plain C++) builds them with the very function the ops use.
#pragma once

#include <algorithm>
#include <cstdint>

#include "score_bounds.h"

namespace ssd_post {

struct SelectParams {
  Activation activation;
  float score_thresh;        // compared as float32, as torch compares a tensor to a Python float
  ScoreBound bound;          // pruning bound derived from score_thresh
  int64_t topk_candidates;   // already clamped to [1, A]: buffers are sized by it
  int64_t background_class;  // -1: every column is a class
};

// Any topk_candidates >= 1 is valid ("no limit" is a real use), but no segment can
// hold more than A candidates: clamping here, once, keeps every buffer and every
// size product (2k slack, B * C * k slots) sized by the data, never by the argument.
inline int64_t effective_topk(int64_t topk_candidates, int64_t num_anchors) {
  return std::max<int64_t>(1, std::min(topk_candidates, num_anchors));
}

inline SelectParams make_select_params(Activation activation, double score_thresh,
                                       int64_t topk_candidates, int64_t num_anchors,
                                       int64_t background_class) {
  return {activation, static_cast<float>(score_thresh),
          make_score_bound(activation, score_thresh),
          effective_topk(topk_candidates, num_anchors), background_class};
}

// K of postprocess's padded outputs [B, K, ...]: an image cannot have more
// detections than its foreground classes times the candidates each may send to
// NMS, so K = min(detections_per_img, C_fg * min(topk_candidates, A)).
// ssd_post.config.PostprocessConfig.padded_detections mirrors this for the fake
// kernel; keep the two equal.
inline int64_t padded_detections(int64_t detections_per_img, int64_t topk_candidates,
                                 int64_t num_anchors, int64_t num_classes,
                                 int64_t background_class) {
  const int64_t foreground = num_classes - (background_class >= 0 ? 1 : 0);
  // foreground * min(topk, A) <= C * A, which fits: logits holds B * A * C elements.
  const int64_t most = foreground * std::min(topk_candidates, num_anchors);
  return std::min(detections_per_img, most);
}

// Per-level selection (RetinaNet, FCOS): the anchor range of each feature level,
// passed to the kernels by value. Levels are [start[l], start[l + 1]). The CPU and
// CUDA ops accept the same level counts, 1..kMaxLevels (checks.h).
constexpr int kMaxLevels = 16;

struct LevelTable {
  int64_t start[kMaxLevels + 1];
  int count;  // 1..kMaxLevels
};

// Built from the anchors per level (checked by checks.h: 1..kMaxLevels sizes >= 0
// summing to A).
inline LevelTable make_level_table(const int64_t* level_sizes, int count) {
  LevelTable table{};
  table.count = count;
  table.start[0] = 0;
  for (int l = 0; l < count; ++l) table.start[l + 1] = table.start[l] + level_sizes[l];
  return table;
}

// SelectParams of the per-level selection (CPU and CUDA): sigmoid scores, with
// centerness FCOS's, pruned by make_level_score_bound. topk_candidates is clamped
// by level_capacity().
inline SelectParams make_level_select_params(double score_thresh, int64_t topk_candidates,
                                             bool with_centerness, int64_t background_class) {
  return {Activation::kSigmoid, static_cast<float>(score_thresh),
          make_level_score_bound(score_thresh, with_centerness), topk_candidates,
          background_class};
}

// Pairs (anchor x class) of the largest level: the index range of a per-level rank key.
inline int64_t largest_level_pairs(const LevelTable& levels, int64_t num_classes) {
  int64_t most = 0;
  for (int l = 0; l < levels.count; ++l) {
    most = std::max(most, (levels.start[l + 1] - levels.start[l]) * num_classes);
  }
  return most;
}

// Slots per (image, level) segment: no level keeps more than topk_candidates
// pairs, nor more pairs than it has (sized by the data, never by the argument).
inline int64_t level_capacity(const LevelTable& levels, int64_t num_classes,
                              int64_t topk_candidates) {
  return std::min(topk_candidates, largest_level_pairs(levels, num_classes));
}

}  // namespace ssd_post
