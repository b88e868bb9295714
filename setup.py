"""Builds rmask_kernels._C: the rmask op schemas, the CPU kernels and, with a CUDA build of
torch (or FORCE_CUDA=1), the CUDA kernels.

The extension reaches torch only through LibTorch's stable ABI (csrc/torch_stable.h), built with
TORCH_TARGET_VERSION set to torch_target() (every other torch header is then an error), and through
the limited Python API. So one cp310-abi3 wheel serves every Python >= 3.10 and every torch from
that release on: the version's local tag names only the device, `+cpu` or the CUDA major
(`+cu13`), and the wheel requires `torch>=` it. A CUDA wheel still needs a torch built
for the same CUDA major (the CUDA runtime is torch's). Those rules are the small functions below
(tests/test_wheel_version.py).

Environment: TORCH_CUDA_ARCH_LIST (default "8.0;9.0+PTX": A100, H100, and PTX for newer GPUs),
FORCE_CUDA=1, DEBUG=1, RMASK_BUILD_BASE (the build folder, default "build": the Makefile gives
each torch its own, so a CPU and a CUDA build never share object files).
"""

import glob
import os
import re

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
# The limited Python API's floor: torch.utils.cpp_extension compiles a py_limited_api extension
# with -DPy_LIMITED_API for its own oldest CPython (3.10), which torch >= 2.11 needs anyway, so
# the wheel's tag says the same.
ABI3_TAG = "cp310"
DEFAULT_CUDA_ARCH_LIST = "8.0;9.0+PTX"


def base_version():
    """The package version without local tag, from rmask_kernels/__init__.py (one source)."""
    with open(os.path.join(ROOT, "rmask_kernels", "__init__.py")) as f:
        return re.search(r'^__version__ = "([^"]+)"', f.read(), re.M).group(1)


def torch_target():
    """The oldest torch whose stable ABI has what the extension uses, (major, minor), from
    rmask_kernels/torch_target.py (one source; the package refuses an older torch at import)."""
    with open(os.path.join(ROOT, "rmask_kernels", "torch_target.py")) as f:
        major, minor = re.search(r"^TORCH_TARGET = \((\d+), (\d+)\)", f.read(), re.M).groups()
    return int(major), int(minor)


def torch_target_version_macro(target=None):
    """The TORCH_TARGET_VERSION value for (major, minor): major in bits 56-63, minor in 48-55."""
    major, minor = target or torch_target()
    return f"0x{(major << 56) | (minor << 48):016x}"


def local_version_tag(cuda_version):
    """The local version label naming the build's device: 'cu13' for CUDA 13.x, 'cpu' without
    CUDA (cuda_version None). Not the torch: the stable ABI serves every torch >= torch_target()."""
    if cuda_version:
        return "cu" + cuda_version.split(".")[0]
    return "cpu"


def package_version(cuda_version, base=None):
    """'0.1.0+cu13', '0.1.0+cpu'."""
    return f"{base or base_version()}+{local_version_tag(cuda_version)}"


def torch_requirement(target=None):
    """'torch>=2.11': every torch release from the stable-ABI target on (PEP 440 ignores torch's
    local label, '+cu130', in that match)."""
    major, minor = target or torch_target()
    return f"torch>={major}.{minor}"


def cuda_requested(torch_module):
    # Gate on the torch build, never on whether a GPU is visible (build machines have none).
    return torch_module.version.cuda is not None or os.environ.get("FORCE_CUDA", "0") == "1"


def add_pip_cuda_headers(cuda_home):
    """ATen's CUDA headers include cuBLAS/cuSPARSE headers, which a bare nvcc toolkit may lack
    and the CUDA build of torch's pip packages (nvidia-*) carry: add those to CPATH (searched
    after -I, so a full toolkit's own headers win). Returns the folder added, or None."""
    if cuda_home and os.path.exists(os.path.join(cuda_home, "include", "cusparse.h")):
        return None
    try:
        import nvidia
    except ImportError:
        return None
    for base in nvidia.__path__:
        for folder in sorted(glob.glob(os.path.join(base, "cu*", "include"))):
            if os.path.exists(os.path.join(folder, "cusparse.h")):
                paths = [p for p in os.environ.get("CPATH", "").split(os.pathsep) if p]
                if folder not in paths:
                    os.environ["CPATH"] = os.pathsep.join(paths + [folder])
                return folder
    return None


def extensions(torch_module, use_cuda):
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    debug = os.environ.get("DEBUG", "0") == "1"
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    # No -std here: torch.utils.cpp_extension adds the standard this torch's headers need
    # (C++20 since torch 2.14). Hidden visibility: the library exports PyInit__C only (its ops
    # register themselves when it loads), so nothing of it can clash with another library.
    # Threads come from torch's own pool (torch::stable::parallel_for): no OpenMP flags here.
    target = f"-DTORCH_TARGET_VERSION={torch_target_version_macro()}"
    cxx_flags = ["-O0" if debug else "-O3", target, "-fvisibility=hidden"]
    kwargs = dict(extra_compile_args={"cxx": cxx_flags}, py_limited_api=True)
    if use_cuda:
        kwargs["extra_compile_args"]["nvcc"] = ["-O0" if debug else "-O3", "-lineinfo", target,
                                                "-Xcompiler", "-fvisibility=hidden"]
        cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        return [CUDAExtension(name="rmask_kernels._C", sources=sources + cuda_sources, **kwargs)], cxx_flags
    return [CppExtension(name="rmask_kernels._C", sources=sources, **kwargs)], cxx_flags


def main():
    import torch
    from torch.utils.cpp_extension import BuildExtension

    use_cuda = cuda_requested(torch)
    cuda_home = pip_headers = None
    if use_cuda:
        # Read by torch.utils.cpp_extension; without it, it would ask a GPU (there may be none).
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCH_LIST)
        from torch.utils.cpp_extension import CUDA_HOME as cuda_home

        pip_headers = add_pip_cuda_headers(cuda_home)
    cuda_version = torch.version.cuda if use_cuda else None
    version = package_version(cuda_version)
    requirement = torch_requirement()
    ext_modules, cxx_flags = extensions(torch, use_cuda)
    build_base = os.environ.get("RMASK_BUILD_BASE", "build")
    print(
        f"rmask_kernels build: version {version}, requires {requirement};"
        f" torch {torch.__version__}, cuda={'yes' if use_cuda else 'no'}"
        f" (torch.version.cuda={torch.version.cuda}, FORCE_CUDA={os.environ.get('FORCE_CUDA', '0')},"
        f" CUDA_HOME={cuda_home}, pip CUDA headers={pip_headers}),"
        f" TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST', '-') if use_cuda else '-'},"
        f" debug={os.environ.get('DEBUG', '0') == '1'}, TORCH_TARGET_VERSION={torch_target_version_macro()},"
        f" sources={len(ext_modules[0].sources)}, build_base={build_base}"
    )
    setup(
        version=version,
        install_requires=[requirement, "numpy", "tqdm"],
        packages=find_packages(include=["rmask_kernels", "rmask_kernels.*"]),
        ext_modules=ext_modules,
        cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
        options={"build": {"build_base": build_base}, "bdist_wheel": {"py_limited_api": ABI3_TAG}},
    )


# Imported (tests/test_wheel_version.py) it only defines the functions above.
if __name__ == "__main__":
    main()
