// Stage 1 kernels: per-row softmax statistics, then one block per (image, class)
// that thresholds its column of the logits and keeps the `capacity` best
// candidates with an exact in-block radix select; select_topk (the single-stage
// family) runs the same select over the segments of its ScoreRule: the anchor x
// class pairs (or, single_label, the anchors) of one (image, level), or one (image,
// class) column. Device code only (see kernel_support.cuh); host_pipeline.h
// launches them and ranks the result.
#pragma once

#include <cstdint>
#include <limits>

#include "../common/score_bounds.h"
#include "../common/select_params.h"
#include "kernel_support.cuh"
#include "../common/rank_keys.h"

namespace ssd_post {
namespace gpu {

constexpr int kRowStatsThreads = 256;  // one warp per row of logits
constexpr int kSelectThreads = 256;
constexpr int kRadixBits = 8;
constexpr int kRadixBins = 1 << kRadixBits;
// The select kernel keeps the 32-bit score key of every anchor of its column in
// shared memory when they fit next to its static scratch under the default
// 48 KiB (SSD300's 8732 and SSDlite's 3234 anchors do); beyond that each pass
// recomputes the keys from the logits, which the L2 cache mostly serves.
constexpr int64_t kMaxCachedAnchors = 10240;

// Row max and 1 / sum(exp(x - max)) of each row of logits [rows, C]. A row with a
// NaN or an infinite max gets a NaN max, which makes every comparison of that row
// fail downstream: torch's softmax turns such a row into NaN, which is never kept.
template <typename scalar_t>
__global__ void __launch_bounds__(kRowStatsThreads)
    softmax_row_stats_kernel(const scalar_t* __restrict__ logits, int64_t rows, int num_classes,
                             float* __restrict__ row_max, float* __restrict__ row_inv_sum) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t row =
      static_cast<int64_t>(blockIdx.x) * (kRowStatsThreads / kWarpSize) + threadIdx.x / kWarpSize;
  // Uniform per warp, so the shuffles below always see all 32 lanes.
  if (row >= rows) return;
  const scalar_t* x = logits + row * num_classes;
  float max_value = -std::numeric_limits<float>::infinity();
  bool has_nan = false;
  for (int c = lane; c < num_classes; c += kWarpSize) {
    const float v = static_cast<float>(x[c]);
    has_nan |= (v != v);
    max_value = v > max_value ? v : max_value;
  }
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    const float other = __shfl_xor_sync(kFullWarp, max_value, offset);
    max_value = other > max_value ? other : max_value;
  }
  has_nan = __any_sync(kFullWarp, has_nan);
  if (has_nan || !isfinite(max_value)) {
    if (lane == 0) {
      row_max[row] = std::numeric_limits<float>::quiet_NaN();
      row_inv_sum[row] = std::numeric_limits<float>::quiet_NaN();
    }
    return;
  }
  float sum = 0.f;
  for (int c = lane; c < num_classes; c += kWarpSize) {
    sum += expf(__fsub_rn(static_cast<float>(x[c]), max_value));
  }
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    sum += __shfl_xor_sync(kFullWarp, sum, offset);
  }
  if (lane == 0) {
    row_max[row] = max_value;
    row_inv_sum[row] = 1.f / sum;
  }
}

// The scoring of select_topk, by value to its kernels (make_topk_scoring in
// host_pipeline.h builds it from the op's ScoreRule).
struct TopkScoring {
  Activation activation;
  FactorMode factor_mode;  // kNone: no factor tensor
  bool factor_logits;      // the factor is a logit (sigmoid_f32 applied)
  bool single_label;       // only each anchor's best class
  bool per_class;          // segments (image, class) over all anchors, else (image, level)
  float score_thresh;
  PairBounds bounds;         // logit bounds that rule a pair out before any exp
  int64_t background_class;  // -1: none
};

