// best_class_candidates as a composition of the best_class op and ATen ops: the
// kernel of every device without a fused one (CUDA and the rest: one read of the
// scores by best_class, then [B, N] work and one host synchronisation, for the
// output width), and _best_class_candidates_composite on any device, so the CPU
// tests hold this composition equal to the CPU kernel.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <tuple>
#include <vector>

#include "../common/checks.h"

namespace ssd_post {
namespace {

std::tuple<at::Tensor, at::Tensor> call_best_class(const at::Tensor& scores) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("ssd_post::best_class", "")
                             .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&)>();
  return op.call(scores);
}

// Keys that order the candidates as the cap does, largest first: score
// descending, equal scores by lower anchor. The float's bits are made monotonic
// as a signed integer (negative floats count down), -0.0 is read as +0.0 (equal
// scores), and the anchor fills the low 32 bits. Failing anchors get the minimum.
at::Tensor rank_keys(const at::Tensor& best, const at::Tensor& passing) {
  const int64_t N = best.size(1);
  const at::Tensor bits = (best + 0.0).view(at::kInt);
  const at::Tensor ordered = at::where(bits >= 0, bits, bits.bitwise_xor(0x7fffffff));
  const at::Tensor later = (N - 1) - at::arange(N, best.options().dtype(at::kLong));
  const at::Tensor key = ordered.to(at::kLong) * (int64_t{1} << 32) + later;
  return at::where(passing, key, std::numeric_limits<int64_t>::min());
}

// family.cxcywh_to_xyxy's torch ops, in the boxes' dtype: boxes [B, W, 4].
at::Tensor corners_of(const at::Tensor& boxes) {
  const at::Tensor centre = boxes.narrow(2, 0, 2);
  const at::Tensor half = boxes.narrow(2, 2, 2) / 2;
  return at::cat({centre - half, centre + half}, 2);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
best_class_candidates_composite(const at::Tensor& scores, double score_thresh,
                                int64_t max_candidates, at::OptionalIntArrayRef classes,
                                const c10::optional<at::Tensor>& boxes,
                                c10::string_view box_format) {
  const bool cxcywh = check_best_class_candidates_inputs(scores, score_thresh, max_candidates,
                                                         classes, boxes, box_format);
  const int64_t B = scores.size(0), C = scores.size(1), N = scores.size(2);
  const int64_t W = std::min(N, max_candidates);
  const at::TensorOptions longs = scores.options().dtype(at::kLong);
  const at::TensorOptions floats = scores.options().dtype(at::kFloat);
  at::Tensor passing, best, label;
  if (B > 0 && N > 0) {
    std::tie(best, label) = call_best_class(scores);
    // As the CPU kernel: float32 scores against the threshold rounded to float32.
    passing = best > static_cast<float>(score_thresh);  // NaN never passes
    if (classes.has_value()) {
      const std::vector<uint8_t> mask = class_allowed_mask(classes, C);
      at::Tensor host = at::empty({C}, at::TensorOptions().dtype(at::kBool));
      std::copy(mask.begin(), mask.end(), host.data_ptr<bool>());
      // non_blocking: from pageable memory the copy is staged before it returns.
      const at::Tensor allowed = host.to(scores.device(), at::kBool, /*non_blocking=*/true);
      passing = passing.logical_and(allowed.index_select(0, label.flatten()).view_as(label));
    }
  }
  // The width: the most candidates an image keeps. Its one host synchronisation.
  const int64_t M =
      passing.defined() ? std::min(passing.sum(1).max().item<int64_t>(), W) : int64_t{0};
  if (M == 0) {
    return {at::empty({B, 0}, longs), at::empty({B, 0}, floats), at::empty({B, 0}, longs),
            at::zeros({B}, longs), at::empty({B, 0, 4}, floats)};
  }
  // Each image's M best passing anchors (all of them where it has at most M, with
  // failing ones after), then back in anchor order with the empty slots last.
  const at::Tensor chosen =
      M < N ? std::get<1>(at::topk(rank_keys(best, passing), M, 1, /*largest=*/true,
                                   /*sorted=*/false))
            : at::arange(N, longs).expand({B, N});
  const at::Tensor order = at::where(passing.gather(1, chosen), chosen, N);
  const at::Tensor sorted = std::get<0>(at::sort(order, 1));
  const at::Tensor filled = sorted < N;
  const at::Tensor safe = at::where(filled, sorted, 0);
  at::Tensor out_boxes = at::empty({B, 0, 4}, floats);
  if (boxes.has_value()) {
    at::Tensor given = boxes->gather(2, safe.unsqueeze(1).expand({B, 4, M})).transpose(1, 2);
    if (cxcywh) given = corners_of(given);
    out_boxes = at::where(filled.unsqueeze(2), given.to(at::kFloat), 0.0);
  }
  return {at::where(filled, sorted, -1), at::where(filled, best.gather(1, safe), 0.0),
          at::where(filled, label.gather(1, safe), -1), filled.sum(1), out_boxes};
}

}  // namespace

TORCH_LIBRARY_IMPL(ssd_post, CompositeExplicitAutograd, m) {
  m.impl("best_class_candidates", &best_class_candidates_composite);
  m.impl("_best_class_candidates_composite", &best_class_candidates_composite);
}

}  // namespace ssd_post
