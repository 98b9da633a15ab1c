"""ssd_post.ops.batched_nms_padded: per-image greedy NMS over padded candidates,
against batched_nms on the flattened non-empty slots (the contract) and the loop of
ssd_post.reference, on the CPU kernel, the CUDA kernel code through the emulator
(tests/cuda_emulation) and a real GPU where there is one."""

from __future__ import annotations

import warnings

import pytest
import torch
import torchvision
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cuda_emulation
import ssd_post
from common_utils import CUDA_MARKS, cpu_and_cuda, needs_cuda
from ssd_post.ops import batched_nms_padded
from ssd_post.reference import batched_nms_padded_loop


def batched_nms_oracle(boxes, scores, labels, iou_threshold, max_kept, class_agnostic=False):
    """The contract: ``ssd_post.batched_nms`` on the non-empty slots flattened in
    (image, slot) order with keys image * KPI + label (KPI labels per image;
    class-agnostic: keys = image), at most max_kept per image, regrouped per image."""
    batch, slots = scores.shape
    filled = (labels >= 0).flatten()
    image = torch.arange(batch).repeat_interleave(slots)
    slot = torch.arange(slots).repeat(batch)
    if class_agnostic or not bool(filled.any()):
        per_image, label = 1, torch.zeros_like(image)
    else:
        per_image, label = int(labels.max()) + 1, labels.flatten()
    keep = ssd_post.batched_nms(
        boxes.reshape(-1, 4)[filled],
        scores.flatten()[filled],
        (image * per_image + label)[filled],
        iou_threshold,
        max_kept=max_kept,
        keys_per_image=per_image,
    )
    kept_image, kept_slot = image[filled][keep], slot[filled][keep]
    indices = torch.full((batch, min(max_kept, slots)), -1, dtype=torch.int64)
    counts = torch.zeros(batch, dtype=torch.int64)
    for b in range(batch):
        mine = kept_slot[kept_image == b]  # batched_nms's output order: rank order
        indices[b, : len(mine)] = mine
        counts[b] = len(mine)
    return indices, counts


def _run(kernels: str, boxes, scores, labels, iou_threshold, max_kept, class_agnostic):
    if kernels == "emulated":
        return cuda_emulation.batched_nms_padded(
            boxes, scores, labels, iou_threshold, max_kept, class_agnostic
        )
    device = "cuda" if kernels == "cuda" else "cpu"
    indices, counts = batched_nms_padded(
        boxes.to(device),
        scores.to(device),
        labels.to(device),
        iou_threshold,
        max_kept,
        class_agnostic,
    )
    assert indices.device.type == counts.device.type == device
    return indices.cpu(), counts.cpu()


KERNELS = ("cpu", "emulated", pytest.param("cuda", marks=CUDA_MARKS))


def _near_threshold_pairs(n: int, iou_threshold: float, generator: torch.Generator):
    """n boxes in pairs of equal squares shifted along x so that their IoU sits just
    above or below iou_threshold (IoU of s-squares shifted by d: (s - d) / (s + d))."""
    side = 20.0
    boxes = torch.zeros(n, 4)
    for k in range(0, n, 2):
        eps = (1e-6, 1e-3, 0.0)[k % 3] * (1 if k % 4 == 0 else -1)
        target = min(max(iou_threshold + eps, 0.0), 1.0)
        shift = side * (1 - target) / (1 + target)
        x, y = (torch.rand(2, generator=generator) * 60).tolist()
        boxes[k] = torch.tensor([x, y, x + side, y + side])
        if k + 1 < n:
            boxes[k + 1] = torch.tensor([x + shift, y, x + shift + side, y + side])
    return boxes


@st.composite
def padded_problems(draw):
    """Boxes on a small integer grid (many IoUs exactly at a threshold, zero-area
    boxes) or in near-threshold pairs; scores with ties, NaN and -0.0; empty slots;
    a few labels. M up to 200, so the CUDA kernel walks several 64-row chunks."""
    batch = draw(st.integers(0, 4))
    slots = draw(st.one_of(st.integers(0, 12), st.integers(13, 200)))
    iou_threshold = draw(st.sampled_from([0.0, 0.2, 0.45, 0.5, 0.7, 1.0]))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    n = batch * slots
    if draw(st.booleans()):
        xy = torch.randint(0, 20, (n, 2), generator=generator).float()
        wh = torch.randint(0, 10, (n, 2), generator=generator).float()  # 0: zero area
        boxes = torch.cat((xy, xy + wh), dim=1)
    else:
        boxes = _near_threshold_pairs(n, iou_threshold, generator)
    if draw(st.booleans()):
        scores = torch.randint(0, 4, (n,), generator=generator) / 4.0  # ties
    else:
        scores = torch.rand(n, generator=generator) * 2 - 0.5  # negative scores too
    special = torch.rand(n, generator=generator)
    scores[special < draw(st.sampled_from([0.0, 0.1]))] = float("nan")
    scores[(special > 0.95)] = -0.0
    if draw(st.booleans()):
        boxes[torch.rand(n, generator=generator) < 0.03, 2] = float("nan")
    num_labels = draw(st.integers(1, 4))
    labels = torch.randint(0, num_labels, (n,), generator=generator)
    empty = draw(st.sampled_from([0.0, 0.3, 1.0]))
    labels[torch.rand(n, generator=generator) < empty] = -1
    max_kept = draw(st.sampled_from([1, 2, 5, 17, 64, 65, 1000]))
    return (
        boxes.reshape(batch, slots, 4),
        scores.reshape(batch, slots),
        labels.reshape(batch, slots),
        iou_threshold,
        max_kept,
        draw(st.booleans()),
    )


