#include "sort.cuh"

#include <c10/cuda/CUDAException.h>

#include <algorithm>

#include <cub/device/device_segmented_radix_sort.cuh>

namespace ssd_post {
namespace gpu {

void sort_segments_descending(const uint64_t* keys_in, uint64_t* keys_out, int num_items,
                              int num_segments, const int32_t* segment_begin,
                              const int32_t* segment_end, int end_bit, cudaStream_t stream,
                              const at::Device& device) {
  if (num_items == 0 || num_segments == 0) return;
  size_t temp_bytes = 0;
  // The size query only computes on the host: no launch, no synchronization.
  C10_CUDA_CHECK(cub::DeviceSegmentedRadixSort::SortKeysDescending(
      nullptr, temp_bytes, keys_in, keys_out, num_items, num_segments, segment_begin, segment_end,
      /*begin_bit=*/0, end_bit, stream));
  const at::Tensor temp = at::empty({static_cast<int64_t>(std::max<size_t>(temp_bytes, 1))},
                                    at::TensorOptions().dtype(at::kByte).device(device));
  C10_CUDA_CHECK(cub::DeviceSegmentedRadixSort::SortKeysDescending(
      temp.data_ptr(), temp_bytes, keys_in, keys_out, num_items, num_segments, segment_begin,
      segment_end, /*begin_bit=*/0, end_bit, stream));
}

}  // namespace gpu
}  // namespace ssd_post
