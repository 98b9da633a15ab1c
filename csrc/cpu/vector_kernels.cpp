// The vectorised loops of the CPU op, written once against at::vec::Vectorized.
// setup.py compiles this file once with the baseline flags and, on x86, once more
// with AVX2 + FMA and CPU_CAPABILITY_AVX2 defined (see vector_kernels.h). ATen's
// vector types live in an inline namespace named after CPU_CAPABILITY, so the two
// compilations never share a vector function; ours go to `baseline` / `avx2`.
//
// -ffp-contract=off holds for both compilations: the IoU must round like
// torchvision's separate ops, FMA or not.
#include "vector_kernels.h"

#include "../common/best_class.h"

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/llvmMathExtras.h>

#include <cmath>
#include <limits>

#if defined(CPU_CAPABILITY_AVX2)
#define SSD_POST_VECTOR_VARIANT avx2
#else
#define SSD_POST_VECTOR_VARIANT baseline
#endif

namespace ssd_post {
namespace cpu {
namespace SSD_POST_VECTOR_VARIANT {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kWidth = Vec::size();
static_assert(kWidth <= kVectorPad, "a vector must fit in the padding after the last box");
static_assert(kWidth <= 32, "lane masks are 32-bit");

constexpr float kMinusInf = -std::numeric_limits<float>::infinity();

// Lane-wise max_first / min_first of macros.h: (a < b) ? b : a and (b < a) ? b : a,
// NaN and signed zeros included, so the vector IoU equals box_iou bit for bit.
// (at::vec::maximum propagates NaN instead, which would suppress differently.)
struct ExactOrder {
  static Vec max(const Vec& a, const Vec& b) { return Vec::blendv(a, b, a < b); }
  static Vec min(const Vec& a, const Vec& b) { return Vec::blendv(a, b, b < a); }
};

// One instruction per max / min on every ISA (MAXPS, FMAXNM, ...), but what a NaN
// operand gives differs between them. Exact where no operand is NaN, which is
// all the row max needs (row_bound.h) and all NMS needs on NaN-free boxes (see
// suppressed()).
struct FastOrder {
  static Vec max(const Vec& a, const Vec& b) { return at::vec::clamp_min(a, b); }
  static Vec min(const Vec& a, const Vec& b) { return at::vec::clamp_max(a, b); }
};

// Bit l set where lane l of a comparison result is true (all bits set).
inline uint32_t lane_mask(const Vec& compare) {
  return ~static_cast<uint32_t>(compare.zero_mask()) & ((uint32_t{1} << kWidth) - 1);
}

inline unsigned lowest_bit(uint32_t mask) {
  return static_cast<unsigned>(c10::llvm::countTrailingZeros(mask));
}

// ---- the row bound of the softmax path ----

inline float scalar_max(const float* x, int64_t n, float m) {
  for (int64_t i = 0; i < n; ++i) m = x[i] > m ? x[i] : m;
  return m;
}

// Max of x[0, n). Ranges of a vector or more finish with one overlapping load
// instead of a scalar tail: max does not mind seeing an element twice. NaN
// handling does not matter here (see row_bound.h).
inline float max_range(const float* x, int64_t n) {
  if (n < kWidth) return scalar_max(x, n, kMinusInf);
  Vec m0 = Vec::loadu(x), m1 = m0;
  int64_t i = kWidth;
  for (; i + 2 * kWidth <= n; i += 2 * kWidth) {
    m0 = FastOrder::max(m0, Vec::loadu(x + i));
    m1 = FastOrder::max(m1, Vec::loadu(x + i + kWidth));
  }
  if (i + kWidth <= n) {
    m0 = FastOrder::max(m0, Vec::loadu(x + i));
    i += kWidth;
  }
  if (i < n) m1 = FastOrder::max(m1, Vec::loadu(x + n - kWidth));
  return at::vec::vec_reduce_all<float>(
      [](const Vec& a, const Vec& b) { return FastOrder::max(a, b); }, FastOrder::max(m0, m1));
}

// (1 + y / 8)^8 for y >= -8, else 0: at most exp(y) (1 + u <= e^u, raised to the
// 8th power), in 5 vector operations where exp takes tens.
inline float exp_lower_bound(float y) {
  float t = 1.f + y * 0.125f;
  t = t > 0.f ? t : 0.f;
  t = t * t;
  t = t * t;
  return t * t;
}

// A lower bound of the softmax denominator sum_k exp(x_k - m) of row x[0, n).
// Float rounding moves it by a relative 1e-5 at most, well inside kBoundMargin.
inline float sum_exp_lower_bound(const float* x, int64_t n, float m) {
  const Vec one(1.f), eighth(0.125f), zero(0.f), max_value(m);
  Vec sum(0.f);
  int64_t i = 0;
  for (; i + kWidth <= n; i += kWidth) {
    Vec t = FastOrder::max(zero, one + (Vec::loadu(x + i) - max_value) * eighth);
    t = t * t;
    t = t * t;
    sum = sum + t * t;
  }
  float total = at::vec::vec_reduce_all<float>([](const Vec& a, const Vec& b) { return a + b; },
                                                sum);
  for (; i < n; ++i) total += exp_lower_bound(x[i] - m);
  return total;
}

// p_c = exp(x_c - m) / S <= exp(x_c - m) / S_lo with S_lo <= S: a row whose best
// foreground logit fails (x - m) - log(S_lo) > bound cannot pass. The cheap test
// without S_lo comes first: it decides most rows of a sparse image.
inline bool row_may_pass(const float* row, int64_t C, int64_t background, float bound,
                         bool use_denominator) {
  float fg, m;
  if (background < 0) {
    fg = m = max_range(row, C);  // the max column itself gives x - m = 0
  } else {
    fg = max_range(row, background);
    const float rest = max_range(row + background + 1, C - background - 1);
    fg = rest > fg ? rest : fg;
    const float bg = row[background];
    m = bg > fg ? bg : fg;
  }
  const float y = fg - m;
  if (!(y > bound)) return false;
  if (!use_denominator) return true;
  return (y - std::log(sum_exp_lower_bound(row, C, m))) > bound;
}

int64_t rows_may_pass(const float* rows, int64_t C, int64_t background, float bound,
                      bool use_denominator, int64_t begin, int64_t end, int32_t* passing) {
  int64_t count = 0;
  for (int64_t r = begin; r < end; ++r) {
    // Branch-free append: the store always happens, the count moves on a pass.
    passing[count] = static_cast<int32_t>(r);
    count += row_may_pass(rows + r * C, C, background, bound, use_denominator) ? 1 : 0;
  }
  return count;
}

int64_t columns_above(const float* row, const float* limit, int64_t C, int32_t* columns) {
  int64_t count = 0, c = 0;
  for (; c + kWidth <= C; c += kWidth) {
    // Ordered compare: false for NaN, like the scalar `>`.
    uint32_t mask = lane_mask(Vec::loadu(row + c) > Vec::loadu(limit + c));
    while (mask != 0) {
      columns[count++] = static_cast<int32_t>(c + lowest_bit(mask));
      mask &= mask - 1;
    }
  }
  for (; c < C; ++c) {
    if (row[c] > limit[c]) columns[count++] = static_cast<int32_t>(c);
  }
  return count;
}

// ---- greedy NMS ----

// Bit l set where box a (earlier in rank order) suppresses box b in lane l:
// box_iou(a, b)'s op order, so both loops below compare the same bits as the
// scalar box_iou. One side is usually a broadcast box.
//
// With FastOrder on NaN-free boxes the corner max / min are exact (up to the sign
// of a zero, which cannot move an IoU across a threshold >= 0). A NaN can still
// appear inside, as inf - inf in a width: ExactOrder's max_first(0, NaN) gives
// width 0 and so IoU 0 or NaN, FastOrder may give width NaN and so IoU NaN;
// neither suppresses, so both orders keep the same boxes.
template <typename Order>
inline uint32_t iou_above(const Vec& ax1, const Vec& ay1, const Vec& ax2, const Vec& ay2,
                          const Vec& aarea, const Vec& bx1, const Vec& by1, const Vec& bx2,
                          const Vec& by2, const Vec& barea, const Vec& thresh) {
  const Vec zero(0.f);
  const Vec xx1 = Order::max(ax1, bx1);
  const Vec yy1 = Order::max(ay1, by1);
  const Vec xx2 = Order::min(ax2, bx2);
  const Vec yy2 = Order::min(ay2, by2);
  const Vec iw = Order::max(zero, xx2 - xx1);
  const Vec ih = Order::max(zero, yy2 - yy1);
  const Vec inter = iw * ih;
  const Vec uni = (aarea + barea) - inter;
  return lane_mask((inter / uni) > thresh);
}

// Bit l set where the kept box a suppresses box j + l.
template <typename Order>
inline uint32_t suppressed(const BoxColumns& b, int64_t j, const Vec& ax1, const Vec& ay1,
                           const Vec& ax2, const Vec& ay2, const Vec& aarea, const Vec& thresh) {
  return iou_above<Order>(ax1, ay1, ax2, ay2, aarea, Vec::loadu(b.x1 + j), Vec::loadu(b.y1 + j),
                          Vec::loadu(b.x2 + j), Vec::loadu(b.y2 + j), Vec::loadu(b.area + j),
                          thresh);
}

template <typename Order>
void greedy(const BoxColumns& b, int64_t n, float thresh, uint8_t* keep) {
  const Vec t(thresh);
  for (int64_t i = 0; i < n; ++i) {
    if (!keep[i]) continue;
    const Vec ax1(b.x1[i]), ay1(b.y1[i]), ax2(b.x2[i]), ay2(b.y2[i]), aarea(b.area[i]);
    for (int64_t j = i + 1; j < n; j += kWidth) {
      // Padding boxes past n never pass the threshold, so no bit past n is set.
      uint32_t mask = suppressed<Order>(b, j, ax1, ay1, ax2, ay2, aarea, t);
      while (mask != 0) {
        keep[j + lowest_bit(mask)] = 0;
        mask &= mask - 1;
      }
    }
  }
}

void greedy_nms(const BoxColumns& b, int64_t n, float thresh, bool any_nan, uint8_t* keep) {
  if (any_nan) {
    greedy<ExactOrder>(b, n, thresh, keep);
  } else {
    greedy<FastOrder>(b, n, thresh, keep);
  }
}

// Whether one of the `count` kept boxes suppresses `box` (x1, y1, x2, y2, area):
// the kept boxes are the earlier ones, so they take box_iou's first argument.
template <typename Order>
bool kept_suppress(const BoxColumns& kept, int64_t count, const float* box, float thresh) {
  const Vec bx1(box[0]), by1(box[1]), bx2(box[2]), by2(box[3]), barea(box[4]), t(thresh);
  for (int64_t l = 0; l < count; l += kWidth) {
    uint32_t mask = iou_above<Order>(Vec::loadu(kept.x1 + l), Vec::loadu(kept.y1 + l),
                                     Vec::loadu(kept.x2 + l), Vec::loadu(kept.y2 + l),
                                     Vec::loadu(kept.area + l), bx1, by1, bx2, by2, barea, t);
    // Lanes past `count` read whatever the padding holds: ignored.
    if (count - l < kWidth) mask &= (uint32_t{1} << (count - l)) - 1;
    if (mask != 0) return true;
  }
  return false;
}

float max_ignoring_nan(const float* x, int64_t n) {
  const Vec minus_inf(kMinusInf);
  Vec m0 = minus_inf, m1 = minus_inf;
  int64_t i = 0;
  // `v > m` is false where v is NaN, so the blend keeps m there.
  for (; i + 2 * kWidth <= n; i += 2 * kWidth) {
    const Vec v0 = Vec::loadu(x + i), v1 = Vec::loadu(x + i + kWidth);
    m0 = Vec::blendv(m0, v0, v0 > m0);
    m1 = Vec::blendv(m1, v1, v1 > m1);
  }
  for (; i + kWidth <= n; i += kWidth) {
    const Vec v = Vec::loadu(x + i);
    m0 = Vec::blendv(m0, v, v > m0);
  }
  // No lane holds a NaN, so the order of the reduction does not matter.
  float m = at::vec::vec_reduce_all<float>(
      [](const Vec& a, const Vec& b) { return FastOrder::max(a, b); }, FastOrder::max(m0, m1));
  for (; i < n; ++i) m = x[i] > m ? x[i] : m;
  return m;
}

// Anchors per tile of best_class: its running best, class and NaN mask stay in L1
// while each class row streams through a tile's contiguous stretch.
constexpr int64_t kBestClassTile = 1024;

void best_class(const float* scores, int64_t class_stride, int64_t C, int64_t n, float* best,
                int64_t* label) {
  const Vec nan_value(std::numeric_limits<float>::quiet_NaN());
  alignas(64) float top[kBestClassTile];
  alignas(64) float top_class[kBestClassTile];  // exact: class indices are far below 2^24
  alignas(64) float any_nan[kBestClassTile];    // all-ones lanes where a score was NaN
  const int64_t vectors_end = n - n % kWidth;
  for (int64_t start = 0; start < vectors_end; start += kBestClassTile) {
    const int64_t t = std::min(kBestClassTile, vectors_end - start);
    const float* row = scores + start;
    for (int64_t i = 0; i < t; i += kWidth) {
      const Vec v = Vec::loadu(row + i);
      v.store(top + i);
      Vec(0.0f).store(top_class + i);
      (v != v).store(any_nan + i);
    }
    // The comparisons of best_class_of, class after class, a vector of anchors at a time.
    for (int64_t c = 1; c < C; ++c) {
      row = scores + c * class_stride + start;
      const Vec class_value(static_cast<float>(c));
      for (int64_t i = 0; i < t; i += kWidth) {
        const Vec v = Vec::loadu(row + i);
        const Vec current = Vec::loadu(top + i);
        const Vec greater = v > current;  // strict, and false where either is NaN
        Vec::blendv(current, v, greater).store(top + i);
        Vec::blendv(Vec::loadu(top_class + i), class_value, greater).store(top_class + i);
        (Vec::loadu(any_nan + i) | (v != v)).store(any_nan + i);
      }
    }
    for (int64_t i = 0; i < t; i += kWidth) {
      Vec::blendv(Vec::loadu(top + i), nan_value, Vec::loadu(any_nan + i)).store(best + start + i);
    }
    for (int64_t i = 0; i < t; ++i) label[start + i] = static_cast<int64_t>(top_class[i]);
  }
  for (int64_t a = vectors_end; a < n; ++a) {
    const float* column = scores + a;
    best_class_of([&](int64_t c) { return column[c * class_stride]; }, C, best + a, label + a);
  }
}

// Anchors per tile of best_class_above: the tile's C class rows (C * 2 KiB) stay
// in L2 between the max pass and the class search of the anchors that pass.
constexpr int64_t kAboveTile = 512;

int64_t best_class_above(const float* scores, int64_t class_stride, int64_t C, int64_t n,
                         float thresh, const uint8_t* allowed, int64_t first_anchor,
                         ClassCandidate* out) {
  int64_t count = 0;
  // best_class_of on the anchor's column: the one rule for the class, and the
  // score reported (the max pass only decides which anchors look).
  const auto emit = [&](int64_t a) {
    const float* column = scores + a;
    float best;
    int64_t label;
    best_class_of([&](int64_t c) { return column[c * class_stride]; }, C, &best, &label);
    if (best > thresh && (allowed == nullptr || allowed[label])) {
      out[count++] = {first_anchor + a, best, label};
    }
  };
  alignas(64) float top[kAboveTile];
  const Vec limit(thresh);
  const int64_t vectors_end = n - n % kWidth;
  for (int64_t start = 0; start < vectors_end; start += kAboveTile) {
    const int64_t t = std::min(kAboveTile, vectors_end - start);
    const float* row = scores + start;
    for (int64_t i = 0; i < t; i += kWidth) Vec::loadu(row + i).store(top + i);
    // The max of each anchor, one instruction a vector (FastOrder): exact where no
    // score is NaN; an anchor with a NaN may pass or fail this filter, and emit's
    // best_class_of, which is NaN then, rejects it. Two class rows per sweep.
    int64_t c = 1;
    for (; c + 1 < C; c += 2) {
      const float* first = scores + c * class_stride + start;
      const float* second = first + class_stride;
      for (int64_t i = 0; i < t; i += kWidth) {
        const Vec pair = FastOrder::max(Vec::loadu(first + i), Vec::loadu(second + i));
        FastOrder::max(Vec::loadu(top + i), pair).store(top + i);
      }
    }
    if (c < C) {
      row = scores + c * class_stride + start;
      for (int64_t i = 0; i < t; i += kWidth) {
        FastOrder::max(Vec::loadu(top + i), Vec::loadu(row + i)).store(top + i);
      }
    }
    for (int64_t i = 0; i < t; i += kWidth) {
      for (uint32_t mask = lane_mask(Vec::loadu(top + i) > limit); mask != 0; mask &= mask - 1) {
        emit(start + i + lowest_bit(mask));
      }
    }
  }
  for (int64_t a = vectors_end; a < n; ++a) emit(a);
  return count;
}

bool any_suppresses(const BoxColumns& kept, int64_t count, const float* box, float thresh,
                    bool any_nan) {
  return any_nan ? kept_suppress<ExactOrder>(kept, count, box, thresh)
                 : kept_suppress<FastOrder>(kept, count, box, thresh);
}

}  // namespace

VectorKernels kernels() {
#define SSD_POST_STRINGIFY2(x) #x
#define SSD_POST_STRINGIFY(x) SSD_POST_STRINGIFY2(x)
  return VectorKernels{rows_may_pass,    columns_above, greedy_nms,
                       any_suppresses,   max_ignoring_nan, best_class,
                       best_class_above,
                       SSD_POST_STRINGIFY(SSD_POST_VECTOR_VARIANT)};
#undef SSD_POST_STRINGIFY
#undef SSD_POST_STRINGIFY2
}

}  // namespace SSD_POST_VECTOR_VARIANT
}  // namespace cpu
}  // namespace ssd_post
