// CPU kernel of ssd_post::select_topk (RetinaNet, FCOS, ATSS, YOLO, SSD-like per
// class): for every block (an (image, level) of anchor x class pairs; per_image
// and per_class: the image's one level) the scores the oracle
// (reference.select_topk_loop) computes for the ScoreRule, the eligible columns
// (background out; single_label: each row's best; the allow-list), the threshold,
// and the best topk_candidates pairs of each group (the level, or per_class the
// class) ranked by selection score, equal scores by flat index anchor * C + class.
//
// Softmax scores come from torch's softmax on copies of the rows that may pass
// (row_bound.h's test, as the SSD op's scan): its bits do not depend on where a row
// sits. "none" uses the values as given. A factor joins the class probability by
// score_bounds.h's selection_score / reported_score, and make_pair_bounds rules
// pairs out before any exp.
//
// Sigmoid scores (of the classes or of a factor given as logits) must be torch's
// own bits. The oracle calls torch.sigmoid on a whole block, and torch's CPU loop
// rounds its vectorised body and its scalar tail differently (Sleef exp against
// std::exp): the bits of a score depend on where it sits in the block, on the grain
// size, on the thread split and on the CPU capability. A block is therefore scored
// in one of two ways:
//   - gathered: the pairs that can pass (a logit bound prunes the others) go
//     through ATen's sigmoid, those of the loop's vectorised body in one call on a
//     gathered copy, those of a scalar tail in calls too short for a vector;
//   - whole block: at::sigmoid of the whole block, as the oracle does.
// The gathered path rests on a model of torch's loop (LoopLayout) and on torch's
// sqrt being the same wherever an element sits; a one-time self-check per thread
// count (the capability is fixed per process) compares both with at::sigmoid and
// at::sqrt on synthetic blocks across the grain and tail edges, and on a mismatch
// every block is scored whole: a change in torch makes this slower, never wrong.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <map>
#include <mutex>
#include <string>
#include <tuple>
#include <vector>

#include "../common/checks.h"
#include "../common/select_params.h"
#include "row_bound.h"
#include "select_per_level.h"
#include "vector_kernels.h"

