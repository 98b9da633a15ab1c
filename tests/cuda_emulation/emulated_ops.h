// The C API of emulated_ops.cpp (the CUDA kernels run on the CPU). Python calls it
// through ctypes (__init__.py, whose EmulatedInputs mirrors the struct below);
// sanitized_run.cpp calls it directly. Every function returns 0, or 1 when an
// emulated launch failed (a deadlock, a bad launch), with the reason on stderr.
#pragma once

#include <cstdint>

extern "C" {

// The inputs and settings shared by decode_threshold_flatten and postprocess,
// float32 and contiguous, with B * C * min(topk_candidates, A) > 0 (the CUDA ops
// launch nothing otherwise).
struct EmulatedInputs {
  const float* locs;         // [B, A, 4]
  const float* logits;       // [B, A, C]
  const float* anchors;      // [A, 4], or [B, A, 4] with per_image_anchors
  const float* image_sizes;  // [B, 2] (height, width)
  int64_t B, A, C;
  int64_t background_class;  // -1: none
  int64_t topk_candidates;
  double score_thresh;
  double box_weights[4];
  int32_t activation;  // 0: softmax, 1: sigmoid
  int32_t per_image_anchors;
  int32_t clip;
};

// decode_threshold_flatten on CUDA: outputs sized B * C * min(topk, A); *num_out = N.
int emulated_decode_threshold_flatten(const EmulatedInputs* inputs, float* boxes, float* scores,
                                      int64_t* keys, int64_t* num_out);

// postprocess on CUDA: outputs [B, K, 4], [B, K], [B, K], [B] and anchor indices
// [B, K], K >= 1 rows per image (the op passes K = padded_detections(),
// common/select_params.h).
int emulated_postprocess(const EmulatedInputs* inputs, double nms_thresh,
                         int64_t detections_per_img, float* out_boxes, float* out_scores,
                         int64_t* out_labels, int64_t* out_counts, int64_t* out_anchors);

// The inputs and settings of select_topk, float32 and contiguous; the enums as
// common/score_bounds.h numbers them (activation: 0 softmax, 1 sigmoid, 2 none;
// factor_mode: 0 no factor, 1 sqrt, 2 before_threshold, 3 after_selection).
struct EmulatedSelectInputs {
  const float* logits;         // [B, A, C]
  const float* score_factor;   // [B, A], or nullptr (then factor_mode is 0)
  const uint8_t* allowed;      // [C] class_allowed_mask, or nullptr: every column
  const int64_t* level_sizes;  // [num_levels], 1 <= num_levels <= kMaxLevels, summing to A
  int64_t B, A, C;
  int64_t background_class;  // -1: none
  int64_t topk_candidates;
  double score_thresh;
  int32_t num_levels;
  int32_t activation;
  int32_t factor_mode;
  int32_t factor_logits;
  int32_t single_label;
  int32_t per_class;  // then num_levels is 1
};

// select_topk on CUDA: outputs flat and scores [B, G, k] and counts [B, G],
// G = select_groups(), k = select_capacity() (B * G * k > 0).
int emulated_select_topk(const EmulatedSelectInputs* inputs, int64_t* flat, float* scores,
                         int64_t* counts);

// The NMS kernel of batched_nms: ranked_boxes [N, 4] grouped into runs
// [group_begin[g], group_end[g]), each in rank order; keep[i] = 1 for survivors,
// at most the first max_kept of each run when max_kept >= 0.
int emulated_nms_ranked_groups(const float* ranked_boxes, const int64_t* group_begin,
                               const int64_t* group_end, int64_t num_groups, double iou_threshold,
                               int64_t max_kept, uint8_t* keep);

// batched_nms_padded on CUDA: boxes [B, M, 4], scores [B, M] float32, labels [B, M]
// int64 (negative: an empty slot), B, M > 0; outputs indices [B, K] and counts [B],
// K >= 1 (the op passes K = padded_nms_capacity(max_kept, M), common/checks.h).
int emulated_batched_nms_padded(const float* boxes, const float* scores, const int64_t* labels,
                                int64_t B, int64_t M, double iou_threshold, int64_t K,
                                int32_t class_agnostic, int64_t* indices, int64_t* counts);

}  // extern "C"
