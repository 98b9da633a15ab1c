"""Builds the compiled extension ssd_post._C; all metadata lives in pyproject.toml.

The CUDA kernels are compiled wherever nvcc is found, GPU or not. The CUDA headers
and libraries that torch's own CUDA headers include (cusparse, cublas, ...) may come
only from the pip `nvidia` packages that torch depends on, so their include and lib
folders are added here.
"""
import glob
import os
import shutil
import sys
import sysconfig

from setuptools import setup

from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))
CUDA_ARCHS = ("80", "90")


def _sources(pattern: str) -> list:
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _find_nvcc():
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if cuda_home and os.path.exists(os.path.join(cuda_home, "bin", "nvcc")):
        return os.path.join(cuda_home, "bin", "nvcc")
    return shutil.which("nvcc")


def _pip_nvidia_dirs():
    """include/ and lib/ folders of the pip `nvidia` CUDA packages, if installed."""
    includes, libs = [], []
    site = sysconfig.get_paths()["purelib"]
    for root in glob.glob(os.path.join(site, "nvidia", "*")):
        if os.path.isdir(os.path.join(root, "include")):
            includes.append(os.path.join(root, "include"))
        if os.path.isdir(os.path.join(root, "lib")):
            libs.append(os.path.join(root, "lib"))
    return includes, libs


def _extension():
    cpp_sources = ["csrc/ssd_post.cpp"] + _sources("csrc/cpu/*.cpp")
    cuda_sources = _sources("csrc/cuda/*.cu")
    cxx_flags = ["-O3", "-fopenmp"]
    # at::parallel_for is inline OpenMP: without -fopenmp it would run serially.
    link_flags = ["-fopenmp"]
    nvcc = _find_nvcc()
    if os.environ.get("SSD_POST_FORCE_CPU") or not nvcc or not cuda_sources:
        reason = "SSD_POST_FORCE_CPU is set" if os.environ.get("SSD_POST_FORCE_CPU") else (
            "nvcc not found" if not nvcc else "no CUDA sources")
        print(f"ssd_post: building CPU-only extension ({reason})", file=sys.stderr)
        return CppExtension(
            "ssd_post._C", cpp_sources,
            extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags,
            py_limited_api=False,
        )

    os.environ.setdefault("CUDA_HOME", os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", ";".join(f"{a[0]}.{a[1]}" for a in CUDA_ARCHS))
    includes, libs = _pip_nvidia_dirs()
    nvcc_flags = [
        "-O3", "--expt-relaxed-constexpr",
        # Decode and IoU must round like torchvision's separate elementwise ops.
        "--fmad=false",
    ] + [f"-gencode=arch=compute_{a},code=sm_{a}" for a in CUDA_ARCHS]
    print(f"ssd_post: building with CUDA kernels (nvcc: {nvcc})", file=sys.stderr)
    return CUDAExtension(
        "ssd_post._C", cpp_sources + cuda_sources,
        include_dirs=includes,
        library_dirs=libs,
        runtime_library_dirs=libs,
        define_macros=[("SSD_POST_WITH_CUDA", "1")],
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        extra_link_args=link_flags,
    )


setup(ext_modules=[_extension()], cmdclass={"build_ext": BuildExtension})
