"""The library is lean: ``import ssd_post`` works without the training stack, and the
wheel declares torch/torchvision only and packages ``ssd_post`` alone."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAINING_MODULES = (
    "pytorch_lightning",
    "lightning",
    "albumentations",
    "cv2",
    "pycocotools",
    "yaml",
    "PIL",
    "matplotlib",
)

# A meta-path finder that refuses the modules named in argv[1], as if they were not
# installed. Modules already imported (by torch/torchvision) are left alone.
BLOCKER = textwrap.dedent("""
    import sys

    BLOCKED = set(sys.argv[1].split(",")) - set(sys.modules)

    class Refuse:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"{name} is blocked: the library must not need it")
            return None

    sys.meta_path.insert(0, Refuse())
""")

# Runs in a fresh interpreter. torch and torchvision, the declared dependencies, are
# imported before the blocker: torchvision imports PIL itself (pillow is its own
# dependency), which is not the library's doing; nothing else may be loaded by them.
LEAN_IMPORT = (
    textwrap.dedent("""
    import sys

    import torch
    import torchvision

    by_torchvision = {name for name in sys.argv[1].split(",") if name in sys.modules}
    assert by_torchvision <= {"PIL"}, f"torch/torchvision loaded {by_torchvision}"
""")
    + BLOCKER
    + textwrap.dedent("""
    import ssd_post
    from ssd_post import reference

    grids = [(3, 3), (2, 2), (2, 2), (1, 1), (1, 1), (1, 1)]
    anchors = ssd_post.DefaultBoxes.ssd300()((300, 300), grids)  # [A, 4]
    generator = torch.Generator().manual_seed(0)
    locs = torch.randn(2, anchors.shape[0], 4, generator=generator) * 0.1    # [B, A, 4]
    logits = torch.randn(2, anchors.shape[0], 3, generator=generator) * 3    # [B, A, C]
    coder = ssd_post.BoxCoder()
    boxes = coder.decode(locs[0], anchors)
    roundtrip = coder.encode(boxes, anchors)
    assert torch.allclose(roundtrip, locs[0], atol=1e-4), "encode(decode(x)) != x"
    result = reference.postprocess_loop(locs, logits, anchors, [(300, 300)] * 2,
                                        ssd_post.PostprocessConfig(score_thresh=0.2))
    counts = result.num_detections
    assert result.boxes.shape[0] == 2 and int(counts.sum()) > 0, counts
    loaded = sorted(name for name in BLOCKED if name in sys.modules)
    assert not loaded, f"imported by the library: {loaded}"
    print("lean ok")
