// Activation and the cheap test that rules an (anchor, class) out before any exp.
//
// softmax: p_c = exp(x_c - m) / S with m = max_k x_k and S = sum_k exp(x_k - m) >= 1,
// so p_c <= exp(x_c - m). When x_c - m <= log(t) - margin, p_c <= t * exp(-margin)
// < t and the class cannot pass the strict test p_c > t: an anchor whose every
// foreground logit is below that bound is skipped after one max pass.
// sigmoid: p_c = 1 / (1 + exp(-x_c)) is monotone, so x_c <= logit(t) - margin rules
// the class out. The margins absorb float rounding; whatever survives the bound is
// tested exactly as torch computes it, so the bound never changes a result.
#pragma once

#include <cmath>
#include <limits>

#include "macros.h"

namespace ssd_post {

// kNone: the logits already are the scores (probabilities), used as given.
enum class Activation : int { kSoftmax = 0, kSigmoid = 1, kNone = 2 };

// How a per-anchor score factor (objectness, centerness, IoU quality) f joins a class
// probability p (select_topk): kSqrt: sqrt(p * f) is thresholded and ranked (FCOS);
// kBeforeThreshold: p * f is (YOLOv5, YOLOX); kAfterSelection: p is thresholded
// and ranked, p * f reported (mmdet ATSS, GFL). kNone: no factor tensor.
enum class FactorMode : int { kNone = 0, kSqrt = 1, kBeforeThreshold = 2, kAfterSelection = 3 };

// Room left between the pruning bound and the true threshold, in logit units.
constexpr double kBoundMargin = 1e-2;

// Sigmoid above this threshold is not pruned: near 1 the margin's effect on p,
// p (1 - p) kBoundMargin, falls toward float resolution.
constexpr double kSigmoidPruneMaxThresh = 0.99;
// Nor below this one: a sigmoid that small is near float's subnormal range, where
// its relative rounding error is no longer small.
constexpr double kSigmoidPruneMinThresh = 1e-30;

struct ScoreBound {
  // A logit (softmax: logit minus the row max) at or below `value` cannot pass.
  float value;
};

inline ScoreBound make_score_bound(Activation activation, double score_thresh) {
  const float minus_inf = -std::numeric_limits<float>::infinity();
  if (score_thresh <= 0.0) return {minus_inf};
  if (activation == Activation::kSoftmax) {
    return {static_cast<float>(std::log(score_thresh) - kBoundMargin)};
  }
  if (score_thresh >= kSigmoidPruneMaxThresh || score_thresh < kSigmoidPruneMinThresh) {
    return {minus_inf};
  }
  const double logit = std::log(score_thresh) - std::log1p(-score_thresh);
  return {static_cast<float>(logit - kBoundMargin)};
}

// The logit bound of the per-level selection (RetinaNet, FCOS), on the CPU and on
// CUDA: sigmoid(x) > t, or with centerness FCOS's sqrt(sigmoid(x) * sigmoid(c)) > t,
// which needs both sigmoids > t^2: the bound is taken at t^2 (1 - 1e-3), the
// relative slack covering the rounding of the product and the square root. It
// bounds the class and the centerness logit alike.
inline ScoreBound make_level_score_bound(double score_thresh, bool with_centerness) {
  const double bounded = with_centerness ? score_thresh * score_thresh * (1.0 - 1e-3)
                                         : score_thresh;
  return make_score_bound(Activation::kSigmoid, bounded);
}

// The logit bounds of select_topk (CPU and CUDA), for any ScoreRule: a class
// logit (softmax: minus its row max) at or below `class_logit`, or a factor logit at
// or below `factor_logit`, cannot give a selection score > score_thresh. A bound
// holds only where the scores are known to be at most 1: class probabilities of
// "softmax" and "sigmoid" and factors given as logits (sigmoid); "none" and
// factors given as probabilities may exceed 1, so they prune nothing.
// - no factor, "after_selection": the selection score is p (p > t);
// - "before_threshold": p * f > t with p, f <= 1 needs p > t and f > t (the
//   rounded product is at most either factor);
// - "sqrt": as make_level_score_bound, both at t^2 (1 - 1e-3). For sigmoid with
//   a sqrt factor or none, class_logit equals make_level_score_bound's bound.
struct PairBounds {
  ScoreBound class_logit;
  ScoreBound factor_logit;
};

inline PairBounds make_pair_bounds(Activation activation, FactorMode factor_mode,
                                   bool factor_logits, double score_thresh) {
  const ScoreBound none{-std::numeric_limits<float>::infinity()};
  const bool joined =
      factor_mode == FactorMode::kSqrt || factor_mode == FactorMode::kBeforeThreshold;
  if (activation == Activation::kNone || (joined && !factor_logits)) return {none, none};
  if (!joined) return {make_score_bound(activation, score_thresh), none};
  const double bounded = factor_mode == FactorMode::kSqrt
                             ? score_thresh * score_thresh * (1.0 - 1e-3)
                             : score_thresh;
  return {make_score_bound(activation, bounded),
          make_score_bound(Activation::kSigmoid, bounded)};
}

// Same op order as torch: sigmoid(x) = 1 / (1 + exp(-x)).
SSD_HOST_DEVICE float sigmoid_f32(float x) {
#if defined(__CUDA_ARCH__)
  return 1.f / (1.f + expf(-x));
#else
  return 1.f / (1.f + std::exp(-x));
#endif
}

// FCOS's score, torch's op order: sqrt(sigmoid(cls) * sigmoid(centerness)).
SSD_HOST_DEVICE float centerness_score(float class_prob, float centerness_prob) {
#if defined(__CUDA_ARCH__)
  return sqrtf(__fmul_rn(class_prob, centerness_prob));
#else
  return std::sqrt(class_prob * centerness_prob);
#endif
}

// Same op order as torch's softmax: exp(x - max) * (1 / sum).
SSD_HOST_DEVICE float softmax_prob(float x, float row_max, float inv_sum) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(expf(__fsub_rn(x, row_max)), inv_sum);
#else
  return std::exp(x - row_max) * inv_sum;
#endif
}

// A per-anchor score factor as a probability: sigmoid_f32 of a logit, else as given.
SSD_HOST_DEVICE float factor_probability(float factor, bool factor_logits) {
  return factor_logits ? sigmoid_f32(factor) : factor;
}

// The score a pair is thresholded and ranked by (select_topk), from the class
// probability p and the factor probability f (ignored without a factor), in torch's
// op order: sqrt(p * f), p * f, or p.
SSD_HOST_DEVICE float selection_score(FactorMode mode, float p, float f) {
  if (mode == FactorMode::kSqrt) return centerness_score(p, f);
  if (mode == FactorMode::kBeforeThreshold) return mul_rn(p, f);
  return p;
}

// The score a selected pair reports: its selection score, or p * f for
// "after_selection" (ranked on p, reported multiplied).
SSD_HOST_DEVICE float reported_score(FactorMode mode, float p, float f) {
  return mode == FactorMode::kAfterSelection ? mul_rn(p, f) : selection_score(mode, p, f);
}

}  // namespace ssd_post
