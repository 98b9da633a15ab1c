// Kernels that turn ranked candidates and NMS survivors into the outputs of
// decode_threshold_flatten and postprocess. Device code only (see
// kernel_support.cuh); ops_cuda.cu launches them.
#pragma once

#include <cstdint>

#include "decode.cuh"
#include "kernel_support.cuh"
#include "select_kernels.cuh"
#include "../common/rank_keys.h"
#include "../common/select_params.h"

namespace ssd_post {
namespace gpu {

constexpr int kElementwiseThreads = 256;
constexpr int kCollectThreads = 256;

// One thread per slot: the ranked candidates of every segment, decoded, at
// first_output[segment] + rank of the flat outputs.
__global__ void __launch_bounds__(kElementwiseThreads) emit_candidates_kernel(
    const uint64_t* __restrict__ sorted_keys, const int32_t* __restrict__ counts,
    const int64_t* __restrict__ first_output, int64_t slots, int64_t capacity,
    int64_t num_classes, int anchor_bits, DecodeParams decode, float* __restrict__ boxes,
    float* __restrict__ scores, int64_t* __restrict__ keys) {
  const int64_t slot = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (slot >= slots) return;
  const int64_t segment = slot / capacity;
  const int64_t rank = slot % capacity;
  if (rank >= counts[segment]) return;
  const int64_t out = first_output[segment] + rank;
  const uint64_t key = sorted_keys[slot];
  float box[4];
  decode_candidate(decode, segment / num_classes,
                   rank_key_index(key, decode.num_anchors, anchor_bits), box);
  for (int k = 0; k < 4; ++k) boxes[4 * out + k] = box[k];
  scores[out] = __uint_as_float(rank_key_score_bits(key, anchor_bits));
  keys[out] = segment;
}

// One thread per slot of select_topk: the ranked items of segment (image, group)
// (select_topk_candidates_kernel) as flat indices anchor * C + class over the
// image's anchors and their reported scores, at [segment, rank]; slots past the
// segment's count get -1 and 0. best_class [B * A] is read with single_label per
// level; factor [B * A] with "after_selection", whose pairs were ranked on the
// class probability and report it times the factor.
__global__ void __launch_bounds__(kElementwiseThreads) emit_topk_candidates_kernel(
    const uint64_t* __restrict__ sorted_keys, const int32_t* __restrict__ counts,
    int64_t slots, int64_t capacity, LevelTable levels, int64_t num_anchors, int64_t num_classes,
    TopkScoring scoring, const int32_t* __restrict__ best_class,
    const float* __restrict__ factor, int64_t index_count, int index_bits,
    int64_t* __restrict__ flat, float* __restrict__ scores,
    int64_t* __restrict__ segment_counts) {
  const int64_t slot = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (slot >= slots) return;
  const int64_t segment = slot / capacity;
  const int64_t rank = slot % capacity;
  const int64_t count = counts[segment];
  if (rank == 0) segment_counts[segment] = count;
  if (rank >= count) {
    flat[slot] = -1;
    scores[slot] = 0.f;
    return;
  }
  const uint64_t key = sorted_keys[slot];
  const int64_t groups = scoring.per_class ? num_classes : levels.count;
  const int64_t image = segment / groups;
  const int64_t group = segment % groups;
  const int64_t item = rank_key_index(key, index_count, index_bits);
  int64_t anchor, cls;
  if (scoring.per_class) {
    anchor = item;
    cls = group;
  } else if (scoring.single_label) {
    anchor = levels.start[group] + item;
    cls = best_class[image * num_anchors + anchor];
  } else {
    const int64_t pair = levels.start[group] * num_classes + item;
    anchor = pair / num_classes;
    cls = pair - anchor * num_classes;
  }
  flat[slot] = anchor * num_classes + cls;
  float score = __uint_as_float(rank_key_score_bits(key, index_bits));
  if (scoring.factor_mode == FactorMode::kAfterSelection) {
    const float f = factor_probability(factor[image * num_anchors + anchor], scoring.factor_logits);
    score = reported_score(scoring.factor_mode, score, f);
  }
  scores[slot] = score;
}

using CollectScan = cub::BlockScan<int, kCollectThreads>;

// One block per image: the NMS survivors of its segments, in (class, rank) order,
// compacted into the image's slots as rank keys over the image-local slot index,
// so that the descending sort breaks equal scores by class, then rank, as the CPU
// kernel's stable sort of the class-ordered survivors does.
__global__ void __launch_bounds__(kCollectThreads) collect_survivors_kernel(
    const uint64_t* __restrict__ ranked_keys, const int32_t* __restrict__ counts,
    const uint8_t* __restrict__ keep, int64_t num_classes, int64_t capacity, int anchor_bits,
    int slot_bits, uint64_t* __restrict__ survivor_keys, int32_t* __restrict__ survivor_begin,
    int32_t* __restrict__ survivor_end) {
  __shared__ CollectScan::TempStorage scan;
  const int64_t image = blockIdx.x;
  const int64_t image_slots = num_classes * capacity;
  const int64_t image_first = image * image_slots;
  int64_t written = 0;
  for (int64_t cls = 0; cls < num_classes; ++cls) {
    const int64_t segment = image * num_classes + cls;
    const int n = counts[segment];
    const int64_t segment_first = segment * capacity;
    for (int base = 0; base < n; base += kCollectThreads) {
      const int i = base + static_cast<int>(threadIdx.x);
      const bool kept = i < n && keep[segment_first + i] != 0;
      int position = 0, chunk_total = 0;
      CollectScan(scan).ExclusiveSum(static_cast<int>(kept), position, chunk_total);
      if (kept) {
        const uint32_t score_bits = rank_key_score_bits(ranked_keys[segment_first + i], anchor_bits);
        survivor_keys[image_first + written + position] =
            make_rank_key(score_bits, cls * capacity + i, image_slots, slot_bits);
      }
      written += chunk_total;
      __syncthreads();  // the scan storage is reused by the next chunk
    }
  }
  if (threadIdx.x == 0) {
    survivor_begin[image] = static_cast<int32_t>(image_first);
    survivor_end[image] = static_cast<int32_t>(image_first + written);
  }
}

// One thread per output row (image, r): the r-th best survivor, or zeros (anchor
// -1). The survivor's anchor is read back from its stage-1 rank key (ranked_keys,
// the same slot as its decoded box), which encodes it over num_anchors.
__global__ void __launch_bounds__(kElementwiseThreads) write_detections_kernel(
    const uint64_t* __restrict__ sorted_survivors, const int32_t* __restrict__ survivor_begin,
    const int32_t* __restrict__ survivor_end, int64_t batch, int64_t detections_per_img,
    int64_t num_classes, int64_t capacity, int slot_bits, const uint64_t* __restrict__ ranked_keys,
    int64_t num_anchors, int anchor_bits, const float4* __restrict__ boxes,
    float* __restrict__ out_boxes, float* __restrict__ out_scores,
    int64_t* __restrict__ out_labels, int64_t* __restrict__ out_counts,
    int64_t* __restrict__ out_anchors) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row >= batch * detections_per_img) return;
  const int64_t image = row / detections_per_img;
  const int64_t r = row % detections_per_img;
  const int64_t available =
      static_cast<int64_t>(survivor_end[image]) - static_cast<int64_t>(survivor_begin[image]);
  const int64_t n = min(available, detections_per_img);
  if (r == 0) out_counts[image] = n;
  float4 box = make_float4(0.f, 0.f, 0.f, 0.f);
  float score = 0.f;
  int64_t label = 0;
  int64_t anchor = -1;
  if (r < n) {
    const uint64_t key = sorted_survivors[survivor_begin[image] + r];
    const int64_t image_slots = num_classes * capacity;
    const int64_t local_slot = rank_key_index(key, image_slots, slot_bits);
    const int64_t slot = image * image_slots + local_slot;
    box = boxes[slot];
    score = __uint_as_float(rank_key_score_bits(key, slot_bits));
    label = local_slot / capacity;
    anchor = rank_key_index(ranked_keys[slot], num_anchors, anchor_bits);
  }
  out_boxes[4 * row + 0] = box.x;
  out_boxes[4 * row + 1] = box.y;
  out_boxes[4 * row + 2] = box.z;
  out_boxes[4 * row + 3] = box.w;
  out_scores[row] = score;
  out_labels[row] = label;
  out_anchors[row] = anchor;
}

}  // namespace gpu
}  // namespace ssd_post
