// Input validation shared by the CPU and CUDA kernels (host code only). Every
// message names the argument and quotes what was received.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "box_math.h"
#include "score_bounds.h"
#include "select_params.h"

namespace ssd_post {

struct BatchDims {
  int64_t batch;    // B
  int64_t anchors;  // A
  int64_t classes;  // C
};

inline bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

inline void check_float_tensor(const at::Tensor& t, const char* name) {
  TORCH_CHECK(is_supported_float(t.scalar_type()), name,
              " should be float32, float16 or bfloat16, got ", t.scalar_type());
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* name,
                              const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), name, " should be on the same device as ", ref_name,
              ", got ", t.device(), " and ", ref.device());
}

inline void check_unit_interval(double value, const char* name) {
  // The negated form also rejects NaN.
  TORCH_CHECK(value >= 0.0 && value <= 1.0, name, " should be in [0, 1], got ", value);
}

// The fused per-class postprocess takes softmax and sigmoid; select_topk "none" too.
inline Activation parse_activation(const std::string& name, bool allow_none = false) {
  if (name == "softmax") return Activation::kSoftmax;
  if (name == "sigmoid") return Activation::kSigmoid;
  if (allow_none && name == "none") return Activation::kNone;
  TORCH_CHECK(false, "score_activation should be 'softmax', 'sigmoid'",
              allow_none ? " or 'none'" : "", ", got '", name, "'");
  return Activation::kSoftmax;  // unreachable
}

// The selection scalars every selecting op takes (per class or per level).
inline void check_selection_scalars(double score_thresh, int64_t topk_candidates,
                                    c10::optional<int64_t> background_class, int64_t C) {
  check_unit_interval(score_thresh, "score_thresh");
  TORCH_CHECK(topk_candidates >= 1, "topk_candidates should be >= 1, got ", topk_candidates);
  if (background_class.has_value()) {
    TORCH_CHECK(*background_class >= 0 && *background_class < C,
                "background_class should be in [0, C) with C = ", C, ", got ", *background_class);
  }
}

// Validates the tensors and scalars shared by decode_threshold_flatten and
// postprocess and returns B, A, C.
inline BatchDims check_decode_inputs(const at::Tensor& locs, const at::Tensor& logits,
                                     const at::Tensor& anchors, const at::Tensor& image_sizes,
                                     double score_thresh, int64_t topk_candidates,
                                     at::ArrayRef<double> box_weights,
                                     c10::optional<int64_t> background_class) {
  TORCH_CHECK(locs.dim() == 3, "locs should be a 3d tensor [B, A, 4], got ", locs.dim(), "D");
  TORCH_CHECK(locs.size(2) == 4, "locs should have 4 box regressions in its last dim, got shape ",
              locs.sizes());
  TORCH_CHECK(logits.dim() == 3, "logits should be a 3d tensor [B, A, C], got ", logits.dim(),
              "D");
  check_float_tensor(locs, "locs");
  check_float_tensor(logits, "logits");
  check_float_tensor(anchors, "anchors");
  const int64_t B = logits.size(0), A = logits.size(1), C = logits.size(2);
  TORCH_CHECK(locs.size(0) == B, "locs and logits should have the same batch size B, got ",
              locs.size(0), " and ", B);
  TORCH_CHECK(locs.size(1) == A, "locs and logits should have the same number of anchors A, got ",
              locs.size(1), " and ", A);
  TORCH_CHECK(C >= 1, "logits should have at least one class column, got shape ", logits.sizes());
  TORCH_CHECK(A < std::numeric_limits<int32_t>::max(), "logits has too many anchors: ", A);
  TORCH_CHECK(anchors.dim() == 2 || anchors.dim() == 3,
              "anchors should be a 2d tensor [A, 4] or a 3d tensor [B, A, 4], got ", anchors.dim(),
              "D");
  TORCH_CHECK(anchors.size(-1) == 4 && anchors.size(-2) == A,
              "anchors should have shape [A, 4] or [B, A, 4] with A = ", A, ", got ",
              anchors.sizes());
  TORCH_CHECK(anchors.dim() == 2 || anchors.size(0) == B,
              "anchors should have one row of anchors per image (B = ", B, "), got shape ",
              anchors.sizes());
  TORCH_CHECK(image_sizes.dim() == 2 && image_sizes.size(0) == B && image_sizes.size(1) == 2,
              "image_sizes should have shape [B, 2] = [", B, ", 2] of (height, width), got ",
              image_sizes.sizes());
  TORCH_CHECK(image_sizes.scalar_type() != at::kBool && !image_sizes.is_complex(),
              "image_sizes should hold integer or float (height, width), got ",
              image_sizes.scalar_type());
  check_same_device(logits, locs, "logits", "locs");
  check_same_device(anchors, locs, "anchors", "locs");
  // CPU image sizes are accepted on every device: their values are checked on the
  // host without a synchronization (op_inputs.h).
  TORCH_CHECK(image_sizes.device() == locs.device() || image_sizes.device().is_cpu(),
              "image_sizes should be on the CPU or on the same device as locs, got ",
              image_sizes.device(), " and ", locs.device());
  check_selection_scalars(score_thresh, topk_candidates, background_class, C);
  TORCH_CHECK(box_weights.size() == 4, "box_weights should have 4 values, got ",
              box_weights.size());
  for (double w : box_weights) {
    TORCH_CHECK(std::isfinite(w) && w > 0, "box_weights should be finite and positive, got ",
                box_weights);
  }
  return {B, A, C};
}

