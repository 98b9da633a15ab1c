// Stage 1 on the GPU: activation, score threshold and per-(image, class) top-k
// of the logits, ranked, in fixed-size slots (no host synchronization).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#include "select_kernels.cuh"

namespace ssd_post {
namespace gpu {

// Candidates of the B * C segments (segment s = image * C + class). Segment s owns
// the slots [s * capacity, (s + 1) * capacity) of `keys`, of which the first
// counts[s] hold its candidates ranked best first (score descending, anchor
// ascending) as rank keys (rank_keys.cuh) over anchor indices with `anchor_bits`.
struct RankedCandidates {
  at::Tensor keys;    // int64 [B * C * capacity], bits of uint64 rank keys
  at::Tensor counts;  // int32 [B * C]
  int64_t capacity = 0;
  int anchor_bits = 1;
};

// logits: [B, A, C] float32, float16 or bfloat16 on a CUDA device, with
// B * C * min(topk_candidates, A) > 0 slots that fit in int32.
RankedCandidates select_ranked_candidates(const at::Tensor& logits, const SelectParams& params,
                                          int64_t topk_candidates);

}  // namespace gpu
}  // namespace ssd_post
