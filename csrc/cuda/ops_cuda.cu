// CUDA kernels of the three ssd_post ops.
//
// postprocess runs entirely on the device with fixed-size buffers: every stage
// writes into slots sized from the input shapes (B * C * min(topk_candidates, A)),
// and counts stay on the device, so there is no host synchronization and the
// whole op can be captured in a CUDA graph. decode_threshold_flatten and
// batched_nms return data-dependent sizes and synchronize for them.
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

#include "../common/checks.h"
#include "decode.cuh"
#include "nms.cuh"
#include "output_kernels.cuh"
#include "rank_keys.cuh"
#include "select.cuh"
#include "sort.cuh"

namespace ssd_post {
namespace gpu {
namespace {

unsigned blocks_for(int64_t items, int threads) {
  const int64_t blocks = (items + threads - 1) / threads;
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "too many elements for one launch: ",
              items);
  return static_cast<unsigned>(blocks);
}

// The float32 copies that decoding reads, kept alive next to the raw pointers.
struct DecodeInputs {
  at::Tensor locs;
  at::Tensor anchors;
  at::Tensor image_sizes;
  DecodeParams params;
};

// Unlike the CPU kernel, image sizes are not checked for positive finite values:
// that would need their values on the host, i.e. a synchronization.
DecodeInputs make_decode_inputs(const at::Tensor& locs, const at::Tensor& anchors,
                                const at::Tensor& image_sizes, at::ArrayRef<double> box_weights,
                                bool clip) {
  DecodeInputs in{locs.to(at::kFloat).contiguous(), anchors.to(at::kFloat).contiguous(),
                  image_sizes.to(at::kFloat).contiguous(), DecodeParams{}};
  in.params = DecodeParams{in.locs.data_ptr<float>(),
                           in.anchors.data_ptr<float>(),
                           in.image_sizes.data_ptr<float>(),
                           in.locs.size(1),
                           in.anchors.dim() == 3,
                           clip,
                           to_box_weights(box_weights)};
  return in;
}

SelectParams make_select_params(double score_thresh, c10::string_view score_activation,
                                c10::optional<int64_t> background_class) {
  const Activation activation = parse_activation(std::string(score_activation));
  return {activation, static_cast<float>(score_thresh),
          make_score_bound(activation, score_thresh).value, background_class.value_or(-1)};
}

uint64_t* as_keys(const at::Tensor& t) { return reinterpret_cast<uint64_t*>(t.data_ptr<int64_t>()); }

std::tuple<at::Tensor, at::Tensor, at::Tensor> decode_threshold_flatten_cuda(
    const at::Tensor& locs, const at::Tensor& logits, const at::Tensor& anchors,
    const at::Tensor& image_sizes, double score_thresh, int64_t topk_candidates,
    at::ArrayRef<double> box_weights, c10::string_view score_activation,
    c10::optional<int64_t> background_class, bool clip_boxes) {
  const BatchDims dims = check_decode_inputs(locs, logits, anchors, image_sizes, score_thresh,
                                             topk_candidates, box_weights, background_class);
  const SelectParams params = make_select_params(score_thresh, score_activation, background_class);
  const c10::cuda::CUDAGuard device_guard(locs.device());
  const int64_t B = dims.batch, A = dims.anchors, C = dims.classes;
  const at::TensorOptions float_options = locs.options().dtype(at::kFloat);
  if (B * C * std::min(topk_candidates, A) == 0) {
    return {at::empty({0, 4}, float_options), at::empty({0}, float_options),
            at::empty({0}, locs.options().dtype(at::kLong))};
  }
  const DecodeInputs in = make_decode_inputs(locs, anchors, image_sizes, box_weights, clip_boxes);
  const RankedCandidates ranked = select_ranked_candidates(logits, params, topk_candidates);

  const at::Tensor counts = ranked.counts.to(at::kLong);
  const at::Tensor ends = at::cumsum(counts, 0);
  const at::Tensor first_output = ends - counts;
  // The one synchronization of this op: N sizes its outputs.
  const int64_t N = ends.select(0, -1).item<int64_t>();
  at::Tensor boxes = at::empty({N, 4}, float_options);
  at::Tensor scores = at::empty({N}, float_options);
  at::Tensor keys = at::empty({N}, locs.options().dtype(at::kLong));
  if (N > 0) {
    const int64_t slots = ranked.keys.numel();
    emit_candidates_kernel<<<blocks_for(slots, kElementwiseThreads), kElementwiseThreads, 0,
                             at::cuda::getCurrentCUDAStream()>>>(
        as_keys(ranked.keys), ranked.counts.data_ptr<int32_t>(),
        first_output.data_ptr<int64_t>(), slots, ranked.capacity, C, ranked.anchor_bits,
        in.params, boxes.data_ptr<float>(), scores.data_ptr<float>(), keys.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {boxes, scores, keys};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> postprocess_cuda(
    const at::Tensor& locs, const at::Tensor& logits, const at::Tensor& anchors,
    const at::Tensor& image_sizes, double score_thresh, double nms_thresh,
    int64_t topk_candidates, int64_t detections_per_img, at::ArrayRef<double> box_weights,
    c10::string_view score_activation, c10::optional<int64_t> background_class,
    bool clip_boxes) {
  const BatchDims dims = check_decode_inputs(locs, logits, anchors, image_sizes, score_thresh,
                                             topk_candidates, box_weights, background_class);
  check_postprocess_scalars(nms_thresh, detections_per_img);
  const SelectParams params = make_select_params(score_thresh, score_activation, background_class);
  const c10::cuda::CUDAGuard device_guard(locs.device());
  const int64_t B = dims.batch, A = dims.anchors, C = dims.classes, K = detections_per_img;
  const at::TensorOptions float_options = locs.options().dtype(at::kFloat);
  const at::TensorOptions long_options = locs.options().dtype(at::kLong);
  if (B * C * std::min(topk_candidates, A) == 0) {
    return {at::zeros({B, K, 4}, float_options), at::zeros({B, K}, float_options),
            at::zeros({B, K}, long_options), at::zeros({B}, long_options)};
  }
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const DecodeInputs in = make_decode_inputs(locs, anchors, image_sizes, box_weights, clip_boxes);
  const RankedCandidates ranked = select_ranked_candidates(logits, params, topk_candidates);
  const int64_t slots = ranked.keys.numel();

  at::Tensor boxes = at::empty({slots, 4}, float_options);
  at::Tensor keep = at::empty({slots}, locs.options().dtype(at::kByte));
  decode_and_nms_segments(ranked, C, in.params, nms_thresh, boxes.data_ptr<float>(),
                          keep.data_ptr<uint8_t>(), stream);

  const int64_t image_slots = C * ranked.capacity;
  const int slot_bits = index_bits_for(image_slots);
  at::Tensor survivor_keys = at::empty({slots}, long_options);
  at::Tensor sorted_survivors = at::empty({slots}, long_options);
  at::Tensor survivor_begin = at::empty({B}, locs.options().dtype(at::kInt));
  at::Tensor survivor_end = at::empty({B}, locs.options().dtype(at::kInt));
  collect_survivors_kernel<<<static_cast<unsigned>(B), kCollectThreads, 0, stream>>>(
      as_keys(ranked.keys), ranked.counts.data_ptr<int32_t>(), keep.data_ptr<uint8_t>(), C,
      ranked.capacity, ranked.anchor_bits, slot_bits, as_keys(survivor_keys),
      survivor_begin.data_ptr<int32_t>(), survivor_end.data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  sort_segments_descending(as_keys(survivor_keys), as_keys(sorted_survivors),
                           static_cast<int>(slots), static_cast<int>(B),
                           survivor_begin.data_ptr<int32_t>(), survivor_end.data_ptr<int32_t>(),
                           kScoreKeyBits + slot_bits, stream, locs.device());

  at::Tensor out_boxes = at::empty({B, K, 4}, float_options);
  at::Tensor out_scores = at::empty({B, K}, float_options);
  at::Tensor out_labels = at::empty({B, K}, long_options);
  at::Tensor out_counts = at::empty({B}, long_options);
  write_detections_kernel<<<blocks_for(B * K, kElementwiseThreads), kElementwiseThreads, 0,
                            stream>>>(
      as_keys(sorted_survivors), survivor_begin.data_ptr<int32_t>(),
      survivor_end.data_ptr<int32_t>(), B, K, C, ranked.capacity, slot_bits,
      reinterpret_cast<const float4*>(boxes.data_ptr<float>()), out_boxes.data_ptr<float>(),
      out_scores.data_ptr<float>(), out_labels.data_ptr<int64_t>(),
      out_counts.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out_boxes, out_scores, out_labels, out_counts};
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

at::Tensor batched_nms_cuda(const at::Tensor& boxes_in, const at::Tensor& scores_in,
                            const at::Tensor& idxs_in, double iou_threshold) {
  check_nms_inputs(boxes_in, scores_in, idxs_in, iou_threshold);
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
  nms_ranked_groups(ranked_boxes.data_ptr<float>(), group_begin.data_ptr<int64_t>(),
                    group_end.data_ptr<int64_t>(), group_begin.numel(), iou_threshold,
                    keep.data_ptr<uint8_t>(), at::cuda::getCurrentCUDAStream());

  const at::Tensor kept = std::get<0>(at::sort(order.index_select(0, at::nonzero(keep).flatten())));
  return order_by_score(kept, rank_scores, is_nan);
}

}  // namespace

TORCH_LIBRARY_IMPL(ssd_post, CUDA, m) {
  m.impl("decode_threshold_flatten", &decode_threshold_flatten_cuda);
  m.impl("batched_nms", &batched_nms_cuda);
  m.impl("postprocess", &postprocess_cuda);
}

}  // namespace gpu
}  // namespace ssd_post