""")
)


def _run(script: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", script, ",".join(TRAINING_MODULES)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.slow  # a fresh Python process
def test_import_ssd_post_needs_no_training_module():
    result = _run(LEAN_IMPORT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "lean ok" in result.stdout


def test_the_blocker_itself_refuses_a_training_module():
    """The check above would pass vacuously if the finder refused nothing."""
    result = _run(BLOCKER + "import yaml\n")
    assert result.returncode != 0 and "yaml is blocked" in result.stderr


@pytest.fixture(scope="module")
def pyproject() -> dict:
    tomllib = pytest.importorskip(
        "tomllib", reason="tomllib is in the standard library from Python 3.11"
    )
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def _name(requirement: str) -> str:
    """The distribution name of a requirement string ("torch>=2.4" -> "torch")."""
    for index, char in enumerate(requirement):
        if not (char.isalnum() or char in "-_."):
            return requirement[:index].lower()
    return requirement.lower()


def test_the_library_depends_on_torch_and_torchvision_only(pyproject):
    names = {_name(r) for r in pyproject["project"]["dependencies"]}
    assert names - {"numpy"} == {"torch", "torchvision"}, names


def test_training_tools_are_extras(pyproject):
    extras = pyproject["project"]["optional-dependencies"]
    train = {_name(r) for r in extras["train"]}
    assert {
        "pytorch-lightning",
        "albumentations",
        "pycocotools",
        "opencv-python-headless",
        "pyyaml",
        "pillow",
    } <= train
    assert {"pytest", "hypothesis", "matplotlib"} <= {_name(r) for r in extras["dev"]}


def test_only_ssd_post_is_packaged(pyproject):
    packages = pyproject["tool"]["setuptools"]["packages"]
    assert packages and all(p == "ssd_post" or p.startswith("ssd_post.") for p in packages), (
        packages
    )
    assert not {"models", "training"} & {p.split(".")[0] for p in packages}


def _imported_modules(path: str):
    """Top-level names of every import statement in a file, function-local ones too."""
    import ast

    with open(path) as f:
        tree = ast.parse(f.read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module.split(".")[0]


def _python_files(*folders: str):
    for folder in folders:
        for root, _, files in os.walk(os.path.join(REPO, folder)):
            yield from (os.path.join(root, name) for name in files if name.endswith(".py"))


def test_no_library_file_imports_a_training_module_even_lazily():
    """The subprocess test sees import time only; a lazy import inside a function
    would still make part of the library need the training stack."""
    offenders = {
        os.path.relpath(path, REPO): sorted(set(_imported_modules(path)) & set(TRAINING_MODULES))
        for path in _python_files("ssd_post")
    }
    assert {path: names for path, names in offenders.items() if names} == {}


def test_no_code_imports_a_script():
    scripts = {"train", "evaluate", "demo"}
    offenders = {
        os.path.relpath(path, REPO): sorted(set(_imported_modules(path)) & scripts)
        for path in _python_files("ssd_post", "models", "training", "benchmarks")
    }
    assert {path: names for path, names in offenders.items() if names} == {}


# A copy of the pure-Python package whose compiled extension is missing or broken,
# imported in a fresh interpreter: the pure-Python parts must work and the first op
# call must say how to rebuild.
WITHOUT_EXTENSION = textwrap.dedent("""
    import sys

    # An editable install's finder would resolve ssd_post to the source tree.
    sys.meta_path = [
        f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")
    ]
    import torch
    import ssd_post
    from ssd_post import reference

    where = ssd_post.__file__
    assert "site-packages" not in where and "{root}" in where, where
    grids = [(3, 3), (2, 2), (2, 2), (1, 1), (1, 1), (1, 1)]
    anchors = ssd_post.DefaultBoxes.ssd300()((300, 300), grids)  # [A, 4]
    locs = torch.zeros(1, anchors.shape[0], 4)                                     # [B, A, 4]
    logits = torch.zeros(1, anchors.shape[0], 3)                                   # [B, A, C]
    logits[0, 0, 1] = 10.0
    boxes = ssd_post.BoxCoder().decode(locs[0], anchors)
    assert torch.allclose(boxes, anchors), "zero regressions should decode to the anchors"
    config = ssd_post.PostprocessConfig(score_thresh=0.5)
    result = reference.postprocess_loop(locs, logits, anchors, [(300, 300)], config)
    assert result.num_detections.tolist() == [1], result.num_detections
    assert ssd_post.has_cuda_kernels() is False
    for call in (lambda: ssd_post.postprocess(locs, logits, anchors, [(300, 300)], config),
                 lambda: ssd_post.batched_nms(boxes, logits[0, :, 1],
                                              torch.zeros(len(boxes), dtype=torch.long), 0.5)):
        try:
            call()
        except RuntimeError as error:
            print("ERROR:", error)
        else:
            raise AssertionError("an op ran without its extension")
""")


@pytest.mark.slow  # a fresh Python process per case
@pytest.mark.parametrize("broken", ["missing", "not_a_library"])
def test_a_missing_or_broken_extension_fails_at_the_first_op_call(tmp_path, broken):
    import shutil
    import sysconfig

    root = tmp_path / "copy"
    shutil.copytree(
        os.path.join(REPO, "ssd_post"),
        root / "ssd_post",
        ignore=shutil.ignore_patterns("_C*", "__pycache__"),
    )
    if broken == "not_a_library":  # what an extension built for another platform looks like
        (root / "ssd_post" / f"_C{sysconfig.get_config_var('EXT_SUFFIX')}").write_bytes(b"\0" * 64)
    script = WITHOUT_EXTENSION.replace("{root}", str(root))
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, PYTHONPATH=str(root)),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    errors = [line for line in result.stdout.splitlines() if line.startswith("ERROR:")]
    assert len(errors) == 2, result.stdout
    for line in errors:
        assert "ssd_post._C" in line and "pip install --no-build-isolation" in line, line
