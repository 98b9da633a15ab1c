// CPU kernels of the three ssd_post ops.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <numeric>

#include "../common/box_math.h"
#include "../common/checks.h"
#include "candidates.h"
#include "nms.h"

namespace ssd_post {
namespace cpu {
namespace {

struct DecodeInputs {
  at::Tensor locs;         // [B, A, 4] float32, contiguous
  at::Tensor anchors;      // [A, 4] or [B, A, 4] float32, contiguous
  at::Tensor image_sizes;  // [B, 2] float32 (h, w)
  BoxWeights weights;
  bool clip;
};

DecodeInputs make_decode_inputs(const at::Tensor& locs, const at::Tensor& anchors,
                                const at::Tensor& image_sizes, at::ArrayRef<double> box_weights,
                                bool clip) {
  DecodeInputs in{locs.to(at::kFloat).contiguous(), anchors.to(at::kFloat).contiguous(),
                  image_sizes.to(at::kFloat).contiguous(), to_box_weights(box_weights), clip};
  if (clip) {
    const float* sizes = in.image_sizes.data_ptr<float>();
    for (int64_t i = 0; i < in.image_sizes.numel(); ++i) {
      TORCH_CHECK(sizes[i] > 0 && std::isfinite(sizes[i]),
                  "image_sizes should hold positive finite (height, width), got ", sizes[i],
                  " for image ", i / 2);
    }
  }
  return in;
}

SelectParams make_select_params(double score_thresh, int64_t topk_candidates,
                                const std::string& score_activation,
                                c10::optional<int64_t> background_class) {
  const Activation activation = parse_activation(score_activation);
  return {activation, static_cast<float>(score_thresh), make_score_bound(activation, score_thresh),
          topk_candidates, background_class.value_or(-1)};
}

// Decodes (and clips) the box of every selected candidate into out[N, 4].
void decode_selection(const Selection& sel, const DecodeInputs& in, float* out) {
  const int64_t C = sel.num_classes;
  const int64_t A = in.locs.size(1);
  const float* locs = in.locs.data_ptr<float>();
  const float* anchors = in.anchors.data_ptr<float>();
  const float* sizes = in.image_sizes.data_ptr<float>();
  const bool per_image_anchors = in.anchors.dim() == 3;
  at::parallel_for(0, sel.num_segments(), 16, [&](int64_t begin, int64_t end) {
    for (int64_t s = begin; s < end; ++s) {
      const int64_t b = s / C;
      const float* image_locs = locs + b * A * 4;
      const float* image_anchors = anchors + (per_image_anchors ? b * A * 4 : 0);
      for (int64_t i = sel.segment_begin[s]; i < sel.segment_begin[s + 1]; ++i) {
        const int64_t a = sel.items[i].anchor;
        float* box = out + 4 * i;
        decode_box(image_locs + 4 * a, image_anchors + 4 * a, in.weights, box);
        if (in.clip) clip_box(box, sizes[2 * b], sizes[2 * b + 1]);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> decode_threshold_flatten_cpu(
    const at::Tensor& locs, const at::Tensor& logits, const at::Tensor& anchors,
    const at::Tensor& image_sizes, double score_thresh, int64_t topk_candidates,
    at::ArrayRef<double> box_weights, c10::string_view score_activation,
    c10::optional<int64_t> background_class, bool clip_boxes) {
  check_decode_inputs(locs, logits, anchors, image_sizes, score_thresh, topk_candidates,
                      box_weights, background_class);
  const SelectParams params = make_select_params(score_thresh, topk_candidates,
                                                 std::string(score_activation), background_class);
  const DecodeInputs in = make_decode_inputs(locs, anchors, image_sizes, box_weights, clip_boxes);
  const Selection sel = select_candidates(logits, params);

  const int64_t N = sel.size();
  at::Tensor boxes = at::empty({N, 4}, locs.options().dtype(at::kFloat));
  at::Tensor scores = at::empty({N}, locs.options().dtype(at::kFloat));
  at::Tensor keys = at::empty({N}, locs.options().dtype(at::kLong));
  decode_selection(sel, in, boxes.data_ptr<float>());
  float* score_out = scores.data_ptr<float>();
  int64_t* key_out = keys.data_ptr<int64_t>();
  for (int64_t s = 0; s < sel.num_segments(); ++s) {
    for (int64_t i = sel.segment_begin[s]; i < sel.segment_begin[s + 1]; ++i) {
      score_out[i] = sel.items[i].score;
      key_out[i] = s;
    }
  }
  return {boxes, scores, keys};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> postprocess_cpu(
    const at::Tensor& locs, const at::Tensor& logits, const at::Tensor& anchors,
    const at::Tensor& image_sizes, double score_thresh, double nms_thresh,
    int64_t topk_candidates, int64_t detections_per_img, at::ArrayRef<double> box_weights,
    c10::string_view score_activation, c10::optional<int64_t> background_class,
    bool clip_boxes) {
  const BatchDims dims = check_decode_inputs(locs, logits, anchors, image_sizes, score_thresh,
                                             topk_candidates, box_weights, background_class);
  check_postprocess_scalars(nms_thresh, detections_per_img);
  const SelectParams params = make_select_params(score_thresh, topk_candidates,
                                                 std::string(score_activation), background_class);
  const DecodeInputs in = make_decode_inputs(locs, anchors, image_sizes, box_weights, clip_boxes);
  const Selection sel = select_candidates(logits, params);

  const int64_t B = dims.batch, C = dims.classes, K = detections_per_img;
  std::vector<float> cand_boxes(static_cast<size_t>(4 * sel.size()));
  std::vector<uint8_t> keep(static_cast<size_t>(sel.size()));
  decode_selection(sel, in, cand_boxes.data());
  at::parallel_for(0, sel.num_segments(), 8, [&](int64_t begin, int64_t end) {
    std::vector<float> areas;
    for (int64_t s = begin; s < end; ++s) {
      const int64_t first = sel.segment_begin[s];
      nms_ranked_run(cand_boxes.data() + 4 * first, sel.segment_begin[s + 1] - first, nms_thresh,
                     keep.data() + first, areas);
    }
  });

  at::Tensor out_boxes = at::zeros({B, K, 4}, locs.options().dtype(at::kFloat));
  at::Tensor out_scores = at::zeros({B, K}, locs.options().dtype(at::kFloat));
  at::Tensor out_labels = at::zeros({B, K}, locs.options().dtype(at::kLong));
  at::Tensor out_count = at::zeros({B}, locs.options().dtype(at::kLong));
  float* boxes_ptr = out_boxes.data_ptr<float>();
  float* scores_ptr = out_scores.data_ptr<float>();
  int64_t* labels_ptr = out_labels.data_ptr<int64_t>();
  int64_t* count_ptr = out_count.data_ptr<int64_t>();
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> survivors;
    for (int64_t b = begin; b < end; ++b) {
      // Survivors in class order, each class in rank order; the stable sort by
      // score then breaks ties by class and rank, as torchvision's concatenation does.
      survivors.clear();
      for (int64_t i = sel.segment_begin[b * C]; i < sel.segment_begin[(b + 1) * C]; ++i) {
        if (keep[i]) survivors.push_back(i);
      }
      std::stable_sort(survivors.begin(), survivors.end(), [&](int64_t x, int64_t y) {
        return sel.items[x].score > sel.items[y].score;
      });
      const int64_t n = std::min<int64_t>(K, static_cast<int64_t>(survivors.size()));
      count_ptr[b] = n;
      // Segment of candidate i: the last segment_begin <= i.
      int64_t segment = b * C;
      for (int64_t r = 0; r < n; ++r) {
        const int64_t i = survivors[r];
        const auto it = std::upper_bound(sel.segment_begin.begin() + b * C,
                                         sel.segment_begin.begin() + (b + 1) * C + 1, i);
        segment = (it - sel.segment_begin.begin()) - 1;
        std::copy_n(cand_boxes.data() + 4 * i, 4, boxes_ptr + (b * K + r) * 4);
        scores_ptr[b * K + r] = sel.items[i].score;
        labels_ptr[b * K + r] = segment - b * C;
      }
    }
  });
  return {out_boxes, out_scores, out_labels, out_count};
}

// Ranks by score, highest first, with NaN above every number as torch.sort puts
// it; equal scores keep index order.
struct ScoreRank {
  const double* scores;
  bool operator()(int64_t x, int64_t y) const {
    const bool nan_x = std::isnan(scores[x]), nan_y = std::isnan(scores[y]);
    if (nan_x != nan_y) return nan_x;
    if (!nan_x && scores[x] != scores[y]) return scores[x] > scores[y];
    return x < y;
  }
};

at::Tensor batched_nms_cpu(const at::Tensor& boxes_in, const at::Tensor& scores_in,
                           const at::Tensor& idxs_in, double iou_threshold) {
  check_nms_inputs(boxes_in, scores_in, idxs_in, iou_threshold);
  const int64_t N = boxes_in.size(0);
  if (N == 0) return at::empty({0}, idxs_in.options().dtype(at::kLong));
  const at::Tensor boxes = boxes_in.to(at::kFloat).contiguous();
  const at::Tensor scores = scores_in.to(at::kDouble).contiguous();
  const at::Tensor idxs = idxs_in.to(at::kLong).contiguous();
  const float* box_data = boxes.data_ptr<float>();
  const int64_t* idx_data = idxs.data_ptr<int64_t>();
  const ScoreRank by_score{scores.data_ptr<double>()};

  // Group by idx, each group in rank order.
  std::vector<int64_t> order(static_cast<size_t>(N));
  std::iota(order.begin(), order.end(), 0);
  std::sort(order.begin(), order.end(), [&](int64_t x, int64_t y) {
    if (idx_data[x] != idx_data[y]) return idx_data[x] < idx_data[y];
    return by_score(x, y);
  });
  std::vector<float> ranked_boxes(static_cast<size_t>(4 * N));
  for (int64_t r = 0; r < N; ++r) std::copy_n(box_data + 4 * order[r], 4, &ranked_boxes[4 * r]);
  std::vector<int64_t> run_begin{0};
  for (int64_t r = 1; r < N; ++r) {
    if (idx_data[order[r]] != idx_data[order[r - 1]]) run_begin.push_back(r);
  }
  run_begin.push_back(N);

  std::vector<uint8_t> keep(static_cast<size_t>(N));
  const int64_t runs = static_cast<int64_t>(run_begin.size()) - 1;
  at::parallel_for(0, runs, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> areas;
    for (int64_t g = begin; g < end; ++g) {
      nms_ranked_run(ranked_boxes.data() + 4 * run_begin[g], run_begin[g + 1] - run_begin[g],
                     iou_threshold, keep.data() + run_begin[g], areas);
    }
  });

  std::vector<int64_t> kept;
  for (int64_t r = 0; r < N; ++r) {
    if (keep[r]) kept.push_back(order[r]);
  }
  std::sort(kept.begin(), kept.end(), by_score);
  at::Tensor out = at::empty({static_cast<int64_t>(kept.size())}, idxs_in.options().dtype(at::kLong));
  std::copy(kept.begin(), kept.end(), out.data_ptr<int64_t>());
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(ssd_post, CPU, m) {
  m.impl("decode_threshold_flatten", &decode_threshold_flatten_cpu);
  m.impl("batched_nms", &batched_nms_cpu);
  m.impl("postprocess", &postprocess_cpu);
}

}  // namespace cpu
}  // namespace ssd_post
