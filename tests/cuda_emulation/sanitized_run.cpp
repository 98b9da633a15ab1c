// Runs the emulated CUDA kernels on seeded random problems, built with
// AddressSanitizer and UndefinedBehaviorSanitizer (tests/test_cuda.py builds and
// runs it), so that a kernel index that leaves its buffer stops with a report
// instead of passing unnoticed. The inputs live in exactly-sized std::vectors,
// so any read or write past a tensor of the CUDA op is caught. It also checks
// what every output must satisfy, whatever the input.
//
// Prints one line per problem and "ok" at the end; exits 1 on the first failure.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "emulated_ops.h"

// The shared score rules (common/), for the check that two bounds agree.
#include "../common/score_bounds.h"

using ssd_post::Activation;
using ssd_post::FactorMode;
using ssd_post::make_level_score_bound;
using ssd_post::make_pair_bounds;
using ssd_post::PairBounds;

namespace {

struct Problem {
  int64_t B, A, C;
  int activation;            // 0: softmax, 1: sigmoid
  int64_t background_class;  // -1: none
  double score_thresh, nms_thresh;
  int64_t topk, detections_per_img;
  bool per_image_anchors, clip, special_values;
};

int failures = 0;

void expect(bool condition, const std::string& what, const Problem& p) {
  if (condition) return;
  ++failures;
  std::fprintf(stderr, "FAILED (B=%lld A=%lld C=%lld act=%d bg=%lld topk=%lld): %s\n",
               static_cast<long long>(p.B), static_cast<long long>(p.A),
               static_cast<long long>(p.C), p.activation, static_cast<long long>(p.background_class),
               static_cast<long long>(p.topk), what.c_str());
}

struct Inputs {
  std::vector<float> locs, logits, anchors, image_sizes;
};

Inputs make_inputs(const Problem& p, std::mt19937& rng) {
  std::normal_distribution<float> normal(0.f, 1.f);
  std::uniform_real_distribution<float> uniform(0.f, 1.f);
  Inputs in;
  in.locs.resize(p.B * p.A * 4);
  for (float& v : in.locs) v = 0.5f * normal(rng);
  in.logits.resize(p.B * p.A * p.C);
  for (float& v : in.logits) v = 2.f * normal(rng);
  // Copies of rows make exact ties across anchors.
  for (int64_t a = 1; a < p.A; a += 7) {
    for (int64_t c = 0; c < p.C; ++c) in.logits[a * p.C + c] = in.logits[(a - 1) * p.C + c];
  }
  if (p.special_values) {
    const float specials[] = {NAN, INFINITY, -INFINITY, 80.f, -80.f};
    for (size_t i = 0; i < in.logits.size(); i += 13) in.logits[i] = specials[i % 5];
    for (size_t i = 0; i < in.locs.size(); i += 29) in.locs[i] = i % 2 ? 40.f : NAN;
  }
  const int64_t anchor_rows = p.per_image_anchors ? p.B * p.A : p.A;
  in.anchors.resize(anchor_rows * 4);
  for (int64_t i = 0; i < anchor_rows; ++i) {
    const float cx = 300.f * uniform(rng), cy = 300.f * uniform(rng);
    const float w = 10.f + 90.f * uniform(rng), h = 10.f + 90.f * uniform(rng);
    in.anchors[4 * i + 0] = cx - w / 2;
    in.anchors[4 * i + 1] = cy - h / 2;
    in.anchors[4 * i + 2] = cx + w / 2;
    in.anchors[4 * i + 3] = cy + h / 2;
  }
  for (int64_t b = 0; b < p.B; ++b) {
    in.image_sizes.push_back(b % 2 ? 240.f : 300.f);
    in.image_sizes.push_back(b % 2 ? 320.f : 300.f);
  }
  return in;
}

EmulatedInputs emulated_inputs(const Problem& p, const Inputs& in) {
  return EmulatedInputs{in.locs.data(),
                        in.logits.data(),
                        in.anchors.data(),
                        in.image_sizes.data(),
                        p.B,
                        p.A,
                        p.C,
                        p.background_class,
                        p.topk,
                        p.score_thresh,
                        {10.0, 10.0, 5.0, 5.0},
                        p.activation,
                        p.per_image_anchors,
                        p.clip};
}

void check_postprocess(const Problem& p, const Inputs& in) {
  const int64_t K = p.detections_per_img;
  std::vector<float> boxes(p.B * K * 4, -1.f), scores(p.B * K, -1.f);
  std::vector<int64_t> labels(p.B * K, -1), counts(p.B, -1), anchors(p.B * K, -2);
  const EmulatedInputs inputs = emulated_inputs(p, in);
  const int status = emulated_postprocess(&inputs, p.nms_thresh, K, boxes.data(), scores.data(),
                                          labels.data(), counts.data(), anchors.data());
  expect(status == 0, "postprocess returned an error", p);
  for (int64_t b = 0; b < p.B; ++b) {
    const int64_t n = counts[b];
    expect(n >= 0 && n <= K, "count in [0, K]", p);
    for (int64_t r = 0; r < K; ++r) {
      const int64_t row = b * K + r;
      if (r >= n) {
        expect(scores[row] == 0.f && labels[row] == 0, "padding is zero", p);
        expect(anchors[row] == -1, "padded anchor indices are -1", p);
        for (int k = 0; k < 4; ++k) expect(boxes[4 * row + k] == 0.f, "padded boxes are zero", p);
        continue;
      }
      expect(scores[row] > static_cast<float>(p.score_thresh) && scores[row] <= 1.f,
             "score in (score_thresh, 1]", p);
      expect(r == 0 || scores[row] <= scores[row - 1], "scores non-increasing", p);
      expect(labels[row] >= 0 && labels[row] < p.C && labels[row] != p.background_class,
             "label is a foreground class", p);
      expect(anchors[row] >= 0 && anchors[row] < p.A, "anchor index in [0, A)", p);
    }
  }
}

void check_flatten(const Problem& p, const Inputs& in) {
  const int64_t capacity = std::min(p.topk, p.A);
  const int64_t slots = p.B * p.C * capacity;
  std::vector<float> boxes(slots * 4), scores(slots);
  std::vector<int64_t> keys(slots);
  int64_t n = -1;
  const EmulatedInputs inputs = emulated_inputs(p, in);
  const int status =
      emulated_decode_threshold_flatten(&inputs, boxes.data(), scores.data(), keys.data(), &n);
  expect(status == 0, "decode_threshold_flatten returned an error", p);
  expect(n >= 0 && n <= slots, "N in [0, slots]", p);
  int64_t run = 0;
  for (int64_t i = 0; i < n; ++i) {
    expect(keys[i] >= 0 && keys[i] < p.B * p.C && keys[i] % p.C != p.background_class,
           "key = image * C + foreground class", p);
    const bool same_key = i > 0 && keys[i] == keys[i - 1];
    expect(i == 0 || keys[i] >= keys[i - 1], "keys non-decreasing", p);
    expect(!same_key || scores[i] <= scores[i - 1], "scores non-increasing within a key", p);
    run = same_key ? run + 1 : 1;
    expect(run <= capacity, "at most topk_candidates per key", p);
    expect(scores[i] > static_cast<float>(p.score_thresh), "score above the threshold", p);
  }
}

void check_nms(std::mt19937& rng, int64_t n, int64_t groups, double iou_threshold,
               int64_t max_kept) {
  const Problem p{1, n, groups, 0, -1, 0.0, iou_threshold, 0, 0, false, false, false};
  std::uniform_real_distribution<float> uniform(0.f, 1.f);
  std::vector<float> boxes(n * 4);
  for (int64_t i = 0; i < n; ++i) {
    const float x = 100.f * uniform(rng), y = 100.f * uniform(rng);
    boxes[4 * i + 0] = x;
    boxes[4 * i + 1] = y;
    boxes[4 * i + 2] = x + 30.f * uniform(rng);
    boxes[4 * i + 3] = y + 30.f * uniform(rng);
  }
  std::vector<int64_t> begin, end;
  for (int64_t g = 0; g < groups; ++g) {
    begin.push_back(g * n / groups);
    end.push_back((g + 1) * n / groups);
  }
  std::vector<uint8_t> keep(n, 0xCD);
  expect(emulated_nms_ranked_groups(boxes.data(), begin.data(), end.data(), groups, iou_threshold,
                                    -1, keep.data()) == 0,
         "nms returned an error", p);
  for (int64_t i = 0; i < n; ++i) expect(keep[i] == 0 || keep[i] == 1, "keep is 0 or 1", p);
  for (int64_t g = 0; g < groups; ++g) {
    if (end[g] > begin[g]) expect(keep[begin[g]] == 1, "the best box of a group is kept", p);
  }
  // Bounded: the first max_kept survivors of each group, nothing else.
  std::vector<uint8_t> bounded(n, 0xCD);
  expect(emulated_nms_ranked_groups(boxes.data(), begin.data(), end.data(), groups, iou_threshold,
                                    max_kept, bounded.data()) == 0,
         "bounded nms returned an error", p);
  for (int64_t g = 0; g < groups; ++g) {
    int64_t survivors = 0;
    for (int64_t i = begin[g]; i < end[g]; ++i) {
      survivors += keep[i];
      expect(bounded[i] == (keep[i] && survivors <= max_kept), "bounded = full truncated", p);
    }
  }
}

// batched_nms_padded on exactly-sized buffers: counts in [0, K], each image's
// survivors distinct non-empty slots in rank order (score descending, slot
// ascending on ties), its best non-empty slot first, -1 after the count.
void check_nms_padded(std::mt19937& rng, int64_t B, int64_t M, int64_t labels_per_image,
                      double iou_threshold, int64_t max_kept, bool class_agnostic) {
  const Problem p{B, M, labels_per_image, 0, -1, 0.0, iou_threshold, 0, max_kept,
                  false, false, false};
  const int64_t K = std::min(max_kept, M);
  std::uniform_real_distribution<float> uniform(0.f, 1.f);
  std::vector<float> boxes(B * M * 4), scores(B * M);
  std::vector<int64_t> labels(B * M), indices(B * K, -7), counts(B, -7);
  for (int64_t i = 0; i < B * M; ++i) {
    const float x = 60.f * uniform(rng), y = 60.f * uniform(rng);
    boxes[4 * i + 0] = x;
    boxes[4 * i + 1] = y;
    boxes[4 * i + 2] = x + 30.f * uniform(rng);
    boxes[4 * i + 3] = y + 30.f * uniform(rng);
    scores[i] = std::round(8.f * uniform(rng)) / 8.f;  // ties
    const float draw = uniform(rng);
    labels[i] = draw < 0.2f ? -1 : static_cast<int64_t>(draw * labels_per_image) % labels_per_image;
  }
  expect(emulated_batched_nms_padded(boxes.data(), scores.data(), labels.data(), B, M,
                                     iou_threshold, K, class_agnostic, indices.data(),
                                     counts.data()) == 0,
         "batched_nms_padded ran", p);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t n = counts[b];
    expect(n >= 0 && n <= K, "count in [0, K]", p);
    int64_t best = -1;
    for (int64_t m = 0; m < M; ++m) {
      const int64_t i = b * M + m;
      if (labels[i] >= 0 && (best < 0 || scores[i] > scores[b * M + best])) best = m;
    }
    expect((n == 0) == (best < 0), "no survivor only in an empty image", p);
    std::vector<bool> seen(M, false);
    for (int64_t r = 0; r < K; ++r) {
      const int64_t slot = indices[b * K + r];
      if (r >= n) {
        expect(slot == -1, "-1 after the count", p);
        continue;
      }
      expect(slot >= 0 && slot < M && !seen[slot] && labels[b * M + slot] >= 0,
             "a distinct non-empty slot", p);
      if (slot < 0 || slot >= M) continue;
      seen[slot] = true;
      if (r == 0) expect(slot == best, "the best slot first", p);
      if (r > 0 && indices[b * K + r - 1] >= 0 && indices[b * K + r - 1] < M) {
        const int64_t prev = indices[b * K + r - 1];
        const float s = scores[b * M + slot], prev_s = scores[b * M + prev];
        expect(prev_s > s || (prev_s == s && prev < slot), "survivors ranked", p);
      }
    }
  }
}

}  // namespace

