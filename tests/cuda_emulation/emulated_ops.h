// The C API of emulated_ops.cpp (the CUDA kernels run on the CPU). Python calls it
// through ctypes (__init__.py); sanitized_run.cpp calls it directly.
#pragma once

#include <cstdint>

extern "C" {

// decode_threshold_flatten on CUDA: outputs sized B * C * min(topk, A); *num_out = N.
// Returns 0, or 1 when an emulated launch failed (a deadlock, a bad launch).
int emulated_decode_threshold_flatten(const float* locs, const float* logits, const float* anchors,
                                      int per_image_anchors, const float* image_sizes, int64_t B,
                                      int64_t A, int64_t C, double score_thresh,
                                      int64_t topk_candidates, const double* box_weights,
                                      int activation, int64_t background_class, int clip,
                                      float* boxes, float* scores, int64_t* keys, int64_t* num_out);

// postprocess on CUDA: outputs [B, K, 4], [B, K], [B, K], [B]. Needs
// B * C * min(topk, A) > 0, as the CUDA op launches nothing otherwise.
int emulated_postprocess(const float* locs, const float* logits, const float* anchors,
                         int per_image_anchors, const float* image_sizes, int64_t B, int64_t A,
                         int64_t C, double score_thresh, double nms_thresh,
                         int64_t topk_candidates, int64_t detections_per_img,
                         const double* box_weights, int activation, int64_t background_class,
                         int clip, float* out_boxes, float* out_scores, int64_t* out_labels,
                         int64_t* out_counts);

// The NMS kernel of batched_nms: ranked_boxes [N, 4] grouped into runs
// [group_begin[g], group_end[g]), each in rank order; keep[i] = 1 for survivors.
int emulated_nms_ranked_groups(const float* ranked_boxes, const int64_t* group_begin,
                               const int64_t* group_end, int64_t num_groups, double iou_threshold,
                               uint8_t* keep);

}  // extern "C"
