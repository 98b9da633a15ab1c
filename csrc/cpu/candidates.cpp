#include "candidates.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>

namespace ssd_post {
namespace cpu {
namespace {

// Fewer anchors than this per task and the scheduling costs more than the scan.
constexpr int64_t kMinAnchorsPerTask = 1024;

// The candidates of one (image, class) seen so far by one task. Keeps at most
// 2 * k entries: when full it drops all but the k best and remembers the k-th
// best score, below which nothing can enter any more (anchors arrive in
// increasing order, so an equal score ranks after every kept one too).
class BoundedCandidates {
 public:
  void push(float score, int32_t anchor, int64_t k) {
    if (score <= floor_) return;
    items_.push_back({score, anchor});
    if (static_cast<int64_t>(items_.size()) >= 2 * k) {
      keep_best(k);
      floor_ = items_.back().score;
    }
  }

  // Leaves the k best, ranked.
  void finish(int64_t k) {
    keep_best(k);
    std::sort(items_.begin(), items_.end(), ranks_before);
  }

  std::vector<Candidate>& items() { return items_; }

 private:
  void keep_best(int64_t k) {
    if (static_cast<int64_t>(items_.size()) <= k) return;
    // Position k - 1 then holds the k-th best, so after the resize it is last.
    std::nth_element(items_.begin(), items_.begin() + (k - 1), items_.end(), ranks_before);
    items_.resize(k);
  }

  std::vector<Candidate> items_;
  float floor_ = -std::numeric_limits<float>::infinity();
};

template <typename scalar_t>
inline float as_float(scalar_t v) {
  return static_cast<float>(v);
}

// Max of a row and whether it holds a NaN (torch's softmax turns a row with a NaN
// into all NaN, which is never kept). Four accumulators let the compiler keep
// independent chains in flight.
template <typename scalar_t>
inline float row_max(const scalar_t* row, int64_t n, bool* has_nan) {
  float m0 = -std::numeric_limits<float>::infinity(), m1 = m0, m2 = m0, m3 = m0;
  bool nan = false;
  int64_t c = 0;
  for (; c + 4 <= n; c += 4) {
    const float v0 = as_float(row[c]), v1 = as_float(row[c + 1]);
    const float v2 = as_float(row[c + 2]), v3 = as_float(row[c + 3]);
    nan |= (v0 != v0) | (v1 != v1) | (v2 != v2) | (v3 != v3);
    m0 = v0 > m0 ? v0 : m0;
    m1 = v1 > m1 ? v1 : m1;
    m2 = v2 > m2 ? v2 : m2;
    m3 = v3 > m3 ? v3 : m3;
  }
  for (; c < n; ++c) {
    const float v = as_float(row[c]);
    nan |= (v != v);
    m0 = v > m0 ? v : m0;
  }
  *has_nan = nan;
  m0 = m1 > m0 ? m1 : m0;
  m2 = m3 > m2 ? m3 : m2;
  return m2 > m0 ? m2 : m0;
}

// Whether any column in [begin, end) has logit - shift > bound.
template <typename scalar_t>
inline bool any_above(const scalar_t* row, int64_t begin, int64_t end, float shift, float bound) {
  bool any = false;
  for (int64_t c = begin; c < end; ++c) any |= (as_float(row[c]) - shift) > bound;
  return any;
}

template <typename scalar_t>
inline bool any_foreground_above(const scalar_t* row, int64_t C, int64_t background, float shift,
                                 float bound) {
  if (background < 0) return any_above(row, 0, C, shift, bound);
  return any_above(row, 0, background, shift, bound) ||
         any_above(row, background + 1, C, shift, bound);
}

// Rows that may hold a passing class wait here and get their probabilities from
// torch's own softmax kernel, a batch of rows at a time: a row's softmax does not
// depend on the rows around it, so the scores are the bits that F.softmax gives
// on the whole [B, A, C] tensor, at the cost of copying only the rows that can pass.
class PendingSoftmaxRows {
 public:
  static constexpr int64_t kRows = 64;

  explicit PendingSoftmaxRows(int64_t num_classes)
      : C_(num_classes), rows_(static_cast<size_t>(kRows * num_classes)) {}

  template <typename scalar_t>
  void add(const scalar_t* row, int32_t anchor) {
    float* dst = rows_.data() + count_ * C_;
    for (int64_t c = 0; c < C_; ++c) dst[c] = as_float(row[c]);
    anchors_[count_++] = anchor;
  }

  bool full() const { return count_ == kRows; }

