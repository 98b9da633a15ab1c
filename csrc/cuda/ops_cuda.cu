// CUDA kernels of the ssd_post ops.
//
// The host side of postprocess and decode_threshold_flatten is host_pipeline.h,
// shared with the CUDA emulator of the tests; this file builds its inputs (with
// csrc/common, as the CPU kernels do) and its outputs. postprocess runs entirely
// on the device with fixed-size buffers: every stage writes into slots sized from
// the input shapes (B * C * min(topk_candidates, A)), and counts stay on the
// device, so there is no host synchronization and the whole op can be captured in
// a CUDA graph (with image_sizes on the device: CPU image sizes are copied over).
// decode_threshold_flatten and batched_nms return data-dependent sizes and
// synchronize for them (batched_nms's optional max_kept changes which rows it
// keeps, not that); batched_nms_padded, select_per_level and postprocess do not.
//
// Scores are exp(x - max) * (1 / sum) in float32 with the device's expf and the
// device's summation order, so they may differ from the CPU kernel (which uses
// torch's CPU softmax) by a few ULPs; boxes may differ by ULPs through expf.
// Ranking, tie-breaking and NMS follow the CPU kernels exactly.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <string>
#include <tuple>
#include <vector>

#include "../common/best_class.h"
#include "../common/checks.h"
#include "../common/op_inputs.h"
#include "cuda_backend.cuh"
#include "host_pipeline.h"

