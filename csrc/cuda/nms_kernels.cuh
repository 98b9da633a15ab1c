// Greedy NMS, one block per run of ranked boxes. The run is walked in chunks of 64
// boxes: the boxes of a chunk first get 64-bit masks of which later boxes of the
// same chunk they suppress, one thread scans those masks greedily (the only serial
// part, 64 steps), then every thread tests the later boxes it owns against the
// boxes the chunk kept. The result is the CPU's sequential greedy loop exactly: a
// box is dropped iff an earlier kept box of its run overlaps it by > threshold.
//
// Device code only (see kernel_support.cuh); host_pipeline.h launches these kernels.
#pragma once

#include <cstdint>

#include "../common/box_math.h"
#include "decode.cuh"
#include "kernel_support.cuh"
#include "../common/rank_keys.h"

namespace ssd_post {
namespace gpu {

constexpr int kNmsThreads = 128;
constexpr int kNmsChunk = 64;  // rows whose suppression masks fit in one uint64_t
static_assert(kNmsThreads >= kNmsChunk, "one thread per row of a chunk");

struct NmsShared {
  uint64_t row_masks[kNmsChunk];
  float kept_boxes[kNmsChunk][4];
  float kept_areas[kNmsChunk];
  int kept_count;
};

__device__ __forceinline__ void load_box(const float4* boxes, int64_t i, float out[4]) {
  const float4 v = boxes[i];
  out[0] = v.x;
  out[1] = v.y;
  out[2] = v.z;
  out[3] = v.w;
}

// keep[0, n) must be 1 and visible to the whole block on entry. Every IoU is taken
// as box_iou(earlier, later), the argument order of the CPU loop. With max_kept in
// [0, n), only the first max_kept survivors are kept (the full pass truncated) and
// the walk stops at the chunk that reaches them.
__device__ __forceinline__ void greedy_nms_block(const float4* boxes, int n, double iou_threshold,
                                                 int64_t max_kept, uint8_t* keep,
                                                 NmsShared& shared) {
  const int tid = threadIdx.x;
  const int limit = (max_kept < 0 || max_kept > n) ? n : static_cast<int>(max_kept);
  int total_kept = 0;  // survivors of the chunks before this one (the same in every thread)
  for (int chunk_begin = 0; chunk_begin < n; chunk_begin += kNmsChunk) {
    const int chunk_len = min(kNmsChunk, n - chunk_begin);
    // Masks inside the chunk, for the rows still alive when the chunk starts.
    if (tid < chunk_len) {
      uint64_t mask = 0;
      const int i = chunk_begin + tid;
      if (keep[i]) {
        float box_i[4];
        load_box(boxes, i, box_i);
        const float area_i = box_area(box_i);
        for (int j = tid + 1; j < chunk_len; ++j) {
          if (!keep[chunk_begin + j]) continue;
          float box_j[4];
          load_box(boxes, chunk_begin + j, box_j);
          if (suppresses(box_iou(box_i, area_i, box_j, box_area(box_j)), iou_threshold)) {
            mask |= uint64_t{1} << j;
          }
        }
      }
      shared.row_masks[tid] = mask;
    }
    __syncthreads();
    // Greedy scan of the chunk in rank order; only rows that are kept apply masks,
    // and rows past the limit are dropped.
    if (tid == 0) {
      uint64_t alive = 0;
      for (int t = 0; t < chunk_len; ++t) {
        if (keep[chunk_begin + t]) alive |= uint64_t{1} << t;
      }
      int kept = 0;
      for (int t = 0; t < chunk_len; ++t) {
        if (((alive >> t) & 1u) && total_kept + kept < limit) {
          load_box(boxes, chunk_begin + t, shared.kept_boxes[kept]);
          shared.kept_areas[kept] = box_area(shared.kept_boxes[kept]);
          ++kept;
          alive &= ~shared.row_masks[t];
        } else {
          keep[chunk_begin + t] = 0;
        }
      }
      shared.kept_count = kept;
    }
    __syncthreads();
    const int kept = shared.kept_count;
    total_kept += kept;
    if (total_kept >= limit) {
      // Enough survivors: the rows after this chunk are dropped unseen.
      for (int j = chunk_begin + chunk_len + tid; j < n; j += blockDim.x) keep[j] = 0;
      return;
    }
    // The boxes this chunk kept suppress later rows; each thread owns its rows.
    for (int j = chunk_begin + chunk_len + tid; j < n; j += blockDim.x) {
      if (!keep[j]) continue;
      float box_j[4];
      load_box(boxes, j, box_j);
      const float area_j = box_area(box_j);
      for (int q = 0; q < kept; ++q) {
        if (suppresses(box_iou(shared.kept_boxes[q], shared.kept_areas[q], box_j, area_j),
                       iou_threshold)) {
          keep[j] = 0;
          break;
        }
      }
    }
    __syncthreads();
  }
}

__global__ void __launch_bounds__(kNmsThreads) decode_and_nms_segments_kernel(
    const uint64_t* __restrict__ sorted_keys, const int32_t* __restrict__ counts,
    int64_t capacity, int64_t num_classes, int anchor_bits, DecodeParams decode,
    double iou_threshold, float4* boxes, uint8_t* keep) {
  __shared__ NmsShared shared;
  const int64_t segment = blockIdx.x;
  const int n = counts[segment];
  if (n == 0) return;
  const int64_t first = segment * capacity;
  const int64_t image = segment / num_classes;
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    const int64_t anchor = rank_key_index(sorted_keys[first + i], decode.num_anchors, anchor_bits);
    float box[4];
    decode_candidate(decode, image, anchor, box);
    boxes[first + i] = make_float4(box[0], box[1], box[2], box[3]);
    keep[first + i] = 1;
  }
  __syncthreads();
  greedy_nms_block(boxes + first, n, iou_threshold, /*max_kept=*/-1, keep + first, shared);
}

__global__ void __launch_bounds__(kNmsThreads)
    nms_ranked_groups_kernel(const float4* __restrict__ ranked_boxes,
                             const int64_t* __restrict__ group_begin,
                             const int64_t* __restrict__ group_end, double iou_threshold,
                             int64_t max_kept, uint8_t* keep) {
  __shared__ NmsShared shared;
  const int64_t first = group_begin[blockIdx.x];
  const int n = static_cast<int>(group_end[blockIdx.x] - first);
  for (int i = threadIdx.x; i < n; i += blockDim.x) keep[first + i] = 1;
  __syncthreads();
  greedy_nms_block(ranked_boxes + first, n, iou_threshold, max_kept, keep + first, shared);
}

}  // namespace gpu
}  // namespace ssd_post