@pytest.mark.parametrize(
    "kernels",
    # The emulator runs a fiber per CUDA thread: 120 examples take about 20 s there.
    ("cpu", pytest.param("emulated", marks=pytest.mark.slow), KERNELS[2]),
)
@settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(problem=padded_problems())
def test_matches_batched_nms_on_the_flattened_slots(kernels, problem):
    expected = batched_nms_oracle(*problem)
    indices, counts = _run(kernels, *problem)
    assert counts.tolist() == expected[1].tolist()
    assert indices.tolist() == expected[0].tolist()


@settings(max_examples=60, deadline=None)
@given(problem=padded_problems())
def test_the_two_oracles_agree(problem):
    # The readable loop of ssd_post.reference states the same contract per image.
    loop = batched_nms_padded_loop(*problem)
    flat = batched_nms_oracle(*problem)
    assert loop[0].tolist() == flat[0].tolist() and loop[1].tolist() == flat[1].tolist()


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("class_agnostic", [False, True])
@pytest.mark.parametrize("max_kept", [3, 1000])
def test_torchvision_batched_nms_per_image(kernels, class_agnostic, max_kept):
    # torchvision.ops.batched_nms itself, one image at a time, on inputs where its
    # answer is defined: integer boxes (its label offsets add no rounding) and
    # distinct scores (its sorts need no tie order).
    generator = torch.Generator().manual_seed(11)
    batch, slots = 3, 150
    xy = torch.randint(0, 40, (batch, slots, 2), generator=generator).float()
    wh = torch.randint(1, 15, (batch, slots, 2), generator=generator).float()
    boxes = torch.cat((xy, xy + wh), dim=2)
    scores = torch.stack([torch.randperm(slots, generator=generator) for _ in range(batch)]) / slots
    labels = torch.randint(0, 4, (batch, slots), generator=generator)
    labels[torch.rand(batch, slots, generator=generator) < 0.25] = -1
    labels[1] = -1  # an image with no candidate
    indices, counts = _run(kernels, boxes, scores, labels, 0.45, max_kept, class_agnostic)
    for image in range(batch):
        filled = torch.nonzero(labels[image] >= 0).flatten()
        groups = torch.zeros_like(filled) if class_agnostic else labels[image, filled]
        keep = torchvision.ops.batched_nms(
            boxes[image, filled], scores[image, filled], groups, 0.45
        )[:max_kept]
        want = filled[keep].tolist()
        assert counts[image] == len(want)
        assert indices[image].tolist() == want + [-1] * (min(max_kept, slots) - len(want))
    assert counts[1] == 0 and int(counts.max()) > 1


def _crowded(batch: int, slots: int, num_labels: int, seed: int):
    """Boxes crowded into a small area with tied scores and some empty slots: most
    candidates are suppressed, so a bounded scan walks far down the ranking."""
    generator = torch.Generator().manual_seed(seed)
    xy = torch.rand(batch, slots, 2, generator=generator) * 50
    wh = torch.rand(batch, slots, 2, generator=generator) * 20 + 1
    boxes = torch.cat((xy, xy + wh), dim=2)
    scores = torch.round(torch.rand(batch, slots, generator=generator) * 40) / 40
    labels = torch.randint(0, num_labels, (batch, slots), generator=generator)
    labels[torch.rand(batch, slots, generator=generator) < 0.2] = -1
    return boxes, scores, labels


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("max_kept", [1, 30, 300, 5000])
@pytest.mark.parametrize("class_agnostic", [False, True])
def test_crowded_images(kernels, max_kept, class_agnostic):
    problem = _crowded(3, 700, 5, seed=max_kept) + (0.5, max_kept, class_agnostic)
    expected = batched_nms_oracle(*problem)
    indices, counts = _run(kernels, *problem)
    assert indices.tolist() == expected[0].tolist() and counts.tolist() == expected[1].tolist()
    # The limit binds where it is small, and the scan found survivors past a chunk.
    if max_kept <= 30:
        assert counts.tolist() == [max_kept] * 3
    assert int(counts.max()) > 1 or max_kept == 1


