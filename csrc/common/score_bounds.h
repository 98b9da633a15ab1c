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

}  // namespace ssd_post
