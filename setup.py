"""Builds the compiled extension ssd_post._C; all metadata lives in pyproject.toml.

The CUDA kernels are compiled wherever nvcc is found, GPU or not. The CUDA headers
and libraries that torch's own CUDA headers include (cusparse, cublas, ...) may come
only from the pip `nvidia` packages that torch depends on, so their include and lib
folders are added here.
"""

import glob
import os
import platform
import re
import shutil
import subprocess
import sys
import sysconfig

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
CUDA_ARCHS = ("80", "90")


def _sources(pattern: str) -> list:
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _find_nvcc():
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if cuda_home and os.path.exists(os.path.join(cuda_home, "bin", "nvcc")):
        return os.path.join(cuda_home, "bin", "nvcc")
    return shutil.which("nvcc")


def _toolkit_root(nvcc: str) -> str:
    """The CUDA toolkit that `nvcc` belongs to.

    nvcc on PATH may be a wrapper script (e.g. /usr/local/bin/nvcc that execs the
    real one), in which case its parent folder is no toolkit; nvcc itself reports
    its root as TOP in a dry run.
    """
    guess = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    if os.path.exists(os.path.join(guess, "include", "cuda_runtime.h")):
        return guess
    try:
        dry_run = subprocess.run(
            [nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
            capture_output=True,
            text=True,
            timeout=60,
        )
        match = re.search(r"^#\$ TOP=(.+)$", dry_run.stdout + dry_run.stderr, re.MULTILINE)
        if match:
            return os.path.realpath(match.group(1).strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return guess


def _pip_nvidia_dirs():
    """include/ and lib/ folders of the pip `nvidia` CUDA packages, if installed."""
    includes, libs = [], []
    site = sysconfig.get_paths()["purelib"]
    for root in sorted(glob.glob(os.path.join(site, "nvidia", "*"))):
        if os.path.isdir(os.path.join(root, "include")):
            includes.append(os.path.join(root, "include"))
        if os.path.isdir(os.path.join(root, "lib")):
            libs.append(os.path.join(root, "lib"))
    return includes, libs


def _cudart_link_dir(cuda_home: str, pip_libs: list):
    """A folder with a linkable libcudart.so when the toolkit has none.

    torch links CUDA extensions with -lcudart; a partial toolkit may lack the
    unversioned libcudart.so that the pip runtime package ships only as
    libcudart.so.<major>. A link in build/ makes it linkable.
    """
    for sub in ("lib64", "lib", os.path.join("targets", "x86_64-linux", "lib")):
        if os.path.exists(os.path.join(cuda_home, sub, "libcudart.so")):
            return None
    for lib in pip_libs:
        versioned = sorted(glob.glob(os.path.join(lib, "libcudart.so.*")))
        if versioned:
            link_dir = os.path.join(ROOT, "build", "cudart_link")
            os.makedirs(link_dir, exist_ok=True)
            link = os.path.join(link_dir, "libcudart.so")
            if os.path.lexists(link):
                os.remove(link)
            os.symlink(versioned[0], link)
            return link_dir
    return None


def _build_plan():
    """(with_cuda, reason, nvcc); decided before torch's cpp_extension is imported,
    because that module fixes CUDA_HOME when it is first imported."""
    cuda_sources = _sources("csrc/cuda/*.cu")
    if os.environ.get("SSD_POST_FORCE_CPU"):
        return False, "SSD_POST_FORCE_CPU is set", None
    nvcc = _find_nvcc()
    if not nvcc:
        return False, "nvcc not found", None
    if not cuda_sources:
        return False, "no CUDA sources", None
    os.environ.setdefault("CUDA_HOME", _toolkit_root(nvcc))
    return True, "", nvcc


WITH_CUDA, CPU_ONLY_REASON, NVCC = _build_plan()

from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


# vector_kernels.cpp is compiled a second time with these flags on x86 (see
# csrc/cpu/vector_kernels.h); the CPU picks the variant at run time.
VECTOR_SOURCE = "csrc/cpu/vector_kernels.cpp"
AVX2_FLAGS = {
    "unix": ["-mavx2", "-mfma", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
    "msvc": ["/arch:AVX2", "/DCPU_CAPABILITY=AVX2", "/DCPU_CAPABILITY_AVX2"],
}
# The op library uses no Python API (csrc/ssd_post.cpp): declaring it limited-API
# keeps torch from linking libtorch_python, so C++ programs can load it.
PY_LIMITED_API = True
WITH_AVX2_VARIANT = platform.machine().lower() in ("x86_64", "amd64")


# Host compiler flags (compile, link) by compiler kind, chosen when the compiler is
# known. No FMA contraction: CPU boxes and IoUs must round like torchvision's
# separate ops (MSVC's /fp:precise contracts only with /fp:contract). at::parallel_for
# is inline OpenMP: without OpenMP it would run serially.
HOST_FLAGS = {
    "unix": (["-O3", "-fopenmp", "-ffp-contract=off", "-Wno-unknown-pragmas"], ["-fopenmp"]),
    "msvc": (["/O2", "/openmp", "/fp:precise"], []),
}


class BuildWithVectorVariants(BuildExtension):
    """torch's BuildExtension, with the host flags of the compiler in use and the
    AVX2 compilation of VECTOR_SOURCE.

    setuptools gives every source of an extension the same flags, so the second
    compilation of the one file goes to its own object folder and is linked in as
    an extra object, the way ATen builds its per-CPU-capability kernels.
    """

    def build_extensions(self):
        compile_flags, link_flags = HOST_FLAGS[self._compiler_kind()]
        for ext in self.extensions:
            ext.extra_compile_args["cxx"] = list(compile_flags)
            ext.extra_link_args = list(link_flags)
        super().build_extensions()

    def _compiler_kind(self) -> str:
        return "msvc" if self.compiler.compiler_type == "msvc" else "unix"

    def build_extension(self, ext):
        if WITH_AVX2_VARIANT:
            flags = AVX2_FLAGS[self._compiler_kind()]
            args = dict(ext.extra_compile_args)
            args["cxx"] = list(args["cxx"]) + flags
            objects = self.compiler.compile(
                [VECTOR_SOURCE],
                output_dir=os.path.join(self.build_temp, "avx2"),
                macros=ext.define_macros,
                include_dirs=ext.include_dirs,
                debug=self.debug,
                extra_postargs=args,
                depends=ext.depends,
            )
            ext.extra_objects = list(ext.extra_objects or []) + objects
        super().build_extension(ext)


def _extension():
    cpp_sources = ["csrc/ssd_post.cpp"] + _sources("csrc/cpu/*.cpp")
    # Replaced by the flags of the compiler in use (BuildWithVectorVariants).
    cxx_flags, link_flags = HOST_FLAGS["unix"]
    macros = [("SSD_POST_HAVE_AVX2_KERNELS", "1")] if WITH_AVX2_VARIANT else []
    if not WITH_CUDA:
        print(f"ssd_post: building CPU-only extension ({CPU_ONLY_REASON})", file=sys.stderr)
        return CppExtension(
            "ssd_post._C",
            cpp_sources,
            define_macros=macros,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_flags,
            py_limited_api=PY_LIMITED_API,
        )

    cuda_home = os.environ["CUDA_HOME"]
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", ";".join(f"{a[0]}.{a[1]}" for a in CUDA_ARCHS))
    pip_includes, pip_libs = _pip_nvidia_dirs()
    # The toolkit's own headers first; the pip packages fill in what it lacks.
    includes = [os.path.join(cuda_home, "include")] + pip_includes
    libs = list(pip_libs)
    link_dir = _cudart_link_dir(cuda_home, pip_libs)
    if link_dir:
        libs.insert(0, link_dir)
    nvcc_flags = [
        "-O3",
        "--expt-relaxed-constexpr",
        # Decode and IoU must round like torchvision's separate elementwise ops.
        "--fmad=false",
    ] + [f"-gencode=arch=compute_{a},code=sm_{a}" for a in CUDA_ARCHS]
    print(
        f"ssd_post: building with CUDA kernels for sm_{', sm_'.join(CUDA_ARCHS)} "
        f"(nvcc: {NVCC}, CUDA_HOME: {cuda_home})",
        file=sys.stderr,
    )
    return CUDAExtension(
        "ssd_post._C",
        cpp_sources + _sources("csrc/cuda/*.cu"),
        include_dirs=includes,
        library_dirs=libs,
        runtime_library_dirs=pip_libs,
        define_macros=macros + [("SSD_POST_WITH_CUDA", "1")],
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        extra_link_args=link_flags,
        py_limited_api=PY_LIMITED_API,
    )


setup(ext_modules=[_extension()], cmdclass={"build_ext": BuildWithVectorVariants})
