// The per-anchor pruning test of the softmax path, vectorised (vector_kernels.cpp): it is the only code
// that touches every logit, so its speed is the speed of the whole CPU op.
#pragma once

#include <cstdint>

namespace ssd_post {
namespace cpu {

// For each row r in [begin, end) of the float32 logits `rows` (C columns each),
// whether some foreground logit x_c (column `background` excluded, -1: none) has
// x_c - m - log(S_lo) > bound, with m = max(row) and S_lo <= sum_k exp(x_k - m) a
// lower bound of the softmax denominator (so that log(p_c) <= x_c - m - log(S_lo)).
// Without use_denominator, S_lo = 1 (the test then costs one max per row): the
// denominator pays only once the class limits have risen above the threshold,
// while at the threshold it rarely rules out a row that the max test lets through.
// Writes the passing row indices, in increasing order, to `passing` (room for
// end - begin entries) and returns how many there are.
//
// Only the foreground max needs the test, because x - m is monotone in x for a
// fixed m. A row holding a NaN may either pass or fail: a passing row gets its
// probabilities from torch's softmax, which turns such a row into NaN, and NaN is
// never kept, so both answers give the same detections.
int64_t float_rows_may_pass(const float* rows, int64_t C, int64_t background, float bound,
                            bool use_denominator, int64_t begin, int64_t end, int32_t* passing);

// The columns c in [0, C) of one row of probabilities with row[c] > limit[c] (NaN
// never is), in increasing order, written to `columns` (room for C entries);
// returns how many there are. A vector of columns per compare:
// in a dense image most (anchor, class) pairs fail their class's limit, and a
// branch per pair cost more than the rest of the scan.
int64_t columns_above(const float* row, const float* limit, int64_t C, int32_t* columns);

}  // namespace cpu
}  // namespace ssd_post
