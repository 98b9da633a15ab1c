// Builds the kernels' parameters from an op's arguments, once for the CPU and the
// CUDA kernels (host code only; check_decode_inputs has validated the arguments).
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <string>

#include "checks.h"
#include "decode_params.h"
#include "select_params.h"

namespace ssd_post {

inline SelectParams make_select_params(const BatchDims& dims, double score_thresh,
                                       int64_t topk_candidates,
                                       const std::string& score_activation,
                                       c10::optional<int64_t> background_class) {
  return make_select_params(parse_activation(score_activation), score_thresh, topk_candidates,
                            dims.anchors, background_class.value_or(-1));
}

// The float32 copies that the kernels read, kept alive next to the raw pointers
// of `params`.
struct DecodeInputs {
  at::Tensor locs;         // [B, A, 4] float32, contiguous
  at::Tensor anchors;      // [A, 4] or [B, A, 4] float32, contiguous
  at::Tensor image_sizes;  // [B, 2] float32 (height, width), whole numbers
  DecodeParams params;
};

// Image sizes, one contract on every device:
// - fractional sizes are truncated toward zero, as torchvision's int() of a size;
// - the values are checked (positive and finite after truncation) wherever the
//   host can read them without a device synchronization, i.e. when image_sizes is
//   a CPU tensor, which is what the Python API passes for a list or a CPU tensor,
//   on every device. The CUDA ops accept CPU image_sizes and copy them over.
// - image_sizes already on the GPU are not checked (that would synchronize): a
//   size that is not positive clips every coordinate of that image into
//   [0, max(size, 0)] per clip_box, a NaN size leaves coordinates unclipped.
// Sizes are used only when clipping, so they are checked only then.
inline at::Tensor whole_image_sizes(const at::Tensor& image_sizes, const at::Device& device,
                                    bool clip) {
  at::Tensor sizes = image_sizes.is_floating_point() ? image_sizes.trunc() : image_sizes;
  sizes = sizes.to(at::kFloat).contiguous();
  if (clip && sizes.device().is_cpu()) {
    const float* values = sizes.data_ptr<float>();
    const at::Tensor given = image_sizes.to(at::kDouble).contiguous();
    for (int64_t i = 0; i < sizes.numel(); ++i) {
      TORCH_CHECK(values[i] > 0 && std::isfinite(values[i]),
                  "image_sizes should hold positive finite (height, width) (fractions are "
                  "truncated), got ", given.data_ptr<double>()[i], " for image ", i / 2);
    }
  }
  // non_blocking: from pageable memory the copy is staged before it returns, and it
  // spares postprocess a stream synchronization.
  return sizes.to(device, at::kFloat, /*non_blocking=*/true);
}

inline DecodeInputs make_decode_inputs(const at::Tensor& locs, const at::Tensor& anchors,
                                       const at::Tensor& image_sizes,
                                       at::ArrayRef<double> box_weights, bool clip) {
  DecodeInputs in{locs.to(at::kFloat).contiguous(), anchors.to(at::kFloat).contiguous(),
                  whole_image_sizes(image_sizes, locs.device(), clip), DecodeParams{}};
  in.params = DecodeParams{in.locs.data_ptr<float>(),       in.anchors.data_ptr<float>(),
                           in.image_sizes.data_ptr<float>(), in.locs.size(1),
                           in.anchors.dim() == 3,            clip,
                           to_box_weights(box_weights)};
  return in;
}

}  // namespace ssd_post