// An allow-list of class columns: each in [0, C) and not the background column.
inline void check_class_list(c10::OptionalIntArrayRef classes, int64_t C,
                             c10::optional<int64_t> background_class) {
  if (!classes.has_value()) return;
  for (const int64_t c : *classes) {
    TORCH_CHECK_VALUE(c >= 0 && c < C, "classes should be columns in [0, C) with C = ", C,
                      ", got ", *classes);
    TORCH_CHECK_VALUE(!background_class.has_value() || c != *background_class,
                      "classes should not hold the background column ", *background_class,
                      ", got ", *classes);
  }
}

// Validates select_topk's arguments and returns B, A, C; `levels` receives the
// anchor range of each level and `rule` the scoring and grouping.
inline BatchDims check_select_inputs(const at::Tensor& logits,
                                     const c10::optional<at::Tensor>& score_factor,
                                     at::IntArrayRef level_sizes, double score_thresh,
                                     int64_t topk_candidates,
                                     c10::optional<int64_t> background_class,
                                     const std::string& score_activation,
                                     const std::string& factor_mode, bool factor_logits,
                                     bool single_label, c10::OptionalIntArrayRef classes,
                                     bool per_class, LevelTable* levels, ScoreRule* rule) {
  TORCH_CHECK_VALUE(logits.dim() == 3, "logits should be a 3d tensor [B, A, C], got ",
                    logits.dim(), "D");
  check_float_tensor(logits, "logits");
  const int64_t B = logits.size(0), A = logits.size(1), C = logits.size(2);
  TORCH_CHECK_VALUE(C >= 1, "logits should have at least one class column, got shape ",
                    logits.sizes());
  if (score_factor.has_value()) {
    const at::Tensor& factor = *score_factor;
    check_float_tensor(factor, "score_factor");
    check_same_device(factor, logits, "score_factor", "logits");
    TORCH_CHECK_VALUE((factor.dim() == 2 || (factor.dim() == 3 && factor.size(2) == 1)) &&
                          factor.size(0) == B && factor.size(1) == A,
                      "score_factor should be [B, A] or [B, A, 1] = [", B, ", ", A, "], got ",
                      factor.sizes());
  }
  const int64_t count = static_cast<int64_t>(level_sizes.size());
  // A ValueError in Python: the one place where the level limit is checked.
  TORCH_CHECK_VALUE(count >= 1 && count <= kMaxLevels, "level_sizes should have 1 to ",
                    kMaxLevels, " levels, got ", count);
  int64_t total = 0;
  for (const int64_t n : level_sizes) {
    TORCH_CHECK_VALUE(n >= 0, "level_sizes should be >= 0, got ", level_sizes);
    total += n;
  }
  TORCH_CHECK_VALUE(total == A, "level_sizes should sum to A = ", A, ", got ", level_sizes);
  TORCH_CHECK_VALUE(!per_class || count == 1,
                    "per_class selection scores each image as one block: level_sizes should be "
                    "[A], got ", level_sizes);
  check_selection_scalars(score_thresh, topk_candidates, background_class, C);
  FactorMode mode = FactorMode::kNone;
  if (factor_mode == "sqrt") {
    mode = FactorMode::kSqrt;
  } else if (factor_mode == "before_threshold") {
    mode = FactorMode::kBeforeThreshold;
  } else if (factor_mode == "after_selection") {
    mode = FactorMode::kAfterSelection;
  } else {
    TORCH_CHECK_VALUE(false,
                      "factor_mode should be 'sqrt', 'before_threshold' or 'after_selection', "
                      "got '", factor_mode, "'");
  }
  check_class_list(classes, C, background_class);
  *rule = {parse_activation(score_activation, /*allow_none=*/true),
           score_factor.has_value() ? mode : FactorMode::kNone, factor_logits, single_label,
           per_class};
  *levels = make_level_table(level_sizes.data(), static_cast<int>(count));
  // The kernels index a level's pairs with 32-bit arithmetic.
  TORCH_CHECK_VALUE(largest_level_pairs(*levels, C) <= std::numeric_limits<uint32_t>::max(),
                    "a feature level should have fewer than 2^32 anchor x class pairs, got ",
                    largest_level_pairs(*levels, C));
  return {B, A, C};
}