// Score key of one (anchor, class) pair of select_topk: the bits of its selection
// score when that is > score_thresh, else 0 (passing scores are > score_thresh >= 0,
// so their keys are nonzero and order like the scores). `shift` and `inv_sum`: the
// anchor's softmax row max and 1 / sum (softmax only); `factor`: its raw factor
// (read only by the factor modes that join it before the threshold).
__device__ __forceinline__ uint32_t topk_pair_key(const TopkScoring& s, float x, float shift,
                                                  float inv_sum, float factor) {
  float p = x;  // "none": the logits are the probabilities
  if (s.activation == Activation::kSoftmax) {
    // The bound saves the exp; a NaN row max (an invalid row) fails it too.
    if (!(__fsub_rn(x, shift) > s.bounds.class_logit.value)) return 0u;
    p = softmax_prob(x, shift, inv_sum);
  } else if (s.activation == Activation::kSigmoid) {
    if (!(x > s.bounds.class_logit.value)) return 0u;  // also drops NaN
    p = sigmoid_f32(x);
  }
  float score = p;
  if (s.factor_mode == FactorMode::kSqrt || s.factor_mode == FactorMode::kBeforeThreshold) {
    // Also drops a NaN factor, whose score would be NaN.
    if (!(factor > s.bounds.factor_logit.value)) return 0u;
    score = selection_score(s.factor_mode, p, factor_probability(factor, s.factor_logits));
  }
  return score > s.score_thresh ? __float_as_uint(score) : 0u;
}

// The rows of logits that a select_topk kernel scores, from some anchor on: the
// logits [n, C], and per anchor the softmax statistics and the factor [n] (nullptr
// when not used).
template <typename scalar_t>
struct TopkRows {
  const scalar_t* logits;
  const float* row_max;      // softmax only
  const float* row_inv_sum;  // softmax only
  const float* factor;       // with a factor tensor
  int64_t num_classes;

  __device__ __forceinline__ uint32_t key(const TopkScoring& s, int64_t anchor,
                                          int64_t cls) const {
    const float x = static_cast<float>(logits[anchor * num_classes + cls]);
    const bool softmax = row_max != nullptr;
    return topk_pair_key(s, x, softmax ? row_max[anchor] : 0.f,
                         softmax ? row_inv_sum[anchor] : 0.f,
                         factor != nullptr ? factor[anchor] : 0.f);
  }
};

// single_label: one warp per anchor (row of logits [rows, C]) finds the best
// eligible column, the highest selection score (equal scores: the lower column)
// among the columns other than the background. Only a passing column can matter:
// when the best column passes, no failing one competes with it, and when it fails,
// none passes. So the best of the passing keys is taken; a row with none, or
// whose best column is not in the allow-list, gets key 0. NaN never passes.
template <typename scalar_t>
__global__ void __launch_bounds__(kRowStatsThreads)
    best_label_kernel(const scalar_t* __restrict__ logits, const float* __restrict__ row_max,
                      const float* __restrict__ row_inv_sum, const float* __restrict__ factor,
                      const uint8_t* __restrict__ allowed, int64_t rows, int num_classes,
                      TopkScoring scoring, uint32_t* __restrict__ best_key,
                      int32_t* __restrict__ best_class) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t row =
      static_cast<int64_t>(blockIdx.x) * (kRowStatsThreads / kWarpSize) + threadIdx.x / kWarpSize;
  // Uniform per warp, so the shuffles below always see all 32 lanes.
  if (row >= rows) return;
  const TopkRows<scalar_t> in{logits + row * num_classes,
                              row_max == nullptr ? nullptr : row_max + row,
                              row_inv_sum == nullptr ? nullptr : row_inv_sum + row,
                              factor == nullptr ? nullptr : factor + row, num_classes};
  uint32_t key = 0u;
  int cls = num_classes;
  // A lane's columns rise, so a strictly greater key is the only one that wins.
  for (int c = lane; c < num_classes; c += kWarpSize) {
    if (c == scoring.background_class) continue;
    const uint32_t k = in.key(scoring, 0, c);
    if (k > key) {
      key = k;
      cls = c;
    }
  }
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    const uint32_t other_key = __shfl_xor_sync(kFullWarp, key, offset);
    const int other_class = __shfl_xor_sync(kFullWarp, cls, offset);
    if (other_key > key || (other_key == key && other_class < cls)) {
      key = other_key;
      cls = other_class;
    }
  }
  if (lane == 0) {
    const bool kept = key != 0u && (allowed == nullptr || allowed[cls] != 0);
    best_key[row] = kept ? key : 0u;
    best_class[row] = kept ? cls : -1;
  }
}

// Score key of item i of one select_topk segment: per level, the level's anchor x
// class pairs i = anchor_in_level * C + class (single_label: its anchors); per
// class, the image's anchors for that column.
template <typename scalar_t>
struct TopkScorer {
  TopkRows<scalar_t> rows;     // from the segment's first anchor
  const uint32_t* best_key;    // single_label: from the first anchor, else nullptr
  const int32_t* best_class;   // single_label: from the first anchor
  const uint8_t* allowed;      // [C], nullptr: every column
  int64_t column;              // per_class: the segment's class; -1: a level
  TopkScoring scoring;

