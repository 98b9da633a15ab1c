// Stage 1 of the CPU pipeline: one read of the logits that applies the activation
// and the score threshold and keeps, per (image, class), the topk_candidates best.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <limits>
#include <vector>

#include "../common/score_bounds.h"

namespace ssd_post {
namespace cpu {

struct Candidate {
  float score;
  int32_t anchor;
};

// Higher score first; equal scores in anchor order, so every result is unique.
inline bool ranks_before(const Candidate& a, const Candidate& b) {
  return a.score > b.score || (a.score == b.score && a.anchor < b.anchor);
}

struct SelectParams {
  Activation activation;
  float score_thresh;       // compared as float32, as torch compares a tensor to a Python float
  ScoreBound bound;         // pruning bound derived from score_thresh
  int64_t topk_candidates;
  int64_t background_class;  // -1: every column is a class
};

// The candidates of one (image, class) seen so far. Keeps at most k + k / 2 + 1
// entries: when full it drops all but the k best and remembers the k-th best
// score, below which nothing can enter any more (anchors arrive in increasing
// order, so an equal score ranks after every kept one too).
class BoundedCandidates {
 public:
  void reset() {
    items_.clear();
    floor_ = -std::numeric_limits<float>::infinity();
  }

  void push(float score, int32_t anchor, int64_t k) {
    if (score <= floor_) return;
    items_.push_back({score, anchor});
    if (static_cast<int64_t>(items_.size()) > k + k / 2) {
      keep_best(k);
      floor_ = items_.back().score;
    }
  }

  // Leaves the k best, ranked.
  void finish(int64_t k);

  std::vector<Candidate>& items() { return items_; }
  const std::vector<Candidate>& items() const { return items_; }

 private:
  void keep_best(int64_t k);

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

 private:
  template <typename scalar_t>
  void scan_softmax(const scalar_t* image, int64_t a_begin, int64_t a_end);
  template <typename scalar_t>
  void scan_sigmoid(const scalar_t* image, int64_t a_begin, int64_t a_end);
  void flush_softmax_rows();

  SelectParams params_;
  int64_t C_;
  std::vector<BoundedCandidates> per_class_;
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
std::vector<std::vector<Candidate>> rank_segments(const at::Tensor& logits,
                                                  const SelectParams& params);

// rank_segments flattened into one array with segment offsets.
Selection select_candidates(const at::Tensor& logits, const SelectParams& params);

}  // namespace cpu
}  // namespace ssd_post
