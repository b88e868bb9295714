"""Builds rmask_kernels._C: the rmask op schemas, the CPU kernels and, with a CUDA build of
torch (or FORCE_CUDA=1), the CUDA kernels. Uses only ATen/torch::library headers and the
limited Python API, so one abi3 wheel serves every Python >= 3.9 for a given torch."""

import glob
import os
import sys

from setuptools import find_packages, setup

import torch
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))
PY_LIMITED_API = "0x03090000"  # CPython 3.9


def cuda_requested():
    # Gate on the torch build, never on whether a GPU is visible (build machines have none).
    return torch.version.cuda is not None or os.environ.get("FORCE_CUDA", "0") == "1"


def extensions():
    debug = os.environ.get("DEBUG", "0") == "1"
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    cxx_flags = ["-O0" if debug else "-O3", "-std=c++17", f"-DPy_LIMITED_API={PY_LIMITED_API}"]
    # at::parallel_for is a header template over `#pragma omp parallel` (torch's OpenMP
    # build): compiled without OpenMP it silently runs every kernel on one thread. The
    # libgomp it links is the one torch already loaded (same soname).
    link_flags = []
    if sys.platform.startswith("linux") and torch.backends.openmp.is_available():
        cxx_flags.append("-fopenmp")
        link_flags.append("-fopenmp")
    kwargs = dict(extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags, py_limited_api=True)
    use_cuda = cuda_requested()
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    if use_cuda and cuda_sources:
        kwargs["extra_compile_args"]["nvcc"] = ["-O3", "-lineinfo"]
        extension = CUDAExtension(name="rmask_kernels._C", sources=sources + cuda_sources, **kwargs)
    else:
        extension = CppExtension(name="rmask_kernels._C", sources=sources, **kwargs)
    print(
        f"rmask_kernels build: torch {torch.__version__}, cuda={'yes' if use_cuda and cuda_sources else 'no'}"
        f" (torch.version.cuda={torch.version.cuda}, FORCE_CUDA={os.environ.get('FORCE_CUDA', '0')}),"
        f" TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST', '<torch default>')}, debug={debug},"
        f" openmp={'-fopenmp' in cxx_flags},"
        f" sources={len(extension.sources)}"
    )
    return [extension]


setup(
    packages=find_packages(include=["rmask_kernels", "rmask_kernels.*"]),
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    options={"bdist_wheel": {"py_limited_api": "cp39"}},
)