namespace ssd_post {
namespace cpu {
namespace {

// ---------------------------------------------------------------------------
// torch's CPU elementwise loop, as far as the bits of a sigmoid depend on it.

// A contiguous float tensor of n elements is split by at::parallel_for (OpenMP
// backend) into ceil(n / T') chunks, T' = min(threads, ceil(n / GRAIN_SIZE)), and
// run on one thread below the grain; each chunk's loop takes whole `step`s (two
// vectors) through the vectorised body and the rest, its tail, one element at a
// time.
struct LoopLayout {
  int threads;   // threads of a top-level call (1 inside a parallel region)
  int64_t step;  // elements per vectorised iteration
};

constexpr int64_t kGrainSize = at::internal::GRAIN_SIZE;
// Gathered body values go through sigmoid in calls of this many: under the grain
// (one thread) and whole steps of every width tried, so all of them take the body.
constexpr int64_t kBodyPiece = 4096;
static_assert(kBodyPiece < at::internal::GRAIN_SIZE && kBodyPiece % 64 == 0,
              "kBodyPiece should stay under the grain and hold whole steps");

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

int64_t loop_chunk(int64_t numel, int threads) {
  if (numel < kGrainSize || threads <= 1) return std::max<int64_t>(numel, 1);
  const int64_t used = std::min<int64_t>(threads, ceil_div(numel, kGrainSize));
  return ceil_div(numel, used);
}

bool in_scalar_tail(int64_t position, int64_t numel, int64_t chunk, int64_t step) {
  const int64_t offset = position % chunk;
  const int64_t length = std::min(numel - (position - offset), chunk);
  return offset >= length - length % step;
}

// The threads a top-level ATen call made here would use: inside a parallel region
// ATen runs a nested parallel_for inline, as one chunk.
int calling_threads() { return at::in_parallel_region() ? 1 : at::get_num_threads(); }

void sigmoid_call(const float* in, float* out, int64_t n) {
  const at::Tensor src = at::from_blob(const_cast<float*>(in), {n}, at::kFloat);
  at::Tensor dst = at::from_blob(out, {n}, at::kFloat);
  at::sigmoid_out(dst, src);
}

// Buffers of one thread, reused from block to block.
struct SigmoidScratch {
  std::vector<int64_t> body, tail;  // indices into the positions
  std::vector<float> in, out;
};

// out[i] = at::sigmoid(block)[positions[i]] to the bit, for a contiguous float32
// block of `numel` elements, if `layout` is torch's. Runs no thread of its own:
// every call is under the grain.
void sigmoid_at(const float* block, int64_t numel, const int64_t* positions, int64_t n,
                const LoopLayout& layout, float* out, SigmoidScratch& s) {
  const int64_t chunk = loop_chunk(numel, layout.threads);
  s.body.clear();
  s.tail.clear();
  for (int64_t i = 0; i < n; ++i) {
    (in_scalar_tail(positions[i], numel, chunk, layout.step) ? s.tail : s.body).push_back(i);
  }
  // Body positions: gathered, padded to whole steps, so every one runs vectorised.
  const int64_t body_n = static_cast<int64_t>(s.body.size());
  const int64_t padded = ceil_div(body_n, layout.step) * layout.step;
  s.in.assign(static_cast<size_t>(padded), 0.f);
  s.out.resize(static_cast<size_t>(padded));
  for (int64_t i = 0; i < body_n; ++i) s.in[i] = block[positions[s.body[i]]];
  for (int64_t first = 0; first < padded; first += kBodyPiece) {
    sigmoid_call(s.in.data() + first, s.out.data() + first, std::min(kBodyPiece, padded - first));
  }
  for (int64_t i = 0; i < body_n; ++i) out[s.body[i]] = s.out[i];
  // Tail positions: a call on fewer than `step` elements runs the scalar loop only.
  const int64_t tail_n = static_cast<int64_t>(s.tail.size());
  s.in.resize(static_cast<size_t>(std::max<int64_t>(tail_n, 1)));
  s.out.resize(s.in.size());
  for (int64_t i = 0; i < tail_n; ++i) s.in[i] = block[positions[s.tail[i]]];
  for (int64_t first = 0; first < tail_n; first += layout.step - 1) {
    sigmoid_call(s.in.data() + first, s.out.data() + first,
                 std::min(layout.step - 1, tail_n - first));
  }
  for (int64_t i = 0; i < tail_n; ++i) out[s.tail[i]] = s.out[i];
}

// at::sigmoid of a contiguous float32 block to the bit (for a verified layout), on
// this thread: each chunk of torch's loop in calls of kBodyPiece elements, whole
// steps without a tail, and its remainder, which ends with the chunk's tail. All
// under the grain, so none of them is split over threads, wherever it runs.
void sigmoid_chunked(const float* x, int64_t numel, const LoopLayout& layout, float* out) {
  const int64_t chunk = loop_chunk(numel, layout.threads);
  for (int64_t first = 0; first < numel; first += chunk) {
    const int64_t end = std::min(first + chunk, numel);
    for (int64_t piece = first; piece < end; piece += kBodyPiece) {
      sigmoid_call(x + piece, out + piece, std::min(kBodyPiece, end - piece));
    }
  }
}

// In place, torch's sqrt of v[0, n) (FCOS's score): torch's float sqrt is its
// vectorised routine, not std::sqrt, and rounds differently from it now and then.
// Calls under the grain, as sigmoid_at's.
void sqrt_like_torch(float* v, int64_t n) {
  for (int64_t first = 0; first < n; first += kBodyPiece) {
    const int64_t count = std::min(kBodyPiece, n - first);
    at::Tensor piece = at::from_blob(v + first, {count}, at::kFloat);
    at::sqrt_out(piece, piece);
  }
}

// ---------------------------------------------------------------------------
// The self-check.

// Set (to anything but "" or "0") before the first per-level call, this makes the
// self-check fail on purpose, so that tests can see the whole-block path taken.
constexpr const char* kPoisonVariable = "SSD_POST_POISON_SIGMOID_SELF_CHECK";

bool poisoned() {
  const char* value = std::getenv(kPoisonVariable);
  return value != nullptr && value[0] != '\0' && std::strcmp(value, "0") != 0;
}

// Whether sigmoid_at and sigmoid_chunked give at::sigmoid's bits at every position
// of synthetic blocks that end below, at and past the grain, split into as many
// chunks as `threads` allows (and fewer), each chunk with a tail, and whether
// sqrt_like_torch is position-independent. Values spread over [-16, 16] with an
// irrational stride: many round differently in the body and in the tail.
bool layout_matches_torch(const LoopLayout& layout) {
  const int64_t most = std::min<int64_t>(layout.threads, 64);
  const int64_t sizes[] = {7, 1000, kGrainSize - 3, kGrainSize, 3 * kGrainSize + 5,
                           most * kGrainSize + 37};
  SigmoidScratch scratch;
  for (const int64_t numel : sizes) {
    at::Tensor block = at::empty({numel}, at::kFloat);
    float* x = block.data_ptr<float>();
    for (int64_t i = 0; i < numel; ++i) {
      const double golden = static_cast<double>(i) * 0.6180339887498949;
      x[i] = static_cast<float>(-16.0 + 32.0 * (golden - std::floor(golden)));
    }
    at::Tensor expected = at::sigmoid(block);
    if (poisoned()) expected.data_ptr<float>()[numel / 2] += 1.f;
    std::vector<int64_t> positions(static_cast<size_t>(numel));
    for (int64_t i = 0; i < numel; ++i) positions[i] = i;
    const at::Tensor products = expected * expected.flip(0);
    const at::Tensor whole_sqrt = at::sqrt(products);
    // Both scorings run on a worker thread, as in the op.
    std::vector<float> gathered_sigmoid(static_cast<size_t>(numel));
    std::vector<float> chunked_sigmoid(static_cast<size_t>(numel));
    std::vector<float> gathered_sqrt;
    for (int64_t i = 1; i < numel; i += 3) gathered_sqrt.push_back(products.data_ptr<float>()[i]);
    at::parallel_for(0, 1, 1, [&](int64_t, int64_t) {
      sigmoid_at(x, numel, positions.data(), numel, layout, gathered_sigmoid.data(), scratch);
      sigmoid_chunked(x, numel, layout, chunked_sigmoid.data());
      sqrt_like_torch(gathered_sqrt.data(), static_cast<int64_t>(gathered_sqrt.size()));
    });
    const size_t bytes = static_cast<size_t>(numel) * sizeof(float);
    if (std::memcmp(gathered_sigmoid.data(), expected.data_ptr<float>(), bytes) != 0 ||
        std::memcmp(chunked_sigmoid.data(), expected.data_ptr<float>(), bytes) != 0) {
      return false;
    }
    // FCOS's sqrt on gathered products must not depend on position either: the
    // sqrt of every third product, gathered, against the whole block's.
    for (size_t j = 0; j < gathered_sqrt.size(); ++j) {
      if (std::memcmp(&gathered_sqrt[j], whole_sqrt.data_ptr<float>() + 1 + 3 * j,
                      sizeof(float)) != 0) {
        return false;
      }
    }
  }
  return true;
}

// The loop step of this CPU capability (two vectors of floats) first; the other
// widths are tried too, so an unlisted capability can still verify one.
std::vector<int64_t> steps_to_try() {
  const std::string capability = at::get_cpu_capability();
  const int64_t preferred = capability == "AVX512" ? 32 : 16;
  std::vector<int64_t> steps{preferred};
  for (const int64_t step : {16, 32, 8, 64}) {
    if (step != preferred) steps.push_back(step);
  }
  return steps;
}

// How a block is scored for a given thread count: step > 0 when the gathered path
// verified that step, 0 when every block is scored whole.
int64_t verified_step(int threads) {
  static std::mutex mutex;
  static std::map<int, int64_t> verified;
  const std::lock_guard<std::mutex> lock(mutex);
  const auto found = verified.find(threads);
  if (found != verified.end()) return found->second;
  int64_t chosen = 0;
  for (const int64_t step : steps_to_try()) {
    if (layout_matches_torch({threads, step})) {
      chosen = step;
      break;
    }
  }
  verified.emplace(threads, chosen);
  return chosen;
}

// ---------------------------------------------------------------------------
// Selection of one block: an (image, level) of anchor x class pairs, or with
// per_class the image's one level.

struct Pair {
  float score;   // the selection score, by which pairs are ranked
  float report;  // the score reported (score_bounds.h reported_score)
  int64_t flat;  // anchor_in_block * C + class
};

bool ranks_before(const Pair& x, const Pair& y) {
  return x.score > y.score || (x.score == y.score && x.flat < y.flat);
}

// The passing pairs of a block. Its slots only grow, so that the hot loops append
// without a branch or a call per pair: write the next slot, then advance by the test.
struct PairBuffer {
  std::vector<Pair> slots;
  int64_t size = 0;

