// Box decode, clip and IoU shared by the CPU and CUDA kernels. Every formula
// follows torchvision's op order (BoxCoder.decode_single, clip_boxes_to_image,
// the nms kernel), so float32 results agree with torchvision to the bit wherever
// the math library's exp agrees.
#pragma once

#include <cmath>

#include "macros.h"

namespace ssd_post {

// log(1000 / 16): the largest dw/dh accepted before exp, as in torchvision and
// detectron2, so that a wild regression cannot overflow the box size.
constexpr float kBoxScaleClamp = 4.135166556742356f;

struct BoxWeights {
  float wx, wy, ww, wh;
};

SSD_HOST_DEVICE float exp_f32(float x) {
#if defined(__CUDA_ARCH__)
  return expf(x);
#else
  return std::exp(x);
#endif
}

// (cx, cy, w, h) -> (x1, y1, x2, y2) as family.cxcywh_to_xyxy computes it with
// torch ops in the boxes' dtype T: half sides first, then centre -/+ half, each
// op in float and rounded back to T (as torch's CPU kernels compute float16 and
// bfloat16; a no-op for float), the corners returned as float32.
template <typename T>
SSD_HOST_DEVICE void cxcywh_to_xyxy(const T box[4], float out[4]) {
  for (int i = 0; i < 2; ++i) {
    const float centre = static_cast<float>(box[i]);
    const float half = static_cast<float>(static_cast<T>(static_cast<float>(box[i + 2]) / 2.0f));
    out[i] = static_cast<float>(static_cast<T>(centre - half));
    out[i + 2] = static_cast<float>(static_cast<T>(centre + half));
  }
}

// Clamp that lets NaN through, as torch.clamp does.
SSD_HOST_DEVICE float clamp_keep_nan(float x, float lo, float hi) {
  if (x != x) return x;
  return x < lo ? lo : (x > hi ? hi : x);
}

// The log-scale regressions (dw, dh) of rel = (dx, dy, dw, dh), weighted and clamped
// at kBoxScaleClamp; min_first keeps a NaN regression NaN, like torch.clamp(max=...).
SSD_HOST_DEVICE void clamped_scale_logs(const float rel[4], BoxWeights w, float* dw, float* dh) {
  *dw = min_first(rel[2] / w.ww, kBoxScaleClamp);
  *dh = min_first(rel[3] / w.wh, kBoxScaleClamp);
}

// Decode given exp(dw) and exp(dh) already computed: the CPU kernels take those from
// torch's own exp (bit-identical to torchvision's decode, whose exp is not always
// the correctly rounded one), the CUDA kernels from expf. anchor and out are xyxy.
SSD_HOST_DEVICE void decode_box_from_exp(const float rel[4], const float anchor[4], BoxWeights w,
                                         float exp_dw, float exp_dh, float out[4]) {
  const float width = sub_rn(anchor[2], anchor[0]);
  const float height = sub_rn(anchor[3], anchor[1]);
  const float ctr_x = add_rn(anchor[0], mul_rn(0.5f, width));
  const float ctr_y = add_rn(anchor[1], mul_rn(0.5f, height));
  const float dx = rel[0] / w.wx;
  const float dy = rel[1] / w.wy;
  const float pred_ctr_x = add_rn(mul_rn(dx, width), ctr_x);
  const float pred_ctr_y = add_rn(mul_rn(dy, height), ctr_y);
  const float half_w = mul_rn(0.5f, mul_rn(exp_dw, width));
  const float half_h = mul_rn(0.5f, mul_rn(exp_dh, height));
  out[0] = sub_rn(pred_ctr_x, half_w);
  out[1] = sub_rn(pred_ctr_y, half_h);
  out[2] = add_rn(pred_ctr_x, half_w);
  out[3] = add_rn(pred_ctr_y, half_h);
}

// rel = (dx, dy, dw, dh) regression of one anchor; anchor and out are xyxy.
SSD_HOST_DEVICE void decode_box(const float rel[4], const float anchor[4], BoxWeights w,
                                float out[4]) {
  float dw, dh;
  clamped_scale_logs(rel, w, &dw, &dh);
  decode_box_from_exp(rel, anchor, w, exp_f32(dw), exp_f32(dh), out);
}

// Clip an xyxy box to an image of height h and width w, in place.
SSD_HOST_DEVICE void clip_box(float box[4], float image_h, float image_w) {
  box[0] = clamp_keep_nan(box[0], 0.f, image_w);
  box[1] = clamp_keep_nan(box[1], 0.f, image_h);
  box[2] = clamp_keep_nan(box[2], 0.f, image_w);
  box[3] = clamp_keep_nan(box[3], 0.f, image_h);
}

SSD_HOST_DEVICE float box_area(const float* box) {
  return mul_rn(sub_rn(box[2], box[0]), sub_rn(box[3], box[1]));
}

// IoU of two xyxy boxes given their precomputed areas, in torchvision's op order.
// A zero-area box gives IoU 0 (or NaN against another zero-area box), which never
// exceeds a threshold: zero-area boxes suppress nothing.
SSD_HOST_DEVICE float box_iou(const float* a, float area_a, const float* b, float area_b) {
  const float xx1 = max_first(a[0], b[0]);
  const float yy1 = max_first(a[1], b[1]);
  const float xx2 = min_first(a[2], b[2]);
  const float yy2 = min_first(a[3], b[3]);
  const float iw = max_first(0.f, sub_rn(xx2, xx1));
  const float ih = max_first(0.f, sub_rn(yy2, yy1));
  const float inter = mul_rn(iw, ih);
  return inter / sub_rn(add_rn(area_a, area_b), inter);
}

// torchvision compares the float IoU against the threshold as a double.
SSD_HOST_DEVICE bool suppresses(float iou, double iou_threshold) {
  return static_cast<double>(iou) > iou_threshold;
}

}  // namespace ssd_post
