"""Builds the compiled extension ssd_post._C; all metadata lives in pyproject.toml.

The CUDA kernels are compiled wherever nvcc is found, GPU or not, for the GPUs that
TORCH_CUDA_ARCH_LIST names (sm_80 and sm_90 when it is unset). The CUDA headers
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
# The GPUs the CUDA kernels are built for when TORCH_CUDA_ARCH_LIST is not set:
# A100 (sm_80) and H100 (sm_90), in torch's TORCH_CUDA_ARCH_LIST syntax.
DEFAULT_CUDA_ARCHS = "8.0;9.0"
# std::bit_cast (common/rank_keys.h), and torch's own headers, need C++20. Passed
# here for the host compiler and nvcc alike; torch's BuildExtension then adds no
# -std of its own (it only appends one when none is given).
CXX_STANDARD = "c++20"


def cuda_arch_list(environ) -> str:
    """The CUDA architectures to build for: TORCH_CUDA_ARCH_LIST when it is set
    (torch's syntax: "8.6", "8.0;9.0+PTX", "Ampere", "native"), else
    DEFAULT_CUDA_ARCHS. torch's cpp_extension turns the list into -gencode flags,
    which is why nvcc_flags() holds none."""
    return environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_CUDA_ARCHS


def nvcc_flags() -> list:
    """nvcc's flags besides the architectures. No flag may mention "arch": torch
    then skips TORCH_CUDA_ARCH_LIST and adds no -gencode at all."""
    return [
        "-O3",
        f"-std={CXX_STANDARD}",
        "--expt-relaxed-constexpr",
        # Decode and IoU must round like torchvision's separate elementwise ops.
        "--fmad=false",
    ]


def host_flags(compiler_kind: str) -> tuple:
    """(compile, link) flags of the host compiler, "unix" (gcc, clang) or "msvc".
    No FMA contraction: CPU boxes and IoUs must round like torchvision's separate
    ops (MSVC's /fp:precise contracts only with /fp:contract). at::parallel_for is
    inline OpenMP: without OpenMP it would run serially."""
    if compiler_kind == "msvc":
        return [f"/std:{CXX_STANDARD}", "/O2", "/openmp", "/fp:precise"], []
    return [
        f"-std={CXX_STANDARD}",
        "-O3",
        "-fopenmp",
        "-ffp-contract=off",
        "-Wno-unknown-pragmas",
    ], ["-fopenmp"]


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


def _build_command(build_extension_base):
    """The build_ext command on top of torch's BuildExtension, passed in because
    torch's cpp_extension may be imported only once CUDA_HOME is settled."""

    class BuildWithVectorVariants(build_extension_base):
        """torch's BuildExtension, with the host flags of the compiler in use and the
        AVX2 compilation of VECTOR_SOURCE.

        setuptools gives every source of an extension the same flags, so the second
        compilation of the one file goes to its own object folder and is linked in as
        an extra object, the way ATen builds its per-CPU-capability kernels.
        """

        def build_extensions(self):
            compile_flags, link_flags = host_flags(self._compiler_kind())
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

    return BuildWithVectorVariants


def _extension(with_cuda: bool, cpu_only_reason: str, nvcc):
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    cpp_sources = (
        ["csrc/ssd_post.cpp"] + _sources("csrc/cpu/*.cpp") + _sources("csrc/composite/*.cpp")
    )
    # Replaced by the flags of the compiler in use (BuildWithVectorVariants).
    cxx_flags, link_flags = host_flags("unix")
    macros = [("SSD_POST_HAVE_AVX2_KERNELS", "1")] if WITH_AVX2_VARIANT else []
    if not with_cuda:
        print(f"ssd_post: building CPU-only extension ({cpu_only_reason})", file=sys.stderr)
        return CppExtension(
            "ssd_post._C",
            cpp_sources,
            define_macros=macros,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_flags,
            py_limited_api=PY_LIMITED_API,
        )

    cuda_home = os.environ["CUDA_HOME"]
    os.environ["TORCH_CUDA_ARCH_LIST"] = cuda_arch_list(os.environ)
    pip_includes, pip_libs = _pip_nvidia_dirs()
    # The toolkit's own headers first; the pip packages fill in what it lacks.
    includes = [os.path.join(cuda_home, "include")] + pip_includes
    libs = list(pip_libs)
    link_dir = _cudart_link_dir(cuda_home, pip_libs)
    if link_dir:
        libs.insert(0, link_dir)
    print(
        f"ssd_post: building with CUDA kernels for TORCH_CUDA_ARCH_LIST="
        f"{os.environ['TORCH_CUDA_ARCH_LIST']} (nvcc: {nvcc}, CUDA_HOME: {cuda_home})",
        file=sys.stderr,
    )
    return CUDAExtension(
        "ssd_post._C",
        cpp_sources + _sources("csrc/cuda/*.cu"),
        include_dirs=includes,
        library_dirs=libs,
        runtime_library_dirs=pip_libs,
        define_macros=macros + [("SSD_POST_WITH_CUDA", "1")],
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags()},
        extra_link_args=link_flags,
        py_limited_api=PY_LIMITED_API,
    )


def main():
    # Decided before torch's cpp_extension is imported, which fixes CUDA_HOME when
    # it is first imported.
    with_cuda, cpu_only_reason, nvcc = _build_plan()
    from torch.utils.cpp_extension import BuildExtension

    setup(
        ext_modules=[_extension(with_cuda, cpu_only_reason, nvcc)],
        cmdclass={"build_ext": _build_command(BuildExtension)},
    )


# setuptools runs this file as __main__ (setup.py build_ext, pip's build backend);
# tests import it for the flag functions above without building anything.
if __name__ == "__main__":
    main()
