// Exact greedy NMS on the device, one block per run of boxes in rank order.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "decode.cuh"
#include "select.cuh"

namespace ssd_post {
namespace gpu {

// postprocess: decodes the ranked candidates of every segment of `ranked` into
// boxes[slot] (float32 xyxy, 4 per slot) and sets keep[slot] to 1 for the NMS
// survivors of each segment, 0 for the others (slots past a segment's count are
// left alone).
void decode_and_nms_segments(const RankedCandidates& ranked, int64_t num_classes,
                             const DecodeParams& decode, double iou_threshold, float* boxes,
                             uint8_t* keep, cudaStream_t stream);

// batched_nms: ranked_boxes [N, 4] grouped into runs [group_begin[g], group_end[g]),
// each in rank order; keep[i] = 1 for the survivors of each run.
void nms_ranked_groups(const float* ranked_boxes, const int64_t* group_begin,
                       const int64_t* group_end, int64_t num_groups, double iou_threshold,
                       uint8_t* keep, cudaStream_t stream);

}  // namespace gpu
}  // namespace ssd_post
