// Stage 1 of the CPU pipeline: one read of the logits that applies the activation
// and the score threshold and keeps, per (image, class), the topk_candidates best.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <bit>
#include <cstdint>
#include <limits>
#include <vector>

#include "../common/rank_keys.h"
#include "../common/select_params.h"

namespace ssd_post {
namespace cpu {

struct Candidate {
  float score;
  int32_t anchor;
};

// Higher score first; equal scores in anchor order, so every result is unique.
// Candidate scores passed `score > score_thresh >= 0`, so they are positive floats
// whose bits order like their values: one 64-bit compare of the rank keys of
// common/rank_keys.h (score bits, then 32 bits of reversed anchor) ranks two
// candidates without a branch. A function object, not a function, so that
// std::sort and std::nth_element inline it.
struct RanksBefore {
  static uint64_t key(const Candidate& c) {
    return make_rank_key(std::bit_cast<uint32_t>(c.score), c.anchor, int64_t{1} << 32, 32);
  }
  bool operator()(const Candidate& a, const Candidate& b) const { return key(a) > key(b); }
};
inline constexpr RanksBefore ranks_before{};

// The candidates of one (image, class) seen so far. Keeps at most 2k + 1 entries:
// when full it drops all but the k best and remembers the k-th best score, below
// which nothing can enter any more (anchors arrive in increasing order, so an
// equal score ranks after every kept one too). The slack of k entries makes each
// pruning (a linear nth_element over 2k) pay for k pushes.
class BoundedCandidates {
 public:
  void reset() {
    items_.clear();
    floor_ = -std::numeric_limits<float>::infinity();
  }

  // Returns true when the floor rose (callers may cache it).
  bool push(float score, int32_t anchor, int64_t k) {
    if (score <= floor_) return false;
    items_.push_back({score, anchor});
    if (static_cast<int64_t>(items_.size()) <= 2 * k) return false;
    keep_best(k);
    floor_ = items_.back().score;
    return true;
  }

  // A score must be above this to enter (-inf until the first pruning).
  float floor() const { return floor_; }

  // Leaves the k best, in no particular order.
  void keep_best(int64_t k);

  // Leaves the k best, ranked.
  void finish(int64_t k);

  std::vector<Candidate>& items() { return items_; }
  const std::vector<Candidate>& items() const { return items_; }

 private:
  std::vector<Candidate> items_;
  float floor_ = -std::numeric_limits<float>::infinity();
};

// Collects the candidates of one image's anchors into one BoundedCandidates per
// class. A thread keeps one scanner and reuses it image after image, so its buffers
// are allocated once per thread, not once per image.
class CandidateScanner {
 public:
  CandidateScanner(const SelectParams& params, int64_t num_classes);

  // Forgets the candidates of the previous image.
  void reset();

  // Scans anchors [a_begin, a_end) of image b of logits [B, A, C] (contiguous).
  void scan(const at::Tensor& logits, int64_t b, int64_t a_begin, int64_t a_end);

  // After scan: per class, candidates in no particular order (finish() ranks them).
  std::vector<BoundedCandidates>& per_class() { return per_class_; }

  // A speculative cut across the classes, for a caller that needs only the best
  // candidates of the image: once more than 2m candidates were offered, only scores
  // above the m-th best offered so far are taken (0: no cut, the default). It
  // saves the pushes, and the cut rises into every class's limit.
  void set_image_cap(int64_t m) { image_cap_ = m; }

  // After scan: every candidate of the image scored above this was taken (-inf
  // when nothing was cut). Below it the candidates may be incomplete, so a caller
  // may use only what ranks above it, or scan again without the cut.
  float image_floor() const { return image_floor_; }

 private:
  template <typename scalar_t>
  void scan_softmax(const scalar_t* image, int64_t a_begin, int64_t a_end);
  template <typename scalar_t>
  void scan_sigmoid(const scalar_t* image, int64_t a_begin, int64_t a_end);
  void flush_softmax_rows();
  // The softmax row test's bound (row_bound.h) for the current class limits.
  float row_bound() const;
  // The same bound for a lowest foreground limit of `lowest_limit`.
  float row_bound_at(float lowest_limit) const;
  // Offers a score that passed limits_[c] to class c.
  void offer(int64_t c, float score, int32_t anchor) {
    BoundedCandidates& cands = per_class_[static_cast<size_t>(c)];
    if (cands.push(score, anchor, params_.topk_candidates)) {
      limits_[static_cast<size_t>(c)] =
          std::max({params_.score_thresh, cands.floor(), image_floor_});
    }
    if (image_cap_ > 0) note_image_score(score);
  }
  // Counts a taken score towards the image cut; raises image_floor_ and every
  // class's limit when the best image_cap_ change.
  void note_image_score(float score);

  SelectParams params_;
  int64_t C_;
  std::vector<BoundedCandidates> per_class_;
  // Per class, the score a candidate must exceed: score_thresh, raised to the
  // class's floor once it is full, +inf for the background. One compare per
  // (anchor, class) then decides, and in a dense image most of them fail it.
  std::vector<float> limits_;
  std::vector<float> converted_;  // a block of rows as float32 (half / bfloat16 input)
  std::vector<int32_t> passing_;  // rows of the current block that may pass
  // Rows that may pass wait here and get their probabilities from torch's own
  // softmax kernel, a batch at a time: a row's softmax does not depend on the rows
  // around it, so the scores are the bits that F.softmax gives on the whole
  // [B, A, C] tensor, at the cost of copying only the rows that can pass.
  at::Tensor pending_rows_;   // [kPendingRows, C] float32
  at::Tensor pending_probs_;  // [kPendingRows, C] float32
  std::vector<int32_t> pending_anchor_;
  int64_t pending_count_ = 0;
  std::vector<int32_t> passing_columns_;  // [C]: the classes of a row above their limit
  int64_t image_cap_ = 0;
  std::vector<float> image_scores_;  // at most 2 * image_cap_ taken scores
  float image_floor_ = -std::numeric_limits<float>::infinity();
};

// Candidates of all B * C segments, segment s = image * C + class, each segment
// ranked by ranks_before and holding at most topk_candidates entries. Background
// segments are empty.
struct Selection {
  std::vector<Candidate> items;
  std::vector<int64_t> segment_begin;  // [B * C + 1]
  int64_t num_classes = 0;

  int64_t num_segments() const { return static_cast<int64_t>(segment_begin.size()) - 1; }
  int64_t size() const { return static_cast<int64_t>(items.size()); }
};

// How many anchor chunks each image is split into so that a batch smaller than the
// thread count still keeps every thread busy (1 when B >= threads).
int64_t anchor_chunks_per_image(int64_t B, int64_t A);

// The ranked candidates of every (image, class) segment s = image * C + class:
// the anchors of each image are scanned in anchor_chunks_per_image chunks in
// parallel and the chunks of a segment merged. logits: [B, A, C] on the CPU, any
// strides (made contiguous).
// image_cap: CandidateScanner::set_image_cap of every scan (0: none); then
// image_floors[b] (resized to B) is the image_floor of image b over its chunks.
std::vector<std::vector<Candidate>> rank_segments(const at::Tensor& logits,
                                                  const SelectParams& params,
                                                  int64_t image_cap = 0,
                                                  std::vector<float>* image_floors = nullptr);

// rank_segments flattened into one array with segment offsets.
Selection select_candidates(const at::Tensor& logits, const SelectParams& params);

}  // namespace cpu
}  // namespace ssd_post
