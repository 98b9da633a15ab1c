#include "nms.h"

#include <immintrin.h>

#include <cmath>

#include "../common/box_math.h"

namespace ssd_post {
namespace cpu {
namespace {

// Room for a whole AVX vector past the last box.
constexpr int64_t kPad = 8;

// The largest float t with (x > t) == (double(x) > iou_threshold) for every float x:
// the threshold rounded down to float. Lets the vector code compare in float with
// the same outcome as torchvision's double comparison.
float float_threshold(double iou_threshold) {
  float t = static_cast<float>(iou_threshold);
  if (static_cast<double>(t) > iou_threshold) t = std::nextafter(t, -INFINITY);
  return t;
}

// One kept box against boxes [j, j + 4) in the op order of box_iou:
// max_first(a, b) is MAXPS(b, a) and min_first(a, b) is MINPS(b, a), NaN included.
struct Sse {
  static constexpr int64_t kWidth = 4;
  static int suppressed(const NmsScratch& s, int64_t j, __m128 ax1, __m128 ay1, __m128 ax2,
                        __m128 ay2, __m128 aarea, __m128 thresh) {
    const __m128 zero = _mm_setzero_ps();
    const __m128 xx1 = _mm_max_ps(_mm_loadu_ps(&s.x1[j]), ax1);
    const __m128 yy1 = _mm_max_ps(_mm_loadu_ps(&s.y1[j]), ay1);
    const __m128 xx2 = _mm_min_ps(_mm_loadu_ps(&s.x2[j]), ax2);
    const __m128 yy2 = _mm_min_ps(_mm_loadu_ps(&s.y2[j]), ay2);
    const __m128 iw = _mm_max_ps(_mm_sub_ps(xx2, xx1), zero);
    const __m128 ih = _mm_max_ps(_mm_sub_ps(yy2, yy1), zero);
    const __m128 inter = _mm_mul_ps(iw, ih);
    const __m128 uni = _mm_sub_ps(_mm_add_ps(aarea, _mm_loadu_ps(&s.area[j])), inter);
    return _mm_movemask_ps(_mm_cmpgt_ps(_mm_div_ps(inter, uni), thresh));
  }
};

__attribute__((target("avx2"))) inline int suppressed_avx2(const NmsScratch& s, int64_t j,
                                                             __m256 ax1, __m256 ay1, __m256 ax2,
                                                             __m256 ay2, __m256 aarea,
                                                             __m256 thresh) {
  const __m256 zero = _mm256_setzero_ps();
  const __m256 xx1 = _mm256_max_ps(_mm256_loadu_ps(&s.x1[j]), ax1);
  const __m256 yy1 = _mm256_max_ps(_mm256_loadu_ps(&s.y1[j]), ay1);
  const __m256 xx2 = _mm256_min_ps(_mm256_loadu_ps(&s.x2[j]), ax2);
  const __m256 yy2 = _mm256_min_ps(_mm256_loadu_ps(&s.y2[j]), ay2);
  const __m256 iw = _mm256_max_ps(_mm256_sub_ps(xx2, xx1), zero);
  const __m256 ih = _mm256_max_ps(_mm256_sub_ps(yy2, yy1), zero);
  const __m256 inter = _mm256_mul_ps(iw, ih);
  const __m256 uni = _mm256_sub_ps(_mm256_add_ps(aarea, _mm256_loadu_ps(&s.area[j])), inter);
  return _mm256_movemask_ps(_mm256_cmp_ps(_mm256_div_ps(inter, uni), thresh, _CMP_GT_OQ));
}

// Clears keep[j + l] for each set bit l of mask.
inline void clear_bits(uint8_t* keep, int64_t j, int mask) {
  while (mask) {
    keep[j + __builtin_ctz(mask)] = 0;
    mask &= mask - 1;
  }
}

void greedy_sse(const NmsScratch& s, int64_t n, float thresh, uint8_t* keep) {
  const __m128 t = _mm_set1_ps(thresh);
  for (int64_t i = 0; i < n; ++i) {
    if (!keep[i]) continue;
    const __m128 ax1 = _mm_set1_ps(s.x1[i]), ay1 = _mm_set1_ps(s.y1[i]);
    const __m128 ax2 = _mm_set1_ps(s.x2[i]), ay2 = _mm_set1_ps(s.y2[i]);
    const __m128 aarea = _mm_set1_ps(s.area[i]);
    for (int64_t j = i + 1; j < n; j += Sse::kWidth) {
      clear_bits(keep, j, Sse::suppressed(s, j, ax1, ay1, ax2, ay2, aarea, t));
    }
  }
}

__attribute__((target("avx2"))) void greedy_avx2(const NmsScratch& s, int64_t n, float thresh,
                                                 uint8_t* keep) {
  const __m256 t = _mm256_set1_ps(thresh);
  for (int64_t i = 0; i < n; ++i) {
    if (!keep[i]) continue;
    const __m256 ax1 = _mm256_set1_ps(s.x1[i]), ay1 = _mm256_set1_ps(s.y1[i]);
    const __m256 ax2 = _mm256_set1_ps(s.x2[i]), ay2 = _mm256_set1_ps(s.y2[i]);
    const __m256 aarea = _mm256_set1_ps(s.area[i]);
    for (int64_t j = i + 1; j < n; j += 8) {
      clear_bits(keep, j, suppressed_avx2(s, j, ax1, ay1, ax2, ay2, aarea, t));
    }
  }
}

using GreedyFn = void (*)(const NmsScratch&, int64_t, float, uint8_t*);

GreedyFn pick_greedy() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") ? greedy_avx2 : greedy_sse;
}

}  // namespace

void nms_ranked_run(const float* boxes, int64_t n, double iou_threshold, uint8_t* keep,
                    NmsScratch& s) {
  static const GreedyFn greedy = pick_greedy();
  if (n <= 0) return;
  const size_t padded = static_cast<size_t>(n + kPad);
  s.x1.resize(padded);
  s.y1.resize(padded);
  s.x2.resize(padded);
  s.y2.resize(padded);
  s.area.resize(padded);
  for (int64_t i = 0; i < n; ++i) {
    s.x1[i] = boxes[4 * i];
    s.y1[i] = boxes[4 * i + 1];
    s.x2[i] = boxes[4 * i + 2];
    s.y2[i] = boxes[4 * i + 3];
    s.area[i] = box_area(boxes + 4 * i);
    keep[i] = 1;
  }
  // Padding boxes have zero size: IoU 0 (or NaN against a zero-area box), which
  // never passes the threshold, so the vector loops may read past n freely. Their
  // suppression bits are never set, so keep[] is never written past n.
  for (size_t i = static_cast<size_t>(n); i < padded; ++i) {
    s.x1[i] = s.y1[i] = s.x2[i] = s.y2[i] = s.area[i] = 0.f;
  }
  greedy(s, n, float_threshold(iou_threshold), keep);
}

}  // namespace cpu
}  // namespace ssd_post
