// Greedy NMS, one block per run of ranked boxes. The run is walked in chunks of 64
// boxes: the boxes of a chunk first get 64-bit masks of which later boxes of the
// same chunk they suppress, one thread scans those masks greedily (the only serial
// part, 64 steps), then every thread tests the later boxes it owns against the
// boxes the chunk kept. The result is the CPU's sequential greedy loop exactly: a
// box is dropped iff an earlier kept box of its run (and, when the run carries
// labels, of its label) overlaps it by > threshold.
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
  int64_t kept_labels[kNmsChunk];
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
// the walk stops at the chunk that reaches them. labels[0, n) (or nullptr: one
// label) splits the run: a box only suppresses boxes of its own label, so a run
// holding every label of an image is that image's per-label NMS, truncated at
// max_kept survivors over all labels. Returns the survivor count (in every thread).
__device__ __forceinline__ int greedy_nms_block(const float4* boxes, const int64_t* labels, int n,
                                                double iou_threshold, int64_t max_kept,
                                                uint8_t* keep, NmsShared& shared) {
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
          if (labels != nullptr && labels[chunk_begin + j] != labels[i]) continue;
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
          shared.kept_labels[kept] = labels != nullptr ? labels[chunk_begin + t] : 0;
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
      return total_kept;
    }
    // The boxes this chunk kept suppress later rows; each thread owns its rows.
    for (int j = chunk_begin + chunk_len + tid; j < n; j += blockDim.x) {
      if (!keep[j]) continue;
      float box_j[4];
      load_box(boxes, j, box_j);
      const float area_j = box_area(box_j);
      const int64_t label_j = labels != nullptr ? labels[j] : 0;
      for (int q = 0; q < kept; ++q) {
        if (shared.kept_labels[q] != label_j) continue;
        if (suppresses(box_iou(shared.kept_boxes[q], shared.kept_areas[q], box_j, area_j),
                       iou_threshold)) {
          keep[j] = 0;
          break;
        }
      }
    }
    __syncthreads();
  }
  return total_kept;
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
  greedy_nms_block(boxes + first, /*labels=*/nullptr, n, iou_threshold, /*max_kept=*/-1,
                   keep + first, shared);
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
  greedy_nms_block(ranked_boxes + first, /*labels=*/nullptr, n, iou_threshold, max_kept,
                   keep + first, shared);
}

// --- batched_nms_padded: B images of M padded slots ---------------------------------

constexpr int kPaddedKeyThreads = 256;

// One rank key per slot of scores / labels [B, M] (kEmptyRankKey for a slot with a
// negative label), and each image's segment [b * M, (b + 1) * M) for the sort.
__global__ void __launch_bounds__(kPaddedKeyThreads)
    padded_rank_keys_kernel(const float* __restrict__ scores, const int64_t* __restrict__ labels,
                            int64_t B, int64_t M, int index_bits, uint64_t* keys,
                            int32_t* segment_begin, int32_t* segment_end) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= B * M) return;
  const int64_t slot = i % M;
  keys[i] = labels[i] < 0 ? kEmptyRankKey
                          : make_rank_key(ordered_score_bits(scores[i]), slot, M, index_bits);
  if (slot == 0) {
    // B * M < 2^31 (host_pipeline.h).
    segment_begin[i / M] = static_cast<int32_t>(i);
    segment_end[i / M] = static_cast<int32_t>(i + M);
  }
}

using PaddedCompactScan = cub::BlockScan<int, kNmsThreads>;

// One block per image of batched_nms_padded: the image's ranked non-empty slots
// (sorted_keys [B, M], each image's keys descending, empty slots last) gathered
// into ranked_boxes / ranked_labels / keep [B, M], the greedy scan of the other NMS
// ops over them, stopped after K survivors, and the survivors' slots compacted in
// rank order into indices [B, K] (-1 past the count) with counts [B].
__global__ void __launch_bounds__(kNmsThreads)
    nms_padded_kernel(const uint64_t* __restrict__ sorted_keys, const float* __restrict__ boxes,
                      const int64_t* __restrict__ labels, int64_t M, int index_bits,
                      double iou_threshold, int64_t K, bool class_agnostic, float4* ranked_boxes,
                      int64_t* ranked_labels, uint8_t* keep, int64_t* indices, int64_t* counts) {
  __shared__ NmsShared shared;
  __shared__ PaddedCompactScan::TempStorage scan;
  const int tid = threadIdx.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * M;
  const uint64_t* keys = sorted_keys + first;
  int n = 0;  // non-empty slots; they are the first n keys (the same in every thread)
  for (int64_t base = 0; base < M; base += blockDim.x) {
    const int64_t i = base + tid;
    const bool filled = i < M && keys[i] != kEmptyRankKey;
    if (filled) {
      const int64_t slot = rank_key_index(keys[i], M, index_bits);
      // Four loads, not one float4: a contiguous view need not be 16-byte aligned.
      const float* box = boxes + 4 * (first + slot);
      ranked_boxes[first + i] = make_float4(box[0], box[1], box[2], box[3]);
      ranked_labels[first + i] = labels[first + slot];
      keep[first + i] = 1;
    }
    const int filled_here = __syncthreads_count(filled);
    n += filled_here;
    if (filled_here < static_cast<int>(blockDim.x)) break;  // only empty slots follow
  }
  __syncthreads();
  const int kept =
      greedy_nms_block(ranked_boxes + first, class_agnostic ? nullptr : ranked_labels + first, n,
                       iou_threshold, K, keep + first, shared);
  __syncthreads();  // keep[] as the scan left it, for every thread
  int64_t* out = indices + static_cast<int64_t>(blockIdx.x) * K;
  int written = 0;
  for (int base = 0; base < n && written < kept; base += blockDim.x) {
    const int i = base + tid;
    const bool survivor = i < n && keep[first + i] != 0;
    int position = 0, chunk_total = 0;
    PaddedCompactScan(scan).ExclusiveSum(static_cast<int>(survivor), position, chunk_total);
    if (survivor) out[written + position] = rank_key_index(keys[i], M, index_bits);
    written += chunk_total;
    __syncthreads();  // the scan storage is reused by the next chunk
  }
  for (int64_t q = kept + tid; q < K; q += blockDim.x) out[q] = -1;
  if (tid == 0) counts[blockIdx.x] = kept;
}

}  // namespace gpu
}  // namespace ssd_post
