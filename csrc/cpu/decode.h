// Box decode on the CPU, for the candidates a stage hands over (the counterpart of
// cuda/decode.cuh). The exp of (dw, dh) is torch's own exp, called once over many
// candidates: torch's exp gives an element the same bits wherever it sits in a
// tensor, and torchvision decodes with it, so the boxes are bit-identical to
// torchvision's and NMS decisions near the IoU threshold cannot flip.
#pragma once

#include <cstdint>

#include "../common/box_math.h"
#include "../common/op_inputs.h"
#include "candidates.h"
#include "debug_counters.h"

namespace ssd_post {
namespace cpu {

// Writes (dw, dh) of the n candidates of image b (anything with an `anchor`
// member), clamped, to logs[2 * i], ready for one exp over many of them.
template <typename Item>
void fill_scale_logs(const Item* items, int64_t n, int64_t b, const DecodeParams& p, float* logs) {
  for (int64_t i = 0; i < n; ++i) {
    clamped_scale_logs(p.rel(b, items[i].anchor), p.weights, &logs[2 * i], &logs[2 * i + 1]);
  }
}

// Decodes (and clips) the n candidates of image b into out[n, 4], given their
// exp(dw), exp(dh) in scales[2 * i].
template <typename Item>
void decode_candidates(const Item* items, int64_t n, int64_t b, const DecodeParams& p,
                       const float* scales, float* out) {
  const float* sizes = p.image_sizes + 2 * b;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t a = items[i].anchor;
    float* box = out + 4 * i;
    decode_box_from_exp(p.rel(b, a), p.anchor_box(b, a), p.weights, scales[2 * i],
                        scales[2 * i + 1], box);
    if (p.clip) clip_box(box, sizes[0], sizes[1]);
  }
  count_event(Counter::kDecodedBoxes, n);
}

// Decodes (and clips) the box of every selected candidate into out[N, 4], with one
// torch exp over all candidates.
void decode_selection(const Selection& sel, const DecodeInputs& in, float* out);

}  // namespace cpu
}  // namespace ssd_post
