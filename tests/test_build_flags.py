"""The compiler flags setup.py chooses, checked without building: setup.py is
imported as a module (it builds only when run as __main__)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from torch.utils import cpp_extension

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup_module():
    spec = importlib.util.spec_from_file_location("ssd_post_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _gencode(*archs: str) -> list:
    return sorted(f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs)


def _arch_flags(setup_module, monkeypatch, environ: dict) -> list:
    """The -gencode flags torch's cpp_extension adds to our nvcc flags, with the
    arch list setup.py sets from `environ`."""
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", setup_module.cuda_arch_list(environ))
    return cpp_extension._get_cuda_arch_flags(setup_module.nvcc_flags())


def test_default_archs_are_sm80_and_sm90(setup_module, monkeypatch):
    assert _arch_flags(setup_module, monkeypatch, {}) == _gencode("80", "90")
    assert _arch_flags(setup_module, monkeypatch, {"TORCH_CUDA_ARCH_LIST": ""}) == _gencode(
        "80", "90"
    )


@pytest.mark.parametrize(
    "arch_list, expected",
    [
        ("8.6", _gencode("86")),
        ("7.5 8.9", _gencode("75", "89")),
        ("9.0+PTX", _gencode("90") + ["-gencode=arch=compute_90,code=compute_90"]),
    ],
)
def test_torch_cuda_arch_list_is_honoured(setup_module, monkeypatch, arch_list, expected):
    flags = _arch_flags(setup_module, monkeypatch, {"TORCH_CUDA_ARCH_LIST": arch_list})
    assert sorted(flags) == sorted(expected)


@pytest.mark.parametrize("kind", ["unix", "msvc"])
def test_cxx20_is_passed_once_to_every_compiler(setup_module, kind):
    compile_flags, _ = setup_module.host_flags(kind)
    prefix = "/std:" if kind == "msvc" else "-std="
    assert [f for f in compile_flags if f.startswith(prefix)] == [f"{prefix}c++20"]
    nvcc = setup_module.nvcc_flags()
    assert [f for f in nvcc if f.startswith("-std=")] == ["-std=c++20"]
    # No FMA contraction on the host, none on the device either.
    assert ("-ffp-contract=off" in compile_flags) == (kind == "unix")
    assert "--fmad=false" in nvcc