  __device__ __forceinline__ uint32_t key(int64_t item) const {
    if (column >= 0) {  // the segment's own column is foreground and allowed
      if (best_key != nullptr) return best_class[item] == column ? best_key[item] : 0u;
      return rows.key(scoring, item, column);
    }
    if (best_key != nullptr) return best_key[item];
    // 32-bit division (inline; the 64-bit one is a called routine): a level's
    // pairs are below 2^32 (check_select_inputs).
    const int64_t num_classes = rows.num_classes;
    const int64_t anchor = static_cast<uint32_t>(item) / static_cast<uint32_t>(num_classes);
    const int64_t cls = item - anchor * num_classes;
    if (cls == scoring.background_class || (allowed != nullptr && allowed[cls] == 0)) return 0u;
    return rows.key(scoring, anchor, cls);
  }
};

// The SSD postprocess's stage 1 as a select_topk scoring of one (image, class)
// column: the activation's probability alone, pruned by the bound of its
// SelectParams (make_pair_bounds' class bound without a factor).
__device__ __forceinline__ TopkScoring column_scoring(const SelectParams& params) {
  const ScoreBound none{-std::numeric_limits<float>::infinity()};
  return {params.activation, FactorMode::kNone, /*factor_logits=*/false,
          /*single_label=*/false, /*per_class=*/true, params.score_thresh,
          PairBounds{params.bound, none}, params.background_class};
}

using SelectScan = cub::BlockScan<int, kSelectThreads>;

struct SelectShared {
  SelectScan::TempStorage scan;
  int histogram[kRadixBins];
  uint32_t digit;
  int count_above_digit;
};
// The select launch stays within the 48 KiB of shared memory a block gets without
// opting in to more: its static scratch plus the largest key cache.
static_assert(sizeof(SelectShared) + kMaxCachedAnchors * sizeof(uint32_t) <= 48 * 1024,
              "select_candidates_kernel needs more than 48 KiB of shared memory");

// Run by warp 0: the radix digit that holds the `remaining`-th largest key of the
// histogram, and how many keys lie in larger digits. Lane L sums digits
// 255 - 8L down to 248 - 8L, so a prefix sum over the lanes walks the digits from
// the largest.
__device__ __forceinline__ void find_radix_digit(SelectShared& shared, int remaining, int lane) {
  constexpr int kDigitsPerLane = kRadixBins / kWarpSize;
  int counts[kDigitsPerLane];
  int lane_total = 0;
#pragma unroll
  for (int j = 0; j < kDigitsPerLane; ++j) {
    counts[j] = shared.histogram[kRadixBins - 1 - (lane * kDigitsPerLane + j)];
    lane_total += counts[j];
  }
  int inclusive = lane_total;
#pragma unroll
  for (int offset = 1; offset < kWarpSize; offset *= 2) {
    const int before = __shfl_up_sync(kFullWarp, inclusive, offset);
    if (lane >= offset) inclusive += before;
  }
  const int exclusive = inclusive - lane_total;
  // At least `remaining` keys are in the histogram, so exactly one lane matches.
  if (exclusive < remaining && remaining <= inclusive) {
    int above = exclusive;
#pragma unroll
    for (int j = 0; j < kDigitsPerLane; ++j) {
      if (above + counts[j] >= remaining) {
        shared.digit = static_cast<uint32_t>(kRadixBins - 1 - (lane * kDigitsPerLane + j));
        shared.count_above_digit = above;
        break;
      }
      above += counts[j];
    }
  }
}