  void clear() { size = 0; }
  // Room for n more pairs past size; returns the first free slot.
  Pair* room(int64_t n) {
    if (size + n > static_cast<int64_t>(slots.size())) {
      slots.resize(static_cast<size_t>(std::max<int64_t>(2 * slots.size(), size + n)));
    }
    return slots.data() + size;
  }
  void push(const Pair& pair) {
    *room(1) = pair;
    ++size;
  }
  Pair* begin() { return slots.data(); }
  Pair* end() { return slots.data() + size; }
};

// What the kernel reads of the inputs, validated and laid out by the op.
struct BlockInputs {
  at::Tensor logits;  // [B, A, C], as given (any float dtype and strides)
  at::Tensor factor;  // [B, A] (a view of the tensor given), or undefined
  const LevelTable* levels;
  ScoreRule rule;
  float score_thresh;  // compared as float32, as torch compares a tensor to a Python float
  int64_t background;  // -1: every column is a class
  int64_t topk;        // topk_candidates, >= 1
  PairBounds bounds;
  std::vector<uint8_t> allowed;  // [C]: 1 where a column may be reported (class_allowed_mask)
  bool all_allowed;
  int64_t groups;    // per image: C (per_class) or the levels
  int64_t capacity;  // slots per (image, group)
  // Some score is a sigmoid (the class activation, or a factor given as logits),
  // whose bits depend on where torch's loop meets it.
  bool uses_sigmoid;
  // Float32 blocks laid out as torch's loop sees them (each image's rows
  // contiguous) and, for a sigmoid, that layout verified: blocks are scored on
  // the worker threads, gathered or whole (chunk by chunk, as torch splits them).
  bool layout_known;
  // And pairs can be ruled out before they are scored (softmax and "none" always
  // go this way: their bits do not depend on where a row sits).
  bool gather;
  LoopLayout layout;
  const float* logits_data;  // when layout_known
  int64_t image_stride;
  const float* factor_data;  // when layout_known and a factor given
  int64_t factor_image_stride;
  int64_t* flat_out;  // [B, groups, capacity]
  float* score_out;   // [B, groups, capacity]
  int64_t* count_out;  // [B, groups]
};

struct Block {
  int64_t image;
  int level;
};

// Rows of softmax probabilities computed per call of torch's softmax.
constexpr int64_t kSoftmaxRows = 256;

// Per-thread buffers, reused from block to block.
struct BlockScratch {
  SigmoidScratch sigmoid;
  std::vector<int64_t> rows, positions, anchors;
  std::vector<int32_t> passing;
  std::vector<float> row_max, row_bound, probs, factors, pair_factors, select, report;
  std::vector<double> best;
  PairBuffer pairs;
  std::vector<Pair> sorted;
  std::vector<int64_t> class_begin;
  at::Tensor staged, staged_probs;  // [kSoftmaxRows, C] float32
};

// Writes the best `capacity` of the pairs [begin, end) (all passing), ranked, to
// segment `segment` (image * groups + group).
void write_best(Pair* begin, Pair* end, const BlockInputs& in, int64_t segment,
                int64_t flat_offset) {
  const int64_t size = end - begin;
  const int64_t n = std::min<int64_t>(size, in.capacity);
  if (size > n) std::nth_element(begin, begin + n, end, ranks_before);
  std::sort(begin, begin + n, ranks_before);
  int64_t* flat = in.flat_out + segment * in.capacity;
  float* scores = in.score_out + segment * in.capacity;
  for (int64_t i = 0; i < n; ++i) {
    flat[i] = flat_offset + begin[i].flat;
    scores[i] = begin[i].report;
  }
  in.count_out[segment] = n;
}

// Ranks the block's passing pairs (s.pairs) into its groups: the level, or per
// class (a counting sort by class first).
void finish_block(const BlockInputs& in, const Block& block, BlockScratch& s) {
  const int64_t C = in.logits.size(2);
  const int64_t flat_offset = in.levels->start[block.level] * C;
  if (!in.rule.per_class) {
    write_best(s.pairs.begin(), s.pairs.end(), in,
               block.image * in.groups + block.level, flat_offset);
    return;
  }
  s.class_begin.assign(static_cast<size_t>(C + 1), 0);
  for (const Pair& p : s.pairs) ++s.class_begin[p.flat % C + 1];
  for (int64_t c = 0; c < C; ++c) s.class_begin[c + 1] += s.class_begin[c];
  s.sorted.resize(static_cast<size_t>(s.pairs.size));
  std::vector<int64_t>& fill = s.anchors;  // free at this point
  fill.assign(s.class_begin.begin(), s.class_begin.end() - 1);
  for (const Pair& p : s.pairs) s.sorted[fill[p.flat % C]++] = p;
  for (int64_t c = 0; c < C; ++c) {
    if (s.class_begin[c + 1] == s.class_begin[c]) continue;
    write_best(s.sorted.data() + s.class_begin[c], s.sorted.data() + s.class_begin[c + 1], in,
               block.image * in.groups + c, flat_offset);
  }
}

// The selection and reported scores of a pair (score_bounds.h selection_score and
// reported_score), for `rows` x `width` class probabilities p and one factor
// probability per row f (nullptr: no factor): p itself without a factor. The
// square root of "sqrt" is torch's (sqrt_like_torch): torch's vectorised float sqrt
// is not always the correctly rounded std::sqrt that centerness_score uses on the
// host, and the scores must be the oracle's bits.
struct Scored {
  const float* select;
  const float* report;
};

// p_is_scratch: p is this thread's buffer, which "sqrt" may overwrite (one pass
// less over a dense block).
Scored score_pairs(const ScoreRule& rule, const float* p, int64_t rows, int64_t width,
                   const float* f, BlockScratch& s, bool p_is_scratch) {
  if (rule.factor_mode == FactorMode::kNone) return {p, p};
  const int64_t n = rows * width;
  const bool in_place = p_is_scratch && rule.factor_mode == FactorMode::kSqrt;
  if (!in_place) s.select.resize(static_cast<size_t>(n));
  float* select = in_place ? const_cast<float*>(p) : s.select.data();
  if (rule.factor_mode == FactorMode::kSqrt) {
    // torch's sqrt(p * f): the product (centerness_score's), then torch's sqrt.
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t c = 0; c < width; ++c) select[r * width + c] = mul_rn(p[r * width + c], f[r]);
    }
    sqrt_like_torch(select, n);
    return {select, select};
  }
  s.report.resize(static_cast<size_t>(n));
  float* report = s.report.data();
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < width; ++c) {
      const int64_t i = r * width + c;
      select[i] = selection_score(rule.factor_mode, p[i], f[r]);
      report[i] = reported_score(rule.factor_mode, p[i], f[r]);
    }
  }
  return {select, report};
}