// The allow-list as one flag per column (1: may be reported); all 1 without one.
inline std::vector<uint8_t> class_allowed_mask(c10::OptionalIntArrayRef classes, int64_t C) {
  std::vector<uint8_t> allowed(static_cast<size_t>(C), classes.has_value() ? 0 : 1);
  if (classes.has_value()) {
    for (const int64_t c : *classes) allowed[static_cast<size_t>(c)] = 1;
  }
  return allowed;
}

inline void check_nms_inputs(const at::Tensor& boxes, const at::Tensor& scores,
                             const at::Tensor& idxs, double iou_threshold) {
  TORCH_CHECK(boxes.dim() == 2, "boxes should be a 2d tensor [N, 4], got ", boxes.dim(), "D");
  TORCH_CHECK(boxes.size(1) == 4, "boxes should have 4 elements in dimension 1, got ",
              boxes.size(1));
  TORCH_CHECK(scores.dim() == 1, "scores should be a 1d tensor [N], got ", scores.dim(), "D");
  TORCH_CHECK(idxs.dim() == 1, "idxs should be a 1d tensor [N], got ", idxs.dim(), "D");
  TORCH_CHECK(boxes.size(0) == scores.size(0) && boxes.size(0) == idxs.size(0),
              "boxes, scores and idxs should have the same length N, got ", boxes.size(0), ", ",
              scores.size(0), " and ", idxs.size(0));
  TORCH_CHECK(boxes.is_floating_point(), "boxes should be a floating point tensor, got ",
              boxes.scalar_type());
  TORCH_CHECK(scores.is_floating_point(), "scores should be a floating point tensor, got ",
              scores.scalar_type());
  TORCH_CHECK(at::isIntegralType(idxs.scalar_type(), /*includeBool=*/false),
              "idxs should be an integer tensor, got ", idxs.scalar_type());
  check_same_device(scores, boxes, "scores", "boxes");
  check_same_device(idxs, boxes, "idxs", "boxes");
  check_unit_interval(iou_threshold, "iou_threshold");
}

// batched_nms's optional bound: stop a group after max_kept survivors, or with
// keys laid out as image * keys_per_image + class, an image after max_kept
// survivors over all its groups. Wrong values are a ValueError in Python.
inline void check_nms_limits(c10::optional<int64_t> max_kept,
                             c10::optional<int64_t> keys_per_image) {
  if (max_kept.has_value()) {
    TORCH_CHECK_VALUE(*max_kept >= 0, "max_kept should be >= 0 (or None for no limit), got ",
                      *max_kept);
  }
  if (keys_per_image.has_value()) {
    TORCH_CHECK_VALUE(*keys_per_image >= 1, "keys_per_image should be >= 1, got ",
                      *keys_per_image);
    TORCH_CHECK_VALUE(max_kept.has_value(),
                      "keys_per_image only sets what max_kept counts (survivors per image), "
                      "so it needs max_kept; got keys_per_image = ",
                      *keys_per_image, " and max_kept = None");
  }
}

// The shape of batched_nms_padded's inputs: B images of M slots each.
struct PaddedNmsDims {
  int64_t batch;  // B
  int64_t slots;  // M
};

