// The CUDA ops of ssd_post run on the CPU: the kernels by emulator.h, the host side
// by csrc/cuda/host_pipeline.h itself (the very code that ops_cuda.cu runs),
// instantiated with a backend of std::vector buffers, emulated launches and
// std::sort in place of CUB's segmented sort. Behind the C API of emulated_ops.h.
// Inputs are float32 and contiguous; the Python side converts.
#include "emulator.h"
#include "emulated_ops.h"

// The kernel headers and the host pipeline, exactly as nvcc compiles them.
#include "host_pipeline.h"

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <exception>
#include <functional>
#include <vector>

using namespace ssd_post;
using namespace ssd_post::gpu;

namespace {

// The backend of host_pipeline.h on the CPU.
struct EmulatorBackend {
  // Filled with 0xCD bytes, so a slot that no kernel wrote stands out.
  template <typename T>
  struct Buffer {
    std::vector<T> items;
    T* data() { return items.data(); }
    const T* data() const { return items.data(); }
  };

  template <typename T>
  Buffer<T> buffer(int64_t n) {
    Buffer<T> out;
    out.items.resize(static_cast<size_t>(n));
    if (!out.items.empty()) {
      std::memset(static_cast<void*>(out.items.data()), 0xCD, out.items.size() * sizeof(T));
    }
    return out;
  }

  template <typename Kernel, typename... Args>
  void launch(unsigned grid, int threads, size_t shared_bytes, Kernel kernel, Args... args) {
    cuda_emulation::launch(grid, threads, shared_bytes, kernel, args...);
  }

  // The keys carry their own tie-break, so any correct sort gives CUB's order.
  void sort_segments_descending(const uint64_t* in, uint64_t* out, int64_t /*items*/,
                                int64_t segments, const int32_t* begin, const int32_t* end,
                                int /*end_bit*/) {
    for (int64_t s = 0; s < segments; ++s) {
      std::copy(in + begin[s], in + end[s], out + begin[s]);
      std::sort(out + begin[s], out + end[s], std::greater<uint64_t>());
    }
  }

  int64_t exclusive_scan(const int32_t* counts, int64_t n, int64_t* first) {
    int64_t total = 0;
    for (int64_t i = 0; i < n; ++i) {
      first[i] = total;
      total += counts[i];
    }
    return total;
  }
};

// The op's parameters as the CUDA ops build them (common/select_params.h).
SelectParams select_params(const EmulatedInputs& p) {
  const Activation activation = p.activation == 0 ? Activation::kSoftmax : Activation::kSigmoid;
  return make_select_params(activation, p.score_thresh, p.topk_candidates, p.A,
                            p.background_class);
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

RankedCandidates<EmulatorBackend> select(EmulatorBackend& backend, const EmulatedInputs& p) {
  return select_ranked<float>(backend, p.logits, p.B, p.A, p.C, select_params(p));
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
    EmulatorBackend backend;
    const auto ranked = select(backend, *inputs);
    flatten_candidates(backend, ranked, decode_params(*inputs), [&](int64_t n) {
      *num_out = n;
      return FlatOutputs{boxes, scores, keys};
    });
  });
}

int emulated_postprocess(const EmulatedInputs* inputs, double nms_thresh,
                         int64_t detections_per_img, float* out_boxes, float* out_scores,
                         int64_t* out_labels, int64_t* out_counts, int64_t* out_anchors) {
  return guarded([&] {
    EmulatorBackend backend;
    const auto ranked = select(backend, *inputs);
    postprocess_ranked(backend, ranked, decode_params(*inputs), nms_thresh,
                       DetectionOutputs{out_boxes, out_scores, out_labels, out_counts,
                                        out_anchors, detections_per_img});
  });
}

int emulated_select_topk(const EmulatedSelectInputs* inputs, int64_t* flat, float* scores,
                         int64_t* counts) {
  return guarded([&] {
    const EmulatedSelectInputs& p = *inputs;
    EmulatorBackend backend;
    // The same builders as select_topk_cuda (ops_cuda.cu), where check_select_inputs
    // makes the level table and the rule.
    const LevelTable levels = make_level_table(p.level_sizes, p.num_levels);
    const ScoreRule rule{static_cast<Activation>(p.activation),
                         static_cast<FactorMode>(p.factor_mode), p.factor_logits != 0,
                         p.single_label != 0, p.per_class != 0};
    const TopkInputs<float> in{p.logits, p.score_factor, p.allowed, p.B, p.A, p.C};
    select_topk_ranked(backend, in, levels, rule, p.score_thresh, p.topk_candidates,
                       p.background_class, TopkOutputs{flat, scores, counts});
  });
}

int emulated_nms_ranked_groups(const float* ranked_boxes, const int64_t* group_begin,
                               const int64_t* group_end, int64_t num_groups, double iou_threshold,
                               int64_t max_kept, uint8_t* keep) {
  return guarded([&] {
    EmulatorBackend backend;
    nms_ranked_groups(backend, ranked_boxes, group_begin, group_end, num_groups, iou_threshold,
                      max_kept, keep);
  });
}

int emulated_batched_nms_padded(const float* boxes, const float* scores, const int64_t* labels,
                                int64_t B, int64_t M, double iou_threshold, int64_t K,
                                int32_t class_agnostic, int64_t* indices, int64_t* counts) {
  return guarded([&] {
    EmulatorBackend backend;
    nms_padded(backend, boxes, scores, labels, B, M, iou_threshold, K, class_agnostic != 0,
               indices, counts);
  });
}

}  // extern "C"