// The selection of one segment by the whole block: the best `capacity` of its
// `n` items (scorer.key(i), 0 = not passing) written as rank keys over i (with
// `index_count` and `index_bits`, common/rank_keys.h) into `slots`, in item
// order; returns how many (the same value in every thread). With `cache_keys`
// the keys of all n items are kept in dynamic shared memory between passes.
template <class Scorer>
__device__ __forceinline__ int64_t select_segment_keys(SelectShared& shared, const Scorer& scorer,
                                                      int64_t n, int64_t capacity,
                                                      int64_t index_count, int index_bits,
                                                      bool cache_keys, uint64_t* slots) {
  uint32_t* cached_keys = dynamic_shared_memory<uint32_t>();
  const int tid = threadIdx.x;
  // Pass 1: how many items pass, filling the key cache on the way.
  int64_t passing = 0;
  for (int64_t base = 0; base < n; base += kSelectThreads) {
    const int64_t item = base + tid;
    uint32_t key = 0;
    if (item < n) {
      key = scorer.key(item);
      if (cache_keys) cached_keys[item] = key;
    }
    // Also the barrier after which the cache is complete.
    passing += __syncthreads_count(key != 0u);
  }
  auto key_at = [&](int64_t item) -> uint32_t {
    return cache_keys ? cached_keys[item] : scorer.key(item);
  };

  // With more passing items than slots, find the exact key of the capacity-th
  // best (kth_key) and how many items with that key still fit (take_equal),
  // one 8-bit digit at a time from the top. Otherwise every passing key is taken.
  uint32_t kth_key = 0;
  int take_equal = 0;
  if (passing > capacity) {
    uint32_t prefix = 0, prefix_mask = 0;
    int remaining = static_cast<int>(capacity);
    for (int shift = 32 - kRadixBits; shift >= 0; shift -= kRadixBits) {
      for (int i = tid; i < kRadixBins; i += kSelectThreads) shared.histogram[i] = 0;
      __syncthreads();
      for (int64_t item = tid; item < n; item += kSelectThreads) {
        const uint32_t key = key_at(item);
        if (key != 0u && (key & prefix_mask) == prefix) {
          atomicAdd(&shared.histogram[(key >> shift) & (kRadixBins - 1)], 1);
        }
      }
      __syncthreads();
      if (tid < kWarpSize) find_radix_digit(shared, remaining, tid);
      __syncthreads();
      prefix |= shared.digit << shift;
      prefix_mask |= static_cast<uint32_t>(kRadixBins - 1) << shift;
      remaining -= shared.count_above_digit;
    }
    kth_key = prefix;
    take_equal = remaining;
  }

  // Pass 3: write the chosen keys in item order. Among items whose key equals
  // kth_key the lowest items are taken, as the CPU's (score, item) ranking does.
  // One scan counts both kinds: above-kth in the low 16 bits, equal in the high 16.
  int64_t above_seen = 0, equal_seen = 0;
  for (int64_t base = 0; base < n; base += kSelectThreads) {
    const int64_t item = base + tid;
    const uint32_t key = item < n ? key_at(item) : 0u;
    const bool above = key > kth_key;
    const bool equal = key != 0u && key == kth_key;
    int before = 0, chunk_total = 0;
    SelectScan(shared.scan)
        .ExclusiveSum(static_cast<int>(above) | (static_cast<int>(equal) << 16), before,
                      chunk_total);
    const int64_t above_before = above_seen + (before & 0xFFFF);
    const int64_t equal_before = equal_seen + (before >> 16);
    if (above || (equal && equal_before < take_equal)) {
      const int64_t position = above_before + min(equal_before, static_cast<int64_t>(take_equal));
      slots[position] = make_rank_key(key, item, index_count, index_bits);
    }
    above_seen += chunk_total & 0xFFFF;
    equal_seen += chunk_total >> 16;
    __syncthreads();  // the scan storage is reused by the next chunk
  }
  return min(passing, capacity);
}


// One block per segment (image, class). Writes the segment's best `capacity`
// candidates, in anchor order, as rank keys into its slots, and the segment's
// count and slot range for the segmented sort.
template <typename scalar_t>
__global__ void __launch_bounds__(kSelectThreads) select_candidates_kernel(
    const scalar_t* __restrict__ logits, const float* __restrict__ row_max,
    const float* __restrict__ row_inv_sum, int64_t num_anchors, int64_t num_classes,
    SelectParams params, int64_t capacity, int anchor_bits, bool cache_keys,
    uint64_t* __restrict__ slot_keys, int32_t* __restrict__ segment_begin,
    int32_t* __restrict__ segment_end, int32_t* __restrict__ counts) {
  __shared__ SelectShared shared;
  const int64_t segment = blockIdx.x;
  const int64_t image = segment / num_classes;
  const int64_t cls = segment % num_classes;
  const int64_t first_slot = segment * capacity;
  const int64_t A = num_anchors;
  int64_t count = 0;
  if (cls != params.background_class) {
    const bool softmax = params.activation == Activation::kSoftmax;
    const TopkScorer<scalar_t> scorer{
        TopkRows<scalar_t>{logits + image * A * num_classes,
                           softmax ? row_max + image * A : nullptr,
                           softmax ? row_inv_sum + image * A : nullptr, nullptr, num_classes},
        nullptr,
        nullptr,
        nullptr,
        cls,
        column_scoring(params)};
    count = select_segment_keys(shared, scorer, A, capacity, A, anchor_bits, cache_keys,
                                slot_keys + first_slot);
  }
  if (threadIdx.x == 0) {
    counts[segment] = static_cast<int32_t>(count);
    segment_begin[segment] = static_cast<int32_t>(first_slot);
    segment_end[segment] = static_cast<int32_t>(first_slot + count);
  }
}