// Offers the scored columns of one row (anchor `a` of the block): entries [0, n),
// column column_of(i) (increasing), scores select[i] / report[i]. single_label: only
// the row's best non-background column (highest score, equal scores to the lower
// column, NaN ignored), then the allow-list and the threshold; else each
// allowed foreground column above the threshold.
template <typename ColumnOf>
void offer_row(const BlockInputs& in, int64_t a, int64_t C, int64_t n, ColumnOf column_of,
               const float* select, const float* report, PairBuffer& pairs) {
  if (in.rule.single_label) {
    int64_t best = -1;
    for (int64_t i = 0; i < n; ++i) {
      if (column_of(i) == in.background || std::isnan(select[i])) continue;
      if (best < 0 || select[i] > select[best]) best = i;
    }
    if (best < 0) return;
    const int64_t c = column_of(best);
    if (in.allowed[c] && select[best] > in.score_thresh) {
      pairs.push({select[best], report[best], a * C + c});
    }
    return;
  }
  for (int64_t i = 0; i < n; ++i) {
    const int64_t c = column_of(i);
    if (select[i] > in.score_thresh && c != in.background && in.allowed[c]) {
      pairs.push({select[i], report[i], a * C + c});
    }
  }
}

// Offers `n` whole rows of the block, anchors[r] (nullptr: anchors first..first+n),
// their scores row-major [n, C].
void offer_rows(const BlockInputs& in, const int64_t* anchors, int64_t first, int64_t n,
                int64_t C, const Scored& scored, BlockScratch& s) {
  if (!in.rule.single_label && in.all_allowed) {  // one compare per pair: dense blocks
    for (int64_t r = 0; r < n; ++r) {
      const int64_t a = anchors == nullptr ? first + r : anchors[r];
      const float* select = scored.select + r * C;
      const float* report = scored.report + r * C;
      Pair* out = s.pairs.room(C);
      int64_t kept = 0;
      for (int64_t c = 0; c < C; ++c) {
        out[kept] = {select[c], report[c], a * C + c};
        kept += (select[c] > in.score_thresh) & (c != in.background);
      }
      s.pairs.size += kept;
    }
    return;
  }
  for (int64_t r = 0; r < n; ++r) {
    offer_row(in, anchors == nullptr ? first + r : anchors[r], C, C,
              [](int64_t i) { return i; }, scored.select + r * C, scored.report + r * C, s.pairs);
  }
}

