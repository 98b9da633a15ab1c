#include "candidates.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/softmax.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>

#include "row_bound.h"

namespace ssd_post {
namespace cpu {
namespace {

// Fewer anchors than this per task and the scheduling costs more than the scan.
constexpr int64_t kMinAnchorsPerTask = 1024;
// Rows tested per call of the vectorised bound test (and converted per block for
// half / bfloat16): small enough to stay in L1, large enough to amortise the call.
constexpr int64_t kBlockRows = 128;
// Rows per call of torch's softmax: amortises the dispatcher over many rows.
constexpr int64_t kPendingRows = 256;

}  // namespace

void BoundedCandidates::keep_best(int64_t k) {
  if (static_cast<int64_t>(items_.size()) <= k) return;
  // Position k - 1 then holds the k-th best, so after the resize it is last.
  std::nth_element(items_.begin(), items_.begin() + (k - 1), items_.end(), ranks_before);
  items_.resize(k);
}

void BoundedCandidates::finish(int64_t k) {
  keep_best(k);
  std::sort(items_.begin(), items_.end(), ranks_before);
}

CandidateScanner::CandidateScanner(const SelectParams& params, int64_t num_classes)
    : params_(params),
      C_(num_classes),
      per_class_(static_cast<size_t>(num_classes)),
      passing_(static_cast<size_t>(kBlockRows)) {
  if (params_.activation == Activation::kSoftmax) {
    pending_rows_ = at::empty({kPendingRows, C_}, at::kFloat);
    pending_probs_ = at::empty({kPendingRows, C_}, at::kFloat);
    pending_anchor_.resize(static_cast<size_t>(kPendingRows));
    passing_columns_.resize(static_cast<size_t>(C_));
  }
  reset();
}

void CandidateScanner::reset() {
  for (auto& cands : per_class_) cands.reset();
  limits_.assign(static_cast<size_t>(C_), params_.score_thresh);
  if (params_.background_class >= 0) {
    limits_[static_cast<size_t>(params_.background_class)] = std::numeric_limits<float>::infinity();
  }
  pending_count_ = 0;
  image_scores_.clear();
  image_floor_ = -std::numeric_limits<float>::infinity();
}

void CandidateScanner::note_image_score(float score) {
  image_scores_.push_back(score);
  if (static_cast<int64_t>(image_scores_.size()) <= 2 * image_cap_) return;
  // Position m - 1 then holds the m-th best, so after the resize it is last.
  std::nth_element(image_scores_.begin(), image_scores_.begin() + (image_cap_ - 1),
                   image_scores_.end(), std::greater<float>());
  image_scores_.resize(static_cast<size_t>(image_cap_));
  image_floor_ = image_scores_.back();
  for (float& limit : limits_) limit = std::max(limit, image_floor_);
}

void CandidateScanner::flush_softmax_rows() {
  if (pending_count_ == 0) return;
  const int64_t n = pending_count_;
  pending_count_ = 0;
  at::Tensor probs_view = pending_probs_.narrow(0, 0, n);
  at::softmax_out(probs_view, pending_rows_.narrow(0, 0, n), /*dim=*/1);
  const float* prob = pending_probs_.data_ptr<float>();
  int32_t* columns = passing_columns_.data();
  for (int64_t r = 0; r < n; ++r) {
    const float* row = prob + r * C_;
    const int32_t anchor = pending_anchor_[r];
    // NaN fails the comparison: a row with a NaN logit is never kept. An offer
    // only moves its own class's limit, so the columns found stay valid.
    const int64_t found = columns_above(row, limits_.data(), C_, columns);
    for (int64_t i = 0; i < found; ++i) offer(columns[i], row[columns[i]], anchor);
  }
}

float CandidateScanner::row_bound() const {
  // A row can give a candidate only above the lowest foreground limit; the
  // limits rise with the per-class and image cuts.
  float lowest = std::numeric_limits<float>::infinity();
  for (int64_t c = 0; c < C_; ++c) {
    if (c != params_.background_class) lowest = std::min(lowest, limits_[c]);
  }
  return row_bound_at(lowest);
}

float CandidateScanner::row_bound_at(float lowest_limit) const {
  return make_score_bound(Activation::kSoftmax, lowest_limit).value;
}

template <typename scalar_t>
void CandidateScanner::scan_softmax(const scalar_t* image, int64_t a_begin, int64_t a_end) {
  constexpr bool kIsFloat = std::is_same<scalar_t, float>::value;
  if (!kIsFloat && converted_.empty()) converted_.resize(static_cast<size_t>(kBlockRows * C_));
  float* staged = pending_rows_.data_ptr<float>();
  // The row bound while every class limit is still the threshold (row_bound_at).
  const float threshold_bound = row_bound_at(params_.score_thresh);
  for (int64_t block = a_begin; block < a_end; block += kBlockRows) {
    const int64_t rows = std::min(kBlockRows, a_end - block);
    const float* block_rows;
    if constexpr (kIsFloat) {
      block_rows = image + block * C_;
    } else {
      for (int64_t i = 0; i < rows * C_; ++i) converted_[i] = static_cast<float>(image[block * C_ + i]);
      block_rows = converted_.data();
    }
    const float bound = row_bound();
    const int64_t n = float_rows_may_pass(block_rows, C_, params_.background_class, bound,
                                          bound > threshold_bound, 0, rows, passing_.data());
    for (int64_t i = 0; i < n; ++i) {
      const int64_t r = passing_[i];
      std::copy_n(block_rows + r * C_, C_, staged + pending_count_ * C_);
      pending_anchor_[pending_count_++] = static_cast<int32_t>(block + r);
      if (pending_count_ == kPendingRows) flush_softmax_rows();
    }
  }
  flush_softmax_rows();
}

template <typename scalar_t>
void CandidateScanner::scan_sigmoid(const scalar_t* image, int64_t a_begin, int64_t a_end) {
  const float* limit = limits_.data();
  for (int64_t a = a_begin; a < a_end; ++a) {
    const scalar_t* row = image + a * C_;
    for (int64_t c = 0; c < C_; ++c) {
      const float x = static_cast<float>(row[c]);
      // The bound test also drops NaN; the background's limit is +inf.
      if (!(x > params_.bound.value)) continue;
      const float prob = sigmoid_f32(x);
      if (prob > limit[c]) offer(c, prob, static_cast<int32_t>(a));
    }
  }
}

void CandidateScanner::scan(const at::Tensor& logits, int64_t b, int64_t a_begin, int64_t a_end) {
  const int64_t A = logits.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "scan_candidates", [&] {
    const scalar_t* image = logits.const_data_ptr<scalar_t>() + b * A * C_;
    if (params_.activation == Activation::kSigmoid) {
      scan_sigmoid<scalar_t>(image, a_begin, a_end);
    } else {
      scan_softmax<scalar_t>(image, a_begin, a_end);
    }
  });
}

int64_t anchor_chunks_per_image(int64_t B, int64_t A) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t chunks = B >= threads ? 1 : (threads + B - 1) / std::max<int64_t>(B, 1);
  return std::max<int64_t>(1, std::min(chunks, A / kMinAnchorsPerTask));
}

