// CPU kernel of ssd_post::select_per_level (RetinaNet, FCOS): for every (image,
// level) block of anchor x class pairs, the scores torchvision computes, the
// threshold, and the best topk_candidates pairs ranked (score descending, equal
// scores by flat index anchor * C + class), in the layout of the CUDA kernel.
//
// The scores must be torch's own bits. torchvision calls torch.sigmoid on a whole
// (image, level) block, and torch's CPU loop rounds its vectorised body and its
// scalar tail differently (Sleef exp against std::exp): the bits of a score depend
// on where it sits in the block, on the grain size, on the thread split and on the
// CPU capability. A block is therefore scored in one of two ways:
//   - gathered: the pairs that can pass (a logit bound prunes the others) go
//     through ATen's sigmoid, those of the loop's vectorised body in one call on a
//     gathered copy, those of a scalar tail in calls too short for a vector;
//   - whole block: at::sigmoid of the whole block, as torchvision does.
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
// Selection of one (image, level) block.

struct Pair {
  float score;
  int64_t flat;  // anchor_in_level * C + class
};

bool ranks_before(const Pair& x, const Pair& y) {
  return x.score > y.score || (x.score == y.score && x.flat < y.flat);
}

// What the kernel reads of the inputs, validated and laid out by the op.
struct LevelInputs {
  at::Tensor logits;      // [B, A, C], as given (any float dtype and strides)
  at::Tensor centerness;  // [B, A, 1] as given, or undefined
  const LevelTable* levels;
  SelectParams params;
  int64_t capacity;  // slots per (image, level)
  // Float32 blocks laid out as torch's loop sees them (each image's [A, C]
  // contiguous) and that layout verified: blocks are scored on the worker threads,
  // whole (chunk by chunk, as torch's loop splits them) or gathered.
  bool layout_known;
  // And a logit bound to prune with: the gathered path.
  bool gather;
  LoopLayout layout;
  const float* logits_data;  // when layout_known
  int64_t image_stride;
  const float* centerness_data;  // when layout_known and centerness given
  int64_t centerness_image_stride;
};

// Where one block's ranked pairs go: slots [capacity], a count.
struct BlockOutput {
  int64_t* flat;
  float* scores;
  int64_t* count;
  int64_t flat_offset;  // first anchor of the level * C
};

// Ranks `pairs` (all passing) and writes the best `capacity` of them.
void write_best(std::vector<Pair>& pairs, int64_t capacity, const BlockOutput& out) {
  const int64_t n = std::min<int64_t>(static_cast<int64_t>(pairs.size()), capacity);
  if (static_cast<int64_t>(pairs.size()) > n) {
    std::nth_element(pairs.begin(), pairs.begin() + n, pairs.end(), ranks_before);
  }
  std::sort(pairs.begin(), pairs.begin() + n, ranks_before);
  for (int64_t i = 0; i < n; ++i) {
    out.flat[i] = out.flat_offset + pairs[i].flat;
    out.scores[i] = pairs[i].score;
  }
  *out.count = n;
}

double sigmoid_double(double x) { return 1.0 / (1.0 + std::exp(-x)); }

// Per-thread buffers.
struct BlockScratch {
  SigmoidScratch sigmoid;
  std::vector<int64_t> rows, positions, anchors;
  std::vector<float> row_max, row_bound, scores, centerness_scores;
  std::vector<double> best;
  std::vector<Pair> pairs;
};

