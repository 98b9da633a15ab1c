// Schemas of the ssd_post ops. Kernels live in cpu/ and cuda/, fake (meta)
// kernels in ssd_post/ops.py.
#include <Python.h>
#include <torch/library.h>

#include "cpu/vector_kernels.h"

// `from ssd_post import _C` only needs to load this shared library, which runs the
// TORCH_LIBRARY registrations below; the module itself is empty.
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(ssd_post, m) {
  m.def(
      "decode_threshold_flatten(Tensor locs, Tensor logits, Tensor anchors, Tensor image_sizes, "
      "float score_thresh, int topk_candidates, float[] box_weights, str score_activation, "
      "int? background_class, bool clip_boxes) -> (Tensor boxes, Tensor scores, Tensor keys)");
  m.def("batched_nms(Tensor boxes, Tensor scores, Tensor idxs, float iou_threshold) -> Tensor");
  m.def(
      "postprocess(Tensor locs, Tensor logits, Tensor anchors, Tensor image_sizes, "
      "float score_thresh, float nms_thresh, int topk_candidates, int detections_per_img, "
      "float[] box_weights, str score_activation, int? background_class, bool clip_boxes) "
      "-> (Tensor boxes, Tensor scores, Tensor labels, Tensor num_detections)");
  // Which compilation of cpu/vector_kernels.cpp this process runs ("baseline",
  // "avx2"): for bug reports, and for the tests that run each variant.
  m.def("cpu_vector_kernels() -> str", [] { return std::string(ssd_post::cpu::vector_kernels().name); });
}
