// The loops of the CPU ops that run a SIMD vector at a time, behind one table
// of function pointers chosen once per process.
//
// vector_kernels.cpp is written once against at::vec::Vectorized<float> (ATen's
// portable SIMD: NEON on ARM, AVX2 or a generic fallback on x86, VSX, ...) and is
// compiled twice on x86: with the baseline flags (namespace `baseline`) and, as
// ATen does for its own kernels, with AVX2 + FMA enabled (namespace `avx2`, only
// when setup.py defines SSD_POST_HAVE_AVX2_KERNELS). vector_dispatch.cpp picks
// the widest variant the CPU runs, honouring ATEN_CPU_CAPABILITY like torch's own
// kernels do.
#pragma once

#include <cstdint>

namespace ssd_post {
namespace cpu {

// Coordinates of one run of boxes as separate arrays, padded past n with
// zero-size boxes up to kVectorPad entries, so a vector may read past the end.
struct BoxColumns {
  const float* x1;
  const float* y1;
  const float* x2;
  const float* y2;
  const float* area;
};

// Room past the last box for one vector of the widest variant (8 floats for AVX2,
// 4 for NEON); vector_kernels.cpp checks its vector fits.
constexpr int64_t kVectorPad = 16;

// An anchor whose best class passes (best_class_candidates).
struct ClassCandidate {
  int64_t anchor;
  float score;
  int64_t label;
};

struct VectorKernels {
  // See float_rows_may_pass in row_bound.h.
  int64_t (*rows_may_pass)(const float* rows, int64_t C, int64_t background, float bound,
                           bool use_denominator, int64_t begin, int64_t end, int32_t* passing);
  // See columns_above in row_bound.h.
  int64_t (*columns_above)(const float* row, const float* limit, int64_t C, int32_t* columns);
  // Greedy NMS over n ranked boxes: keep[] holds 1 on entry; clears keep[j] for
  // each box whose IoU (box_iou's op order) with an earlier kept box is > thresh.
  // any_nan: whether a coordinate is NaN (then the slower NaN-exact max / min).
  void (*greedy_nms)(const BoxColumns& boxes, int64_t n, float thresh, bool any_nan,
                     uint8_t* keep);
  // Whether one of the first `count` boxes of `kept` (the kept boxes of a group,
  // readable up to count + kVectorPad) suppresses `box` = (x1, y1, x2, y2, area),
  // the next box of the group in rank order: IoU(kept, box) > thresh in box_iou's
  // op order. any_nan: whether a coordinate of either side is NaN.
  bool (*any_suppresses)(const BoxColumns& kept, int64_t count, const float* box, float thresh,
                         bool any_nan);
  // The largest non-NaN value of x[0, n) (-inf if none): some x[c] > bound exactly
  // when it is > bound, and a NaN never passes (select_per_level's row test).
  float (*max_ignoring_nan)(const float* x, int64_t n);
  // best_class (common/best_class.h) of anchors [0, n) of one image's class-major
  // scores: column c of anchor a at scores[c * class_stride + a]; a vector of
  // anchors at a time, the same comparisons as best_class_of.
  void (*best_class)(const float* scores, int64_t class_stride, int64_t C, int64_t n,
                     float* best, int64_t* label);
  // The anchors of [0, n) (same layout as best_class) whose best class scores
  // > thresh (NaN never) and is allowed (allowed[label] != 0; every class when
  // allowed is null), in anchor order: out[i] = {first_anchor + a, best, label}.
  // Returns how many were written (at most n). Reads the scores once, at the cost
  // of a max: only the anchors that pass look for their class.
  int64_t (*best_class_above)(const float* scores, int64_t class_stride, int64_t C, int64_t n,
                              float thresh, const uint8_t* allowed, int64_t first_anchor,
                              ClassCandidate* out);
  // Which variant this is ("baseline" or "avx2"), for tests and benchmarks.
  const char* name;
};

namespace baseline {
VectorKernels kernels();
}  // namespace baseline

#if defined(SSD_POST_HAVE_AVX2_KERNELS)
namespace avx2 {
VectorKernels kernels();
}  // namespace avx2
#endif

// The variant for this process, chosen on the first call.
const VectorKernels& vector_kernels();

}  // namespace cpu
}  // namespace ssd_post