@pytest.mark.parametrize("kernels", KERNELS)
def test_hand_made_case(kernels):
    box = [0.0, 0.0, 10.0, 10.0]
    boxes = torch.tensor(
        [[box, box, [20.0, 20.0, 30.0, 30.0], box, [5.0, 5.0, 5.0, 9.0], box]], dtype=torch.float32
    )
    scores = torch.tensor([[0.5, 0.9, 0.7, float("nan"), 0.95, 0.9]])
    labels = torch.tensor([[0, 0, 0, -1, 0, 1]])
    # Slot 3 is empty (its NaN score is ignored); slot 4 has zero area and suppresses
    # nothing; slot 1 beats slot 5 on the tie but they have different labels; slot 0
    # is suppressed by slot 1.
    indices, counts = _run(kernels, boxes, scores, labels, 0.5, 10, False)
    assert indices.tolist() == [[4, 1, 5, 2, -1, -1]] and counts.tolist() == [4]
    indices, counts = _run(kernels, boxes, scores, labels, 0.5, 10, True)
    assert indices.tolist() == [[4, 1, 2, -1, -1, -1]] and counts.tolist() == [3]
    indices, counts = _run(kernels, boxes, scores, labels, 0.5, 2, False)
    assert indices.tolist() == [[4, 1]] and counts.tolist() == [2]


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("batch, slots", [(0, 5), (3, 0), (0, 0)])
def test_empty_shapes(kernels, batch, slots):
    boxes, scores = torch.zeros(batch, slots, 4), torch.zeros(batch, slots)
    labels = torch.zeros(batch, slots, dtype=torch.int64)
    indices, counts = _run(kernels, boxes, scores, labels, 0.5, 4, False)
    assert indices.shape == (batch, min(4, slots)) and indices.dtype == torch.int64
    assert counts.tolist() == [0] * batch and counts.dtype == torch.int64


@pytest.mark.parametrize("kernels", KERNELS)
def test_all_slots_empty(kernels):
    boxes, scores, _ = _crowded(2, 90, 3, seed=1)
    labels = torch.full((2, 90), -1, dtype=torch.int64)
    indices, counts = _run(kernels, boxes, scores, labels, 0.5, 100, False)
    assert counts.tolist() == [0, 0] and bool((indices == -1).all()) and indices.shape == (2, 90)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_are_computed_in_float32(device, dtype):
    boxes, scores, labels = _crowded(2, 300, 4, seed=3)
    boxes, scores = boxes.to(dtype), scores.to(dtype)
    expected = batched_nms_padded(boxes.float(), scores.float(), labels, 0.45, 50)
    actual = batched_nms_padded(boxes.to(device), scores.to(device), labels.to(device), 0.45, 50)
    for got, want in zip(actual, expected):
        assert got.cpu().tolist() == want.tolist()


def test_result_does_not_depend_on_thread_count():
    boxes, scores, labels = _crowded(8, 500, 6, seed=4)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = batched_nms_padded(boxes, scores, labels, 0.5, 100)
    finally:
        torch.set_num_threads(threads)
    for got, want in zip(batched_nms_padded(boxes, scores, labels, 0.5, 100), single):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_any_label_values():
    # Labels are compared, never used as offsets or array indices.
    boxes = torch.tensor([[[0.0, 0.0, 10.0, 10.0]] * 4])
    scores = torch.tensor([[0.4, 0.3, 0.2, 0.1]])
    labels = torch.tensor([[2**40, 7, 2**40, 7]])
    indices, counts = batched_nms_padded(boxes, scores, labels, 0.5, 4)
    assert indices.tolist() == [[0, 1, -1, -1]] and counts.tolist() == [2]
    emulated = cuda_emulation.batched_nms_padded(boxes, scores, labels, 0.5, 4)
    assert emulated[0].tolist() == indices.tolist()


@needs_cuda
def test_cuda_does_not_synchronize():
    boxes, scores, labels = (t.cuda() for t in _crowded(4, 3000, 8, seed=5))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        indices, counts = batched_nms_padded(boxes, scores, labels, 0.5, 100)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert indices.shape == (4, 100) and counts.shape == (4,)


# --- bad input ---------------------------------------------------------------------


def _good():
    boxes, scores, labels = _crowded(2, 6, 3, seed=0)
    return {"boxes": boxes, "scores": scores, "labels": labels}


