// The one CUB segmented radix sort of the extension (one template instantiation,
// reused by every stage that ranks candidates).
#pragma once

#include <ATen/ATen.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace ssd_post {
namespace gpu {

// Sorts each segment [begin[s], end[s]) of keys_in into keys_out, largest first.
// Slots outside every segment are neither read nor written. Runs on `stream`
// without any host synchronization; temporary storage comes from the caching
// allocator of `device`.
void sort_segments_descending(const uint64_t* keys_in, uint64_t* keys_out, int num_items,
                              int num_segments, const int32_t* segment_begin,
                              const int32_t* segment_end, int end_bit, cudaStream_t stream,
                              const at::Device& device);

}  // namespace gpu
}  // namespace ssd_post
