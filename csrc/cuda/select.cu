// Stage 1 on the host side: launches the kernels of select_kernels.cuh, then the
// segmented sort that ranks each segment.
#include "select.cuh"

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <algorithm>
#include <limits>

#include "rank_keys.cuh"
#include "select_kernels.cuh"
#include "sort.cuh"

namespace ssd_post {
namespace gpu {
namespace {

template <typename scalar_t>
void launch_selection(const at::Tensor& logits, const SelectParams& params, int64_t capacity,
                      int anchor_bits, RankedCandidates& out, at::Tensor& unsorted_keys,
                      at::Tensor& segment_begin, at::Tensor& segment_end) {
  const int64_t B = logits.size(0), A = logits.size(1), C = logits.size(2);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const bool softmax = params.activation == Activation::kSoftmax;
  at::Tensor row_max, row_inv_sum;
  if (softmax) {
    row_max = at::empty({B * A}, logits.options().dtype(at::kFloat));
    row_inv_sum = at::empty({B * A}, logits.options().dtype(at::kFloat));
    const int64_t rows_per_block = kRowStatsThreads / kWarpSize;
    const int64_t blocks = (B * A + rows_per_block - 1) / rows_per_block;
    TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "logits has too many rows: ",
                B * A);
    softmax_row_stats_kernel<scalar_t><<<static_cast<unsigned>(blocks), kRowStatsThreads, 0,
                                         stream>>>(logits.data_ptr<scalar_t>(), B * A,
                                                   static_cast<int>(C),
                                                   row_max.data_ptr<float>(),
                                                   row_inv_sum.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  const bool cache_keys = A <= kMaxCachedAnchors;
  const size_t cache_bytes = cache_keys ? static_cast<size_t>(A) * sizeof(uint32_t) : 0;
  select_candidates_kernel<scalar_t><<<static_cast<unsigned>(B * C), kSelectThreads, cache_bytes,
                                       stream>>>(
      logits.data_ptr<scalar_t>(), softmax ? row_max.data_ptr<float>() : nullptr,
      softmax ? row_inv_sum.data_ptr<float>() : nullptr, A, C, params, capacity, anchor_bits,
      cache_keys, reinterpret_cast<uint64_t*>(unsorted_keys.data_ptr<int64_t>()),
      segment_begin.data_ptr<int32_t>(), segment_end.data_ptr<int32_t>(),
      out.counts.data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

RankedCandidates select_ranked_candidates(const at::Tensor& logits_in, const SelectParams& params,
                                          int64_t topk_candidates) {
  const at::Tensor logits = logits_in.contiguous();
  const int64_t B = logits.size(0), A = logits.size(1), C = logits.size(2);
  RankedCandidates out;
  out.capacity = std::min(topk_candidates, A);
  out.anchor_bits = index_bits_for(A);
  const int64_t slots = B * C * out.capacity;
  TORCH_CHECK(slots > 0 && slots <= std::numeric_limits<int32_t>::max(),
              "B * C * min(topk_candidates, A) should be in [1, 2^31), got ", slots);
  const at::TensorOptions int_options = logits.options().dtype(at::kInt);
  out.counts = at::empty({B * C}, int_options);
  at::Tensor segment_begin = at::empty({B * C}, int_options);
  at::Tensor segment_end = at::empty({B * C}, int_options);
  at::Tensor unsorted_keys = at::empty({slots}, logits.options().dtype(at::kLong));
  out.keys = at::empty({slots}, logits.options().dtype(at::kLong));

  // Only the three dtypes the checks admit, to keep the number of kernels small.
  switch (logits.scalar_type()) {
    case at::kFloat:
      launch_selection<float>(logits, params, out.capacity, out.anchor_bits, out, unsorted_keys,
                              segment_begin, segment_end);
      break;
    case at::kHalf:
      launch_selection<at::Half>(logits, params, out.capacity, out.anchor_bits, out,
                                 unsorted_keys, segment_begin, segment_end);
      break;
    case at::kBFloat16:
      launch_selection<at::BFloat16>(logits, params, out.capacity, out.anchor_bits, out,
                                     unsorted_keys, segment_begin, segment_end);
      break;
    default:
      TORCH_CHECK(false, "logits should be float32, float16 or bfloat16, got ",
                  logits.scalar_type());
  }
  sort_segments_descending(reinterpret_cast<const uint64_t*>(unsorted_keys.data_ptr<int64_t>()),
                           reinterpret_cast<uint64_t*>(out.keys.data_ptr<int64_t>()),
                           static_cast<int>(slots), static_cast<int>(B * C),
                           segment_begin.data_ptr<int32_t>(), segment_end.data_ptr<int32_t>(),
                           kScoreKeyBits + out.anchor_bits, at::cuda::getCurrentCUDAStream(),
                           logits.device());
  return out;
}

}  // namespace gpu
}  // namespace ssd_post
