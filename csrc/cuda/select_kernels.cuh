// Stage 1 kernels: per-row softmax statistics, then one block per (image, class)
// that thresholds its column of the logits and keeps the `capacity` best
// candidates with an exact in-block radix select; the per-level variant (RetinaNet,
// FCOS) runs the same select over the anchor x class pairs of one (image, level). Device code only (see
// kernel_support.cuh); select.cu launches them and ranks the result.
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

// Score key of one (anchor, class) of a column: the bits of the probability when
// it passes the threshold, else 0. Passing probabilities are > score_thresh >= 0,
// so their keys are nonzero and order like the probabilities.
template <typename scalar_t>
struct ColumnScorer {
  const scalar_t* column;    // &logits[image, 0, class]
  int64_t stride;            // C
  const float* row_max;      // [A] of this image (softmax only)
  const float* row_inv_sum;  // [A] of this image (softmax only)
  bool softmax;
  float score_thresh;
  float bound;

  __device__ __forceinline__ uint32_t key(int64_t anchor) const {
    const float x = static_cast<float>(column[anchor * stride]);
    float prob;
    if (softmax) {
      const float shift = row_max[anchor];
      // The pruning bound saves the exp; a NaN max (invalid row) fails it too.
      if (!(__fsub_rn(x, shift) > bound)) return 0u;
      prob = softmax_prob(x, shift, row_inv_sum[anchor]);
    } else {
      if (!(x > bound)) return 0u;  // also drops NaN
      prob = sigmoid_f32(x);
    }
    return prob > score_thresh ? __float_as_uint(prob) : 0u;
  }
};

// Score key of one anchor x class pair of a feature level (per-level selection):
// sigmoid, or FCOS's sqrt(sigmoid(x) * sigmoid(centerness)), in torch's op order;
// the background column (if any) never passes. `bound` prunes by logit: a class
// or centerness logit at or below it cannot give a passing score.
template <typename scalar_t>
struct PairScorer {
  const scalar_t* logits;      // &logits[image, first anchor of the level, 0]
  const float* centerness;     // &centerness[image, first anchor of the level], or nullptr
  int64_t num_classes;
  int64_t background_class;  // -1: none
  float score_thresh;
  float bound;

  __device__ __forceinline__ uint32_t key(int64_t pair) const {
    // 32-bit division (inline; the 64-bit one is a called routine): a level's
    // pairs are below 2^32 (check_level_inputs).
    const int64_t anchor =
        static_cast<uint32_t>(pair) / static_cast<uint32_t>(num_classes);
    if (pair - anchor * num_classes == background_class) return 0u;
    const float x = static_cast<float>(logits[pair]);
    if (!(x > bound)) return 0u;  // also drops NaN
    float prob = sigmoid_f32(x);
    if (centerness != nullptr) {
      const float c = centerness[anchor];
      if (!(c > bound)) return 0u;
      prob = centerness_score(prob, sigmoid_f32(c));
    }
    return prob > score_thresh ? __float_as_uint(prob) : 0u;
  }
};

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
    const ColumnScorer<scalar_t> scorer{logits + image * A * num_classes + cls,
                                        num_classes,
                                        softmax ? row_max + image * A : nullptr,
                                        softmax ? row_inv_sum + image * A : nullptr,
                                        softmax,
                                        params.score_thresh,
                                        params.bound.value};
    count = select_segment_keys(shared, scorer, A, capacity, A, anchor_bits, cache_keys,
                                slot_keys + first_slot);
  }
  if (threadIdx.x == 0) {
    counts[segment] = static_cast<int32_t>(count);
    segment_begin[segment] = static_cast<int32_t>(first_slot);
    segment_end[segment] = static_cast<int32_t>(first_slot + count);
  }
}

// Per-level selection (RetinaNet, FCOS): one block per segment (image, level) over
// the level's anchor x class pairs, flattened as p = anchor_in_level * C + class
// (contiguous in the logits). Writes the segment's best `capacity` pairs as rank
// keys over p (equal scores: lower p first, as torchvision's flattened top-k).
template <typename scalar_t>
__global__ void __launch_bounds__(kSelectThreads) select_level_candidates_kernel(
    const scalar_t* __restrict__ logits, const float* __restrict__ centerness,
    int64_t num_anchors, int64_t num_classes, LevelTable levels, SelectParams params,
    int64_t capacity, int64_t index_count, int index_bits, uint64_t* __restrict__ slot_keys,
    int32_t* __restrict__ segment_begin, int32_t* __restrict__ segment_end,
    int32_t* __restrict__ counts) {
  __shared__ SelectShared shared;
  const int64_t segment = blockIdx.x;
  const int64_t image = segment / levels.count;
  const int level = static_cast<int>(segment % levels.count);
  // Unrolled over the table, so that it is read with constant indices (a dynamic
  // index would copy the parameter struct to local memory).
  int64_t first_anchor = 0, end_anchor = 0;
#pragma unroll
  for (int l = 0; l < kMaxLevels; ++l) {
    if (l == level) {
      first_anchor = levels.start[l];
      end_anchor = levels.start[l + 1];
    }
  }
  const int64_t pairs = (end_anchor - first_anchor) * num_classes;
  const int64_t first_slot = segment * capacity;
  const int64_t anchor_offset = image * num_anchors + first_anchor;
  const PairScorer<scalar_t> scorer{logits + anchor_offset * num_classes,
                                    centerness == nullptr ? nullptr : centerness + anchor_offset,
                                    num_classes,
                                    params.background_class,
                                    params.score_thresh,
                                    params.bound.value};
  const int64_t count = select_segment_keys(shared, scorer, pairs, capacity, index_count,
                                            index_bits, /*cache_keys=*/false,
                                            slot_keys + first_slot);
  if (threadIdx.x == 0) {
    counts[segment] = static_cast<int32_t>(count);
    segment_begin[segment] = static_cast<int32_t>(first_slot);
    segment_end[segment] = static_cast<int32_t>(first_slot + count);
  }
}

}  // namespace gpu
}  // namespace ssd_post