double sigmoid_double(double x) { return 1.0 / (1.0 + std::exp(-x)); }

// A class logit at or below row_bound[r] (for rows[r], whose max logit is
// row_max[r]) cannot give a pair that both passes the threshold and is among the
// block's `k` best selection scores (sigmoid class scores, one level).
//
// The k rows with the best score of their best class give k pairs scoring at
// least about s_k, the k-th best of those row scores, so a pair of the top k
// scores at least that much (with single_label too: each of those rows gives its
// best pair). With s = the selection score of p = sigmoid(x) and the row's
// factor f = sigmoid(factor logit): s = p, s = p * f (needs p >= s_k / f) or
// s = sqrt(p * f) (needs p >= s_k^2 / f). s_k is lowered by a relative 1e-5, far
// more than the ULPs by which torch's float scores differ from the exact ones, so
// pairs tied with the k-th score are never cut: sigmoid saturates at exactly 1.0
// from about x = 17, so such ties can have far lower logits than the k-th row's.
// Dense blocks then score a few pairs per row at most, instead of every pair. NaN
// logits are left out of a row's max: the max of the rest is a real pair of that
// row. `factor`: the block's factor logits when the mode joins them, else nullptr.
void topk_row_bounds(const float* factor, FactorMode mode, float bound, int64_t k,
                     BlockScratch& s) {
  const int64_t n = static_cast<int64_t>(s.rows.size());
  const bool sqrt_mode = mode == FactorMode::kSqrt;
  double kth;
  if (factor == nullptr) {  // sigmoid is monotone: the k-th best row max is enough
    s.best.assign(s.row_max.begin(), s.row_max.end());
    std::nth_element(s.best.begin(), s.best.begin() + (k - 1), s.best.end(),
                     std::greater<double>());
    kth = sigmoid_double(s.best[k - 1]);
  } else {
    s.best.resize(static_cast<size_t>(n));
    for (int64_t r = 0; r < n; ++r) {
      const double product = sigmoid_double(s.row_max[r]) * sigmoid_double(factor[s.rows[r]]);
      s.best[r] = sqrt_mode ? std::sqrt(product) : product;
    }
    std::nth_element(s.best.begin(), s.best.begin() + (k - 1), s.best.end(),
                     std::greater<double>());
    kth = s.best[k - 1];
  }
  const double needed = std::max(kth, 0.0) * (1 - 1e-5);
  s.row_bound.resize(static_cast<size_t>(n));
  for (int64_t r = 0; r < n; ++r) {
    double p = needed;
    if (factor != nullptr) {
      const double f = sigmoid_double(factor[s.rows[r]]);
      p = f > 0 ? std::min((sqrt_mode ? needed * needed : needed) / f, 1.0) : 1.0;
    }
    // p = 0: -inf (no pruning); p = 1: inf (no pair of the row can reach it).
    const float logit = static_cast<float>(std::log(p) - std::log1p(-p));
    s.row_bound[r] = std::max(bound, logit);
  }
}

// One (image, level) block of the float32 inputs (layout_known): its columns, its
// anchors, and where its logits and factors (nullptr without a factor) start.
struct BlockData {
  int64_t C;
  int64_t A_l;
  const float* x;
  const float* factor;
};

BlockData block_data(const BlockInputs& in, const Block& block) {
  const int64_t C = in.logits.size(2);
  const int64_t first = in.levels->start[block.level];
  const float* factor =
      in.factor_data == nullptr ? nullptr
                                : in.factor_data + block.image * in.factor_image_stride + first;
  return {C, in.levels->start[block.level + 1] - first,
          in.logits_data + block.image * in.image_stride + first * C, factor};
}

// The factor logits of a block that the bounds may cut (a joined factor given as
// logits with a finite bound), else nullptr.
const float* factor_to_cut(const BlockInputs& in, const float* factor) {
  const bool finite = in.bounds.factor_logit.value > -std::numeric_limits<float>::infinity();
  return finite && in.rule.factor_logits ? factor : nullptr;
}

// The factor probabilities of the block's anchors[0, n) (increasing) into
// s.factors: torch's sigmoid of the block's [A_l] factor slice, or as given.
void factor_probabilities(const BlockInputs& in, const float* factor, int64_t A_l,
                          const int64_t* anchors, int64_t n, BlockScratch& s) {
  s.factors.resize(static_cast<size_t>(std::max<int64_t>(n, 1)));
  if (in.rule.factor_logits) {
    sigmoid_at(factor, A_l, anchors, n, in.layout, s.factors.data(), s.sigmoid);
  } else {
    for (int64_t i = 0; i < n; ++i) s.factors[i] = factor[anchors[i]];
  }
}