// A class logit at or below row_bound[r] (for rows[r], whose max logit is
// row_max[r]) cannot give a pair that both passes the threshold and is among the
// block's `k` best scores.
//
// The k rows with the best score of their best class give k pairs scoring at
// least about s_k, the k-th best of those row scores, so a pair of the top k
// scores at least that much. Plain sigmoid: s = sigmoid(x); with centerness
// (FCOS) s = sqrt(sigmoid(x) * sigmoid(ctr)), which needs sigmoid(x) >= s_k^2 /
// sigmoid(ctr). s_k is lowered by a relative 1e-5, far more than the ULPs by which
// torch's float scores differ from the exact ones, so pairs tied with the k-th
// score are never cut: sigmoid saturates at exactly 1.0 from about x = 17, so
// such ties can have far lower logits than the k-th row's. Dense blocks then
// score a few pairs per row at most, instead of every pair. NaN logits are left
// out of a row's max: the max of the rest is a real pair of that row.
void topk_row_bounds(const float* centerness, float bound, int64_t k, BlockScratch& s) {
  const int64_t n = static_cast<int64_t>(s.rows.size());
  double kth;
  if (centerness == nullptr) {  // sigmoid is monotone: the k-th best row max is enough
    s.best.assign(s.row_max.begin(), s.row_max.end());
    std::nth_element(s.best.begin(), s.best.begin() + (k - 1), s.best.end(),
                     std::greater<double>());
    kth = sigmoid_double(s.best[k - 1]);
  } else {
    s.best.resize(static_cast<size_t>(n));
    for (int64_t r = 0; r < n; ++r) {
      s.best[r] = std::sqrt(sigmoid_double(s.row_max[r]) * sigmoid_double(centerness[s.rows[r]]));
    }
    std::nth_element(s.best.begin(), s.best.begin() + (k - 1), s.best.end(),
                     std::greater<double>());
    kth = s.best[k - 1];
  }
  const double needed = std::max(kth, 0.0) * (1 - 1e-5);
  s.row_bound.resize(static_cast<size_t>(n));
  for (int64_t r = 0; r < n; ++r) {
    double p = needed;
    if (centerness != nullptr) {
      const double c = sigmoid_double(centerness[s.rows[r]]);
      p = c > 0 ? std::min(needed * needed / c, 1.0) : 1.0;
    }
    // p = 0: -inf (no pruning); p = 1: inf (no pair of the row can reach it).
    const float logit = static_cast<float>(std::log(p) - std::log1p(-p));
    s.row_bound[r] = std::max(bound, logit);
  }
}

// Scores, thresholds and ranks one block through the gathered path. Returns false,
// having written nothing, when the block is better scored whole (most of its
// pairs may pass).
bool select_block_gathered(const LevelInputs& in, int64_t image, int level, BlockScratch& s,
                           const BlockOutput& out) {
  const int64_t C = in.logits.size(2);
  const int64_t first = in.levels->start[level];
  const int64_t A_l = in.levels->start[level + 1] - first;
  const float* x = in.logits_data + image * in.image_stride + first * C;
  const float* ctr = in.centerness_data == nullptr
                         ? nullptr
                         : in.centerness_data + image * in.centerness_image_stride + first;
  const float bound = in.params.bound.value;
  const int64_t background = in.params.background_class;
  const int64_t k = in.params.topk_candidates;
  s.rows.clear();
  s.row_max.clear();
  // One max per row tells which rows may hold a passing pair; on a trained head this
  // pass, which reads every logit, is all that most rows cost.
  const auto max_ignoring_nan = vector_kernels().max_ignoring_nan;
  for (int64_t a = 0; a < A_l; ++a) {
    if (ctr != nullptr && !(ctr[a] > bound)) continue;
    const float row_max = max_ignoring_nan(x + a * C, C);
    if (row_max > bound) {
      s.rows.push_back(a);
      s.row_max.push_back(row_max);
    }
  }
  const int64_t rows = static_cast<int64_t>(s.rows.size());
  // No top-k bound with a background column, which a row's max could hold.
  const bool topk_bound = background < 0 && A_l > k && rows > k;
  if (topk_bound) topk_row_bounds(ctr, bound, k, s);
  s.positions.clear();
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t a = s.rows[r];
    const float row_bound = topk_bound ? s.row_bound[r] : bound;
    if (!(s.row_max[r] > row_bound)) continue;
    const float* row = x + a * C;
    for (int64_t c = 0; c < C; ++c) {
      if (row[c] > row_bound && c != background) s.positions.push_back(a * C + c);
    }
  }
  const int64_t n = static_cast<int64_t>(s.positions.size());
  // Scoring a gathered pair costs several times a pair of a whole-block sigmoid.
  if (n * 8 > A_l * C) return false;
  s.scores.resize(static_cast<size_t>(n));
  sigmoid_at(x, A_l * C, s.positions.data(), n, in.layout, s.scores.data(), s.sigmoid);
  if (ctr != nullptr) {
    // torch's sqrt(sigmoid(x) * sigmoid(ctr)): the centerness sigmoid over the
    // level's [A_l, 1] block, at the anchors of the pairs (positions increase).
    s.anchors.clear();
    for (const int64_t p : s.positions) {
      if (s.anchors.empty() || s.anchors.back() != p / C) s.anchors.push_back(p / C);
    }
    s.centerness_scores.resize(s.anchors.size());
    sigmoid_at(ctr, A_l, s.anchors.data(), static_cast<int64_t>(s.anchors.size()), in.layout,
               s.centerness_scores.data(), s.sigmoid);
    size_t j = 0;
    for (int64_t i = 0; i < n; ++i) {
      while (s.anchors[j] != s.positions[i] / C) ++j;
      s.scores[i] *= s.centerness_scores[j];  // IEEE: the same in torch's vector loop
    }
    sqrt_like_torch(s.scores.data(), n);
  }
  s.pairs.clear();
  for (int64_t i = 0; i < n; ++i) {
    if (s.scores[i] > in.params.score_thresh) s.pairs.push_back({s.scores[i], s.positions[i]});
  }
  write_best(s.pairs, in.capacity, out);
  return true;
}

