// CPU kernels of the three ssd_post ops.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <limits>
#include <unordered_map>

#include "../common/box_math.h"
#include "../common/checks.h"
#include "../common/op_inputs.h"
#include "bounded_nms.h"
#include "candidates.h"
#include "debug_counters.h"
#include "decode.h"
#include "nms.h"

namespace ssd_post {
namespace cpu {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> decode_threshold_flatten_cpu(
    const at::Tensor& locs, const at::Tensor& logits, const at::Tensor& anchors,
    const at::Tensor& image_sizes, double score_thresh, int64_t topk_candidates,
    at::ArrayRef<double> box_weights, c10::string_view score_activation,
    c10::optional<int64_t> background_class, bool clip_boxes) {
  const BatchDims dims = check_decode_inputs(locs, logits, anchors, image_sizes, score_thresh,
                                             topk_candidates, box_weights, background_class);
  const SelectParams params = make_select_params(dims, score_thresh, topk_candidates,
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

// The image cut of postprocess's candidate scan (CandidateScanner::set_image_cap):
// only the best 8 K candidates of an image are taken, which in a dense image saves
// most of the per-class pushes and softmax rows. An image with fewer than K
// survivors among them is scanned again without the cut: 8 K leaves room for 7 K
// suppressed boxes. No cut (0) where it would not be below `most`, the number of
// candidates an image can send to NMS (it would only cost memory).
int64_t image_cap(int64_t K, int64_t most) {
  const int64_t cap = std::max<int64_t>(8 * K, 512);
  return cap < most ? cap : 0;
}

// The candidates of image b from a fresh scan of all its anchors (per class, the
// top-k cut applied) into nms.
void add_image(CandidateScanner& scanner, const at::Tensor& logits, int64_t b,
               const SelectParams& params, BoundedNms& nms) {
  const int64_t C = logits.size(2);
  scanner.reset();
  scanner.scan(logits, b, 0, logits.size(1));
  for (int64_t c = 0; c < C; ++c) {
    BoundedCandidates& cands = scanner.per_class()[c];
    cands.keep_best(params.topk_candidates);
    nms.add_class(cands.items(), c);
  }
}

// Scans image b again without the image cut, after nms.run found the cut too high.
void rescan_image(const at::Tensor& logits, int64_t b, const SelectParams& params,
                  const DecodeInputs& in, BoundedNms& nms, const PostprocessOutputs& out) {
  count_event(Counter::kImageRescans, 1);
  CandidateScanner scanner(params, logits.size(2));
  add_image(scanner, logits, b, params, nms);
  nms.run(b, in.params, out, kNoCut);
}

// B >= threads: each image runs the whole pipeline on one thread, with buffers
// that the thread reuses, so the extra memory is per thread, not per image.
void postprocess_per_image(const at::Tensor& logits, const SelectParams& params,
                           const DecodeInputs& in, double nms_thresh, int64_t cap,
                           const PostprocessOutputs& out) {
  const int64_t B = logits.size(0), C = logits.size(2);
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    CandidateScanner scanner(params, C);
    scanner.set_image_cap(cap);
    BoundedNms nms(nms_thresh);
    for (int64_t b = begin; b < end; ++b) {
      add_image(scanner, logits, b, params, nms);
      if (!nms.run(b, in.params, out, scanner.image_floor())) {
        rescan_image(logits, b, params, in, nms, out);
      }
    }
  });
}

// B < threads: the anchors of each image are split across threads and the
// (image, class) segments merged, then each image is scanned on one thread.
void postprocess_split_anchors(const at::Tensor& logits, const SelectParams& params,
                               const DecodeInputs& in, double nms_thresh, int64_t cap,
                               const PostprocessOutputs& out) {
  const int64_t B = logits.size(0), C = logits.size(2);
  std::vector<float> floors;
  const std::vector<std::vector<Candidate>> merged = rank_segments(logits, params, cap, &floors);
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    BoundedNms nms(nms_thresh);
    for (int64_t b = begin; b < end; ++b) {
      for (int64_t c = 0; c < C; ++c) nms.add_class(merged[b * C + c], c);
      if (!nms.run(b, in.params, out, floors[b])) rescan_image(logits, b, params, in, nms, out);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> postprocess_cpu(
    const at::Tensor& locs, const at::Tensor& logits_in, const at::Tensor& anchors,
    const at::Tensor& image_sizes, double score_thresh, double nms_thresh,
    int64_t topk_candidates, int64_t detections_per_img, at::ArrayRef<double> box_weights,
    c10::string_view score_activation, c10::optional<int64_t> background_class,
    bool clip_boxes) {
  const BatchDims dims = check_decode_inputs(locs, logits_in, anchors, image_sizes, score_thresh,
                                             topk_candidates, box_weights, background_class);
  check_postprocess_scalars(nms_thresh, detections_per_img);
  const SelectParams params = make_select_params(dims, score_thresh, topk_candidates,
                                                 std::string(score_activation), background_class);
  const DecodeInputs in = make_decode_inputs(locs, anchors, image_sizes, box_weights, clip_boxes);
  const at::Tensor logits = logits_in.contiguous();

  const int64_t B = dims.batch;
  const int64_t K = padded_detections(detections_per_img, params.topk_candidates, dims.anchors,
                                      dims.classes, params.background_class);
  at::Tensor out_boxes = at::zeros({B, K, 4}, locs.options().dtype(at::kFloat));
  at::Tensor out_scores = at::zeros({B, K}, locs.options().dtype(at::kFloat));
  at::Tensor out_labels = at::zeros({B, K}, locs.options().dtype(at::kLong));
  at::Tensor out_count = at::zeros({B}, locs.options().dtype(at::kLong));
  // -1 marks the rows past num_detections, which no image fills.
  at::Tensor out_anchors = at::full({B, K}, -1, locs.options().dtype(at::kLong));
  if (B == 0 || dims.anchors == 0) {
    return {out_boxes, out_scores, out_labels, out_count, out_anchors};
  }
  const PostprocessOutputs out{out_boxes.data_ptr<float>(), out_scores.data_ptr<float>(),
                               out_labels.data_ptr<int64_t>(), out_anchors.data_ptr<int64_t>(),
                               out_count.data_ptr<int64_t>(), K};
  const int64_t most =
      padded_detections(std::numeric_limits<int64_t>::max(), params.topk_candidates,
                        dims.anchors, dims.classes, params.background_class);
  const int64_t cap = image_cap(K, most);
  const int64_t chunks = anchor_chunks_per_image(B, dims.anchors);
  if (chunks == 1) {
    postprocess_per_image(logits, params, in, nms_thresh, cap, out);
  } else {
    postprocess_split_anchors(logits, params, in, nms_thresh, cap, out);
  }
  return {out_boxes, out_scores, out_labels, out_count, out_anchors};
}

// A box of batched_nms with its rank: score key descending (NaN above every
// number, as torch.sort puts it; -0.0 equal to 0.0), then index ascending. The
// keys are computed once, so ranking compares integers instead of testing doubles
// for NaN at every comparison.
struct Ranked {
  uint64_t score_key;
  int64_t index;
};

uint64_t score_key(double score) {
  if (std::isnan(score)) return std::numeric_limits<uint64_t>::max();
  const uint64_t bits = std::bit_cast<uint64_t>(score == 0.0 ? 0.0 : score);
  // IEEE bits order like the values once negatives are flipped and positives moved up.
  return (bits >> 63) != 0 ? ~bits : bits | (uint64_t{1} << 63);
}

bool ranks_before(const Ranked& x, const Ranked& y) {
  return x.score_key > y.score_key || (x.score_key == y.score_key && x.index < y.index);
}

// Floor division: the image of key `key` when keys are image * keys_per_image + class
// (keys_per_image >= 1); negative keys fall into negative images.
int64_t image_of_key(int64_t key, int64_t keys_per_image) {
  const int64_t q = key / keys_per_image;
  return key % keys_per_image < 0 ? q - 1 : q;
}

// Candidates of a bounded run are ranked a chunk at a time: the best `chunk`
// (selected, then sorted), and the next chunk, twice as large, only if the scan
// wants more. The first chunk covers max_kept survivors and a margin for the
// boxes they suppress.
int64_t first_chunk(int64_t max_kept) { return std::max<int64_t>(64, max_kept + max_kept / 2); }

at::Tensor batched_nms_cpu(const at::Tensor& boxes_in, const at::Tensor& scores_in,
                           const at::Tensor& idxs_in, double iou_threshold,
                           c10::optional<int64_t> max_kept, c10::optional<int64_t> keys_per_image) {
  check_nms_inputs(boxes_in, scores_in, idxs_in, iou_threshold);
  check_nms_limits(max_kept, keys_per_image);
  const int64_t N = boxes_in.size(0);
  if (N == 0) return at::empty({0}, idxs_in.options().dtype(at::kLong));
  const at::Tensor boxes = boxes_in.to(at::kFloat).contiguous();
  const at::Tensor scores = scores_in.to(at::kDouble).contiguous();
  const at::Tensor idxs = idxs_in.to(at::kLong).contiguous();
  const float* box_data = boxes.data_ptr<float>();
  const double* score_data = scores.data_ptr<double>();
  const int64_t* idx_data = idxs.data_ptr<int64_t>();
  const int64_t limit = max_kept.value_or(-1);

  // The runs scanned one at a time: images when the limit is per image (each
  // image's candidates in rank order, one kept list per group), else groups.
  const bool per_image = keys_per_image.has_value();
  const auto run_of = [&](const Ranked& r) {
    return per_image ? image_of_key(idx_data[r.index], *keys_per_image) : idx_data[r.index];
  };
  std::vector<Ranked> order(static_cast<size_t>(N));
  bool grouped = true;
  for (int64_t i = 0; i < N; ++i) {
    order[i] = {score_key(score_data[i]), i};
    grouped = grouped && (i == 0 || run_of(order[i - 1]) <= run_of(order[i]));
  }
  if (!grouped) {
    std::stable_sort(order.begin(), order.end(),
                     [&](const Ranked& x, const Ranked& y) { return run_of(x) < run_of(y); });
  }
  std::vector<int64_t> run_begin{0};
  for (int64_t r = 1; r < N; ++r) {
    if (run_of(order[r]) != run_of(order[r - 1])) run_begin.push_back(r);
  }
  run_begin.push_back(N);

  std::vector<uint8_t> keep(static_cast<size_t>(N), 0);  // by box index
  const int64_t runs = static_cast<int64_t>(run_begin.size()) - 1;
  at::parallel_for(0, runs, 1, [&](int64_t begin, int64_t end) {
    NmsScratch scratch;
    std::vector<float> ranked_boxes;
    std::vector<uint8_t> ranked_keep;
    std::unordered_map<int64_t, int64_t> group_of_key;  // per image: key -> group of the scan
    for (int64_t g = begin; g < end; ++g) {
      Ranked* first = order.data() + run_begin[g];
      Ranked* last = order.data() + run_begin[g + 1];
      const int64_t n = last - first;
      if (limit < 0) {
        std::sort(first, last, ranks_before);
        ranked_boxes.resize(static_cast<size_t>(4 * n));
        ranked_keep.resize(static_cast<size_t>(n));
        for (int64_t r = 0; r < n; ++r) {
          std::copy_n(box_data + 4 * first[r].index, 4, &ranked_boxes[4 * r]);
        }
        nms_ranked_run(ranked_boxes.data(), n, iou_threshold, ranked_keep.data(), scratch);
        for (int64_t r = 0; r < n; ++r) keep[first[r].index] = ranked_keep[r];
        continue;
      }
      GreedyScan& scan = scratch.scan;
      scan.start(iou_threshold, limit);
      group_of_key.clear();
      Ranked* next = first;
      for (int64_t chunk = first_chunk(limit); next < last && !scan.full(); chunk *= 2) {
        Ranked* chunk_end = last - next > chunk ? next + chunk : last;
        if (chunk_end < last) std::nth_element(next, chunk_end, last, ranks_before);
        std::sort(next, chunk_end, ranks_before);
        for (; next < chunk_end && !scan.full(); ++next) {
          const int64_t i = next->index;
          int64_t group = 0;
          if (per_image) group = group_of_key.emplace(idx_data[i], group_of_key.size()).first->second;
          keep[i] = scan.offer(box_data + 4 * i, group) ? 1 : 0;
        }
      }
    }
  });

  std::vector<Ranked> kept;
  for (int64_t i = 0; i < N; ++i) {
    if (keep[i]) kept.push_back({score_key(score_data[i]), i});
  }
  std::sort(kept.begin(), kept.end(), ranks_before);
  at::Tensor out = at::empty({static_cast<int64_t>(kept.size())}, idxs_in.options().dtype(at::kLong));
  int64_t* out_data = out.data_ptr<int64_t>();
  for (size_t r = 0; r < kept.size(); ++r) out_data[r] = kept[r].index;
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
