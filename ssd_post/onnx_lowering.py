"""The ONNX lowering of ssd_post's ops: onnxscript functions for
``torch.onnx.export(..., dynamo=True, custom_translation_table=...)``.

Each compiled op the postprocess traces to becomes standard ONNX ops (opset 18):

- ``postprocess`` (SSD's fused per-class op) and ``decode_threshold_flatten``:
  activation, box decode + clip, TopK per (image, class), NonMaxSuppression,
  ScatterND + TopK per image (the module docstring of :mod:`ssd_post.onnx`);
- ``select_topk`` (every other mode's scoring and selection): activation, score
  factor (sqrt / before_threshold / after_selection), background column and
  allow-list as constant masks, single label by ArgMax (equal scores to the lower
  column), ``score > score_thresh`` as a mask, then TopK per (image, class), per
  (image, level) over anchor x class, or per image;
- ``decode_boxes``: torchvision's box decode in its op order;
- ``batched_nms_padded``: one NonMaxSuppression call whose "classes" are the labels
  (each label's slots masked to -inf in the other rows; one row when class-agnostic),
  then ScatterND + TopK per image.

Equal values keep their index order in every TopK (``ordered_topk`` settles ties
itself: OpenVINO's TopK does not) and NonMaxSuppression visits equal scores in index
order, which is ssd_post's tie rule everywhere, so the selection is the op's; only
each runtime's exp / sigmoid / softmax rounding differs (a few ULPs).

Built on first use (:func:`build_lowerings`) so that onnxscript is imported lazily.
"""

from __future__ import annotations

import importlib
from typing import Callable, Dict, Optional, Sequence

from .box_coder import BOX_SCALE_CLAMP
from .config import PostprocessConfig
from .ops import select_capacity

EXPORT_EXTRA = "pip install ssd-post[export]"
TIE_ORDERS = ("graph", "runtime")
# The largest k whose order key (dense rank * k + index rank) stays below 2^31.
MAX_GRAPH_ORDERED_K = 46340
# The lowest float32: NonMaxSuppression's score threshold that lets every finite
# score through (its comparison is strict) while the -inf of masked slots stays out.
LOWEST_FLOAT = -3.4028234663852886e38


