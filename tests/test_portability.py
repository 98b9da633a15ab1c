"""The CPU kernels are portable: every compilation of the vector loops gives the same
detections, and the C++ sources compile for aarch64 (Linux ARM, the ISA of Apple
silicon) against the installed torch headers."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from ssd_post import ops

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CROSS_COMPILER = "aarch64-linux-gnu-g++"


def _x86_with_avx2() -> bool:
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def test_cpu_vector_kernels_follow_torch_capability():
    expected = "avx2" if _x86_with_avx2() else "baseline"
    assert ops.cpu_vector_kernels() == expected


# Runs in a fresh interpreter, since the variant is chosen once per process: the
# postprocess of SSD-shaped inputs that exercise every vector loop (softmax row
# bound, per-column compare, NMS with NaN and inverted boxes, best-class
# candidates) against the loop
# oracle and torchvision computed in the same process (torch's own softmax and exp
# also follow ATEN_CPU_CAPABILITY, so each variant is checked under its own torch).
VARIANT_RUN = textwrap.dedent("""
    import sys
    import torch
    import torchvision
    import ssd_post
    from ssd_post import ops, reference
    sys.path.insert(0, "tests")
    from common_utils import assert_same_detections

    torch.manual_seed(0)
    anchors = torch.rand(3000, 4) * 200
    anchors[:, 2:] += anchors[:, :2]
    found = 0
    for activation, classes in (("softmax", 91), ("softmax", 7), ("sigmoid", 13)):
        locs = torch.randn(3, 3000, 4) * 0.5
        logits = torch.randn(3, 3000, classes) * 4
        logits[0, 5, 3] = float("nan")
        config = ssd_post.PostprocessConfig(score_activation=activation, score_thresh=0.05,
                                            background_class=0 if activation == "softmax" else None)
        args = (locs, logits, anchors, [(300, 300)] * 3, config)
        det = ssd_post.postprocess(*args)
        assert_same_detections(det, reference.postprocess_loop(*args))
        found += int(det.num_detections.sum())
    boxes = torch.rand(4000, 4) * 100
    boxes[:, 2:] += boxes[:, :2] * 0.3
    boxes[::97, 0] = float("nan")
    boxes[::89, 2] = boxes[::89, 0] - 1  # inverted: zero area, suppresses nothing
    scores = torch.rand(4000)
    idxs = torch.randint(0, 5, (4000,))
    kept = ssd_post.batched_nms(boxes, scores, idxs, 0.5)
    assert torch.equal(kept, torchvision.ops.batched_nms(boxes, scores, idxs, 0.5))
    assert found > 0 and 0 < kept.numel() < 4000, (found, kept.numel())
    scores = torch.rand(3, 13, 2100) ** 4  # YOLO's best-class candidates, capped
    scores[1, 3, 7] = float("nan")
    for cap in (50, 3000):
        got = ops.best_class_candidates(scores, 0.5, cap)
        want = reference.best_class_candidates_loop(scores, 0.5, cap)
        assert all(torch.equal(g, w) for g, w in zip(got, want))
    print(ops.cpu_vector_kernels())
""")


@pytest.mark.slow  # a fresh Python process per variant
@pytest.mark.parametrize("capability, variant", [("default", "baseline"), ("avx2", "avx2")])
def test_each_vector_variant_equals_the_oracle(capability, variant):
    if variant == "avx2" and not _x86_with_avx2():
        pytest.skip("no AVX2 variant: not an x86 CPU with AVX2")
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability)
    proc = subprocess.run(
        [sys.executable, "-c", VARIANT_RUN],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == variant


def _cross_compile_command(source: str) -> list:
    from torch.utils.cpp_extension import include_paths

    flags = [
        "-std=c++20",
        "-fsyntax-only",
        "-DTORCH_API_INCLUDE_EXTENSION_H",
        "-DTORCH_EXTENSION_NAME=_C",
        "-DSSD_POST_WITH_CUDA=0",
    ]
    includes = [f"-I{path}" for path in include_paths()]
    return [CROSS_COMPILER, *flags, *includes, os.path.join(REPO, source)]


AARCH64_SOURCES = ["csrc/ssd_post.cpp"] + sorted(
    os.path.join("csrc", folder, name)
    for folder in ("cpu", "composite")
    for name in os.listdir(os.path.join(REPO, "csrc", folder))
    if name.endswith(".cpp")
)


@pytest.mark.slow  # a cross compile per source, about 5 s each
@pytest.mark.skipif(
    shutil.which(CROSS_COMPILER) is None,
    reason=f"{CROSS_COMPILER} not installed (the CI path installs "
    "g++-aarch64-linux-gnu); cannot check the aarch64 build",
)
@pytest.mark.parametrize("source", AARCH64_SOURCES)
def test_cpu_sources_compile_for_aarch64(source):
    proc = subprocess.run(
        _cross_compile_command(source), capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]


def test_no_x86_intrinsics_outside_atens_vector_types():
    # The portable sources may use only at::vec; an x86 header or builtin would
    # break aarch64 and MSVC builds (the aarch64 check above may be skipped).
    offenders = []
    for folder in ("common", "cpu", "composite"):
        for name in os.listdir(os.path.join(REPO, "csrc", folder)):
            text = open(os.path.join(REPO, "csrc", folder, name)).read()
            for marker in (
                "immintrin.h",
                "__builtin_cpu_supports",
                "_mm_",
                "_mm256_",
                "__builtin_ctz",
            ):
                if marker in text:
                    offenders.append(f"csrc/{folder}/{name}: {marker}")
    assert not offenders, offenders
