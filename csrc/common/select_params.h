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

// The scoring and grouping of select_topk, one value for the CPU and CUDA kernels
// and the emulator (built by make_score_rule in checks.h from the op's arguments).
struct ScoreRule {
  Activation activation;   // of the class logits
  FactorMode factor_mode;  // kNone when no factor tensor is given
  bool factor_logits;      // the factor is a logit (sigmoid applied) or a probability
  bool single_label;       // only each anchor's best class (equal scores: lower class)
  bool per_class;          // groups are (image, class) over one level, else (image, level)
};

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

// Groups per image of select_topk: the classes (per_class) or the levels.
inline int64_t select_groups(const LevelTable& levels, int64_t num_classes, const ScoreRule& rule) {
  return rule.per_class ? num_classes : levels.count;
}

// Slots per (image, group) of select_topk: per_class, a class keeps at most
// min(topk, A) anchors; per level, min(topk, pairs of the largest level), where an
// anchor gives one pair with single_label. ssd_post.ops.select_capacity mirrors it.
inline int64_t select_capacity(const LevelTable& levels, int64_t num_classes,
                               int64_t topk_candidates, const ScoreRule& rule) {
  if (rule.per_class) return std::min(topk_candidates, levels.start[levels.count]);
  return level_capacity(levels, rule.single_label ? 1 : num_classes, topk_candidates);
}

}  // namespace ssd_post
