// Chooses the variant of vector_kernels.cpp for this process, and the row-bound
// entry points of row_bound.h on top of it.
#include <ATen/Version.h>

#include "row_bound.h"
#include "vector_kernels.h"

namespace ssd_post {
namespace cpu {
namespace {

VectorKernels pick_kernels() {
#if defined(SSD_POST_HAVE_AVX2_KERNELS)
  // torch's own dispatch decides what this CPU runs ("DEFAULT", "AVX2", "AVX512"),
  // and so honours ATEN_CPU_CAPABILITY: a user who limits torch limits us too.
  const std::string capability = at::get_cpu_capability();
  if (capability == "AVX2" || capability == "AVX512") return avx2::kernels();
#endif
  return baseline::kernels();
}

}  // namespace

const VectorKernels& vector_kernels() {
  static const VectorKernels chosen = pick_kernels();
  return chosen;
}

int64_t float_rows_may_pass(const float* rows, int64_t C, int64_t background, float bound,
                            bool use_denominator, int64_t begin, int64_t end, int32_t* passing) {
  return vector_kernels().rows_may_pass(rows, C, background, bound, use_denominator, begin, end,
                                        passing);
}

int64_t columns_above(const float* row, const float* limit, int64_t C, int32_t* columns) {
  return vector_kernels().columns_above(row, limit, C, columns);
}

}  // namespace cpu
}  // namespace ssd_post