// Thresholds and ranks the whole block's scores p [A_l * C].
void select_from_scores(const LevelInputs& in, const float* p, int64_t A_l, int64_t C,
                        BlockScratch& s, const BlockOutput& out) {
  const float thresh = in.params.score_thresh;
  const int64_t background = in.params.background_class;
  s.pairs.clear();
  for (int64_t a = 0; a < A_l; ++a) {
    for (int64_t c = 0; c < C; ++c) {
      const float score = p[a * C + c];
      if (score > thresh && c != background) s.pairs.push_back({score, a * C + c});
    }
  }
  write_best(s.pairs, in.capacity, out);
}

// Scores one block whole on this thread, torch's bits (the layout is verified),
// then thresholds and ranks.
void select_block_chunked(const LevelInputs& in, int64_t image, int level, BlockScratch& s,
                          const BlockOutput& out) {
  const int64_t C = in.logits.size(2);
  const int64_t first = in.levels->start[level];
  const int64_t A_l = in.levels->start[level + 1] - first;
  const int64_t numel = A_l * C;
  s.scores.resize(static_cast<size_t>(numel));
  sigmoid_chunked(in.logits_data + image * in.image_stride + first * C, numel, in.layout,
                  s.scores.data());
  if (in.centerness_data != nullptr) {
    s.centerness_scores.resize(static_cast<size_t>(A_l));
    sigmoid_chunked(in.centerness_data + image * in.centerness_image_stride + first, A_l,
                    in.layout, s.centerness_scores.data());
    for (int64_t a = 0; a < A_l; ++a) {
      for (int64_t c = 0; c < C; ++c) s.scores[a * C + c] *= s.centerness_scores[a];
    }
    sqrt_like_torch(s.scores.data(), numel);
  }
  select_from_scores(in, s.scores.data(), A_l, C, s, out);
}