std::vector<std::vector<Candidate>> rank_segments(const at::Tensor& logits_in,
                                                  const SelectParams& params,
                                                  int64_t image_cap,
                                                  std::vector<float>* image_floors) {
  const at::Tensor logits = logits_in.contiguous();
  const int64_t B = logits.size(0), A = logits.size(1), C = logits.size(2);
  const int64_t k = params.topk_candidates;
  const int64_t chunks = anchor_chunks_per_image(B, A);
  const int64_t anchors_per_chunk = (A + chunks - 1) / chunks;
  const int64_t num_tasks = B * chunks;

  // task_results[task][class], ranked.
  std::vector<std::vector<Candidate>> task_results(static_cast<size_t>(num_tasks * C));
  std::vector<float> task_floors(static_cast<size_t>(num_tasks));
  at::parallel_for(0, num_tasks, 1, [&](int64_t begin, int64_t end) {
    CandidateScanner scanner(params, C);
    scanner.set_image_cap(image_cap);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / chunks, chunk = t % chunks;
      const int64_t a_begin = std::min(A, chunk * anchors_per_chunk);
      const int64_t a_end = std::min(A, a_begin + anchors_per_chunk);
      scanner.reset();
      scanner.scan(logits, b, a_begin, a_end);
      for (int64_t c = 0; c < C; ++c) {
        BoundedCandidates& cands = scanner.per_class()[c];
        cands.finish(k);
        task_results[t * C + c] = cands.items();
      }
      task_floors[t] = scanner.image_floor();
    }
  });
  if (image_floors != nullptr) {
    // A chunk's candidates are complete above its own floor, so the image's are
    // above the highest of them.
    image_floors->assign(static_cast<size_t>(B), -std::numeric_limits<float>::infinity());
    for (int64_t t = 0; t < num_tasks; ++t) {
      float& floor = (*image_floors)[t / chunks];
      floor = std::max(floor, task_floors[t]);
    }
  }

  // Merge the chunks of each (image, class); a single chunk is already final.
  const int64_t num_segments = B * C;
  std::vector<std::vector<Candidate>> merged(static_cast<size_t>(num_segments));
  at::parallel_for(0, num_segments, 16, [&](int64_t begin, int64_t end) {
    for (int64_t s = begin; s < end; ++s) {
      const int64_t b = s / C, c = s % C;
      std::vector<Candidate>& out = merged[s];
      if (chunks == 1) {
        out.swap(task_results[b * C + c]);
        continue;
      }
      for (int64_t chunk = 0; chunk < chunks; ++chunk) {
        const auto& part = task_results[(b * chunks + chunk) * C + c];
        out.insert(out.end(), part.begin(), part.end());
      }
      if (static_cast<int64_t>(out.size()) > k) {
        std::nth_element(out.begin(), out.begin() + (k - 1), out.end(), ranks_before);
        out.resize(k);
      }
      std::sort(out.begin(), out.end(), ranks_before);
    }
  });
  return merged;
}

Selection select_candidates(const at::Tensor& logits, const SelectParams& params) {
  const std::vector<std::vector<Candidate>> merged = rank_segments(logits, params);
  const int64_t C = logits.size(2);
  const int64_t num_segments = static_cast<int64_t>(merged.size());
  Selection selection;
  selection.num_classes = C;
  selection.segment_begin.resize(static_cast<size_t>(num_segments + 1));
  selection.segment_begin[0] = 0;
  for (int64_t s = 0; s < num_segments; ++s) {
    selection.segment_begin[s + 1] = selection.segment_begin[s] + static_cast<int64_t>(merged[s].size());
  }
  selection.items.resize(static_cast<size_t>(selection.segment_begin[num_segments]));
  at::parallel_for(0, num_segments, 64, [&](int64_t begin, int64_t end) {
    for (int64_t s = begin; s < end; ++s) {
      std::copy(merged[s].begin(), merged[s].end(),
                selection.items.begin() + selection.segment_begin[s]);
    }
  });
  return selection;
}

}  // namespace cpu
}  // namespace ssd_post