  void flush(const SelectParams& p, std::vector<BoundedCandidates>& per_class) {
    if (count_ == 0) return;
    const at::Tensor rows = at::from_blob(rows_.data(), {count_, C_}, at::kFloat);
    const at::Tensor probs = at::_softmax(rows, /*dim=*/1, /*half_to_float=*/false);
    const float* prob = probs.data_ptr<float>();
    for (int64_t r = 0; r < count_; ++r) {
      for (int64_t c = 0; c < C_; ++c) {
        const float value = prob[r * C_ + c];
        if (c != p.background_class && value > p.score_thresh) {
          per_class[c].push(value, anchors_[r], p.topk_candidates);
        }
      }
    }
    count_ = 0;
  }

 private:
  int64_t C_;
  int64_t count_ = 0;
  std::vector<float> rows_;
  int32_t anchors_[kRows];
};

// Scans anchors [a_begin, a_end) of one image's logits [A, C].
template <typename scalar_t>
void scan_anchors(const scalar_t* logits_img, int64_t C, int64_t a_begin, int64_t a_end,
                  const SelectParams& p, std::vector<BoundedCandidates>& per_class) {
  const int64_t bg = p.background_class;
  if (p.activation == Activation::kSigmoid) {
    for (int64_t a = a_begin; a < a_end; ++a) {
      const scalar_t* row = logits_img + a * C;
      for (int64_t c = 0; c < C; ++c) {
        const float x = as_float(row[c]);
        if (c == bg || !(x > p.bound.value)) continue;  // the test also drops NaN
        const float prob = sigmoid_f32(x);
        if (prob > p.score_thresh) per_class[c].push(prob, static_cast<int32_t>(a), p.topk_candidates);
      }
    }
    return;
  }
  PendingSoftmaxRows pending(C);
  for (int64_t a = a_begin; a < a_end; ++a) {
    const scalar_t* row = logits_img + a * C;
    bool has_nan = false;
    const float m = row_max(row, C, &has_nan);
    // A NaN or an infinite max makes torch's softmax row NaN: nothing can pass.
    if (has_nan || !std::isfinite(m)) continue;
    if (!any_foreground_above(row, C, bg, m, p.bound.value)) continue;
    pending.add(row, static_cast<int32_t>(a));
    if (pending.full()) pending.flush(p, per_class);
  }
  pending.flush(p, per_class);
}

}  // namespace

Selection select_candidates(const at::Tensor& logits_in, const SelectParams& params) {
  const at::Tensor logits = logits_in.contiguous();
  const int64_t B = logits.size(0), A = logits.size(1), C = logits.size(2);
  const int64_t k = params.topk_candidates;

  // Split each image's anchors so that small batches still use every thread.
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  int64_t chunks = B >= threads ? 1 : (threads + B - 1) / std::max<int64_t>(B, 1);
  chunks = std::max<int64_t>(1, std::min(chunks, A / kMinAnchorsPerTask));
  const int64_t anchors_per_chunk = (A + chunks - 1) / chunks;
  const int64_t num_tasks = B * chunks;

  // task_results[task][class]
  std::vector<std::vector<BoundedCandidates>> task_results(static_cast<size_t>(num_tasks));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "select_candidates", [&] {
    const scalar_t* data = logits.data_ptr<scalar_t>();
    at::parallel_for(0, num_tasks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t b = t / chunks, chunk = t % chunks;
        const int64_t a_begin = std::min(A, chunk * anchors_per_chunk);
        const int64_t a_end = std::min(A, a_begin + anchors_per_chunk);
        auto& per_class = task_results[t];
        per_class.resize(static_cast<size_t>(C));
        scan_anchors<scalar_t>(data + b * A * C, C, a_begin, a_end, params, per_class);
        for (auto& cands : per_class) cands.finish(k);
      }
    });
  });

  // Merge the chunks of each (image, class); a single chunk is already final.
  const int64_t num_segments = B * C;
  std::vector<std::vector<Candidate>> merged(static_cast<size_t>(num_segments));
  at::parallel_for(0, num_segments, 16, [&](int64_t begin, int64_t end) {
    for (int64_t s = begin; s < end; ++s) {
      const int64_t b = s / C, c = s % C;
      std::vector<Candidate>& out = merged[s];
      if (chunks == 1) {
        out.swap(task_results[b][c].items());
        continue;
      }
      for (int64_t chunk = 0; chunk < chunks; ++chunk) {
        const auto& part = task_results[b * chunks + chunk][c].items();
        out.insert(out.end(), part.begin(), part.end());
      }
      if (static_cast<int64_t>(out.size()) > k) {
        std::nth_element(out.begin(), out.begin() + (k - 1), out.end(), ranks_before);
        out.resize(k);
      }
      std::sort(out.begin(), out.end(), ranks_before);
    }
  });

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