def require(module: str, purpose: str):
    """Imports ``module`` or raises ImportError naming the pip package to install."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(
            f"{purpose} needs the {module!r} package: {EXPORT_EXTRA} (or pip install {module})"
        ) from err


def check_expressible(config: PostprocessConfig, num_classes: int) -> None:
    """Raises ValueError when the ONNX lowering cannot express ``config`` for logits
    with ``num_classes`` columns (``background_class`` may be a name: it is
    resolved). Every mode of the family lowers; what is checked is that the
    columns the config names exist."""
    check_columns(config.resolve_background_class(num_classes), config.classes, num_classes)


def check_columns(
    background: Optional[int], classes: Optional[Sequence[int]], num_classes: int
) -> None:
    """Raises ValueError when the background column or an allowed class is not a
    column of logits with ``num_classes`` columns: the graph's masks are built for
    those C columns, and a column past them would be silently ignored."""
    if background is not None and not 0 <= background < num_classes:
        raise ValueError(f"background_class should be < C = {num_classes}, got {background}")
    if classes is not None and max(classes) >= num_classes:
        raise ValueError(f"classes should be columns < C = {num_classes}, got {list(classes)}")


def static_dim(value, axis: int, what: str) -> int:
    """Size ``axis`` of an exporter value, which must be fixed at export: padded
    sizes depend on A and C, and an ONNX graph has one for every run."""
    size = value.shape[axis] if value.shape is not None else None
    if not isinstance(size, int):
        raise ValueError(
            f"the ONNX lowering needs {what} fixed at export (only the batch is dynamic), "
            f"got {size!r}"
        )
    return size


def build_lowerings(tie_order: str = "graph") -> Dict[str, Callable]:
    """The lowering of each op, keyed by op name (``"postprocess"``, ...).

    Args:
        tie_order: ``"graph"``: every top-k orders equal values by lower index in the
            graph itself, exact in every runtime; ``"runtime"``: the runtime's TopK
            does (the ONNX spec's order: exact in onnxruntime, not in OpenVINO),
            about half the top-k work.
    """
    if tie_order not in TIE_ORDERS:
        raise ValueError(f"tie_order should be one of {TIE_ORDERS}, got {tie_order!r}")
    onnxscript = require("onnxscript", "ONNX export")
    onnx = require("onnx", "ONNX export")
    op = onnxscript.opset18
    FLOAT, INT64, BOOL = onnxscript.FLOAT.dtype, onnxscript.INT64.dtype, onnxscript.BOOL.dtype

    def ints(*values: int):
        return op.Constant(value_ints=[int(v) for v in values])

    def floats(*values: float):
        return op.Constant(value_floats=[float(v) for v in values])

    def scalar_int(value: int):
        return op.Constant(value_int=int(value))

    def scalar_float(value: float):
        return op.Constant(value_float=float(value))

    def bools(values: Sequence[bool]):
        return op.Constant(
            value=onnx.helper.make_tensor("mask", onnx.TensorProto.BOOL, [len(values)], values)
        )

    def filled(value: float):
        return onnx.helper.make_tensor("value", onnx.TensorProto.FLOAT, [1], [value])

    def filled_int(value: int):
        return onnx.helper.make_tensor("value", onnx.TensorProto.INT64, [1], [value])

    def dim(x, axis: int):
        return op.Shape(x, start=axis, end=axis + 1)  # [1] int64

    def last(x, start: int, end: int):
        return op.Slice(x, ints(start), ints(end), ints(-1))

    def ordered_topk(x, k: int):
        """TopK of the k largest along the last axis of x ([..., n], no NaN, k <= n),
        equal values by lower index (ONNX's documented order, ssd_post's rule).

        ``tie_order="runtime"`` relies on the runtime's TopK for that (onnxruntime
        keeps it). ``"graph"`` settles ties in the graph, for runtimes whose TopK
        orders equal values arbitrarily (OpenVINO; its ``stable`` mode is quadratic:
        minutes for YOLO's 30000 of 672000): the k-th value v is found, the values
        equal to v that fit are the first ones by index (CumSum), and the chosen k
        are ordered by the dense rank of their value, then the rank of their index,
        a key below 2^31 (OpenVINO's CPU runs int64 as int32).

        Returns values and indices [..., k]."""
        if tie_order == "runtime":
            return op.TopK(x, ints(k), axis=-1, largest=1, sorted=1)
        if k > MAX_GRAPH_ORDERED_K:
            raise ValueError(
                f"tie_order='graph' orders a top-k of at most {MAX_GRAPH_ORDERED_K} in 31-bit "
                f"keys, got k = {k}: export with tie_order='runtime' (exact in onnxruntime)"
            )
        top, _ = op.TopK(x, ints(k), axis=-1, largest=1, sorted=1)
        kth = last(top, k - 1, k)  # [..., 1]: the k-th largest value, unambiguous
        # Every value above v is in the top k: the rest of the k are values equal to v.
        room = op.ReduceSum(op.Cast(op.Equal(top, kth), to=INT64), ints(-1), keepdims=1)
        at_kth = op.Equal(x, kth)
        late_tie = op.And(
            at_kth, op.Greater(op.CumSum(op.Cast(at_kth, to=INT64), scalar_int(-1)), room)
        )
        # The ties past the room drop below every value: the top k is now one set.
        values, index = op.TopK(
            op.Where(late_tie, floats(float("-inf")), x), ints(k), axis=-1, largest=1, sorted=1
        )
        previous = op.Concat(last(values, 0, 1), last(values, 0, k - 1), axis=-1)
        dense_rank = op.CumSum(  # 0 for the largest value, +1 at each new value
            op.Cast(op.Not(op.Equal(values, previous)), to=INT64), scalar_int(-1)
        )
        _, by_index = op.TopK(index, ints(k), axis=-1, largest=0, sorted=1)  # distinct
        index_rank = op.ScatterElements(
            op.ConstantOfShape(op.Shape(index), value=filled_int(0)),
            by_index,
            op.Expand(op.Range(scalar_int(0), scalar_int(k), scalar_int(1)), op.Shape(index)),
            axis=-1,
        )
        key = op.Add(op.Mul(dense_rank, scalar_int(k)), index_rank)  # < k * k
        _, order = op.TopK(key, ints(k), axis=-1, largest=0, sorted=1)
        return op.GatherElements(values, order, axis=-1), op.GatherElements(index, order, axis=-1)

    # ------------------------------------------------------------------ shared math

    def decode(locs, anchors, box_weights):
        """Boxes [..., 4] in the op order of BoxCoder.decode / ssd_post::decode_boxes
        (same float32 bits except exp); x and y go together as [..., 2] pairs."""
        wx, wy, ww, wh = box_weights
        low, high = last(anchors, 0, 2), last(anchors, 2, 4)
        sizes = op.Sub(high, low)  # (widths, heights)
        half = floats(0.5)
        centers = op.Add(low, op.Mul(half, sizes))
        d_center = op.Div(last(locs, 0, 2), floats(wx, wy))
        d_size = op.Min(op.Div(last(locs, 2, 4), floats(ww, wh)), floats(BOX_SCALE_CLAMP))
        pred_center = op.Add(op.Mul(d_center, sizes), centers)
        half_size = op.Mul(half, op.Mul(op.Exp(d_size), sizes))
        return op.Concat(op.Sub(pred_center, half_size), op.Add(pred_center, half_size), axis=-1)

    def clip(boxes, image_sizes):
        hw = op.Cast(image_sizes, to=FLOAT)  # [B, 2] (h, w)
        limit = op.Unsqueeze(op.Gather(hw, ints(1, 0, 1, 0), axis=1), ints(1))  # [B, 1, 4]
        return op.Min(op.Max(boxes, floats(0.0)), limit)

    def activation(logits, score_activation: str):
        logits = op.Cast(logits, to=FLOAT)
        if score_activation == "softmax":
            return op.Softmax(logits, axis=-1)
        if score_activation == "sigmoid":
            return op.Sigmoid(logits)
        return logits

    def rank_survivors(kept_mask, scores, width: int):
        """The survivors of each image (kept_mask [B, M] float, 1 at a survivor) by
        decreasing score, equal scores by lower slot (TopK's order): slots [B, width]
        (-1 past the count) and counts [B]."""
        ranked = op.Where(op.Greater(kept_mask, floats(0.5)), scores, floats(float("-inf")))
        _, slot = ordered_topk(ranked, width)
        # Each label keeps up to ``width``: the image keeps its ``width`` best of them.
        survivors = op.Cast(op.ReduceSum(kept_mask, ints(1), keepdims=0), to=INT64)
        counts = op.Min(survivors, scalar_int(width))  # [B]
        position = op.Range(scalar_int(0), scalar_int(width), scalar_int(1))
        inside = op.Less(op.Unsqueeze(position, ints(0)), op.Unsqueeze(counts, ints(1)))
        return op.Where(inside, slot, scalar_int(-1)), counts

    def scatter_kept(selected, like):
        """1 at every (row, slot) NonMaxSuppression selected ([S, 3]: row, class, slot),
        0 elsewhere, as a float tensor shaped like ``like`` [R, M]."""
        where = op.Gather(selected, ints(0, 2), axis=1)  # [S, 2]
        ones = op.Expand(floats(1.0), op.Shape(selected, start=0, end=1))
        zeros = op.ConstantOfShape(op.Shape(like), value=filled(0.0))
        return op.ScatterND(zeros, where, ones)

    # ------------------------------------------------------------------ SSD's fused op

    def candidates(locs, logits, anchors, image_sizes, config: PostprocessConfig, background):
        """Per (image, class) top-k of the scores and their boxes; ``background`` is the
        resolved background column (an int) or None.

        Returns values [B, C, k] (background and sub-threshold entries are <= score_thresh),
        their anchor indices [B, C, k], their boxes [B, C * k, 4], and k, C, B as [1]
        int64 tensors.
        """
        scores = activation(logits, config.score_activation)
        boxes = decode(op.Cast(locs, to=FLOAT), op.Cast(anchors, to=FLOAT), config.box_weights)
        if config.clip_boxes:
            boxes = clip(boxes, image_sizes)
        scores = op.Transpose(scores, perm=[0, 2, 1])  # [B, C, A]
        batch, num_classes = dim(scores, 0), dim(scores, 1)
        if background is not None:
            # 0 is never > score_thresh >= 0: the background column yields no candidate.
            columns = op.Range(scalar_int(0), op.Squeeze(num_classes), scalar_int(1))
            is_background = op.Equal(columns, scalar_int(background))
            scores = op.Where(op.Unsqueeze(is_background, ints(0, 2)), floats(0.0), scores)
        count = min(static_dim(locs, 1, "A"), config.topk_candidates)
        k = ints(count)
        # Equal values in index order: ties go by anchor index, as in ssd_post.
        values, indices = ordered_topk(scores, count)  # [B, C, k]
        flat = op.Reshape(indices, op.Concat(batch, ints(-1, 1), axis=0))  # [B, C*k, 1]
        cand_boxes = op.GatherND(boxes, flat, batch_dims=1)  # [B, C*k, 4]
        return values, indices, cand_boxes, k, num_classes, batch

    def fused_config(score_thresh, nms_thresh, topk, per_img, weights, act, background, clip_):
        return PostprocessConfig(
            score_thresh, nms_thresh, topk, per_img, tuple(weights), act, background, clip_
        )

    def lower_postprocess(
        locs,
        logits,
        anchors,
        image_sizes,
        score_thresh,
        nms_thresh,
        topk_candidates,
        detections_per_img,
        box_weights,
        score_activation,
        background_class,
        clip_boxes,
    ):
        config = fused_config(
            score_thresh,
            nms_thresh,
            topk_candidates,
            detections_per_img,
            box_weights,
            score_activation,
            background_class,
            clip_boxes,
        )
        classes = static_dim(logits, 2, "the number of classes C")
        check_expressible(config, classes)
        # The op's (and its fake kernel's) padded size: the graph declares exactly it.
        anchor_count = static_dim(logits, 1, "the number of anchors A")
        padded = config.padded_detections(anchor_count, classes)
        values, indices, cand_boxes, k, num_classes, batch = candidates(
            locs, logits, anchors, image_sizes, config, config.resolve_background_class(classes)
        )
        # One NMS "batch" per (image, class): ONNX NMS shares boxes across classes,
        # but each class has its own top-k boxes here.
        nms_boxes = op.Reshape(cand_boxes, op.Concat(ints(-1), k, ints(4), axis=0))  # [B*C, k, 4]
        nms_scores = op.Reshape(values, op.Concat(ints(-1, 1), k, axis=0))  # [B*C, 1, k]
        per_class = min(config.topk_candidates, config.detections_per_img)
        selected = op.NonMaxSuppression(
            nms_boxes,
            nms_scores,
            ints(per_class),
            floats(config.nms_thresh),
            floats(config.score_thresh),
            center_point_box=0,
        )  # [M, 3]
        flat_values = op.Reshape(values, op.Concat(ints(-1), k, axis=0))  # [B*C, k]
        # The width C * k written out (not -1), so that ONNX shape inference knows it and
        # infers the TopK below as [B, K]: the graph's shape contract is checkable offline.
        width = classes * min(config.topk_candidates, anchor_count)
        kept = op.Reshape(
            scatter_kept(selected, flat_values), op.Concat(batch, ints(width), axis=0)
        )  # [B, C*k]
        per_image = op.Reshape(flat_values, op.Concat(batch, ints(width), axis=0))
        # K <= C_fg * min(topk_candidates, A) <= C * k columns: a TopK of K needs no padding.
        # Ties by index = (class, rank in class), ssd_post's order.
        det_index, counts = rank_survivors(kept, per_image, padded)  # [B, K], [B]
        valid = op.GreaterOrEqual(det_index, scalar_int(0))
        det_index = op.Max(det_index, scalar_int(0))
        det_boxes = op.GatherND(
            cand_boxes, op.Unsqueeze(det_index, ints(-1)), batch_dims=1
        )  # [B, K, 4]
        det_scores = op.GatherElements(per_image, det_index, axis=1)
        labels = op.Div(det_index, k)
        # The anchor of each detection: the first TopK's index at (class, rank).
        anchor_indices = op.GatherElements(
            op.Reshape(indices, op.Concat(batch, ints(width), axis=0)), det_index, axis=1
        )  # [B, K]
        det_boxes = op.Where(op.Unsqueeze(valid, ints(-1)), det_boxes, floats(0.0))
        det_scores = op.Where(valid, det_scores, floats(0.0))
        labels = op.Where(valid, labels, scalar_int(0))
        anchor_indices = op.Where(valid, anchor_indices, scalar_int(-1))
        return det_boxes, det_scores, labels, counts, anchor_indices

    def lower_decode_threshold_flatten(
        locs,
        logits,
        anchors,
        image_sizes,
        score_thresh,
        topk_candidates,
        box_weights,
        score_activation,
        background_class,
        clip_boxes,
    ):
        config = fused_config(
            score_thresh,
            0.5,
            topk_candidates,
            1,
            box_weights,
            score_activation,
            background_class,
            clip_boxes,
        )
        classes = static_dim(logits, 2, "the number of classes C")
        check_expressible(config, classes)
        values, _, cand_boxes, k, num_classes, batch = candidates(
            locs, logits, anchors, image_sizes, config, config.resolve_background_class(classes)
        )
        # NonZero walks [B, C, k] in row-major order: keys increasing, each by rank.
        where = op.Transpose(
            op.NonZero(op.Greater(values, floats(config.score_thresh))), perm=[1, 0]
        )  # [N, 3]
        image, label = (op.Gather(where, ints(i), axis=1) for i in range(2))  # [N, 1] each
        boxes = op.GatherND(
            op.Reshape(cand_boxes, op.Concat(batch, num_classes, k, ints(4), axis=0)), where
        )
        scores = op.GatherND(values, where)
        keys = op.Squeeze(op.Add(op.Mul(image, num_classes), label), ints(1))
        return boxes, scores, keys

    # ------------------------------------------------------------------ the family's ops

    def factor_scores(probs, score_factor, factor_mode: str, factor_logits: bool):
        """(selection, reported) scores [B, A, C] from the class probabilities and the
        per-anchor factor ([B, A] or [B, A, 1]; None: both are the probabilities), in
        the op order of reference._block_scores."""
        if score_factor is None:
            return probs, probs
        factor = op.Reshape(op.Cast(score_factor, to=FLOAT), ints(0, -1, 1))  # [B, A, 1]
        if factor_logits:
            factor = op.Sigmoid(factor)
        product = op.Mul(probs, factor)
        if factor_mode == "sqrt":
            root = op.Sqrt(product)
            return root, root
        if factor_mode == "before_threshold":
            return product, product
        return probs, product  # after_selection

    def lower_select_topk(
        logits,
        score_factor,
        level_sizes,
        score_thresh,
        topk_candidates,
        background_class,
        score_activation="sigmoid",
        factor_mode="sqrt",
        factor_logits=True,
        single_label=False,
        classes=None,
        per_class=False,
    ):
        num_anchors = static_dim(logits, 1, "the number of anchors A")
        num_classes = static_dim(logits, 2, "the number of classes C")
        check_columns(background_class, classes, num_classes)
        level_sizes = [int(n) for n in level_sizes]
        if sum(level_sizes) != num_anchors:
            raise ValueError(f"level_sizes should sum to A = {num_anchors}, got {level_sizes}")
        capacity = select_capacity(
            level_sizes, num_classes, topk_candidates, single_label, per_class
        )
        eligible = [c != background_class for c in range(num_classes)]
        allowed = [classes is None or c in classes for c in range(num_classes)]
        select, report = factor_scores(
            activation(logits, score_activation), score_factor, factor_mode, factor_logits
        )
        threshold = floats(score_thresh)
        # Candidates keep their selection score, every other pair -1: below any score
        # > score_thresh >= 0, so a TopK ranks the candidates first and -1 marks the rest.
        none = floats(-1.0)
        if single_label:
            # Each anchor's best eligible column, NaN ignored, equal scores to the lower
            # column (ArgMax's first maximum), then kept only if allowed and > thresh.
            usable = op.And(bools(eligible), op.Not(op.IsNaN(select)))
            masked = op.Where(usable, select, floats(float("-inf")))
            label = op.ArgMax(masked, axis=-1, keepdims=1, select_last_index=0)  # [B, A, 1]
            best = op.GatherElements(select, label, axis=2)
            passing = op.And(op.Greater(best, threshold), op.Gather(bools(allowed), label, axis=0))
            best = op.Squeeze(op.Where(passing, best, none), ints(2))  # [B, A]
            best_report = op.Squeeze(op.GatherElements(report, label, axis=2), ints(2))
            label = op.Squeeze(label, ints(2))
        else:
            mask = bools([e and a for e, a in zip(eligible, allowed)])
            pairs = op.Where(op.And(mask, op.Greater(select, threshold)), select, none)

        def finish(values, flat, reported):
            """Slots of the selected [B, G, k]: flat -1 and score 0 past the count."""
            valid = op.Greater(values, floats(-0.5))
            counts = op.ReduceSum(op.Cast(valid, to=INT64), ints(2), keepdims=0)
            return (
                op.Where(valid, flat, scalar_int(-1)),
                op.Where(valid, reported, floats(0.0)),
                counts,
            )

        if per_class:
            k = min(topk_candidates, num_anchors)
            column = op.Range(scalar_int(0), scalar_int(num_classes), scalar_int(1))
            if single_label:
                # Class c's candidates are the anchors whose kept best class is c.
                mine = op.Equal(op.Unsqueeze(label, ints(1)), op.Unsqueeze(column, ints(0, 2)))
                by_class = op.Where(mine, op.Unsqueeze(best, ints(1)), none)  # [B, C, A]
                reported_rows = op.Unsqueeze(best_report, ints(1))  # [B, 1, A]
                reported_rows = op.Expand(reported_rows, op.Shape(by_class))
            else:
                by_class = op.Transpose(pairs, perm=[0, 2, 1])
                reported_rows = op.Transpose(report, perm=[0, 2, 1])
            values, anchor = ordered_topk(by_class, k)
            flat = op.Add(op.Mul(anchor, scalar_int(num_classes)), op.Unsqueeze(column, ints(0, 2)))
            return finish(values, flat, op.GatherElements(reported_rows, anchor, axis=2))

        groups = []
        start = 0
        for size in level_sizes:
            if single_label:
                block = op.Slice(best, ints(start), ints(start + size), ints(1))  # [B, A_l]
                k = min(topk_candidates, size)
                values, local = ordered_topk(block, k)
                anchor = op.Add(local, scalar_int(start))
                block_labels = op.Slice(label, ints(start), ints(start + size), ints(1))
                flat = op.Add(
                    op.Mul(anchor, scalar_int(num_classes)),
                    op.GatherElements(block_labels, local, axis=1),
                )
                block_report = op.Slice(best_report, ints(start), ints(start + size), ints(1))
                reported = op.GatherElements(block_report, local, axis=1)
            else:
                shape = ints(0, size * num_classes)
                block = op.Reshape(op.Slice(pairs, ints(start), ints(start + size), ints(1)), shape)
                k = min(topk_candidates, size * num_classes)
                values, local = ordered_topk(block, k)
                flat = op.Add(local, scalar_int(start * num_classes))
                block_report = op.Reshape(
                    op.Slice(report, ints(start), ints(start + size), ints(1)), shape
                )
                reported = op.GatherElements(block_report, local, axis=1)
            missing = capacity - k  # every group has the widest group's width
            if missing:
                widen = ints(0, 0, 0, missing)
                values = op.Pad(values, widen, scalar_float(-1.0))
                flat = op.Pad(flat, widen, scalar_int(-1))
                reported = op.Pad(reported, widen, scalar_float(0.0))
            groups.append(tuple(op.Unsqueeze(t, ints(1)) for t in (values, flat, reported)))
            start += size
        values, flat, reported = (op.Concat(*parts, axis=1) for parts in zip(*groups))
        return finish(values, flat, reported)

    def lower_decode_boxes(rel_codes, anchors, weights):
        return decode(op.Cast(rel_codes, to=FLOAT), op.Cast(anchors, to=FLOAT), weights)

    def lower_batched_nms_padded(
        boxes, scores, labels, iou_threshold, max_kept, class_agnostic=False
    ):
        slots = static_dim(boxes, 1, "the number of candidate slots M")
        width = min(int(max_kept), slots)
        boxes, scores = op.Cast(boxes, to=FLOAT), op.Cast(scores, to=FLOAT)
        # An inverted box (x2 < x1 or y2 < y1) has zero area in ssd_post and suppresses
        # nothing; ONNX NMS would sort its corners, so it gets a zero-area stand-in.
        low, high = last(boxes, 0, 2), last(boxes, 2, 4)
        inverted = op.Cast(
            op.ReduceMax(op.Cast(op.Less(high, low), to=INT64), ints(-1), keepdims=1), to=BOOL
        )
        nms_boxes = op.Where(inverted, op.Concat(low, low, axis=-1), boxes)
        filled_slot = op.GreaterOrEqual(labels, scalar_int(0))
        minus_inf = floats(float("-inf"))
        if class_agnostic:
            rows = op.Unsqueeze(op.Where(filled_slot, scores, minus_inf), ints(1))  # [B, 1, M]
        else:
            # One NMS class per label: a slot's score in its label's row, -inf elsewhere.
            top_label = op.ReduceMax(
                op.Concat(op.Reshape(labels, ints(-1)), ints(0), axis=0), keepdims=0
            )  # a scalar, >= 0 even when every slot is empty
            label_ids = op.Range(scalar_int(0), op.Add(top_label, scalar_int(1)), scalar_int(1))
            mine = op.Equal(op.Unsqueeze(labels, ints(1)), op.Unsqueeze(label_ids, ints(0, 2)))
            rows = op.Where(mine, op.Unsqueeze(scores, ints(1)), minus_inf)  # [B, L, M]
        selected = op.NonMaxSuppression(
            nms_boxes,
            rows,
            ints(width),
            floats(iou_threshold),
            floats(LOWEST_FLOAT),
            center_point_box=0,
        )  # [S, 3] (image, label row, slot)
        return rank_survivors(scatter_kept(selected, scores), scores, width)

    return {
        "postprocess": lower_postprocess,
        "decode_threshold_flatten": lower_decode_threshold_flatten,
        "select_topk": lower_select_topk,
        "decode_boxes": lower_decode_boxes,
        "batched_nms_padded": lower_batched_nms_padded,
    }
