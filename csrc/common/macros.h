// Qualifiers that let one inline function serve the CPU kernels and the CUDA kernels.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define SSD_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define SSD_HOST_DEVICE inline
#endif

namespace ssd_post {

// Arithmetic helpers that are never fused into FMA instructions: torchvision runs
// decode and IoU as separate elementwise ops, so a fused multiply-add would round
// differently and move boxes across the IoU threshold.
SSD_HOST_DEVICE float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

SSD_HOST_DEVICE float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

SSD_HOST_DEVICE float sub_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}

// std::max / std::min semantics (first argument wins when either is NaN), spelled
// out so that host and device agree and so that NaN handling is explicit.
SSD_HOST_DEVICE float max_first(float a, float b) { return (a < b) ? b : a; }
SSD_HOST_DEVICE float min_first(float a, float b) { return (b < a) ? b : a; }

}  // namespace ssd_post