// One select_topk problem: the level layout and the rule (emulated_ops.h numbers).
struct TopkProblem {
  int64_t B, C;
  std::vector<int64_t> level_sizes;
  int activation, factor_mode;  // factor_mode 0: no factor tensor
  bool factor_logits, single_label, per_class;
  std::vector<int64_t> classes;  // the allow-list; empty: none
  int64_t background_class, topk;
  double score_thresh;
};

// select_topk on exactly-sized buffers: every count within its group's items and
// the capacity, flat indices inside the group (its level, or its class) on an
// allowed foreground column, at most one class per anchor with single_label,
// padding after the count; each group ranked by score (flat index ascending on
// ties) above the threshold, except "after_selection", whose reported scores
// are not the ones it ranks by.
void check_select_topk(std::mt19937& rng, const TopkProblem& t) {
  const Problem p{t.B, 0, t.C, t.activation, t.background_class, t.score_thresh, 0.5, t.topk,
                  1, false, false, false};
  int64_t A = 0, largest = 0;
  for (int64_t n : t.level_sizes) {
    A += n;
    largest = std::max(largest, n);
  }
  const int64_t L = static_cast<int64_t>(t.level_sizes.size());
  const int64_t G = t.per_class ? t.C : L;
  const int64_t k = t.per_class ? std::min(t.topk, A)
                                : std::min(t.topk, largest * (t.single_label ? 1 : t.C));
  std::normal_distribution<float> normal(0.f, 2.f);
  std::uniform_real_distribution<float> uniform(0.f, 1.f);
  std::vector<float> logits(t.B * A * t.C), factor(t.factor_mode != 0 ? t.B * A : 0);
  // "none": probabilities on a grid; else logits on a grid: many exact ties.
  for (float& v : logits) {
    v = t.activation == 2 ? std::round(uniform(rng) * 16.f) / 16.f
                          : std::round(normal(rng) * 4.f) / 4.f;
  }
  for (float& v : factor) v = t.factor_logits ? normal(rng) : uniform(rng);
  std::vector<uint8_t> allowed(t.C, 0);
  for (int64_t c : t.classes) allowed[c] = 1;
  const EmulatedSelectInputs inputs{logits.data(),
                                    factor.empty() ? nullptr : factor.data(),
                                    t.classes.empty() ? nullptr : allowed.data(),
                                    t.level_sizes.data(),
                                    t.B,
                                    A,
                                    t.C,
                                    t.background_class,
                                    t.topk,
                                    t.score_thresh,
                                    static_cast<int32_t>(L),
                                    t.activation,
                                    t.factor_mode,
                                    t.factor_logits,
                                    t.single_label,
                                    t.per_class};
  std::vector<int64_t> flat(t.B * G * k), counts(t.B * G);
  std::vector<float> scores(t.B * G * k);
  expect(emulated_select_topk(&inputs, flat.data(), scores.data(), counts.data()) == 0,
         "select_topk ran", p);
  const bool ranked_by_report = t.factor_mode != 3;
  int64_t selected = 0;
  for (int64_t b = 0; b < t.B; ++b) {
    std::vector<int> labels_of_anchor(A, 0);
    for (int64_t g = 0; g < G; ++g) {
      const int64_t level = t.per_class ? 0 : g;
      int64_t first_anchor = 0;
      for (int64_t l = 0; l < level; ++l) first_anchor += t.level_sizes[l];
      const int64_t anchors = t.per_class ? A : t.level_sizes[level];
      const int64_t items = anchors * (t.per_class || t.single_label ? 1 : t.C);
      const int64_t seg = b * G + g, n = counts[seg];
      expect(n >= 0 && n <= std::min(k, items), "count within bounds", p);
      selected += n;
      for (int64_t r = 0; r < k; ++r) {
        const int64_t f = flat[seg * k + r];
        const float s = scores[seg * k + r];
        if (r >= n) {
          expect(f == -1 && s == 0.f, "padding after the count", p);
          continue;
        }
        const int64_t anchor = f / t.C, cls = f % t.C;
        expect(anchor >= first_anchor && anchor < first_anchor + anchors,
               "flat index inside its group", p);
        expect(cls != t.background_class, "a foreground column", p);
        expect(t.classes.empty() || allowed[cls] != 0, "an allowed column", p);
        expect(!t.per_class || cls == g, "the group's own class", p);
        if (anchor >= first_anchor && anchor < first_anchor + anchors) {
          ++labels_of_anchor[anchor];
          expect(!t.single_label || labels_of_anchor[anchor] == 1, "one label per anchor", p);
        }
        if (ranked_by_report) {
          expect(s > static_cast<float>(t.score_thresh), "score above the threshold", p);
          if (r > 0) {
            const float prev = scores[seg * k + r - 1];
            expect(prev > s || (prev == s && flat[seg * k + r - 1] < f), "ranked", p);
          }
        }
      }
    }
  }
  expect(selected > 0, "the problem selects something", p);
}

