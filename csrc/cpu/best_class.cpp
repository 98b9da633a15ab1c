// CPU kernels of best_class (each anchor's best class score and class) and
// best_class_candidates (the anchors whose best class passes a threshold), from
// class-major scores [B, C, N] (YOLOv8's layout), each in one read of the scores.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <memory>
#include <tuple>
#include <vector>

#include "../common/box_math.h"
#include "../common/checks.h"
#include "vector_kernels.h"

namespace ssd_post {
namespace cpu {
namespace {

// Anchors per task: a few pages of every class row, so each task streams its
// slice of the C rows once.
constexpr int64_t kAnchorsPerTask = 2048;

// Each image's [C, N] block is read row by row: the anchors must be contiguous
// (a slice of YOLOv8's [B, 4 + nc + nm, N] output is); other dtypes and layouts
// are converted once.
at::Tensor rows_of_float(const at::Tensor& scores_in) {
  at::Tensor scores = scores_in.to(at::kFloat);
  if (scores.size(2) > 1 && scores.stride(2) != 1) scores = scores.contiguous();
  return scores;
}

int64_t tasks_per_image_of(int64_t N) { return (N + kAnchorsPerTask - 1) / kAnchorsPerTask; }

// Runs fn(task, image, first anchor, anchors) over the (image, anchor stretch)
// tasks of B images of N anchors, threaded.
template <typename Fn>
void for_each_task(int64_t B, int64_t N, const Fn& fn) {
  const int64_t tasks_per_image = tasks_per_image_of(N);
  at::parallel_for(0, B * tasks_per_image, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t first = (t % tasks_per_image) * kAnchorsPerTask;
      fn(t, t / tasks_per_image, first, std::min(kAnchorsPerTask, N - first));
    }
  });
}

std::tuple<at::Tensor, at::Tensor> best_class_cpu(const at::Tensor& scores_in) {
  check_best_class_input(scores_in);
  const at::Tensor scores = rows_of_float(scores_in);
  const int64_t B = scores.size(0), C = scores.size(1), N = scores.size(2);
  at::Tensor best = at::empty({B, N}, scores.options());
  at::Tensor label = at::empty({B, N}, scores.options().dtype(at::kLong));
  if (best.numel() == 0) return {best, label};
  const float* data = scores.data_ptr<float>();
  float* best_data = best.data_ptr<float>();
  int64_t* label_data = label.data_ptr<int64_t>();
  const int64_t image_stride = scores.stride(0), class_stride = scores.stride(1);
  const auto kernel = vector_kernels().best_class;
  for_each_task(B, N, [&](int64_t, int64_t b, int64_t first, int64_t n) {
    kernel(data + b * image_stride + first, class_stride, C, n, best_data + b * N + first,
           label_data + b * N + first);
  });
  return {best, label};
}

// Of an image's `total` candidates (anchor order), the `keep` best (score
// descending, equal scores by lower anchor), back in anchor order. Scores passed
// a threshold, so none is NaN and the order is strict.
void keep_best(ClassCandidate* candidates, int64_t total, int64_t keep) {
  std::nth_element(candidates, candidates + keep, candidates + total,
                   [](const ClassCandidate& a, const ClassCandidate& b) {
                     return a.score > b.score || (a.score == b.score && a.anchor < b.anchor);
                   });
  std::sort(candidates, candidates + keep, [](const ClassCandidate& a, const ClassCandidate& b) {
    return a.anchor < b.anchor;
  });
}

// The box of each of an image's `count` candidates (anchors[k]): read from boxes
// [4, N] of dtype T (any strides), converted from (cx, cy, w, h) when cxcywh,
// written as float32 rows of out [M, 4] (zeros past count). The scattered reads
// go one coordinate row at a time in anchor order, so each row is one rising
// stream that the hardware prefetcher follows (`given`: count x 4 scratch).
template <typename T>
void write_boxes(const T* boxes, int64_t coord_stride, int64_t anchor_stride, bool cxcywh,
                 const int64_t* anchors, int64_t count, int64_t M, T* given, float* out) {
  for (int i = 0; i < 4; ++i) {
    const T* coordinate = boxes + i * coord_stride;
    for (int64_t k = 0; k < count; ++k) given[4 * k + i] = coordinate[anchors[k] * anchor_stride];
  }
  for (int64_t k = 0; k < count; ++k) {
    if (cxcywh) {
      cxcywh_to_xyxy(given + 4 * k, out + 4 * k);
    } else {
      for (int i = 0; i < 4; ++i) out[4 * k + i] = static_cast<float>(given[4 * k + i]);
    }
  }
  std::fill(out + 4 * count, out + 4 * M, 0.0f);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> best_class_candidates_cpu(
    const at::Tensor& scores_in, double score_thresh, int64_t max_candidates,
    at::OptionalIntArrayRef classes, const c10::optional<at::Tensor>& boxes_in,
    c10::string_view box_format) {
  const bool cxcywh = check_best_class_candidates_inputs(scores_in, score_thresh, max_candidates,
                                                         classes, boxes_in, box_format);
  const at::Tensor scores = rows_of_float(scores_in);
  const int64_t B = scores.size(0), C = scores.size(1), N = scores.size(2);
  const int64_t W = std::min(N, max_candidates);
  const std::vector<uint8_t> allowed = class_allowed_mask(classes, C);
  const uint8_t* allowed_ptr = classes.has_value() ? allowed.data() : nullptr;
  // The scores are float32, compared with the threshold rounded to float32, as
  // torch compares a float32 tensor with a Python float.
  const float thresh = static_cast<float>(score_thresh);
  const float* data = scores.data_ptr<float>();
  const int64_t image_stride = scores.stride(0), class_stride = scores.stride(1);
  const int64_t tasks_per_image = tasks_per_image_of(N);
  // Each task finds its candidates into its own buffer (a few pages of the heap,
  // reused from call to call; only what is found is touched).
  std::vector<std::unique_ptr<ClassCandidate[]>> found(B * tasks_per_image);
  std::vector<int64_t> found_count(B * tasks_per_image, 0);
  const auto kernel = vector_kernels().best_class_above;
  for_each_task(B, N, [&](int64_t t, int64_t b, int64_t first, int64_t n) {
    found[t].reset(new ClassCandidate[n]);
    found_count[t] = kernel(data + b * image_stride + first, class_stride, C, n, thresh,
                            allowed_ptr, first, found[t].get());
  });
  // The outputs are as wide as the fullest image (after its cap): their cost is
  // bounded by what is found, not by N.
  std::vector<int64_t> total(B, 0);
  int64_t M = 0;
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t j = 0; j < tasks_per_image; ++j) total[b] += found_count[b * tasks_per_image + j];
    M = std::max(M, std::min(total[b], W));
  }
  const at::TensorOptions longs = scores.options().dtype(at::kLong);
  at::Tensor anchor = at::empty({B, M}, longs);
  at::Tensor score = at::empty({B, M}, scores.options());
  at::Tensor label = at::empty({B, M}, longs);
  at::Tensor count = at::empty({B}, longs);
  at::Tensor boxes = at::empty({B, boxes_in.has_value() ? M : 0, 4}, scores.options());
  int64_t* anchor_out = anchor.data_ptr<int64_t>();
  float* score_out = score.data_ptr<float>();
  int64_t* label_out = label.data_ptr<int64_t>();
  int64_t* count_out = count.data_ptr<int64_t>();
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    std::vector<ClassCandidate> capped;
    for (int64_t b = begin; b < end; ++b) {
      int64_t* image_anchor = anchor_out + b * M;
      float* image_score = score_out + b * M;
      int64_t* image_label = label_out + b * M;
      int64_t k = 0;
      const auto put = [&](const ClassCandidate& c) {
        image_anchor[k] = c.anchor;
        image_score[k] = c.score;
        image_label[k] = c.label;
        ++k;
      };
      const int64_t* counts = found_count.data() + b * tasks_per_image;
      const std::unique_ptr<ClassCandidate[]>* lists = found.data() + b * tasks_per_image;
      if (total[b] > W) {
        capped.clear();
        for (int64_t j = 0; j < tasks_per_image; ++j) {
          capped.insert(capped.end(), lists[j].get(), lists[j].get() + counts[j]);
        }
        keep_best(capped.data(), total[b], W);
        for (int64_t i = 0; i < W; ++i) put(capped[i]);
      } else {
        for (int64_t j = 0; j < tasks_per_image; ++j) {
          for (int64_t i = 0; i < counts[j]; ++i) put(lists[j][i]);
        }
      }
      count_out[b] = k;
      std::fill(image_anchor + k, image_anchor + M, int64_t{-1});
      std::fill(image_score + k, image_score + M, 0.0f);
      std::fill(image_label + k, image_label + M, int64_t{-1});
      if (boxes_in.has_value()) {
        const at::Tensor& given = *boxes_in;
        AT_DISPATCH_FLOATING_TYPES_AND2(
            at::kHalf, at::kBFloat16, given.scalar_type(), "best_class_candidates", [&] {
              std::vector<scalar_t> gathered(4 * k);
              write_boxes(given.data_ptr<scalar_t>() + b * given.stride(0), given.stride(1),
                          given.stride(2), cxcywh, image_anchor, k, M, gathered.data(),
                          boxes.data_ptr<float>() + b * M * 4);
            });
      }
    }
  });
  return {anchor, score, label, count, boxes};
}

}  // namespace

TORCH_LIBRARY_IMPL(ssd_post, CPU, m) {
  m.impl("best_class", &best_class_cpu);
  m.impl("best_class_candidates", &best_class_candidates_cpu);
}

}  // namespace cpu
}  // namespace ssd_post
