"""Builds tests/cuda/host_emulation.cu with nvcc against the installed (CUDA) torch, into
build/cuda-emulation/ (incremental: ninja), and records the torch it was built for, so
test_host_emulation.py loads it only into that torch. Run by `make cuda-check`."""

import importlib.util
import os
import sys

import torch
from torch.utils.cpp_extension import load

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
BUILD = os.path.join(ROOT, "build", "cuda-emulation")
NAME = "rmask_cuda_emulation"


def torch_target_version_macro():
    """setup.py's TORCH_TARGET_VERSION (imported under another name, setup.py only defines its
    functions), so the emulation is built against the same stable ABI as the extension."""
    spec = importlib.util.spec_from_file_location("rmask_setup", os.path.join(ROOT, "setup.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.torch_target_version_macro()


def main():
    if torch.version.cuda is None:
        sys.exit("build_host_emulation.py needs a CUDA build of torch (make cuda-check sets up .venv-cuda)")
    os.makedirs(BUILD, exist_ok=True)
    # Host code only runs; no device code is instantiated (no kernel is launched in this file),
    # so one architecture is enough for nvcc to parse the device side too.
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0")
    load(
        name=NAME,
        sources=[os.path.join(HERE, "host_emulation.cu")],
        extra_include_paths=[os.path.join(ROOT, "csrc")],
        extra_cuda_cflags=["-O2", f"-DTORCH_TARGET_VERSION={torch_target_version_macro()}"],
        build_directory=BUILD,
        is_python_module=False,
        verbose=False,
    )
    with open(os.path.join(BUILD, "torch_version.txt"), "w") as f:
        f.write(torch.__version__)
    print(f"host emulation built: {os.path.join(BUILD, NAME + '.so')} (torch {torch.__version__})")


if __name__ == "__main__":
    main()