// Sigmoid scores through the gathered path: only the pairs that may pass are
// scored. Returns false, having written nothing, when the block is better scored
// whole (most of its pairs may pass).
bool select_block_gathered_sigmoid(const BlockInputs& in, const Block& block, BlockScratch& s) {
  const auto [C, A_l, x, factor] = block_data(in, block);
  const float* cut = factor_to_cut(in, factor);
  const float bound = in.bounds.class_logit.value;
  const float factor_bound = in.bounds.factor_logit.value;
  const int64_t k = in.topk;
  s.rows.clear();
  s.row_max.clear();
  // One max per row tells which rows may hold a passing pair; on a trained head this
  // pass, which reads every logit, is all that most rows cost.
  const auto max_ignoring_nan = vector_kernels().max_ignoring_nan;
  for (int64_t a = 0; a < A_l; ++a) {
    if (cut != nullptr && !(cut[a] > factor_bound)) continue;
    const float row_max = max_ignoring_nan(x + a * C, C);
    if (row_max > bound) {
      s.rows.push_back(a);
      s.row_max.push_back(row_max);
    }
  }
  const int64_t rows = static_cast<int64_t>(s.rows.size());
  // No top-k bound with a background column or an allow-list, which a row's max
  // could hold, nor per class, whose top-k is per column, nor with a joined factor
  // given as probabilities (it may exceed 1).
  const bool joined = in.rule.factor_mode == FactorMode::kSqrt ||
                      in.rule.factor_mode == FactorMode::kBeforeThreshold;
  const bool topk_bound = in.background < 0 && in.all_allowed && !in.rule.per_class && A_l > k &&
                          rows > k && !(joined && factor != nullptr && !in.rule.factor_logits);
  if (topk_bound) topk_row_bounds(joined ? factor : nullptr, in.rule.factor_mode, bound, k, s);
  s.positions.clear();
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t a = s.rows[r];
    const float row_bound = topk_bound ? s.row_bound[r] : bound;
    if (!(s.row_max[r] > row_bound)) continue;
    const float* row = x + a * C;
    // single_label needs every column that may be the row's best, allowed or not.
    for (int64_t c = 0; c < C; ++c) {
      if (row[c] > row_bound && c != in.background && (in.rule.single_label || in.allowed[c])) {
        s.positions.push_back(a * C + c);
      }
    }
  }
  const int64_t n = static_cast<int64_t>(s.positions.size());
  // Scoring a gathered pair costs several times a pair of a whole-block sigmoid.
  if (n * 8 > A_l * C) return false;
  s.probs.resize(static_cast<size_t>(std::max<int64_t>(n, 1)));
  sigmoid_at(x, A_l * C, s.positions.data(), n, in.layout, s.probs.data(), s.sigmoid);
  const float* pair_factor = nullptr;
  if (factor != nullptr) {
    // The factor of each pair's anchor (positions increase, so anchors do).
    s.anchors.clear();
    for (const int64_t p : s.positions) {
      if (s.anchors.empty() || s.anchors.back() != p / C) s.anchors.push_back(p / C);
    }
    factor_probabilities(in, factor, A_l, s.anchors.data(),
                         static_cast<int64_t>(s.anchors.size()), s);
    s.pair_factors.resize(static_cast<size_t>(std::max<int64_t>(n, 1)));
    size_t j = 0;
    for (int64_t i = 0; i < n; ++i) {
      while (s.anchors[j] != s.positions[i] / C) ++j;
      s.pair_factors[i] = s.factors[j];
    }
    pair_factor = s.pair_factors.data();
  }
  const Scored scored = score_pairs(in.rule, s.probs.data(), n, 1, pair_factor, s, true);
  s.pairs.clear();
  if (!in.rule.single_label) {  // the positions hold allowed foreground columns only
    Pair* out = s.pairs.room(n);
    int64_t kept = 0;
    for (int64_t i = 0; i < n; ++i) {
      out[kept] = {scored.select[i], scored.report[i], s.positions[i]};
      kept += scored.select[i] > in.score_thresh;
    }
    s.pairs.size += kept;
    finish_block(in, block, s);
    return true;
  }
  for (int64_t i = 0; i < n;) {
    const int64_t a = s.positions[i] / C;
    int64_t end = i + 1;
    while (end < n && s.positions[end] / C == a) ++end;
    const int64_t* positions = s.positions.data() + i;
    offer_row(in, a, C, end - i, [&](int64_t j) { return positions[j] - a * C; },
              scored.select + i, scored.report + i, s.pairs);
    i = end;
  }
  finish_block(in, block, s);
  return true;
}

