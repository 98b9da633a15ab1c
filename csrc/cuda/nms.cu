// Host side of the greedy NMS: launches the kernels of nms_kernels.cuh.
#include "nms.cuh"

#include <c10/cuda/CUDAException.h>

#include <limits>

#include "nms_kernels.cuh"

namespace ssd_post {
namespace gpu {

void decode_and_nms_segments(const RankedCandidates& ranked, int64_t num_classes,
                             const DecodeParams& decode, double iou_threshold, float* boxes,
                             uint8_t* keep, cudaStream_t stream) {
  const int64_t segments = ranked.counts.numel();
  if (segments == 0) return;
  decode_and_nms_segments_kernel<<<static_cast<unsigned>(segments), kNmsThreads, 0, stream>>>(
      reinterpret_cast<const uint64_t*>(ranked.keys.data_ptr<int64_t>()),
      ranked.counts.data_ptr<int32_t>(), ranked.capacity, num_classes, ranked.anchor_bits, decode,
      iou_threshold, reinterpret_cast<float4*>(boxes), keep);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void nms_ranked_groups(const float* ranked_boxes, const int64_t* group_begin,
                       const int64_t* group_end, int64_t num_groups, double iou_threshold,
                       uint8_t* keep, cudaStream_t stream) {
  if (num_groups == 0) return;
  TORCH_CHECK(num_groups <= std::numeric_limits<int32_t>::max(), "too many NMS groups: ",
              num_groups);
  nms_ranked_groups_kernel<<<static_cast<unsigned>(num_groups), kNmsThreads, 0, stream>>>(
      reinterpret_cast<const float4*>(ranked_boxes), group_begin, group_end, iou_threshold, keep);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace gpu
}  // namespace ssd_post
