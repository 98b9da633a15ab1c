// The real-device backend of host_pipeline.h: buffers from torch's caching
// allocator, launches on the current stream, CUB's segmented radix sort. Only
// exclusive_scan synchronizes (decode_threshold_flatten's output size).
#pragma once

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <cstdint>
#include <limits>

#include "sort.cuh"

namespace ssd_post {
namespace gpu {

class CudaBackend {
 public:
  explicit CudaBackend(const at::Device& device)
      : device_(device), stream_(at::cuda::getCurrentCUDAStream(device.index())) {}

  // Untyped device memory viewed as T; the tensor keeps it alive.
  template <typename T>
  struct Buffer {
    at::Tensor bytes;
    T* data() const { return reinterpret_cast<T*>(bytes.data_ptr()); }
  };

  template <typename T>
  Buffer<T> buffer(int64_t n) {
    return {at::empty({n * static_cast<int64_t>(sizeof(T))},
                      at::TensorOptions().dtype(at::kByte).device(device_))};
  }

  template <typename Kernel, typename... Args>
  void launch(unsigned grid, int threads, size_t shared_bytes, Kernel kernel, Args... args) {
    kernel<<<grid, threads, shared_bytes, stream_>>>(args...);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  void sort_segments_descending(const uint64_t* in, uint64_t* out, int64_t items,
                                int64_t segments, const int32_t* begin, const int32_t* end,
                                int end_bit) {
    TORCH_CHECK(items <= std::numeric_limits<int32_t>::max() &&
                    segments <= std::numeric_limits<int32_t>::max(),
                "a segmented sort over at most 2^31 - 1 keys, got ", items);
    gpu::sort_segments_descending(in, out, static_cast<int>(items), static_cast<int>(segments),
                                  begin, end, end_bit, stream_, device_);
  }

  int64_t exclusive_scan(const int32_t* counts, int64_t n, int64_t* first) {
    const at::TensorOptions on_device = at::TensorOptions().device(device_);
    const at::Tensor count =
        at::from_blob(const_cast<int32_t*>(counts), {n}, on_device.dtype(at::kInt)).to(at::kLong);
    const at::Tensor ends = at::cumsum(count, 0);
    at::from_blob(first, {n}, on_device.dtype(at::kLong)).copy_(ends - count);
    return n == 0 ? 0 : ends.select(0, -1).item<int64_t>();  // the synchronization
  }

 private:
  at::Device device_;
  cudaStream_t stream_;
};

}  // namespace gpu
}  // namespace ssd_post
