// The host side of the CUDA ops, once: buffer sizing, rank-key bits and the launch
// sequence of every stage, templated on a small backend so that the same code
// drives the real device (cuda_backend.cuh, instantiated in ops_cuda.cu) and the
// CPU emulator of the tests (tests/cuda_emulation/emulated_ops.cpp). Free of ATen.
//
// A Backend provides:
//   template <typename T> Buffer<T> buffer(int64_t n);   // device memory, .data()
//   template <typename Kernel, typename... Args>
//   void launch(unsigned grid, int threads, size_t shared_bytes, Kernel kernel, Args... args);
//   void sort_segments_descending(const uint64_t* in, uint64_t* out, int64_t items,
//                                 int64_t segments, const int32_t* begin,
//                                 const int32_t* end, int end_bit);
//   int64_t exclusive_scan(const int32_t* counts, int64_t n, int64_t* first);
//       // first[i] = sum of counts[0, i); returns the total on the host (this is
//       // the one synchronization, used only by decode_threshold_flatten).
//
// postprocess never calls exclusive_scan: every buffer is sized from the shapes
// (B * C * min(topk_candidates, A) slots), so it runs without a host sync.
#pragma once

#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>

#include "../common/decode_params.h"
#include "../common/rank_keys.h"
#include "../common/select_params.h"
#include "nms_kernels.cuh"
#include "output_kernels.cuh"
#include "select_kernels.cuh"

namespace ssd_post {
namespace gpu {

inline void require(bool ok, const std::string& message) {
  if (!ok) throw std::length_error(message);
}

inline unsigned blocks_for(int64_t items, int threads) {
  const int64_t blocks = (items + threads - 1) / threads;
  require(blocks <= std::numeric_limits<int32_t>::max(),
          "too many elements for one launch: " + std::to_string(items));
  return static_cast<unsigned>(blocks);
}

// Candidates of the B * C segments (segment s = image * C + class). Segment s owns
// the slots [s * capacity, (s + 1) * capacity) of `keys`, of which the first
// counts[s] hold its candidates ranked best first (score descending, anchor
// ascending) as rank keys (common/rank_keys.h) over anchor indices with
// `anchor_bits`.
template <class Backend>
struct RankedCandidates {
  typename Backend::template Buffer<uint64_t> keys;  // [B * C * capacity]
  typename Backend::template Buffer<int32_t> counts;  // [B * C]
  int64_t batch = 0, anchors = 0, classes = 0;
  int64_t capacity = 0;  // min(topk_candidates, A), from SelectParams
  int anchor_bits = 1;