// select_topk: one block per segment (image, group), group = level, or with
// per_class the class. A level's items are its anchor x class pairs, flattened as
// p = anchor_in_level * C + class (contiguous in the logits; with single_label its
// anchors); a class's items are the image's anchors. Writes the segment's best
// `capacity` items as rank keys over the item (equal scores: lower item first,
// i.e. lower flat index anchor * C + class), and its count and slot range for the
// segmented sort. row_max / row_inv_sum (softmax), factor and best_key /
// best_class (single_label) are [B * A] or nullptr; allowed is [C] or nullptr.
template <typename scalar_t>
__global__ void __launch_bounds__(kSelectThreads) select_topk_candidates_kernel(
    const scalar_t* __restrict__ logits, const float* __restrict__ row_max,
    const float* __restrict__ row_inv_sum, const float* __restrict__ factor,
    const uint32_t* __restrict__ best_key, const int32_t* __restrict__ best_class,
    const uint8_t* __restrict__ allowed, int64_t num_anchors, int64_t num_classes,
    LevelTable levels, TopkScoring scoring, int64_t capacity, int64_t index_count,
    int index_bits, bool cache_keys, uint64_t* __restrict__ slot_keys,
    int32_t* __restrict__ segment_begin, int32_t* __restrict__ segment_end,
    int32_t* __restrict__ counts) {
  __shared__ SelectShared shared;
  const int64_t segment = blockIdx.x;
  const int64_t groups = scoring.per_class ? num_classes : levels.count;
  const int64_t image = segment / groups;
  const int64_t group = segment % groups;
  // per_class has one level, [0, A). Unrolled over the table, so that it is read
  // with constant indices (a dynamic index would copy the parameter struct to
  // local memory).
  const int level = scoring.per_class ? 0 : static_cast<int>(group);
  int64_t first_anchor = 0, end_anchor = 0;
#pragma unroll
  for (int l = 0; l < kMaxLevels; ++l) {
    if (l == level) {
      first_anchor = levels.start[l];
      end_anchor = levels.start[l + 1];
    }
  }
  const int64_t column = scoring.per_class ? group : -1;
  // Uniform per block: a skipped class reaches none of the select's barriers.
  const bool skipped = scoring.per_class && (group == scoring.background_class ||
                                             (allowed != nullptr && allowed[group] == 0));
  const int64_t per_anchor = scoring.per_class || scoring.single_label ? 1 : num_classes;
  const int64_t items = (end_anchor - first_anchor) * per_anchor;
  const int64_t first_slot = segment * capacity;
  const int64_t offset = image * num_anchors + first_anchor;
  const bool softmax = row_max != nullptr;
  const TopkScorer<scalar_t> scorer{
      TopkRows<scalar_t>{logits + offset * num_classes, softmax ? row_max + offset : nullptr,
                         softmax ? row_inv_sum + offset : nullptr,
                         factor != nullptr ? factor + offset : nullptr, num_classes},
      best_key != nullptr ? best_key + offset : nullptr,
      best_key != nullptr ? best_class + offset : nullptr,
      allowed,
      column,
      scoring};
  const int64_t count =
      skipped ? 0
              : select_segment_keys(shared, scorer, items, capacity, index_count, index_bits,
                                    cache_keys, slot_keys + first_slot);
  if (threadIdx.x == 0) {
    counts[segment] = static_cast<int32_t>(count);
    segment_begin[segment] = static_cast<int32_t>(first_slot);
    segment_end[segment] = static_cast<int32_t>(first_slot + count);
  }
}

}  // namespace gpu
}  // namespace ssd_post
