// CPU kernel of batched_nms_padded: greedy NMS over each image's padded slots,
// one image per task of at::parallel_for.
//
// An image's non-empty slots are ranked once (one sort of 64-bit rank keys, the
// keys of the CUDA kernel: common/rank_keys.h) and offered in that order to the
// greedy scan of batched_nms (nms.h), with one kept list per label, until max_kept
// survive. The scan only looks at the boxes ranked before the last survivor, and
// per box at the kept boxes of its label.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <functional>
#include <tuple>
#include <unordered_map>
#include <vector>

#include "../common/checks.h"
#include "../common/rank_keys.h"
#include "nms.h"

namespace ssd_post {
namespace cpu {
namespace {

std::tuple<at::Tensor, at::Tensor> batched_nms_padded_cpu(const at::Tensor& boxes_in,
                                                          const at::Tensor& scores_in,
                                                          const at::Tensor& labels_in,
                                                          double iou_threshold, int64_t max_kept,
                                                          bool class_agnostic) {
  const PaddedNmsDims dims =
      check_padded_nms_inputs(boxes_in, scores_in, labels_in, iou_threshold, max_kept);
  const int64_t B = dims.batch, M = dims.slots;
  const int64_t K = padded_nms_capacity(max_kept, M);
  const at::TensorOptions long_options = labels_in.options();
  at::Tensor indices = at::full({B, K}, -1, long_options);
  at::Tensor counts = at::zeros({B}, long_options);
  if (B == 0 || M == 0) return {indices, counts};

  const at::Tensor boxes = boxes_in.to(at::kFloat).contiguous();
  // float16 / bfloat16 scores convert exactly, so the ranking is theirs.
  const at::Tensor scores = scores_in.to(at::kFloat).contiguous();
  const at::Tensor labels = labels_in.contiguous();
  const float* box_data = boxes.data_ptr<float>();
  const float* score_data = scores.data_ptr<float>();
  const int64_t* label_data = labels.data_ptr<int64_t>();
  int64_t* index_data = indices.data_ptr<int64_t>();
  int64_t* count_data = counts.data_ptr<int64_t>();
  const int index_bits = index_bits_for(M);

  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    GreedyScan scan;
    std::vector<uint64_t> ranked;
    // The scan's groups are dense numbers; labels may be any int64.
    std::unordered_map<int64_t, int64_t> group_of_label;
    for (int64_t b = begin; b < end; ++b) {
      const float* image_scores = score_data + b * M;
      const int64_t* image_labels = label_data + b * M;
      ranked.clear();
      for (int64_t slot = 0; slot < M; ++slot) {
        if (image_labels[slot] < 0) continue;  // an empty slot
        ranked.push_back(
            make_rank_key(ordered_score_bits(image_scores[slot]), slot, M, index_bits));
      }
      std::sort(ranked.begin(), ranked.end(), std::greater<uint64_t>());
      scan.start(iou_threshold, K);
      group_of_label.clear();
      int64_t* out = index_data + b * K;
      int64_t count = 0;
      for (size_t r = 0; r < ranked.size() && !scan.full(); ++r) {
        const int64_t slot = rank_key_index(ranked[r], M, index_bits);
        const int64_t group =
            class_agnostic
                ? 0
                : group_of_label.emplace(image_labels[slot], group_of_label.size()).first->second;
        if (scan.offer(box_data + 4 * (b * M + slot), group)) out[count++] = slot;
      }
      count_data[b] = count;
    }
  });
  return {indices, counts};
}

}  // namespace

TORCH_LIBRARY_IMPL(ssd_post, CPU, m) { m.impl("batched_nms_padded", &batched_nms_padded_cpu); }

}  // namespace cpu
}  // namespace ssd_post