// Softmax and "none" scores through the gathered path: the rows that may pass
// (softmax: row_bound.h's test on the class bound, as the SSD op's scan), their
// probabilities from torch's softmax on a copy of those rows (its bits do not
// depend on where a row sits), then every column of each.
void select_block_rows(const BlockInputs& in, const Block& block, BlockScratch& s) {
  const auto [C, A_l, x, factor] = block_data(in, block);
  const float* cut = factor_to_cut(in, factor);
  const float factor_bound = in.bounds.factor_logit.value;
  const bool softmax = in.rule.activation == Activation::kSoftmax;
  const bool p_is_selection_score =
      in.rule.activation == Activation::kNone &&
      (in.rule.factor_mode == FactorMode::kNone ||
       in.rule.factor_mode == FactorMode::kAfterSelection);
  s.pairs.clear();
  if (softmax && !s.staged.defined()) {
    s.staged = at::empty({kSoftmaxRows, C}, at::kFloat);
    s.staged_probs = at::empty({kSoftmaxRows, C}, at::kFloat);
  }
  s.passing.resize(static_cast<size_t>(kSoftmaxRows));
  for (int64_t begin = 0; begin < A_l; begin += kSoftmaxRows) {
    const int64_t end = std::min(A_l, begin + kSoftmaxRows);
    int64_t n = 0;
    if (softmax) {
      n = float_rows_may_pass(x, C, in.background, in.bounds.class_logit.value,
                              /*use_denominator=*/false, begin, end, s.passing.data());
    } else if (p_is_selection_score) {
      // "none" ranked on p itself: a row gives a pair only if one of its values is
      // > score_thresh, the very test applied when it is scored, so the others
      // are skipped unscored (a YOLO head's rows are almost all far below it).
      for (int64_t a = begin; a < end; ++a) {
        const float* row = x + a * C;
        for (int64_t c = 0; c < C; ++c) {
          if (row[c] > in.score_thresh && c != in.background) {
            s.passing[n++] = static_cast<int32_t>(a);
            break;
          }
        }
      }
    } else {
      for (int64_t a = begin; a < end; ++a) s.passing[n++] = static_cast<int32_t>(a);
    }
    s.rows.clear();
    for (int64_t i = 0; i < n; ++i) {
      const int64_t a = s.passing[i];
      if (cut == nullptr || cut[a] > factor_bound) s.rows.push_back(a);
    }
    const int64_t rows = static_cast<int64_t>(s.rows.size());
    if (rows == 0) continue;
    const float* probs;
    if (softmax) {
      float* staged = s.staged.data_ptr<float>();
      for (int64_t r = 0; r < rows; ++r) std::copy_n(x + s.rows[r] * C, C, staged + r * C);
      at::Tensor out = s.staged_probs.narrow(0, 0, rows);
      at::softmax_out(out, s.staged.narrow(0, 0, rows), /*dim=*/1);
      probs = s.staged_probs.data_ptr<float>();
    } else if (rows == end - begin) {
      probs = x + begin * C;  // every row of [begin, end): read in place
    } else {
      s.probs.resize(static_cast<size_t>(rows * C));
      for (int64_t r = 0; r < rows; ++r) std::copy_n(x + s.rows[r] * C, C, s.probs.data() + r * C);
      probs = s.probs.data();
    }
    if (factor != nullptr) factor_probabilities(in, factor, A_l, s.rows.data(), rows, s);
    const Scored scored = score_pairs(in.rule, probs, rows, C,
                                      factor == nullptr ? nullptr : s.factors.data(), s,
                                      probs != x + begin * C);
    offer_rows(in, s.rows.data(), 0, rows, C, scored, s);
  }
  finish_block(in, block, s);
}

// Sigmoid scores of a whole block on this thread, torch's bits (the layout is
// verified), then the threshold and the ranking.
void select_block_chunked(const BlockInputs& in, const Block& block, BlockScratch& s) {
  const auto [C, A_l, x, factor] = block_data(in, block);
  const int64_t numel = A_l * C;
  s.probs.resize(static_cast<size_t>(numel));
  sigmoid_chunked(x, numel, in.layout, s.probs.data());
  const float* f = nullptr;
  if (factor != nullptr) {
    s.factors.resize(static_cast<size_t>(A_l));
    if (in.rule.factor_logits) {
      sigmoid_chunked(factor, A_l, in.layout, s.factors.data());
    } else {
      std::copy_n(factor, A_l, s.factors.data());
    }
    f = s.factors.data();
  }
  const Scored scored = score_pairs(in.rule, s.probs.data(), A_l, C, f, s, true);
  s.pairs.clear();
  offer_rows(in, nullptr, 0, A_l, C, scored, s);
  finish_block(in, block, s);
}