@pytest.mark.parametrize(
    "change, match",
    [
        ({"boxes": torch.zeros(2, 6)}, r"boxes should be a 3d tensor \[B, M, 4\], got shape"),
        ({"boxes": torch.zeros(2, 6, 5)}, r"boxes should be a 3d tensor \[B, M, 4\]"),
        ({"scores": torch.zeros(2, 5)}, r"scores should have shape \[B, M\] = \[2, 6\]"),
        ({"scores": torch.zeros(12)}, r"scores should have shape \[B, M\]"),
        ({"labels": torch.zeros(3, 6, dtype=torch.int64)}, r"labels should have shape \[B, M\]"),
        ({"boxes": torch.zeros(2, 6, 4, dtype=torch.int32)}, "boxes should be float32, float16"),
        ({"scores": torch.zeros(2, 6, dtype=torch.float64)}, "scores should be float32, float16"),
        ({"labels": torch.zeros(2, 6, dtype=torch.int32)}, "labels should be int64"),
        ({"labels": torch.zeros(2, 6)}, "labels should be int64"),
    ],
)
@pytest.mark.parametrize("entry", ["wrapper", "op"])
def test_bad_tensors_are_value_errors(change, match, entry):
    args = {**_good(), **change}
    call = batched_nms_padded if entry == "wrapper" else torch.ops.ssd_post.batched_nms_padded
    with pytest.raises(ValueError, match=match):
        call(args["boxes"], args["scores"], args["labels"], 0.5, 3)


@pytest.mark.parametrize(
    "iou_threshold, max_kept, match",
    [
        (1.5, 3, r"iou_threshold should be in \[0, 1\], got 1.5"),
        (-0.1, 3, r"iou_threshold should be in \[0, 1\], got -0.1"),
        (float("nan"), 3, r"iou_threshold should be in \[0, 1\], got nan"),
        (0.5, 0, "max_kept should be .*>= 1, got 0"),
        (0.5, -2, "max_kept should be .*>= 1, got -2"),
    ],
)
@pytest.mark.parametrize("entry", ["wrapper", "op"])
def test_bad_scalars_are_value_errors(iou_threshold, max_kept, match, entry):
    args = _good()
    call = batched_nms_padded if entry == "wrapper" else torch.ops.ssd_post.batched_nms_padded
    with pytest.raises(ValueError, match=match):
        call(args["boxes"], args["scores"], args["labels"], iou_threshold, max_kept)


def test_bad_python_arguments():
    args = _good()
    with pytest.raises(ValueError, match="max_kept should be an int >= 1, got 2.5"):
        batched_nms_padded(args["boxes"], args["scores"], args["labels"], 0.5, 2.5)
    with pytest.raises(ValueError, match="class_agnostic should be a bool, got 1"):
        batched_nms_padded(args["boxes"], args["scores"], args["labels"], 0.5, 2, 1)
    with pytest.raises(ValueError, match="labels should be a Tensor, got list"):
        batched_nms_padded(args["boxes"], args["scores"], [0, 1], 0.5, 2)
    with pytest.raises(ValueError, match="labels should be on the same device as boxes"):
        batched_nms_padded(args["boxes"], args["scores"], args["labels"].to("meta"), 0.5, 2)


# --- compile, export, script -------------------------------------------------------


def _select_kept(boxes, scores, labels):
    """A padded pipeline stage: NMS, then the kept boxes and scores gathered."""
    indices, counts = batched_nms_padded(boxes, scores, labels, 0.5, 40)
    gather = indices.clamp(min=0)
    kept_boxes = torch.gather(boxes, 1, gather[..., None].expand(-1, -1, 4))
    kept_scores = torch.gather(scores, 1, gather).masked_fill(indices < 0, 0.0)
    return indices, counts, kept_boxes, kept_scores


def test_inside_torch_compile_fullgraph():
    problem = _crowded(3, 200, 4, seed=6)
    compiled = torch.compile(_select_kept, backend="aot_eager", fullgraph=True)
    for got, want in zip(compiled(*problem), _select_kept(*problem)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_inside_torch_compile_with_dynamic_shapes():
    compiled = torch.compile(_select_kept, backend="aot_eager", fullgraph=True, dynamic=True)
    for slots in (30, 90):  # K = min(40, M): the fake kernel's sym_min, both sides of it
        problem = _crowded(2, slots, 3, seed=slots)
        result = compiled(*problem)
        assert result[0].shape == (2, min(40, slots))
        for got, want in zip(result, _select_kept(*problem)):
            torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_torch_export():
    class Stage(torch.nn.Module):
        def forward(self, boxes, scores, labels):
            return _select_kept(boxes, scores, labels)

    problem = _crowded(2, 120, 3, seed=7)
    exported = torch.export.export(Stage(), problem)
    for got, want in zip(exported.module()(*problem), _select_kept(*problem)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_torchscript():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "`torch.jit.script` is deprecated", FutureWarning)
        scripted = torch.jit.script(batched_nms_padded)
    problem = _crowded(2, 100, 3, seed=8)
    for got, want in zip(
        scripted(*problem, 0.5, 20, True), batched_nms_padded(*problem, 0.5, 20, True)
    ):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