namespace ssd_post {
namespace gpu {
namespace {

// Stage 1 on logits of any admitted dtype (only the three that the checks admit,
// to keep the number of kernels small).
RankedCandidates<CudaBackend> select_ranked_any(CudaBackend& backend, const at::Tensor& logits_in,
                                                const SelectParams& params) {
  const at::Tensor logits = logits_in.contiguous();
  const int64_t B = logits.size(0), A = logits.size(1), C = logits.size(2);
  switch (logits.scalar_type()) {
    case at::kFloat:
      return select_ranked(backend, logits.data_ptr<float>(), B, A, C, params);
    case at::kHalf:
      return select_ranked(backend, logits.data_ptr<at::Half>(), B, A, C, params);
    case at::kBFloat16:
      return select_ranked(backend, logits.data_ptr<at::BFloat16>(), B, A, C, params);
    default:
      TORCH_CHECK(false, "logits should be float32, float16 or bfloat16, got ",
                  logits.scalar_type());
  }
}

// Whether stage 1 has any slot: B * C * min(topk, A) > 0.
bool has_slots(const BatchDims& dims) {
  return dims.batch > 0 && dims.anchors > 0 && dims.classes > 0;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> decode_threshold_flatten_cuda(
    const at::Tensor& locs, const at::Tensor& logits, const at::Tensor& anchors,
    const at::Tensor& image_sizes, double score_thresh, int64_t topk_candidates,
    at::ArrayRef<double> box_weights, c10::string_view score_activation,
    c10::optional<int64_t> background_class, bool clip_boxes) {
  const BatchDims dims = check_decode_inputs(locs, logits, anchors, image_sizes, score_thresh,
                                             topk_candidates, box_weights, background_class);
  const SelectParams params = make_select_params(dims, score_thresh, topk_candidates,
                                                 std::string(score_activation), background_class);
  const c10::cuda::CUDAGuard device_guard(locs.device());
  const at::TensorOptions float_options = locs.options().dtype(at::kFloat);
  at::Tensor boxes = at::empty({0, 4}, float_options);
  at::Tensor scores = at::empty({0}, float_options);
  at::Tensor keys = at::empty({0}, locs.options().dtype(at::kLong));
  if (!has_slots(dims)) return {boxes, scores, keys};
  const DecodeInputs in = make_decode_inputs(locs, anchors, image_sizes, box_weights, clip_boxes);
  CudaBackend backend(locs.device());
  const auto ranked = select_ranked_any(backend, logits, params);
  flatten_candidates(backend, ranked, in.params, [&](int64_t n) {
    boxes = at::empty({n, 4}, float_options);
    scores = at::empty({n}, float_options);
    keys = at::empty({n}, locs.options().dtype(at::kLong));
    return FlatOutputs{boxes.data_ptr<float>(), scores.data_ptr<float>(),
                       keys.data_ptr<int64_t>()};
  });
  return {boxes, scores, keys};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> postprocess_cuda(
    const at::Tensor& locs, const at::Tensor& logits, const at::Tensor& anchors,
    const at::Tensor& image_sizes, double score_thresh, double nms_thresh,
    int64_t topk_candidates, int64_t detections_per_img, at::ArrayRef<double> box_weights,
    c10::string_view score_activation, c10::optional<int64_t> background_class,
    bool clip_boxes) {
  const BatchDims dims = check_decode_inputs(locs, logits, anchors, image_sizes, score_thresh,
                                             topk_candidates, box_weights, background_class);
  check_postprocess_scalars(nms_thresh, detections_per_img);
  const SelectParams params = make_select_params(dims, score_thresh, topk_candidates,
                                                 std::string(score_activation), background_class);
  const c10::cuda::CUDAGuard device_guard(locs.device());
  const int64_t B = dims.batch;
  const int64_t K = padded_detections(detections_per_img, params.topk_candidates, dims.anchors,
                                      dims.classes, params.background_class);
  const at::TensorOptions float_options = locs.options().dtype(at::kFloat);
  const at::TensorOptions long_options = locs.options().dtype(at::kLong);
  if (!has_slots(dims) || K == 0) {
    return {at::zeros({B, K, 4}, float_options), at::zeros({B, K}, float_options),
            at::zeros({B, K}, long_options), at::zeros({B}, long_options),
            at::full({B, K}, -1, long_options)};
  }
  const DecodeInputs in = make_decode_inputs(locs, anchors, image_sizes, box_weights, clip_boxes);
  CudaBackend backend(locs.device());
  const auto ranked = select_ranked_any(backend, logits, params);
  at::Tensor out_boxes = at::empty({B, K, 4}, float_options);
  at::Tensor out_scores = at::empty({B, K}, float_options);
  at::Tensor out_labels = at::empty({B, K}, long_options);
  at::Tensor out_counts = at::empty({B}, long_options);
  at::Tensor out_anchors = at::empty({B, K}, long_options);
  postprocess_ranked(backend, ranked, in.params, nms_thresh,
                     DetectionOutputs{out_boxes.data_ptr<float>(), out_scores.data_ptr<float>(),
                                      out_labels.data_ptr<int64_t>(),
                                      out_counts.data_ptr<int64_t>(),
                                      out_anchors.data_ptr<int64_t>(), K});
  return {out_boxes, out_scores, out_labels, out_counts, out_anchors};
}

template <typename scalar_t>
void select_topk_typed(CudaBackend& backend, const at::Tensor& logits, const float* factor,
                       const uint8_t* allowed, const LevelTable& levels, const ScoreRule& rule,
                       double score_thresh, int64_t topk_candidates, int64_t background_class,
                       const TopkOutputs& out) {
  const TopkInputs<scalar_t> in{logits.data_ptr<scalar_t>(), factor, allowed,
                                logits.size(0), logits.size(1), logits.size(2)};
  select_topk_ranked(backend, in, levels, rule, score_thresh, topk_candidates, background_class,
                     out);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> select_topk_cuda(
    const at::Tensor& logits_in, const c10::optional<at::Tensor>& score_factor,
    at::IntArrayRef level_sizes, double score_thresh, int64_t topk_candidates,
    c10::optional<int64_t> background_class, c10::string_view score_activation,
    c10::string_view factor_mode, bool factor_logits, bool single_label,
    c10::OptionalIntArrayRef classes, bool per_class) {
  LevelTable levels;
  ScoreRule rule;
  const BatchDims dims = check_select_inputs(
      logits_in, score_factor, level_sizes, score_thresh, topk_candidates, background_class,
      std::string(score_activation), std::string(factor_mode), factor_logits, single_label,
      classes, per_class, &levels, &rule);
  const c10::cuda::CUDAGuard device_guard(logits_in.device());
  const int64_t B = dims.batch, A = dims.anchors, C = dims.classes;
  const at::Tensor logits = logits_in.contiguous();
  at::Tensor factor;
  if (score_factor.has_value()) {
    // float32, as the CPU path computes with it (B x A values: a small copy).
    factor = score_factor->to(at::kFloat).reshape({B, A}).contiguous();
  }
  at::Tensor allowed;
  if (classes.has_value()) {
    const std::vector<uint8_t> mask = class_allowed_mask(classes, C);
    at::Tensor host = at::empty({C}, at::TensorOptions().dtype(at::kByte));
    std::copy(mask.begin(), mask.end(), host.data_ptr<uint8_t>());
    // non_blocking: from pageable memory the copy is staged before it returns, so
    // the host tensor may go, and no stream synchronization is needed.
    allowed = host.to(logits.device(), at::kByte, /*non_blocking=*/true);
  }
  const int64_t groups = select_groups(levels, C, rule);
  const int64_t capacity = select_capacity(levels, C, topk_candidates, rule);
  const at::TensorOptions options = logits.options();
  at::Tensor flat = at::empty({B, groups, capacity}, options.dtype(at::kLong));
  at::Tensor scores = at::empty({B, groups, capacity}, options.dtype(at::kFloat));
  at::Tensor counts = at::zeros({B, groups}, options.dtype(at::kLong));
  if (flat.numel() == 0) return {flat, scores, counts};
  CudaBackend backend(logits.device());
  const float* factor_ptr = factor.defined() ? factor.data_ptr<float>() : nullptr;
  const uint8_t* allowed_ptr = allowed.defined() ? allowed.data_ptr<uint8_t>() : nullptr;
  const TopkOutputs out{flat.data_ptr<int64_t>(), scores.data_ptr<float>(),
                        counts.data_ptr<int64_t>()};
  const int64_t background = background_class.value_or(-1);
  switch (logits.scalar_type()) {
    case at::kFloat:
      select_topk_typed<float>(backend, logits, factor_ptr, allowed_ptr, levels, rule,
                               score_thresh, topk_candidates, background, out);
      break;
    case at::kHalf:
      select_topk_typed<at::Half>(backend, logits, factor_ptr, allowed_ptr, levels, rule,
                                  score_thresh, topk_candidates, background, out);
      break;
    case at::kBFloat16:
      select_topk_typed<at::BFloat16>(backend, logits, factor_ptr, allowed_ptr, levels, rule,
                                      score_thresh, topk_candidates, background, out);
      break;
    default:
      TORCH_CHECK(false, "logits should be float32, float16 or bfloat16, got ",
                  logits.scalar_type());
  }
  return {flat, scores, counts};
}

// `candidates` (indices into the scores) reordered by rank: NaN first, then score
// descending; two stable sorts keep equal scores in the incoming order.
at::Tensor order_by_score(const at::Tensor& candidates, const at::Tensor& rank_scores,
                          const at::Tensor& is_nan) {
  const at::Tensor by_score = std::get<1>(
      at::sort(rank_scores.index_select(0, candidates), /*stable=*/true, /*dim=*/0,
               /*descending=*/true));
  const at::Tensor ordered = candidates.index_select(0, by_score);
  const at::Tensor nan_first = std::get<1>(
      at::sort(is_nan.index_select(0, ordered), /*stable=*/true, /*dim=*/0, /*descending=*/true));
  return ordered.index_select(0, nan_first);
}

// `ranked` (kept indices in output order) without the survivors of each image past
// its first max_kept; image = floor(idx / keys_per_image).
at::Tensor first_per_image(const at::Tensor& ranked, const at::Tensor& idxs, int64_t max_kept,
                           int64_t keys_per_image) {
  const int64_t M = ranked.numel();
  if (M == 0) return ranked;
  const at::Tensor images = at::div(idxs.index_select(0, ranked), keys_per_image, "floor");
  // Stable: each image's survivors stay in output order.
  const at::Tensor by_image =
      std::get<1>(at::sort(images, /*stable=*/true, /*dim=*/0, /*descending=*/false));
  const at::Tensor sorted_images = images.index_select(0, by_image);
  const at::Tensor position = at::arange(M, ranked.options());
  at::Tensor run_start = at::zeros({M}, ranked.options());
  if (M > 1) {
    const at::Tensor starts = sorted_images.slice(0, 1).ne(sorted_images.slice(0, 0, M - 1));
    run_start.slice(0, 1).copy_(position.slice(0, 1) * starts);
  }
  const at::Tensor rank_in_image = position - std::get<0>(at::cummax(run_start, 0));
  // Back from image order to output order.
  at::Tensor rank_by_output = at::empty_like(rank_in_image);
  rank_by_output.index_copy_(0, by_image, rank_in_image);
  return ranked.masked_select(rank_by_output < max_kept);
}

at::Tensor batched_nms_cuda(const at::Tensor& boxes_in, const at::Tensor& scores_in,
                            const at::Tensor& idxs_in, double iou_threshold,
                            c10::optional<int64_t> max_kept,
                            c10::optional<int64_t> keys_per_image) {
  check_nms_inputs(boxes_in, scores_in, idxs_in, iou_threshold);
  check_nms_limits(max_kept, keys_per_image);
  const c10::cuda::CUDAGuard device_guard(boxes_in.device());
  const int64_t N = boxes_in.size(0);
  const at::TensorOptions long_options = idxs_in.options().dtype(at::kLong);
  if (N == 0) return at::empty({0}, long_options);
  TORCH_CHECK(N <= std::numeric_limits<int32_t>::max(), "boxes should have fewer than 2^31 rows, got ",
              N);
  const at::Tensor boxes = boxes_in.to(at::kFloat).contiguous();
  const at::Tensor scores = scores_in.to(at::kDouble);
  const at::Tensor idxs = idxs_in.to(at::kLong);
  // The CPU kernel ranks NaN above every number and -0.0 equal to 0.0; torch.sort
  // orders by bits there, so NaN gets its own key and zeros are made +0.0.
  const at::Tensor nan_mask = scores.isnan();
  const at::Tensor is_nan = nan_mask.to(at::kByte);
  const at::Tensor rank_scores = scores.masked_fill(nan_mask, std::numeric_limits<double>::infinity())
                                     .masked_fill(scores == 0, 0.0);

  // Grouped by idx, each group in rank order.
  const at::Tensor by_rank = order_by_score(at::arange(N, long_options), rank_scores, is_nan);
  const at::Tensor by_group = std::get<1>(
      at::sort(idxs.index_select(0, by_rank), /*stable=*/true, /*dim=*/0, /*descending=*/false));
  const at::Tensor order = by_rank.index_select(0, by_group);
  const at::Tensor sorted_idxs = idxs.index_select(0, order);
  const at::Tensor ranked_boxes = boxes.index_select(0, order).contiguous();

  at::Tensor is_group_start = at::ones({N}, idxs.options().dtype(at::kBool));
  if (N > 1) {
    is_group_start.slice(0, 1).copy_(sorted_idxs.slice(0, 1).ne(sorted_idxs.slice(0, 0, N - 1)));
  }
  const at::Tensor group_begin = at::nonzero(is_group_start).flatten().contiguous();
  const at::Tensor group_end =
      at::cat({group_begin.slice(0, 1), at::full({1}, N, group_begin.options())}).contiguous();

  at::Tensor keep = at::empty({N}, idxs.options().dtype(at::kByte));
  CudaBackend backend(boxes_in.device());
  nms_ranked_groups(backend, ranked_boxes.data_ptr<float>(), group_begin.data_ptr<int64_t>(),
                    group_end.data_ptr<int64_t>(), group_begin.numel(), iou_threshold,
                    max_kept.value_or(-1), keep.data_ptr<uint8_t>());

  const at::Tensor kept = std::get<0>(at::sort(order.index_select(0, at::nonzero(keep).flatten())));
  const at::Tensor ranked = order_by_score(kept, rank_scores, is_nan);
  // Per image: every group already stopped at max_kept survivors, and an image's
  // best max_kept survivors include at most max_kept of any one group, so the
  // image's first max_kept in output order are its answer.
  if (keys_per_image.has_value()) return first_per_image(ranked, idxs, *max_kept, *keys_per_image);
  return ranked;
}

// One thread per (image, anchor): consecutive threads read consecutive anchors of
// a class row, so every class row is read coalesced, once.
template <typename scalar_t>
__global__ void best_class_kernel(const scalar_t* __restrict__ scores, int64_t image_stride,
                                  int64_t class_stride, int64_t C, int64_t N, int64_t total,
                                  float* __restrict__ best, int64_t* __restrict__ label) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= total) return;
  const int64_t b = i / N, a = i % N;
  const scalar_t* column = scores + b * image_stride + a;
  best_class_of([&](int64_t c) { return static_cast<float>(column[c * class_stride]); }, C,
                best + i, label + i);
}

std::tuple<at::Tensor, at::Tensor> best_class_cuda(const at::Tensor& scores_in) {
  check_best_class_input(scores_in);
  const c10::cuda::CUDAGuard device_guard(scores_in.device());
  at::Tensor scores = scores_in;
  if (scores.size(2) > 1 && scores.stride(2) != 1) scores = scores.contiguous();
  const int64_t B = scores.size(0), C = scores.size(1), N = scores.size(2);
  at::Tensor best = at::empty({B, N}, scores.options().dtype(at::kFloat));
  at::Tensor label = at::empty({B, N}, scores.options().dtype(at::kLong));
  const int64_t total = B * N;
  if (total == 0) return {best, label};
  constexpr int kThreads = 256;
  const int64_t blocks = (total + kThreads - 1) / kThreads;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream(scores.device().index());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scores.scalar_type(), "best_class",
                                  [&] {
                                    best_class_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
                                        scores.data_ptr<scalar_t>(), scores.stride(0),
                                        scores.stride(1), C, N, total, best.data_ptr<float>(),
                                        label.data_ptr<int64_t>());
                                  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {best, label};
}

std::tuple<at::Tensor, at::Tensor> batched_nms_padded_cuda(const at::Tensor& boxes_in,
                                                           const at::Tensor& scores_in,
                                                           const at::Tensor& labels_in,
                                                           double iou_threshold, int64_t max_kept,
                                                           bool class_agnostic) {
  const PaddedNmsDims dims =
      check_padded_nms_inputs(boxes_in, scores_in, labels_in, iou_threshold, max_kept);
  const c10::cuda::CUDAGuard device_guard(boxes_in.device());
  const int64_t B = dims.batch, M = dims.slots;
  const int64_t K = padded_nms_capacity(max_kept, M);
  const at::TensorOptions long_options = labels_in.options();
  if (B == 0 || M == 0) return {at::full({B, K}, -1, long_options), at::zeros({B}, long_options)};
  const at::Tensor boxes = boxes_in.to(at::kFloat).contiguous();
  const at::Tensor scores = scores_in.to(at::kFloat).contiguous();
  const at::Tensor labels = labels_in.contiguous();
  at::Tensor indices = at::empty({B, K}, long_options);
  at::Tensor counts = at::empty({B}, long_options);
  CudaBackend backend(boxes_in.device());
  nms_padded(backend, boxes.data_ptr<float>(), scores.data_ptr<float>(),
             labels.data_ptr<int64_t>(), B, M, iou_threshold, K, class_agnostic,
             indices.data_ptr<int64_t>(), counts.data_ptr<int64_t>());
  return {indices, counts};
}

}  // namespace

TORCH_LIBRARY_IMPL(ssd_post, CUDA, m) {
  m.impl("decode_threshold_flatten", &decode_threshold_flatten_cuda);
  m.impl("batched_nms", &batched_nms_cuda);
  m.impl("postprocess", &postprocess_cuda);
  m.impl("select_topk", &select_topk_cuda);
  m.impl("batched_nms_padded", &batched_nms_padded_cuda);
  m.impl("best_class", &best_class_cuda);
}

}  // namespace gpu
}  // namespace ssd_post
