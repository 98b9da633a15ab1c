// Schemas of the ssd_post ops. Kernels live in cpu/ and cuda/, fake (meta)
// kernels in ssd_post/ops.py.
#include <torch/library.h>

#include "cpu/debug_counters.h"
#include "cpu/select_per_level.h"
#include "cpu/vector_kernels.h"

// No Python here: the shared library holds only torch registrations (run by its
// static initialisers when it is loaded), so a C++ program without Python can
// dlopen it next to libtorch, e.g. to run an AOTInductor package that calls these
// ops. Python loads it with torch.ops.load_library (ssd_post/_extension.py).

TORCH_LIBRARY(ssd_post, m) {
  m.def(
      "decode_threshold_flatten(Tensor locs, Tensor logits, Tensor anchors, Tensor image_sizes, "
      "float score_thresh, int topk_candidates, float[] box_weights, str score_activation, "
      "int? background_class, bool clip_boxes) -> (Tensor boxes, Tensor scores, Tensor keys)");
  // max_kept: at most that many survivors per group, or with keys_per_image (keys
  // laid out as image * keys_per_image + class) per image: the full NMS truncated.
  // The defaults keep older callers and exported graphs valid.
  m.def(
      "batched_nms(Tensor boxes, Tensor scores, Tensor idxs, float iou_threshold, "
      "int? max_kept=None, int? keys_per_image=None) -> Tensor");
  // anchor_indices [B, K] int64: the anchor row (index into A) of each detection,
  // -1 past num_detections, for gathering per-anchor data (masks, keypoints).
  m.def(
      "postprocess(Tensor locs, Tensor logits, Tensor anchors, Tensor image_sizes, "
      "float score_thresh, float nms_thresh, int topk_candidates, int detections_per_img, "
      "float[] box_weights, str score_activation, int? background_class, bool clip_boxes) "
      "-> (Tensor boxes, Tensor scores, Tensor labels, Tensor num_detections, "
      "Tensor anchor_indices)");
  // The NMS stage of postprocess pipelines that keep their candidates padded:
  // boxes [B, M, 4], scores [B, M], labels [B, M] (-1: an empty slot). Per image,
  // greedy NMS among equal labels (any label with class_agnostic) in rank order
  // (score descending, NaN first, then slot), stopped after max_kept survivors:
  // indices [B, K] (survivor slots in rank order, -1 past the count) and counts
  // [B], K = min(max_kept, M). Fixed-size outputs, no host synchronization.
  m.def(
      "batched_nms_padded(Tensor boxes, Tensor scores, Tensor labels, float iou_threshold, "
      "int max_kept, bool class_agnostic=False) -> (Tensor indices, Tensor counts)");
  // Each anchor's best class of class-major scores [B, C, N] (YOLOv8's layout), in
  // one read: best [B, N] float32 (NaN when a score of the anchor is NaN, as
  // torch.max) and label [B, N] int64 (equal scores: the lower class).
  m.def("best_class(Tensor scores) -> (Tensor best, Tensor label)");
  // The fused pass of best-class selection (YOLO's prediction regime) from the
  // same scores [B, C, N], in one read: per image, the anchors whose best class
  // (best_class's rule) scores > score_thresh and is in `classes` (when given); of
  // more than max_candidates, the max_candidates best (score descending, equal
  // scores by lower anchor). Slots [B, M] in anchor order, M the most candidates
  // an image keeps (data-dependent, at most min(N, max_candidates): the cost is
  // bounded by what passes): anchor int64 (-1 past the count), score float32 (0
  // past it), label int64 (-1 past it), count [B] int64, and with boxes [B, 4, N]
  // (the same layout: YOLOv8's prediction[:, :4]) each candidate's box [B, M, 4]
  // float32 as x1, y1, x2, y2 (box_format "xyxy" as given, "cxcywh" converted in
  // the boxes' dtype), zeros past the count; without boxes an empty [B, 0, 4].
  // CUDA reads M back to the host: one synchronisation.
  m.def(
      "best_class_candidates(Tensor scores, float score_thresh, int max_candidates, "
      "int[]? classes=None, Tensor? boxes=None, str box_format=\"xyxy\") -> (Tensor anchor, "
      "Tensor score, Tensor label, Tensor count, Tensor boxes)");
  // torchvision's box decode (BoxCoder.decode_single, its op order, float32) of
  // rel_codes [..., 4] against anchors [..., 4] (broadcast) with weights (wx, wy,
  // ww, wh): xyxy boxes. An op so that exported programs run eager's kernels
  // (composite/decode_boxes.cpp).
  m.def("decode_boxes(Tensor rel_codes, Tensor anchors, float[] weights) -> Tensor");
  // The same op as a composition of best_class and ATen ops: the kernel of every
  // device but the CPU (composite/best_class_candidates.cpp), callable on the CPU
  // so that the tests hold it equal to the CPU kernel.
  m.def(
      "_best_class_candidates_composite(Tensor scores, float score_thresh, "
      "int max_candidates, int[]? classes=None, Tensor? boxes=None, "
      "str box_format=\"xyxy\") -> (Tensor anchor, Tensor score, Tensor label, "
      "Tensor count, Tensor boxes)");
  // The selection of the single-stage family: for every (image, group) the best
  // topk_candidates anchor x class pairs whose score is > score_thresh, ranked
  // (score descending, equal scores by flat index anchor * C + class), as flat
  // indices [B, G, k], their scores [B, G, k] and counts [B, G]; slots past a count
  // hold -1 and 0. Groups are the levels of level_sizes (RetinaNet, FCOS, ATSS; one
  // level: per image, EfficientDet, YOLO) or, per_class, the classes (SSD; one level).
  // Scores: score_activation ("softmax", "sigmoid", "none") of the logits, over each
  // (image, level) block as torch computes it, joined with the optional per-anchor
  // score_factor [B, A(, 1)] (a logit when factor_logits) by factor_mode ("sqrt",
  // "before_threshold", "after_selection": ranked on the class score, reported
  // multiplied); single_label keeps only each anchor's best class; classes is an
  // allow-list of columns. k = select_capacity (common/select_params.h). On the CPU
  // the scores are torch's bits (cpu/select_per_level.cpp), on CUDA the device's.
  m.def(
      "select_topk(Tensor logits, Tensor? score_factor, int[] level_sizes, float score_thresh, "
      "int topk_candidates, int? background_class, str score_activation=\"sigmoid\", "
      "str factor_mode=\"sqrt\", bool factor_logits=True, bool single_label=False, "
      "int[]? classes=None, bool per_class=False) -> (Tensor flat, Tensor scores, Tensor counts)");
  // Which compilation of cpu/vector_kernels.cpp this process runs ("baseline",
  // "avx2"): for bug reports, and for the tests that run each variant.
  m.def("cpu_vector_kernels() -> str", [] { return std::string(ssd_post::cpu::vector_kernels().name); });
  // Counters of the CPU kernels, for the tests: [boxes decoded, images scanned
  // again], summed over all threads since the last reset (cpu/debug_counters.h);
  // reset=True sets them back to 0 after reading.
  m.def("_debug_counters(bool reset=False) -> int[]", &ssd_post::cpu::read_counters);
  // How the CPU select_topk scores its sigmoid blocks at the current thread count
  // ("gathered" or "whole_block", after its self-check): for tests and bug reports.
  m.def("per_level_cpu_scoring() -> str", [] { return ssd_post::cpu::per_level_scoring(); });
}