// The one logit bound: select_topk's (make_pair_bounds) equals the per-level one
// of the CPU kernel (make_level_score_bound) for sigmoid with or without a sqrt
// factor.
void check_bounds_agree() {
  const Problem p{1, 1, 1, 1, -1, 0.0, 0.5, 1, 1, false, false, false};
  for (const double t : {0.0, 1e-31, 1e-6, 0.05, 0.3, 0.5, 0.9, 0.989, 0.99, 0.999, 1.0}) {
    for (const bool sqrt_factor : {false, true}) {
      const PairBounds bounds =
          make_pair_bounds(Activation::kSigmoid,
                           sqrt_factor ? FactorMode::kSqrt : FactorMode::kNone, true, t);
      const float level = make_level_score_bound(t, sqrt_factor).value;
      expect(bounds.class_logit.value == level, "class bound equals the level bound", p);
      expect(!sqrt_factor || bounds.factor_logit.value == level,
             "factor bound equals the level bound", p);
    }
  }
}

int main() {
  std::mt19937 rng(2024);
  const Problem problems[] = {
      // B, A, C, activation, background, score, nms, topk, K, per-image, clip, specials
      {2, 700, 7, 0, 0, 0.01, 0.45, 400, 200, false, true, false},
      {3, 300, 5, 0, 0, 0.01, 0.45, 5, 20, false, true, false},  // radix select
      {2, 257, 3, 1, -1, 0.3, 0.5, 64, 50, true, false, false},
      {1, 1, 1, 1, -1, 0.0, 0.5, 1, 1, false, true, false},
      {2, 65, 2, 0, 1, 0.0, 1.0, 400, 1000, false, true, false},  // everything kept
      {2, 500, 4, 0, 3, 0.05, 0.0, 200, 300, true, true, true},   // NaN / inf, NMS all
      {1, 10300, 2, 1, -1, 0.6, 0.5, 300, 100, false, true, false},  // keys not cached
      {2, 100, 9, 0, 0, 1.0, 0.5, 50, 10, false, true, false},       // nothing passes
  };
  for (const Problem& p : problems) {
    const Inputs in = make_inputs(p, rng);
    check_postprocess(p, in);
    check_flatten(p, in);
    std::printf("B=%lld A=%lld C=%lld done\n", static_cast<long long>(p.B),
                static_cast<long long>(p.A), static_cast<long long>(p.C));
  }
  // B, C, levels, activation, factor mode, factor logits, single label, per class,
  // classes, background, topk, score_thresh
  const TopkProblem topk_problems[] = {
      {2, 7, {300, 80, 20}, 1, 0, true, false, false, {}, -1, 100, 0.05},  // radix select
      {1, 3, {40, 0, 9}, 1, 1, true, false, false, {}, -1, 1000, 0.2},    // every pair, empty level
      {3, 5, {64, 16}, 1, 0, true, false, false, {}, -1, 1, 0.0},         // one slot per level
      {2, 6, {120, 30}, 0, 2, true, true, false, {}, 0, 50, 0.01},        // softmax, YOLOX-like
      {2, 9, {200}, 2, 2, false, true, false, {1, 4, 8}, -1, 40, 0.25},    // none, allow-list
      {2, 4, {90, 40, 11}, 1, 3, true, false, false, {}, 3, 30, 0.3},     // after_selection
      {2, 6, {150}, 0, 0, true, false, true, {}, 0, 20, 0.05},            // SSD-like per class
      {1, 5, {10300}, 2, 1, false, true, true, {0, 2, 3}, -1, 300, 0.5},  // keys not cached
      {2, 40, {70, 33}, 1, 2, true, true, false, {}, -1, 25, 0.1},        // C > one warp
  };
  for (const TopkProblem& t : topk_problems) check_select_topk(rng, t);
  check_bounds_agree();
  std::printf("select_topk done\n");
  check_nms(rng, 1, 1, 0.5, 0);
  check_nms(rng, 300, 1, 0.5, 70);
  check_nms(rng, 2000, 37, 0.3, 3);
  check_nms(rng, 500, 500, 0.0, 1);
  check_nms_padded(rng, 3, 200, 4, 0.5, 50, false);  // several chunks per image
  check_nms_padded(rng, 2, 70, 1, 0.0, 1000, true);   // K = M
  check_nms_padded(rng, 1, 1, 1, 0.5, 1, false);
  check_nms_padded(rng, 4, 130, 3, 0.7, 1, false);
  std::printf("batched_nms_padded done\n");
  if (failures > 0) {
    std::printf("%d checks failed\n", failures);
    return 1;
  }
  std::printf("ok\n");
  return 0;
}
