// CPU kernel of best_class: each anchor's best class score and class from
// class-major scores [B, C, N] (YOLOv8's layout), in one read of the scores.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <tuple>

#include "../common/checks.h"
#include "vector_kernels.h"

namespace ssd_post {
namespace cpu {
namespace {

// Anchors per task: a few pages of every class row, so each task streams its
// slice of the C rows once.
constexpr int64_t kAnchorsPerTask = 2048;

std::tuple<at::Tensor, at::Tensor> best_class_cpu(const at::Tensor& scores_in) {
  check_best_class_input(scores_in);
  // Each image's [C, N] block read row by row: the anchors must be contiguous
  // (a slice of YOLOv8's [B, 4 + nc + nm, N] output is); other dtypes and layouts
  // are converted once.
  at::Tensor scores = scores_in.to(at::kFloat);
  if (scores.size(2) > 1 && scores.stride(2) != 1) scores = scores.contiguous();
  const int64_t B = scores.size(0), C = scores.size(1), N = scores.size(2);
  at::Tensor best = at::empty({B, N}, scores.options());
  at::Tensor label = at::empty({B, N}, scores.options().dtype(at::kLong));
  if (best.numel() == 0) return {best, label};
  const float* data = scores.data_ptr<float>();
  float* best_data = best.data_ptr<float>();
  int64_t* label_data = label.data_ptr<int64_t>();
  const int64_t image_stride = scores.stride(0), class_stride = scores.stride(1);
  const int64_t tasks_per_image = (N + kAnchorsPerTask - 1) / kAnchorsPerTask;
  const auto kernel = vector_kernels().best_class;
  at::parallel_for(0, B * tasks_per_image, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / tasks_per_image;
      const int64_t first = (t % tasks_per_image) * kAnchorsPerTask;
      const int64_t n = std::min(kAnchorsPerTask, N - first);
      kernel(data + b * image_stride + first, class_stride, C, n, best_data + b * N + first,
             label_data + b * N + first);
    }
  });
  return {best, label};
}

}  // namespace

TORCH_LIBRARY_IMPL(ssd_post, CPU, m) { m.impl("best_class", &best_class_cpu); }

}  // namespace cpu
}  // namespace ssd_post
