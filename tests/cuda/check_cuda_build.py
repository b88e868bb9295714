"""After `make wheel-cuda`: the installed CUDA wheel of rmask_kernels imports under the CUDA
build of torch on a machine without a GPU, registers the CUDA kernels of every op, carries
device code for the requested architectures, and its metadata name the torch it needs.
Run from outside the source tree (so the installed package is the one imported) by
`make cuda-check`; with `--library PATH`, checks only that library's device code (the CMake
build's, `make cmake-check-cuda`)."""

import os
import re
import shutil
import subprocess
import sys
from importlib import metadata

import torch

OPS = ("rmask::masked_conv2d", "rmask::masked_conv2d_stats", "rmask::masked_conv2d_backward")


def required_architectures(arch_list):
    """'8.0;9.0+PTX' -> ({'sm_80', 'sm_90'}, {'sm_90'} with PTX)."""
    elf, ptx = set(), set()
    for arch in re.split(r"[;\s]+", arch_list.strip()):
        if not arch:
            continue
        name = "sm_" + arch.replace("+PTX", "").replace(".", "")
        elf.add(name)
        if arch.endswith("+PTX"):
            ptx.add(name)
    return elf, ptx


def find_cuobjdump():
    """CUDA_HOME's, else the PATH's, else the copy triton (a dependency of CUDA torch) ships."""
    candidates = [os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "cuobjdump"), shutil.which("cuobjdump")]
    try:
        import triton

        candidates.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))
    except ImportError:
        pass
    for path in candidates:
        if path and os.access(path, os.X_OK):
            return path
    raise FileNotFoundError(f"cuobjdump not found (looked at {candidates}): it lists the device code in the library")


def check_device_code(library):
    """The library holds machine code (SASS) and PTX for the TORCH_CUDA_ARCH_LIST it was built for."""
    cuobjdump = find_cuobjdump()
    elf = subprocess.run([cuobjdump, "--list-elf", library], check=True, capture_output=True, text=True).stdout
    ptx = subprocess.run([cuobjdump, "--list-ptx", library], check=True, capture_output=True, text=True).stdout
    want_elf, want_ptx = required_architectures(os.environ.get("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX"))
    have_elf = set(re.findall(r"sm_\d+a?", elf))
    have_ptx = set(re.findall(r"sm_\d+a?", ptx))
    assert want_elf <= have_elf, f"device code for {sorted(want_elf)} expected, {library} has {sorted(have_elf)}"
    assert want_ptx <= have_ptx, f"PTX for {sorted(want_ptx)} expected, {library} has {sorted(have_ptx)}"
    return have_elf, have_ptx


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "--library":  # only the device code of that library
        have_elf, have_ptx = check_device_code(sys.argv[2])
        print(f"{sys.argv[2]}: SASS {sorted(have_elf)}, PTX {sorted(have_ptx)}")
        return 0

    import rmask_kernels
    from rmask_kernels import ops

    here = os.path.dirname(os.path.abspath(__file__))
    source_tree = os.path.dirname(os.path.dirname(here))
    package_dir = os.path.dirname(os.path.abspath(rmask_kernels.__file__))
    assert package_dir != os.path.join(source_tree, "rmask_kernels"), f"imported the source tree, not the wheel: {package_dir}"
    assert ops.extension_loaded(), f"extension failed to load: {ops.EXTENSION_ERROR}"
    for op in OPS:
        for key in ("CUDA", "CPU"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(op, key), f"{op} has no {key} kernel"

    version = metadata.version("rmask_kernels")
    cuda_tag = "cu" + "".join(torch.version.cuda.split(".")[:2])
    minor = ".".join(torch.__version__.split(".")[:2])
    assert version.endswith(f"+{cuda_tag}torch{minor}"), version
    requires = [r for r in metadata.requires("rmask_kernels") or [] if "extra ==" not in r]
    assert f"torch=={minor}.*" in requires, requires

    library = next(
        os.path.join(package_dir, f) for f in os.listdir(package_dir) if f.startswith("_C") and f.endswith(".so")
    )
    assert library.endswith(".abi3.so"), library
    have_elf, have_ptx = check_device_code(library)
    print(
        f"CUDA build OK: rmask_kernels {version} (requires {', '.join(requires)}) from {package_dir};"
        f" torch {torch.__version__}, GPU visible: {torch.cuda.is_available()};"
        f" CUDA kernels registered for {len(OPS)} ops; SASS {sorted(have_elf)}, PTX {sorted(have_ptx)}"
    )


if __name__ == "__main__":
    sys.exit(main())
