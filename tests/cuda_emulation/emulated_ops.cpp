// The CUDA kernels of ssd_post, run on the CPU by emulator.h, behind the C API of
// emulated_ops.h. The host side here follows
// csrc/cuda/{select.cu, nms.cu, ops_cuda.cu} launch for launch, with std::vector
// in place of device tensors and std::sort in place of CUB's segmented sort.
// Inputs are float32 and contiguous; the Python side converts.
#include "emulator.h"
#include "emulated_ops.h"

// The kernel headers, exactly as nvcc compiles them.
#include "nms_kernels.cuh"
#include "output_kernels.cuh"
#include "select_kernels.cuh"

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <functional>
#include <vector>

using cuda_emulation::launch;
using namespace ssd_post;
using namespace ssd_post::gpu;

namespace {

unsigned blocks_for(int64_t items, int threads) {
  return static_cast<unsigned>((items + threads - 1) / threads);
}

// Sorts each [begin[s], end[s]) of keys_in into keys_out, largest first, as
// sort_segments_descending does (the keys carry their own tie-break).
void sort_segments_descending(const std::vector<uint64_t>& keys_in, std::vector<uint64_t>& keys_out,
                              const std::vector<int32_t>& begin, const std::vector<int32_t>& end) {
  for (size_t s = 0; s < begin.size(); ++s) {
    std::copy(keys_in.begin() + begin[s], keys_in.begin() + end[s], keys_out.begin() + begin[s]);
    std::sort(keys_out.begin() + begin[s], keys_out.begin() + end[s], std::greater<uint64_t>());
  }
}

DecodeParams decode_params(const EmulatedInputs& p) {
  return DecodeParams{p.locs,
                      p.anchors,
                      p.image_sizes,
                      p.A,
                      p.per_image_anchors != 0,
                      p.clip != 0,
                      BoxWeights{static_cast<float>(p.box_weights[0]),
                                 static_cast<float>(p.box_weights[1]),
                                 static_cast<float>(p.box_weights[2]),
                                 static_cast<float>(p.box_weights[3])}};
}

// select_ranked_candidates of select.cu.
struct Ranked {
  std::vector<uint64_t> keys;
  std::vector<int32_t> counts;
  int64_t capacity;
  int anchor_bits;
  int64_t slots;  // B * C * capacity
};

Ranked select_ranked(const EmulatedInputs& p) {
  const Activation activation = p.activation == 0 ? Activation::kSoftmax : Activation::kSigmoid;
  const SelectParams params{activation, static_cast<float>(p.score_thresh),
                            make_score_bound(activation, p.score_thresh).value,
                            p.background_class};
  Ranked out;
  out.capacity = std::min(p.topk_candidates, p.A);
  out.anchor_bits = index_bits_for(p.A);
  const int64_t segments = p.B * p.C, slots = segments * out.capacity;
  std::vector<float> row_max(p.B * p.A), row_inv_sum(p.B * p.A);
  if (activation == Activation::kSoftmax) {
    const int rows_per_block = kRowStatsThreads / kWarpSize;
    launch(blocks_for(p.B * p.A, rows_per_block), kRowStatsThreads, 0,
           &softmax_row_stats_kernel<float>, p.logits, p.B * p.A, static_cast<int>(p.C),
           row_max.data(), row_inv_sum.data());
  }
  const bool cache_keys = p.A <= kMaxCachedAnchors;
  std::vector<uint64_t> unsorted(slots, ~uint64_t{0});  // poison: unwritten slots stand out
  std::vector<int32_t> begin(segments), end(segments);
  out.counts.assign(segments, -1);
  launch(static_cast<unsigned>(segments), kSelectThreads,
         cache_keys ? static_cast<size_t>(p.A) * sizeof(uint32_t) : 0,
         &select_candidates_kernel<float>, p.logits,
         activation == Activation::kSoftmax ? row_max.data() : nullptr,
         activation == Activation::kSoftmax ? row_inv_sum.data() : nullptr, p.A, p.C, params,
         out.capacity, out.anchor_bits, cache_keys, unsorted.data(), begin.data(), end.data(),
         out.counts.data());
  out.keys.assign(slots, ~uint64_t{0});
  out.slots = slots;
  sort_segments_descending(unsorted, out.keys, begin, end);
  return out;
}

template <typename F>
int guarded(F&& body) {
  try {
    body();
    return 0;
  } catch (const std::exception& error) {
    std::fprintf(stderr, "emulated CUDA op: %s\n", error.what());
    return 1;
  }
}

}  // namespace

extern "C" {

int emulated_decode_threshold_flatten(const EmulatedInputs* inputs, float* boxes, float* scores,
                                      int64_t* keys, int64_t* num_out) {
  return guarded([&] {
    const Ranked ranked = select_ranked(*inputs);
    std::vector<int64_t> first_output(ranked.counts.size());
    int64_t n = 0;
    for (size_t s = 0; s < first_output.size(); ++s) {
      first_output[s] = n;
      n += ranked.counts[s];
    }
    *num_out = n;
    if (n > 0) {
      launch(blocks_for(ranked.slots, kElementwiseThreads), kElementwiseThreads, 0,
             &emit_candidates_kernel, ranked.keys.data(), ranked.counts.data(),
             first_output.data(), ranked.slots, ranked.capacity, inputs->C, ranked.anchor_bits,
             decode_params(*inputs), boxes, scores, keys);
    }
  });
}

int emulated_postprocess(const EmulatedInputs* inputs, double nms_thresh,
                         int64_t detections_per_img, float* out_boxes, float* out_scores,
                         int64_t* out_labels, int64_t* out_counts) {
  return guarded([&] {
    const int64_t B = inputs->B, C = inputs->C;
    const Ranked ranked = select_ranked(*inputs);
    const int64_t slots = ranked.slots;
    std::vector<float4> boxes(slots);
    std::vector<uint8_t> keep(slots, 0xCD);
    launch(static_cast<unsigned>(B * C), kNmsThreads, 0, &decode_and_nms_segments_kernel,
           ranked.keys.data(), ranked.counts.data(), ranked.capacity, C, ranked.anchor_bits,
           decode_params(*inputs), nms_thresh, boxes.data(), keep.data());

    const int64_t image_slots = C * ranked.capacity;
    const int slot_bits = index_bits_for(image_slots);
    std::vector<uint64_t> survivors(slots, ~uint64_t{0}), sorted(slots, ~uint64_t{0});
    std::vector<int32_t> begin(B), end(B);
    launch(static_cast<unsigned>(B), kCollectThreads, 0, &collect_survivors_kernel,
           ranked.keys.data(), ranked.counts.data(), keep.data(), C, ranked.capacity,
           ranked.anchor_bits, slot_bits, survivors.data(), begin.data(), end.data());
    sort_segments_descending(survivors, sorted, begin, end);
    launch(blocks_for(B * detections_per_img, kElementwiseThreads), kElementwiseThreads, 0,
           &write_detections_kernel, sorted.data(), begin.data(), end.data(), B,
           detections_per_img, C, ranked.capacity, slot_bits, boxes.data(), out_boxes, out_scores,
           out_labels, out_counts);
  });
}

int emulated_nms_ranked_groups(const float* ranked_boxes, const int64_t* group_begin,
                               const int64_t* group_end, int64_t num_groups, double iou_threshold,
                               uint8_t* keep) {
  return guarded([&] {
    launch(static_cast<unsigned>(num_groups), kNmsThreads, 0, &nms_ranked_groups_kernel,
           reinterpret_cast<const float4*>(ranked_boxes), group_begin, group_end, iou_threshold,
           keep);
  });
}

}  // extern "C"
