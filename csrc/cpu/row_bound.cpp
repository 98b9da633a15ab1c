#include "row_bound.h"

#include <immintrin.h>

#include <limits>

namespace ssd_post {
namespace cpu {
namespace {

constexpr float kMinusInf = -std::numeric_limits<float>::infinity();

// Scalar max of a few values; NaN handling as in the vector code does not matter
// (see the header).
inline float scalar_max(const float* x, int64_t n, float m) {
  for (int64_t i = 0; i < n; ++i) m = x[i] > m ? x[i] : m;
  return m;
}

// ---- SSE2: part of x86-64 itself, so this path runs on every machine. ----

inline float hmax_sse(__m128 v) {
  v = _mm_max_ps(v, _mm_shuffle_ps(v, v, _MM_SHUFFLE(1, 0, 3, 2)));
  v = _mm_max_ps(v, _mm_shuffle_ps(v, v, _MM_SHUFFLE(2, 3, 0, 1)));
  return _mm_cvtss_f32(v);
}

// Max of x[0, n). Ranges of 4 or more finish with one overlapping load instead of
// a scalar tail: max does not mind seeing an element twice.
inline float max_range_sse(const float* x, int64_t n) {
  if (n < 4) return scalar_max(x, n, kMinusInf);
  __m128 m0 = _mm_loadu_ps(x), m1 = m0;
  int64_t i = 4;
  for (; i + 8 <= n; i += 8) {
    m0 = _mm_max_ps(_mm_loadu_ps(x + i), m0);
    m1 = _mm_max_ps(_mm_loadu_ps(x + i + 4), m1);
  }
  if (i + 4 <= n) {
    m0 = _mm_max_ps(_mm_loadu_ps(x + i), m0);
    i += 4;
  }
  if (i < n) m1 = _mm_max_ps(_mm_loadu_ps(x + n - 4), m1);
  return hmax_sse(_mm_max_ps(m0, m1));
}

// ---- AVX2: twice the width where the CPU has it (chosen at run time). ----

__attribute__((target("avx2"))) inline float max_range_avx2(const float* x, int64_t n) {
  if (n < 8) return max_range_sse(x, n);
  __m256 m0 = _mm256_loadu_ps(x), m1 = m0;
  int64_t i = 8;
  for (; i + 16 <= n; i += 16) {
    m0 = _mm256_max_ps(_mm256_loadu_ps(x + i), m0);
    m1 = _mm256_max_ps(_mm256_loadu_ps(x + i + 8), m1);
  }
  if (i + 8 <= n) {
    m0 = _mm256_max_ps(_mm256_loadu_ps(x + i), m0);
    i += 8;
  }
  if (i < n) m1 = _mm256_max_ps(_mm256_loadu_ps(x + n - 8), m1);
  const __m256 m = _mm256_max_ps(m0, m1);
  return hmax_sse(_mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1)));
}

struct MaxSse {
  static float run(const float* x, int64_t n) { return max_range_sse(x, n); }
};
struct MaxAvx2 {
  __attribute__((target("avx2"))) static float run(const float* x, int64_t n) {
    return max_range_avx2(x, n);
  }
};

template <typename Max>
inline bool row_may_pass(const float* row, int64_t C, int64_t background, float bound) {
  if (background < 0) {
    const float m = Max::run(row, C);
    return (m - m) > bound;  // the max column itself gives x - m = 0
  }
  float fg = Max::run(row, background);
  const float rest = Max::run(row + background + 1, C - background - 1);
  fg = rest > fg ? rest : fg;
  const float bg = row[background];
  const float m = bg > fg ? bg : fg;
  return (fg - m) > bound;
}

template <typename Max>
inline int64_t rows_may_pass(const float* rows, int64_t C, int64_t background, float bound,
                             int64_t begin, int64_t end, int32_t* passing) {
  int64_t count = 0;
  for (int64_t r = begin; r < end; ++r) {
    // Branch-free append: the store always happens, the count moves on a pass.
    passing[count] = static_cast<int32_t>(r);
    count += row_may_pass<Max>(rows + r * C, C, background, bound) ? 1 : 0;
  }
  return count;
}

__attribute__((target("avx2"))) int64_t rows_may_pass_avx2(const float* rows, int64_t C,
                                                           int64_t background, float bound,
                                                           int64_t begin, int64_t end,
                                                           int32_t* passing) {
  return rows_may_pass<MaxAvx2>(rows, C, background, bound, begin, end, passing);
}

int64_t rows_may_pass_sse(const float* rows, int64_t C, int64_t background, float bound,
                          int64_t begin, int64_t end, int32_t* passing) {
  return rows_may_pass<MaxSse>(rows, C, background, bound, begin, end, passing);
}

using RowsFn = int64_t (*)(const float*, int64_t, int64_t, float, int64_t, int64_t, int32_t*);

RowsFn pick_rows_fn() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") ? rows_may_pass_avx2 : rows_may_pass_sse;
}

}  // namespace

int64_t columns_above(const float* row, const float* limit, int64_t C, int32_t* columns) {
  int64_t count = 0, c = 0;
  for (; c + 4 <= C; c += 4) {
    // Ordered compare: false for NaN, like the scalar `>`.
    unsigned mask = static_cast<unsigned>(
        _mm_movemask_ps(_mm_cmpgt_ps(_mm_loadu_ps(row + c), _mm_loadu_ps(limit + c))));
    while (mask != 0) {
      columns[count++] = static_cast<int32_t>(c + __builtin_ctz(mask));
      mask &= mask - 1;
    }
  }
  for (; c < C; ++c) {
    if (row[c] > limit[c]) columns[count++] = static_cast<int32_t>(c);
  }
  return count;
}

int64_t float_rows_may_pass(const float* rows, int64_t C, int64_t background, float bound,
                            int64_t begin, int64_t end, int32_t* passing) {
  static const RowsFn fn = pick_rows_fn();
  return fn(rows, C, background, bound, begin, end, passing);
}

}  // namespace cpu
}  // namespace ssd_post
