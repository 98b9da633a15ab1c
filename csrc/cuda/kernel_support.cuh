// What the kernel headers (*_kernels.cuh) need from the device besides CUDA's own
// built-ins, in one place so that those headers stay free of ATen and host code.
//
// The kernel headers are compiled twice: by nvcc into the extension, and by the
// host compiler into the CUDA emulator of the tests (tests/cuda_emulation/), which
// defines SSD_POST_CUDA_EMULATION and provides the built-ins (threadIdx,
// __syncthreads, warp shuffles, cub::BlockScan, ...) with one fiber per CUDA thread. That lets a
// machine without a GPU run the very kernel code, not a copy of it.
#pragma once

#include <cstdint>

#include "../common/macros.h"

#if !defined(SSD_POST_CUDA_EMULATION)
#include <cub/block/block_scan.cuh>
#endif

namespace ssd_post {
namespace gpu {

constexpr int kWarpSize = 32;
constexpr unsigned kFullWarp = 0xffffffffu;

#if !defined(SSD_POST_CUDA_EMULATION)
// The dynamic shared memory of the running block (its size is the launch's third
// argument), viewed as T.
template <typename T>
__device__ __forceinline__ T* dynamic_shared_memory() {
  extern __shared__ __align__(16) unsigned char dynamic_shared_bytes[];
  return reinterpret_cast<T*>(dynamic_shared_bytes);
}
#endif

}  // namespace gpu
}  // namespace ssd_post