// Scores one block whole with torch's own ops on exactly the block torchvision
// scores (the tensors as given, converted to float32 as the oracle does), then
// thresholds and ranks. For blocks whose layout is not known or not verified:
// run on the calling thread when the block is at or past the grain, where
// torch's sigmoid splits it over threads as torchvision's call does.
void select_block_whole(const LevelInputs& in, int64_t image, int level, BlockScratch& s,
                        const BlockOutput& out) {
  const int64_t C = in.logits.size(2);
  const int64_t first = in.levels->start[level];
  const int64_t A_l = in.levels->start[level + 1] - first;
  at::Tensor scores = at::sigmoid(in.logits[image].narrow(0, first, A_l).to(at::kFloat));
  if (in.centerness.defined()) {
    const at::Tensor ctr = in.centerness[image].narrow(0, first, A_l).to(at::kFloat);
    scores = at::sqrt(scores * at::sigmoid(ctr));
  }
  scores = scores.contiguous();
  select_from_scores(in, scores.data_ptr<float>(), A_l, C, s, out);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> select_topk_cpu(
    const at::Tensor& logits, const c10::optional<at::Tensor>& centerness,
    at::IntArrayRef level_sizes, double score_thresh, int64_t topk_candidates,
    c10::optional<int64_t> background_class, c10::string_view score_activation,
    c10::string_view factor_mode, bool factor_logits, bool single_label,
    c10::OptionalIntArrayRef classes, bool per_class) {
  LevelTable levels;
  ScoreRule rule;
  const BatchDims dims = check_select_inputs(
      logits, centerness, level_sizes, score_thresh, topk_candidates, background_class,
      std::string(score_activation), std::string(factor_mode), factor_logits, single_label,
      classes, per_class, &levels, &rule);
  TORCH_CHECK(rule.activation == Activation::kSigmoid &&
                  (rule.factor_mode == FactorMode::kNone ||
                   (rule.factor_mode == FactorMode::kSqrt && rule.factor_logits)) &&
                  !rule.single_label && !rule.per_class && !classes.has_value(),
              "select_topk: this scoring is not implemented on the CPU yet");
  const int64_t B = dims.batch, A = dims.anchors, C = dims.classes;
  const int64_t capacity = level_capacity(levels, C, topk_candidates);
  const at::TensorOptions options = logits.options();
  at::Tensor flat = at::full({B, levels.count, capacity}, -1, options.dtype(at::kLong));
  at::Tensor scores = at::zeros({B, levels.count, capacity}, options.dtype(at::kFloat));
  at::Tensor counts = at::zeros({B, levels.count}, options.dtype(at::kLong));
  if (flat.numel() == 0) return {flat, scores, counts};

  LevelInputs in;
  in.logits = logits;
  if (centerness.has_value()) in.centerness = centerness->reshape({B, A, 1});
  in.levels = &levels;
  in.params = make_level_select_params(score_thresh, topk_candidates, centerness.has_value(),
                                       background_class.value_or(-1));
  in.capacity = capacity;
  const int threads = calling_threads();
  in.layout = {threads, verified_step(threads)};
  // The loop layout modelled is that of a contiguous block (all images share strides).
  const bool blocks_contiguous = logits[0].is_contiguous() &&
                                 (!in.centerness.defined() || in.centerness[0].is_contiguous());
  const bool float32 = logits.scalar_type() == at::kFloat &&
                       (!in.centerness.defined() || in.centerness.scalar_type() == at::kFloat);
  in.layout_known = in.layout.step > 0 && blocks_contiguous && float32;
  in.gather = in.layout_known && in.params.bound.value > -std::numeric_limits<float>::infinity();
  if (in.layout_known) {
    in.logits_data = logits.data_ptr<float>();
    in.image_stride = logits.stride(0);
    in.centerness_data = in.centerness.defined() ? in.centerness.data_ptr<float>() : nullptr;
    in.centerness_image_stride = in.centerness.defined() ? in.centerness.stride(0) : 0;
  }

  // The (image, level) blocks, largest first, taken one at a time by each thread:
  // level sizes differ by a factor of 4 or more, so fixed shares would not balance.
  struct Block {
    int64_t image;
    int level;
  };
  std::vector<Block> blocks;
  for (int l = 0; l < levels.count; ++l) {
    if (levels.start[l + 1] == levels.start[l]) continue;
    for (int64_t b = 0; b < B; ++b) blocks.push_back({b, l});
  }
  std::stable_sort(blocks.begin(), blocks.end(), [&](const Block& x, const Block& y) {
    return levels.start[x.level + 1] - levels.start[x.level] >
           levels.start[y.level + 1] - levels.start[y.level];
  });
  int64_t* flat_data = flat.data_ptr<int64_t>();
  float* score_data = scores.data_ptr<float>();
  int64_t* count_data = counts.data_ptr<int64_t>();
  auto output_of = [&](const Block& block) {
    const int64_t segment = block.image * levels.count + block.level;
    return BlockOutput{flat_data + segment * capacity, score_data + segment * capacity,
                       count_data + segment, levels.start[block.level] * C};
  };
  const int64_t num_blocks = static_cast<int64_t>(blocks.size());
  // Whole blocks of unknown layout at or past the grain run afterwards on this
  // thread, where torch's sigmoid splits them over threads as torchvision's call does.
  std::vector<uint8_t> deferred(static_cast<size_t>(num_blocks), 0);
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(threads, num_blocks);
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    BlockScratch scratch;
    for (int64_t i = next.fetch_add(1); i < num_blocks; i = next.fetch_add(1)) {
      const Block& block = blocks[i];
      if (in.gather && select_block_gathered(in, block.image, block.level, scratch,
                                             output_of(block))) {
        continue;
      }
      const int64_t numel = (levels.start[block.level + 1] - levels.start[block.level]) * C;
      if (in.layout_known) {
        select_block_chunked(in, block.image, block.level, scratch, output_of(block));
      } else if (numel < kGrainSize || threads == 1) {
        select_block_whole(in, block.image, block.level, scratch, output_of(block));
      } else {
        deferred[i] = 1;
      }
    }
  });
  BlockScratch scratch;
  for (int64_t i = 0; i < num_blocks; ++i) {
    if (deferred[i]) select_block_whole(in, blocks[i].image, blocks[i].level, scratch,
                                        output_of(blocks[i]));
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
