"""Builds lenserve._C from csrc/.

The CPU extension is always built. CUDA sources are added when nvcc and a CUDA build of torch
are present; LENSERVE_CUDA=0 or 1 forces the choice. LENSERVE_CPU_ARCH overrides the -march
flag (default: x86-64-v3 when the build machine has AVX2 and FMA, else the compiler default).
"""
import glob
import os
import platform
import shutil

from setuptools import setup

import torch
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _cpu_arch_flags() -> list[str]:
    arch = os.environ.get("LENSERVE_CPU_ARCH")
    if arch:
        return [f"-march={arch}"]
    if platform.machine() not in ("x86_64", "AMD64"):
        return []
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return []
    if " avx2" in flags and " fma" in flags and " f16c" in flags:
        return ["-march=x86-64-v3"]
    return []


def _want_cuda() -> bool:
    forced = os.environ.get("LENSERVE_CUDA")
    if forced is not None:
        return forced == "1"
    return torch.version.cuda is not None and shutil.which("nvcc") is not None


def _rel(paths):
    return sorted(os.path.relpath(p, ROOT) for p in paths)


def extensions():
    sources = _rel(glob.glob(os.path.join(ROOT, "csrc", "*.cpp")) + glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))
    cxx = ["-O3", "-fopenmp", "-fno-math-errno", *_cpu_arch_flags()]
    include_dirs = [os.path.join(ROOT, "csrc")]
    if _want_cuda():
        sources += _rel(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")) + glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cpp")))
        arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list
        nvcc = ["-O3", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr"]
        return [
            CUDAExtension(
                "lenserve._C",
                sources,
                include_dirs=include_dirs,
                define_macros=[("LENSERVE_WITH_CUDA", "1")],
                extra_compile_args={"cxx": cxx, "nvcc": nvcc},
                extra_link_args=["-fopenmp"],
            )
        ]
    return [
        CppExtension(
            "lenserve._C",
            sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx},
            extra_link_args=["-fopenmp"],
        )
    ]


setup(ext_modules=extensions(), cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)})
