// decode_boxes: torchvision's BoxCoder.decode_single as ATen ops, in its op order
// (ssd_post.box_coder.BoxCoder.decode is the same formula in Python, the oracle).
// One kernel for every device (CompositeExplicitAutograd). Being an op, it stays
// one call in an exported program: AOTInductor runs these very ATen kernels instead
// of compiling the formula with its own exp and fusions, so a package's boxes equal
// eager's bit for bit.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>

#include "../common/checks.h"

namespace ssd_post {
namespace {

at::Tensor decode_boxes(const at::Tensor& rel_codes_in, const at::Tensor& anchors_in,
                        at::ArrayRef<double> weights) {
  const auto check_boxes = [](const at::Tensor& t, const char* name) {
    TORCH_CHECK_VALUE(t.dim() >= 1 && t.size(-1) == 4, name, " should be [..., 4], got ",
                      t.sizes());
    TORCH_CHECK_VALUE(t.is_floating_point(), name, " should be floating point, got ",
                      t.scalar_type());
  };
  check_boxes(rel_codes_in, "rel_codes");
  check_boxes(anchors_in, "anchors");
  TORCH_CHECK_VALUE(weights.size() == 4, "weights should be 4 floats, got ", weights.size());
  for (const double w : weights) {
    TORCH_CHECK_VALUE(std::isfinite(w) && w > 0, "weights should be finite and > 0, got ",
                      weights);
  }
  TORCH_CHECK_VALUE(rel_codes_in.device() == anchors_in.device(),
                    "anchors should be on the device of rel_codes, got ", anchors_in.device(),
                    " and ", rel_codes_in.device());
  const at::Tensor rel = rel_codes_in.to(at::kFloat);
  const at::Tensor anchors = anchors_in.to(at::kFloat);
  // The same double as the oracle's math.log(1000 / 16) (BOX_SCALE_CLAMP).
  const double scale_clamp = std::log(1000.0 / 16);
  const at::Tensor widths = anchors.select(-1, 2) - anchors.select(-1, 0);
  const at::Tensor heights = anchors.select(-1, 3) - anchors.select(-1, 1);
  const at::Tensor ctr_x = anchors.select(-1, 0) + widths.mul(0.5);
  const at::Tensor ctr_y = anchors.select(-1, 1) + heights.mul(0.5);
  const at::Tensor dx = rel.select(-1, 0) / weights[0];
  const at::Tensor dy = rel.select(-1, 1) / weights[1];
  const at::Tensor dw = at::clamp(rel.select(-1, 2) / weights[2], c10::nullopt, scale_clamp);
  const at::Tensor dh = at::clamp(rel.select(-1, 3) / weights[3], c10::nullopt, scale_clamp);
  const at::Tensor pred_ctr_x = dx * widths + ctr_x;
  const at::Tensor pred_ctr_y = dy * heights + ctr_y;
  const at::Tensor half_w = (at::exp(dw) * widths).mul(0.5);
  const at::Tensor half_h = (at::exp(dh) * heights).mul(0.5);
  return at::stack({pred_ctr_x - half_w, pred_ctr_y - half_h, pred_ctr_x + half_w,
                    pred_ctr_y + half_h},
                   -1);
}

}  // namespace

TORCH_LIBRARY_IMPL(ssd_post, CompositeExplicitAutograd, m) {
  m.impl("decode_boxes", &decode_boxes);
}

}  // namespace ssd_post
