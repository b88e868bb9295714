"""After `make wheel-cuda`: the installed CUDA wheel of rmask_kernels imports under the CUDA
build of torch on a machine without a GPU, registers the CUDA kernels of every op, carries
device code for the requested architectures, references torch only through the stable C
shim (no C++ symbol of ATen, c10 or torch), and its metadata carry setup.py's version tag and
torch requirement.
Run from outside the source tree (so the installed package is the one imported) by
`make cuda-check`; with `--library PATH`, checks only that library's device code and symbols
(the CMake build's, `make cmake-check-cuda`)."""

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from importlib import metadata

import torch

OPS = ("rmask::masked_conv2d", "rmask::masked_conv2d_stats", "rmask::masked_conv2d_backward")
SOURCE_TREE = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def setup_py():
    """The source tree's setup.py (imported under another name, it only defines its functions):
    the version tag and torch requirement the wheel must carry are its rules."""
    spec = importlib.util.spec_from_file_location("rmask_setup", os.path.join(SOURCE_TREE, "setup.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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


def check_stable_abi_only(library):
    """The library's undefined symbols name no C++ function of ATen, c10 or torch: it reaches
    torch through the stable C shim only, so it loads in every torch from its target on."""
    symbols = subprocess.run(["nm", "-D", "-C", "--undefined-only", library], check=True, capture_output=True,
                             text=True).stdout
    unstable = [line.split(None, 1)[-1] for line in symbols.splitlines() if re.search(r"\b(at|c10|torch)::", line)]
    assert not unstable, f"{library} uses torch's C++ ABI, not only its stable C shim: {unstable[:10]}"


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "--library":  # only the device code and symbols of that library
        have_elf, have_ptx = check_device_code(sys.argv[2])
        check_stable_abi_only(sys.argv[2])
        print(f"{sys.argv[2]}: SASS {sorted(have_elf)}, PTX {sorted(have_ptx)}, stable ABI only")
        return 0

    import rmask_kernels
    from rmask_kernels import ops

    package_dir = os.path.dirname(os.path.abspath(rmask_kernels.__file__))
    assert package_dir != os.path.join(SOURCE_TREE, "rmask_kernels"), f"imported the source tree, not the wheel: {package_dir}"
    assert ops.extension_loaded(), f"extension failed to load: {ops.EXTENSION_ERROR}"
    for op in OPS:
        for key in ("CUDA", "CPU"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(op, key), f"{op} has no {key} kernel"

    rules = setup_py()
    version = metadata.version("rmask_kernels")
    assert version == rules.package_version(torch.version.cuda), version  # '0.1.0+cu13'
    requires = [r for r in metadata.requires("rmask_kernels") or [] if "extra ==" not in r]
    assert rules.torch_requirement() in requires, requires  # 'torch>=2.11'

    library = next(
        os.path.join(package_dir, f) for f in os.listdir(package_dir) if f.startswith("_C") and f.endswith(".so")
    )
    assert library.endswith(".abi3.so"), library
    have_elf, have_ptx = check_device_code(library)
    check_stable_abi_only(library)
    print(
        f"CUDA build OK: rmask_kernels {version} (requires {', '.join(requires)}) from {package_dir};"
        f" torch {torch.__version__}, GPU visible: {torch.cuda.is_available()};"
        f" CUDA kernels registered for {len(OPS)} ops; SASS {sorted(have_elf)}, PTX {sorted(have_ptx)};"
        f" stable ABI only"
    )


if __name__ == "__main__":
    sys.exit(main())