// Scores one block whole with torch's own ops on exactly the tensors the oracle
// scores (reference._block_scores: the slices as given, converted to float32),
// then thresholds and ranks. For blocks whose layout is not known or not
// verified: run on the calling thread when a sigmoid'd tensor is at or past the
// grain, where torch's sigmoid splits it over threads as the oracle's call does.
void select_block_whole(const BlockInputs& in, const Block& block, BlockScratch& s) {
  const int64_t C = in.logits.size(2);
  const int64_t first = in.levels->start[block.level];
  const int64_t A_l = in.levels->start[block.level + 1] - first;
  const at::Tensor logits = in.logits[block.image].narrow(0, first, A_l).to(at::kFloat);
  at::Tensor probs = logits;
  if (in.rule.activation == Activation::kSoftmax) probs = at::softmax(logits, -1);
  if (in.rule.activation == Activation::kSigmoid) probs = at::sigmoid(logits);
  at::Tensor select = probs, report = probs;
  if (in.factor.defined()) {
    at::Tensor factor = in.factor[block.image].narrow(0, first, A_l).to(at::kFloat);
    if (in.rule.factor_logits) factor = at::sigmoid(factor);
    const at::Tensor product = probs * factor.unsqueeze(1);
    if (in.rule.factor_mode == FactorMode::kSqrt) {
      select = report = at::sqrt(product);
    } else if (in.rule.factor_mode == FactorMode::kBeforeThreshold) {
      select = report = product;
    } else {
      report = product;
    }
  }
  select = select.contiguous();
  report = report.contiguous();
  s.pairs.clear();
  offer_rows(in, nullptr, 0, A_l, C, {select.data_ptr<float>(), report.data_ptr<float>()}, s);
  finish_block(in, block, s);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> select_topk_cpu(
    const at::Tensor& logits, const c10::optional<at::Tensor>& score_factor,
    at::IntArrayRef level_sizes, double score_thresh, int64_t topk_candidates,
    c10::optional<int64_t> background_class, c10::string_view score_activation,
    c10::string_view factor_mode, bool factor_logits, bool single_label,
    c10::OptionalIntArrayRef classes, bool per_class) {
  LevelTable levels;
  ScoreRule rule;
  const BatchDims dims = check_select_inputs(
      logits, score_factor, level_sizes, score_thresh, topk_candidates, background_class,
      std::string(score_activation), std::string(factor_mode), factor_logits, single_label,
      classes, per_class, &levels, &rule);
  const int64_t B = dims.batch, A = dims.anchors, C = dims.classes;
  const int64_t groups = select_groups(levels, C, rule);
  const int64_t capacity = select_capacity(levels, C, topk_candidates, rule);
  const at::TensorOptions options = logits.options();
  at::Tensor flat = at::full({B, groups, capacity}, -1, options.dtype(at::kLong));
  at::Tensor scores = at::zeros({B, groups, capacity}, options.dtype(at::kFloat));
  at::Tensor counts = at::zeros({B, groups}, options.dtype(at::kLong));
  if (flat.numel() == 0) return {flat, scores, counts};

  BlockInputs in;
  in.logits = logits;
  if (score_factor.has_value()) in.factor = score_factor->reshape({B, A});
  in.levels = &levels;
  in.rule = rule;
  in.score_thresh = static_cast<float>(score_thresh);
  in.background = background_class.value_or(-1);
  in.topk = topk_candidates;
  in.bounds = make_pair_bounds(rule.activation, rule.factor_mode, rule.factor_logits,
                               score_thresh);
  in.allowed = class_allowed_mask(classes, C);
  in.all_allowed = !classes.has_value();
  in.groups = groups;
  in.capacity = capacity;
  in.uses_sigmoid = rule.activation == Activation::kSigmoid ||
                    (in.factor.defined() && rule.factor_logits);
  const int threads = calling_threads();
  in.layout = {threads, in.uses_sigmoid ? verified_step(threads) : 0};
  // The loop layout modelled is that of a contiguous block (all images share strides).
  const bool blocks_contiguous =
      logits[0].is_contiguous() && (!in.factor.defined() || in.factor[0].is_contiguous());
  const bool float32 = logits.scalar_type() == at::kFloat &&
                       (!in.factor.defined() || in.factor.scalar_type() == at::kFloat);
  in.layout_known = blocks_contiguous && float32 && (!in.uses_sigmoid || in.layout.step > 0);
  const bool sigmoid = rule.activation == Activation::kSigmoid;
  in.gather = in.layout_known &&
              (!sigmoid || in.bounds.class_logit.value > -std::numeric_limits<float>::infinity());
  if (in.layout_known) {
    in.logits_data = logits.data_ptr<float>();
    in.image_stride = logits.stride(0);
    in.factor_data = in.factor.defined() ? in.factor.data_ptr<float>() : nullptr;
    in.factor_image_stride = in.factor.defined() ? in.factor.stride(0) : 0;
  } else {
    in.logits_data = nullptr;
    in.image_stride = 0;
    in.factor_data = nullptr;
    in.factor_image_stride = 0;
  }
  in.flat_out = flat.data_ptr<int64_t>();
  in.score_out = scores.data_ptr<float>();
  in.count_out = counts.data_ptr<int64_t>();

  // The blocks, largest first, taken one at a time by each thread: level sizes
  // differ by a factor of 4 or more, so fixed shares would not balance.
  std::vector<Block> blocks;
  for (int l = 0; l < levels.count; ++l) {
    if (levels.start[l + 1] == levels.start[l]) continue;
    for (int64_t b = 0; b < B; ++b) blocks.push_back({b, l});
  }
  std::stable_sort(blocks.begin(), blocks.end(), [&](const Block& x, const Block& y) {
    return levels.start[x.level + 1] - levels.start[x.level] >
           levels.start[y.level + 1] - levels.start[y.level];
  });
  const int64_t num_blocks = static_cast<int64_t>(blocks.size());
  // Whole blocks of unknown layout whose sigmoid'd tensor is at or past the grain
  // run afterwards on this thread, where torch's sigmoid splits them over threads
  // as the oracle's call does.
  auto runs_here = [&](const Block& block) {
    const int64_t A_l = levels.start[block.level + 1] - levels.start[block.level];
    const int64_t numel = sigmoid ? A_l * C : A_l;
    return in.uses_sigmoid && threads > 1 && numel >= kGrainSize;
  };
  std::vector<uint8_t> deferred(static_cast<size_t>(num_blocks), 0);
  std::atomic<int64_t> next{0};
  // A small input is scored on this thread: waking workers would cost more.
  const int64_t workers = B * A * C < kGrainSize ? 1 : std::min<int64_t>(threads, num_blocks);
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    BlockScratch scratch;
    for (int64_t i = next.fetch_add(1); i < num_blocks; i = next.fetch_add(1)) {
      const Block& block = blocks[i];
      if (in.gather) {
        if (!sigmoid) {
          select_block_rows(in, block, scratch);
          continue;
        }
        if (select_block_gathered_sigmoid(in, block, scratch)) continue;
      }
      if (in.layout_known) {
        select_block_chunked(in, block, scratch);
      } else if (!runs_here(block)) {
        select_block_whole(in, block, scratch);
      } else {
        deferred[i] = 1;
      }
    }
  });
  BlockScratch scratch;
  for (int64_t i = 0; i < num_blocks; ++i) {
    if (deferred[i]) select_block_whole(in, blocks[i], scratch);
  }
  return {flat, scores, counts};
}

}  // namespace

std::string per_level_scoring() {
  return verified_step(calling_threads()) > 0 ? "gathered" : "whole_block";
}

TORCH_LIBRARY_IMPL(ssd_post, CPU, m) { m.impl("select_topk", &select_topk_cpu); }

}  // namespace cpu
}  // namespace ssd_post