// Validates batched_nms_padded's arguments (every failure a ValueError in Python)
// and returns B and M.
inline PaddedNmsDims check_padded_nms_inputs(const at::Tensor& boxes, const at::Tensor& scores,
                                             const at::Tensor& labels, double iou_threshold,
                                             int64_t max_kept) {
  TORCH_CHECK_VALUE(boxes.dim() == 3 && boxes.size(2) == 4,
                    "boxes should be a 3d tensor [B, M, 4], got shape ", boxes.sizes());
  const int64_t B = boxes.size(0), M = boxes.size(1);
  TORCH_CHECK_VALUE(scores.dim() == 2 && scores.size(0) == B && scores.size(1) == M,
                    "scores should have shape [B, M] = [", B, ", ", M, "], got ", scores.sizes());
  TORCH_CHECK_VALUE(labels.dim() == 2 && labels.size(0) == B && labels.size(1) == M,
                    "labels should have shape [B, M] = [", B, ", ", M, "], got ", labels.sizes());
  TORCH_CHECK_VALUE(is_supported_float(boxes.scalar_type()),
                    "boxes should be float32, float16 or bfloat16, got ", boxes.scalar_type());
  TORCH_CHECK_VALUE(is_supported_float(scores.scalar_type()),
                    "scores should be float32, float16 or bfloat16, got ", scores.scalar_type());
  TORCH_CHECK_VALUE(labels.scalar_type() == at::kLong,
                    "labels should be int64 (-1 for an empty slot), got ", labels.scalar_type());
  TORCH_CHECK_VALUE(scores.device() == boxes.device(),
                    "scores should be on the same device as boxes, got ", scores.device(),
                    " and ", boxes.device());
  TORCH_CHECK_VALUE(labels.device() == boxes.device(),
                    "labels should be on the same device as boxes, got ", labels.device(),
                    " and ", boxes.device());
  // The rank keys hold a slot index next to 32 score bits (common/rank_keys.h).
  TORCH_CHECK_VALUE(M < std::numeric_limits<int32_t>::max(),
                    "boxes should have fewer than 2^31 - 1 slots per image, got ", M);
  // The negated form also rejects NaN.
  TORCH_CHECK_VALUE(iou_threshold >= 0.0 && iou_threshold <= 1.0,
                    "iou_threshold should be in [0, 1], got ", iou_threshold);
  TORCH_CHECK_VALUE(max_kept >= 1, "max_kept should be >= 1, got ", max_kept);
  return {B, M};
}

// Survivor slots per image of batched_nms_padded (ssd_post/fake_kernels.py computes
// the same for the traced shapes; opcheck holds the two equal).
inline int64_t padded_nms_capacity(int64_t max_kept, int64_t slots) {
  return std::min(max_kept, slots);
}

inline void check_postprocess_scalars(double nms_thresh, int64_t detections_per_img) {
  check_unit_interval(nms_thresh, "nms_thresh");
  TORCH_CHECK(detections_per_img >= 1, "detections_per_img should be >= 1, got ",
              detections_per_img);
}

inline BoxWeights to_box_weights(at::ArrayRef<double> w) {
  return {static_cast<float>(w[0]), static_cast<float>(w[1]), static_cast<float>(w[2]),
          static_cast<float>(w[3])};
}

// best_class's input: class scores [B, C, N] (C >= 1), class-major as YOLOv8's
// output slices them.
inline void check_best_class_input(const at::Tensor& scores) {
  TORCH_CHECK_VALUE(scores.dim() == 3 && scores.size(1) >= 1,
                    "scores should be a 3d tensor [B, C, N] with C >= 1, got shape ",
                    scores.sizes());
  TORCH_CHECK_VALUE(is_supported_float(scores.scalar_type()),
                    "scores should be float32, float16 or bfloat16, got ", scores.scalar_type());
}

// best_class_candidates' arguments: the scores as best_class's, a threshold that
// is a number (a NaN one would keep nothing, silently), a cap >= 1 and an
// allow-list of columns.
// Returns whether box_format is "cxcywh" (else "xyxy").
inline bool check_best_class_candidates_inputs(const at::Tensor& scores, double score_thresh,
                                               int64_t max_candidates,
                                               c10::OptionalIntArrayRef classes,
                                               const c10::optional<at::Tensor>& boxes,
                                               c10::string_view box_format) {
  check_best_class_input(scores);
  TORCH_CHECK_VALUE(!std::isnan(score_thresh), "score_thresh should be a number, got nan");
  TORCH_CHECK_VALUE(max_candidates >= 1, "max_candidates should be >= 1, got ", max_candidates);
  check_class_list(classes, scores.size(1), c10::nullopt);
  TORCH_CHECK_VALUE(box_format == "xyxy" || box_format == "cxcywh",
                    "box_format should be 'xyxy' or 'cxcywh', got '", box_format, "'");
  if (boxes.has_value()) {
    check_float_tensor(*boxes, "boxes");
    check_same_device(*boxes, scores, "boxes", "scores");
    TORCH_CHECK_VALUE(boxes->dim() == 3 && boxes->size(0) == scores.size(0) &&
                          boxes->size(1) == 4 && boxes->size(2) == scores.size(2),
                      "boxes should be [B, 4, N] = [", scores.size(0), ", 4, ", scores.size(2),
                      "] like scores, got ", boxes->sizes());
  }
  return box_format == "cxcywh";
}

}  // namespace ssd_post
