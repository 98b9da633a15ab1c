// Host and device: 64-bit sort keys that carry their own tie-break, so that a radix sort orders
// candidates exactly as the CPU kernels do without relying on sort stability.
//
// key = score_bits << index_bits | (count - 1 - index)
//
// Scores that reach these keys are positive floats (they passed `p > score_thresh`
// with score_thresh >= 0), whose IEEE bits order like the values and fit in 31 bits.
// Sorting keys in descending order then ranks by score descending and, for equal
// scores, by index ascending.
#pragma once

#include <cstdint>
#if !defined(__CUDA_ARCH__)
#include <bit>
#endif

#include "macros.h"

namespace ssd_post {

constexpr int kScoreKeyBits = 31;

// Bits needed to store any index in [0, count), at least 1.
inline int index_bits_for(int64_t count) {
  int bits = 1;
  while (bits < 62 && (int64_t{1} << bits) < count) ++bits;
  return bits;
}

SSD_HOST_DEVICE uint64_t make_rank_key(uint32_t score_bits, int64_t index, int64_t count,
                                       int index_bits) {
  return (static_cast<uint64_t>(score_bits) << index_bits) |
         static_cast<uint64_t>(count - 1 - index);
}

SSD_HOST_DEVICE int64_t rank_key_index(uint64_t key, int64_t count, int index_bits) {
  const uint64_t low_mask = (uint64_t{1} << index_bits) - 1;
  return count - 1 - static_cast<int64_t>(key & low_mask);
}

SSD_HOST_DEVICE uint32_t rank_key_score_bits(uint64_t key, int index_bits) {
  return static_cast<uint32_t>(key >> index_bits);
}

// Scores of any sign, for ops that rank scores they did not threshold themselves
// (batched_nms_padded): 32-bit keys that order like the NMS ops rank, NaN above
// every number (torch.sort's descending order), -0.0 equal to 0.0. With them a rank
// key needs kOrderedScoreBits + index_bits bits.
constexpr int kOrderedScoreBits = 32;

SSD_HOST_DEVICE uint32_t ordered_score_bits(float score) {
  if (score != score) return 0xFFFFFFFFu;
#if defined(__CUDA_ARCH__)
  const uint32_t bits = __float_as_uint(score == 0.f ? 0.f : score);
#else
  const uint32_t bits = std::bit_cast<uint32_t>(score == 0.f ? 0.f : score);
#endif
  // IEEE bits order like the values once negatives are flipped and positives moved up.
  return (bits >> 31) != 0 ? ~bits : bits | 0x80000000u;
}

// A rank key no ranked score makes: the smallest number maps to ~bits(-inf) > 0,
// so a rank key of ordered_score_bits is never 0, and 0 can mark an empty slot,
// which then sorts after every candidate.
constexpr uint64_t kEmptyRankKey = 0;

}  // namespace ssd_post
