#include "bounded_nms.h"

#include <algorithm>

#include "../common/box_math.h"
#include "decode.h"

namespace ssd_post {
namespace cpu {
namespace {

// The first chunk holds max(K, this) candidates, each next one twice the last:
// a sparse image is done in one chunk, and a dense one decodes at most about
// twice the candidates its scan reaches.
constexpr int64_t kMinChunk = 64;

// The output order: score descending, then class, then anchor (the rank within
// the class). Scores passed `score > score_thresh >= 0`, so none is NaN.
struct OutputOrder {
  bool operator()(const ImageCandidate& x, const ImageCandidate& y) const {
    if (x.score != y.score) return x.score > y.score;
    if (x.label != y.label) return x.label < y.label;
    return x.anchor < y.anchor;
  }
};

}  // namespace

BoundedNms::BoundedNms(double nms_thresh)
    : nms_thresh_(nms_thresh), scales_(at::empty({0}, at::kFloat)) {}

void BoundedNms::add_class(const std::vector<Candidate>& ranked, int64_t label) {
  for (const Candidate& c : ranked) {
    candidates_.push_back({c.score, c.anchor, static_cast<int32_t>(label)});
  }
}

bool BoundedNms::run(int64_t b, const DecodeParams& params, const PostprocessOutputs& out,
                     float trust) {
  const int64_t n = static_cast<int64_t>(candidates_.size());
  kept_.start(nms_thresh_, out.K);
  int64_t count = 0;
  int64_t chunk = std::max(out.K, kMinChunk);
  for (int64_t first = 0; first < n && count < out.K; first += chunk, chunk *= 2) {
    const int64_t m = std::min(chunk, n - first);
    ImageCandidate* items = candidates_.data() + first;
    if (first + m < n) std::nth_element(items, items + m, candidates_.data() + n, OutputOrder{});
    std::sort(items, items + m, OutputOrder{});

    if (scales_.numel() < 2 * m) scales_ = at::empty({2 * m}, at::kFloat);
    boxes_.resize(static_cast<size_t>(4 * m));
    float* scale = scales_.data_ptr<float>();
    fill_scale_logs(items, m, b, params, scale);
    scales_.narrow(0, 0, 2 * m).exp_();
    decode_candidates(items, m, b, params, scale, boxes_.data());

    for (int64_t i = 0; i < m && count < out.K; ++i) {
      if (!(items[i].score > trust)) return undo(b, count, out);
      const float* box = boxes_.data() + 4 * i;
      const int64_t label = items[i].label;
      // The kept boxes of the class are compared first, as greedy NMS does
      // (box_iou is not symmetric in how it treats NaN).
      if (!kept_.offer(box, label)) continue;
      const int64_t slot = b * out.K + count++;
      std::copy_n(box, 4, out.boxes + 4 * slot);
      out.scores[slot] = items[i].score;
      out.labels[slot] = label;
      out.anchors[slot] = items[i].anchor;
    }
  }
  // Out of candidates: enough only if none were cut away.
  if (count < out.K && trust != kNoCut) return undo(b, count, out);
  out.counts[b] = count;
  candidates_.clear();
  return true;
}

bool BoundedNms::undo(int64_t b, int64_t count, const PostprocessOutputs& out) {
  std::fill_n(out.boxes + 4 * b * out.K, 4 * count, 0.f);
  std::fill_n(out.scores + b * out.K, count, 0.f);
  std::fill_n(out.labels + b * out.K, count, 0);
  std::fill_n(out.anchors + b * out.K, count, -1);
  candidates_.clear();
  return false;
}

}  // namespace cpu
}  // namespace ssd_post