  int64_t segments() const { return batch * classes; }
  int64_t slots() const { return segments() * capacity; }
};

// Stage 1: activation, threshold and per-segment top-k of logits [B, A, C]
// (contiguous, on the backend's device), ranked. The segment offsets are int32
// (CUB's segmented sort), so B * C * min(topk, A) must stay below 2^31; indices
// over B * A * C inside the kernels are int64.
template <typename scalar_t, class Backend>
RankedCandidates<Backend> select_ranked(Backend& backend, const scalar_t* logits, int64_t B,
                                        int64_t A, int64_t C, const SelectParams& params) {
  RankedCandidates<Backend> out;
  out.batch = B;
  out.anchors = A;
  out.classes = C;
  out.capacity = params.topk_candidates;
  out.anchor_bits = index_bits_for(A);
  const int64_t segments = out.segments();
  // slots <= B * C * A = logits.numel(), so the product itself cannot overflow.
  const int64_t slots = out.slots();
  require(slots > 0 && slots <= std::numeric_limits<int32_t>::max(),
          "B * C * min(topk_candidates, A) should be in [1, 2^31), got " + std::to_string(slots));
  out.counts = backend.template buffer<int32_t>(segments);
  out.keys = backend.template buffer<uint64_t>(slots);
  auto unsorted = backend.template buffer<uint64_t>(slots);
  auto segment_begin = backend.template buffer<int32_t>(segments);
  auto segment_end = backend.template buffer<int32_t>(segments);

  const bool softmax = params.activation == Activation::kSoftmax;
  const int64_t rows = softmax ? B * A : 0;
  auto row_max = backend.template buffer<float>(rows);
  auto row_inv_sum = backend.template buffer<float>(rows);
  if (softmax) {
    backend.launch(blocks_for(rows, kRowStatsThreads / kWarpSize), kRowStatsThreads, 0,
                   &softmax_row_stats_kernel<scalar_t>, logits, rows, static_cast<int>(C),
                   row_max.data(), row_inv_sum.data());
  }
  const bool cache_keys = A <= kMaxCachedAnchors;
  const size_t cache_bytes = cache_keys ? static_cast<size_t>(A) * sizeof(uint32_t) : 0;
  require(segments <= std::numeric_limits<int32_t>::max(),
          "B * C should be below 2^31, got " + std::to_string(segments));
  backend.launch(static_cast<unsigned>(segments), kSelectThreads, cache_bytes,
                 &select_candidates_kernel<scalar_t>, logits,
                 softmax ? static_cast<const float*>(row_max.data()) : nullptr,
                 softmax ? static_cast<const float*>(row_inv_sum.data()) : nullptr, A, C, params,
                 out.capacity, out.anchor_bits, cache_keys, unsorted.data(),
                 segment_begin.data(), segment_end.data(), out.counts.data());
  backend.sort_segments_descending(unsorted.data(), out.keys.data(), slots, segments,
                                   segment_begin.data(), segment_end.data(),
                                   kScoreKeyBits + out.anchor_bits);
  return out;
}

// select_topk's scoring for its kernels: the op's ScoreRule with the threshold as
// float32, the logit bounds of common/score_bounds.h and the background column.
inline TopkScoring make_topk_scoring(const ScoreRule& rule, double score_thresh,
                                     int64_t background_class) {
  return {rule.activation,
          rule.factor_mode,
          rule.factor_logits,
          rule.single_label,
          rule.per_class,
          static_cast<float>(score_thresh),
          make_pair_bounds(rule.activation, rule.factor_mode, rule.factor_logits, score_thresh),
          background_class};
}

// The inputs of select_topk on the device: logits [B, A, C] (contiguous), the
// per-anchor factor [B, A] float32 (nullptr without one) and the allow-list as one
// flag per column [C] uint8 (class_allowed_mask; nullptr: every column).
template <typename scalar_t>
struct TopkInputs {
  const scalar_t* logits;
  const float* factor;
  const uint8_t* allowed;
  int64_t batch, anchors, classes;
};

// Pointers to the outputs of select_topk: flat [B, G, k] int64, scores [B, G, k]
// float32 and counts [B, G] int64, G = select_groups(), k = select_capacity().
struct TopkOutputs {
  int64_t* flat;
  float* scores;
  int64_t* counts;
};

// select_topk (RetinaNet, FCOS, ATSS, YOLO, EfficientDet, SSD-like per class): the
// scores of `rule` (activation, factor, single label, allow-list), the threshold,
// and the best `k` items of every (image, group), ranked (selection score
// descending, flat index ascending), written to `out`. Every buffer is sized by
// the shapes; no host sync.
template <typename scalar_t, class Backend>
void select_topk_ranked(Backend& backend, const TopkInputs<scalar_t>& in,
                        const LevelTable& levels, const ScoreRule& rule, double score_thresh,
                        int64_t topk_candidates, int64_t background_class,
                        const TopkOutputs& out) {
  const int64_t B = in.batch, A = in.anchors, C = in.classes;
  const TopkScoring scoring = make_topk_scoring(rule, score_thresh, background_class);
  const int64_t capacity = select_capacity(levels, C, topk_candidates, rule);
  const int64_t segments = B * select_groups(levels, C, rule);
  // Items of the largest segment: the index range of its rank keys.
  const int64_t index_count =
      rule.per_class ? A : largest_level_pairs(levels, rule.single_label ? 1 : C);
  // slots <= B * A * C = logits.numel(), so the product itself cannot overflow.
  const int64_t slots = segments * capacity;
  if (slots == 0) return;
  require(slots <= std::numeric_limits<int32_t>::max(),
          "B * groups * select_capacity() should be below 2^31, got " + std::to_string(slots));
  const int index_bits = index_bits_for(index_count);
  auto counts = backend.template buffer<int32_t>(segments);
  auto unsorted = backend.template buffer<uint64_t>(slots);
  auto sorted = backend.template buffer<uint64_t>(slots);
  auto segment_begin = backend.template buffer<int32_t>(segments);
  auto segment_end = backend.template buffer<int32_t>(segments);

  const int64_t rows = B * A;
  const unsigned row_blocks = blocks_for(rows, kRowStatsThreads / kWarpSize);
  const bool softmax = rule.activation == Activation::kSoftmax;
  auto row_max = backend.template buffer<float>(softmax ? rows : 0);
  auto row_inv_sum = backend.template buffer<float>(softmax ? rows : 0);
  const float* max_ptr = softmax ? static_cast<const float*>(row_max.data()) : nullptr;
  const float* inv_sum_ptr = softmax ? static_cast<const float*>(row_inv_sum.data()) : nullptr;
  if (softmax) {
    backend.launch(row_blocks, kRowStatsThreads, 0, &softmax_row_stats_kernel<scalar_t>,
                   in.logits, rows, static_cast<int>(C), row_max.data(), row_inv_sum.data());
  }
  auto best_key = backend.template buffer<uint32_t>(rule.single_label ? rows : 0);
  auto best_class = backend.template buffer<int32_t>(rule.single_label ? rows : 0);
  const uint32_t* best_key_ptr = rule.single_label ? best_key.data() : nullptr;
  const int32_t* best_class_ptr = rule.single_label ? best_class.data() : nullptr;
  if (rule.single_label) {
    backend.launch(row_blocks, kRowStatsThreads, 0, &best_label_kernel<scalar_t>, in.logits,
                   max_ptr, inv_sum_ptr, in.factor, in.allowed, rows, static_cast<int>(C),
                   scoring, best_key.data(), best_class.data());
  }
  require(segments <= std::numeric_limits<int32_t>::max(),
          "B * groups should be below 2^31, got " + std::to_string(segments));
  const bool cache_keys = index_count <= kMaxCachedAnchors;
  const size_t cache_bytes = cache_keys ? static_cast<size_t>(index_count) * sizeof(uint32_t) : 0;
  backend.launch(static_cast<unsigned>(segments), kSelectThreads, cache_bytes,
                 &select_topk_candidates_kernel<scalar_t>, in.logits, max_ptr, inv_sum_ptr,
                 in.factor, best_key_ptr, best_class_ptr, in.allowed, A, C, levels, scoring,
                 capacity, index_count, index_bits, cache_keys, unsorted.data(),
                 segment_begin.data(), segment_end.data(), counts.data());
  backend.sort_segments_descending(unsorted.data(), sorted.data(), slots, segments,
                                   segment_begin.data(), segment_end.data(),
                                   kScoreKeyBits + index_bits);
  backend.launch(blocks_for(slots, kElementwiseThreads), kElementwiseThreads, 0,
                 &emit_topk_candidates_kernel, static_cast<const uint64_t*>(sorted.data()),
                 static_cast<const int32_t*>(counts.data()), slots, capacity, levels, A, C,
                 scoring, best_class_ptr, in.factor, index_count, index_bits, out.flat,
                 out.scores, out.counts);
}

// Pointers to the outputs of decode_threshold_flatten, [N, 4], [N], [N].
struct FlatOutputs {
  float* boxes;
  float* scores;
  int64_t* keys;
};

// decode_threshold_flatten after stage 1: counts the candidates (the one host
// sync), lets `allocate(N)` make the outputs and fills them, grouped by segment.
template <class Backend, class Allocate>
void flatten_candidates(Backend& backend, const RankedCandidates<Backend>& ranked,
                        const DecodeParams& decode, Allocate&& allocate) {
  auto first_output = backend.template buffer<int64_t>(ranked.segments());
  const int64_t total = backend.exclusive_scan(ranked.counts.data(), ranked.segments(),
                                               first_output.data());
  const FlatOutputs out = allocate(total);
  if (total == 0) return;
  backend.launch(blocks_for(ranked.slots(), kElementwiseThreads), kElementwiseThreads, 0,
                 &emit_candidates_kernel, ranked.keys.data(), ranked.counts.data(),
                 first_output.data(), ranked.slots(), ranked.capacity, ranked.classes,
                 ranked.anchor_bits, decode, out.boxes, out.scores, out.keys);
}

// Pointers to the outputs of postprocess, [B, K, 4], [B, K], [B, K], [B], [B, K].
struct DetectionOutputs {
  float* boxes;
  float* scores;
  int64_t* labels;
  int64_t* counts;
  int64_t* anchor_indices;     // the anchor row of each detection, -1 in padding rows
  int64_t detections_per_img;  // K >= 1, already padded_detections()
};

// postprocess after stage 1: decode + NMS per segment, the survivors of each image
// ranked, the best K written. No host synchronization.
template <class Backend>
void postprocess_ranked(Backend& backend, const RankedCandidates<Backend>& ranked,
                        const DecodeParams& decode, double nms_thresh,
                        const DetectionOutputs& out) {
  const int64_t B = ranked.batch, C = ranked.classes, slots = ranked.slots();
  auto boxes = backend.template buffer<float4>(slots);
  auto keep = backend.template buffer<uint8_t>(slots);
  backend.launch(static_cast<unsigned>(ranked.segments()), kNmsThreads, 0,
                 &decode_and_nms_segments_kernel, ranked.keys.data(), ranked.counts.data(),
                 ranked.capacity, C, ranked.anchor_bits, decode, nms_thresh, boxes.data(),
                 keep.data());

  const int slot_bits = index_bits_for(C * ranked.capacity);
  auto survivor_keys = backend.template buffer<uint64_t>(slots);
  auto sorted_survivors = backend.template buffer<uint64_t>(slots);
  auto survivor_begin = backend.template buffer<int32_t>(B);
  auto survivor_end = backend.template buffer<int32_t>(B);
  backend.launch(static_cast<unsigned>(B), kCollectThreads, 0, &collect_survivors_kernel,
                 ranked.keys.data(), ranked.counts.data(), keep.data(), C, ranked.capacity,
                 ranked.anchor_bits, slot_bits, survivor_keys.data(), survivor_begin.data(),
                 survivor_end.data());
  backend.sort_segments_descending(survivor_keys.data(), sorted_survivors.data(), slots, B,
                                   survivor_begin.data(), survivor_end.data(),
                                   kScoreKeyBits + slot_bits);
  const int64_t K = out.detections_per_img;
  backend.launch(blocks_for(B * K, kElementwiseThreads), kElementwiseThreads, 0,
                 &write_detections_kernel, sorted_survivors.data(), survivor_begin.data(),
                 survivor_end.data(), B, K, C, ranked.capacity, slot_bits, ranked.keys.data(),
                 ranked.anchors, ranked.anchor_bits, static_cast<const float4*>(boxes.data()),
                 out.boxes, out.scores, out.labels, out.counts, out.anchor_indices);
}

// The NMS of batched_nms: ranked_boxes [N, 4] grouped into runs
// [group_begin[g], group_end[g]), each in rank order; keep[i] = 1 for survivors,
// at most the first max_kept of each run when max_kept >= 0.
template <class Backend>
void nms_ranked_groups(Backend& backend, const float* ranked_boxes, const int64_t* group_begin,
                       const int64_t* group_end, int64_t num_groups, double iou_threshold,
                       int64_t max_kept, uint8_t* keep) {
  if (num_groups == 0) return;
  require(num_groups <= std::numeric_limits<int32_t>::max(),
          "too many NMS groups: " + std::to_string(num_groups));
  backend.launch(static_cast<unsigned>(num_groups), kNmsThreads, 0, &nms_ranked_groups_kernel,
                 reinterpret_cast<const float4*>(ranked_boxes), group_begin, group_end,
                 iou_threshold, max_kept, keep);
}

// batched_nms_padded on boxes [B, M, 4], scores [B, M] (float32) and labels [B, M]
// (int64, negative: an empty slot), B, M > 0: each image's slots ranked by one
// segmented sort of rank keys, then one block per image gathers them in rank order
// and runs the greedy scan of the other NMS ops (labels kept apart unless
// class_agnostic) until K survive, writing indices [B, K] and counts [B]. Every
// buffer is sized by B * M: no host synchronization.
template <class Backend>
void nms_padded(Backend& backend, const float* boxes, const float* scores, const int64_t* labels,
                int64_t B, int64_t M, double iou_threshold, int64_t K, bool class_agnostic,
                int64_t* indices, int64_t* counts) {
  const int64_t slots = B * M;
  require(slots > 0 && slots < std::numeric_limits<int32_t>::max(),
          "B * M should be in [1, 2^31 - 1), got " + std::to_string(slots));
  require(B <= std::numeric_limits<int32_t>::max(),
          "B should be below 2^31, got " + std::to_string(B));
  const int index_bits = index_bits_for(M);
  auto unsorted = backend.template buffer<uint64_t>(slots);
  auto sorted = backend.template buffer<uint64_t>(slots);
  auto segment_begin = backend.template buffer<int32_t>(B);
  auto segment_end = backend.template buffer<int32_t>(B);
  backend.launch(blocks_for(slots, kPaddedKeyThreads), kPaddedKeyThreads, 0,
                 &padded_rank_keys_kernel, scores, labels, B, M, index_bits, unsorted.data(),
                 segment_begin.data(), segment_end.data());
  backend.sort_segments_descending(unsorted.data(), sorted.data(), slots, B,
                                   segment_begin.data(), segment_end.data(),
                                   kOrderedScoreBits + index_bits);
  auto ranked_boxes = backend.template buffer<float4>(slots);
  auto ranked_labels = backend.template buffer<int64_t>(slots);
  auto keep = backend.template buffer<uint8_t>(slots);
  backend.launch(static_cast<unsigned>(B), kNmsThreads, 0, &nms_padded_kernel,
                 static_cast<const uint64_t*>(sorted.data()), boxes, labels, M, index_bits,
                 iou_threshold, K, class_agnostic, ranked_boxes.data(), ranked_labels.data(),
                 keep.data(), indices, counts);
}

}  // namespace gpu
}  // namespace ssd_post
