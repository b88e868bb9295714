"""The backends the parity suite (tests/test_parity.py) runs the op's contract on.

Each backend is one entry of BACKENDS: adding a backend adds an entry, not a test file. Every
one is reached through the public ``rk.masked_conv2d`` (argument handling, autograd, fake
kernels: the path users take) with its backend named explicitly; a fallback to the reference
path fails the test instead of passing it on the oracle's values. Op-level tests (opcheck, the
backward op) reach each backend's ops through ``op``.

- reference: the oracle path itself (F.conv2d * mask), as users get it.
- cpu: the C++ CPU kernels (csrc/cpu). On an AVX-512 CPU the suite runs them again on the
  AVX2 kernels, in a process with ATEN_CPU_CAPABILITY=avx2 (test_parity.py).
- triton: the Triton kernels on CUDA tensors, or on CPU tensors in Triton's interpreter
  (TRITON_INTERPRET=1, set by conftest.py before anything imports them).
- cuda: the CUDA C++ kernels (csrc/cuda) on a GPU; marked ``cuda``, skipped without one.
- cuda-emulation: the CUDA kernels' op bodies and element functions run on the host
  (tests/cuda/host_emulation.cu, built by ``make cuda-check``): their arithmetic, not launches.
"""

import contextlib
import os
import warnings

import pytest
import torch

import rmask_kernels as rk
from rmask_kernels import functional, ops

FALLBACK_WARNING = "rmask_kernels: backend="
EMULATION_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "build", "cuda-emulation")
EMULATION_LIBRARY = os.environ.get("RMASK_CUDA_EMULATION", os.path.join(EMULATION_DIR, "rmask_cuda_emulation.so"))


def load_cuda_emulation():
    """None if the host emulation of the CUDA kernels is loaded (and its ops registered like the
    rmask ops), else why not: it is tied to the torch it was built against."""
    version_file = os.path.join(os.path.dirname(EMULATION_LIBRARY), "torch_version.txt")
    if not os.path.exists(EMULATION_LIBRARY) or not os.path.exists(version_file):
        return f"{EMULATION_LIBRARY} not built (make cuda-check builds it)"
    with open(version_file) as f:
        built_for = f.read().strip()
    if built_for != torch.__version__:
        return f"built for torch {built_for}, this is torch {torch.__version__}"
    if not ops.extension_loaded():
        return "the rmask extension is not loaded (the emulation is served through its CPU route)"
    if not hasattr(torch.ops.rmask_cuda_emulation, "masked_conv2d"):
        torch.ops.load_library(EMULATION_LIBRARY)
        ops.register_op_family("rmask_cuda_emulation", "")
    return None


class BackendUnderTest:
    def __init__(self, name, device, dtypes, low_precision, why_not=None, marks=(), route=None,
                 namespace="rmask", prefix=""):
        self.name, self.device, self.dtypes, self.low_precision = name, device, dtypes, low_precision
        self.why_not, self.marks = why_not, marks
        self.route = route or name  # the backend= that rk.masked_conv2d is given
        self.namespace, self.prefix = namespace, prefix

    def __repr__(self):
        return self.name

    @contextlib.contextmanager
    def _serving(self):
        if self.namespace == "rmask":
            yield
            return
        family = getattr(torch.ops, self.namespace)
        saved = functional.KERNEL_OPS.get(self.route)
        functional.KERNEL_OPS[self.route] = (family.masked_conv2d, family.masked_conv2d_stats)
        try:
            yield
        finally:
            if saved is None:
                functional.KERNEL_OPS.pop(self.route, None)
            else:
                functional.KERNEL_OPS[self.route] = saved

    def __call__(self, *args, **kwargs):
        """rk.masked_conv2d on this backend; a fallback to the reference path is an error."""
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=FALLBACK_WARNING)
            with self._serving():
                return rk.masked_conv2d(*args, backend=self.route, **kwargs)

    def op(self, name):
        """The backend's own op ``name`` (masked_conv2d, masked_conv2d_stats, masked_conv2d_backward)."""
        return getattr(getattr(torch.ops, self.namespace), self.prefix + name)

    def to(self, *tensors):
        return tuple(t.to(self.device) if t is not None else None for t in tensors)


def _available(name):
    return name in rk.available_backends()


_TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
_EMULATION = load_cuda_emulation()
LOW = (torch.bfloat16, torch.float16)

BACKENDS = [
    BackendUnderTest("reference", "cpu", (torch.float64, torch.float32), LOW),
    BackendUnderTest("cpu", "cpu", (torch.float64, torch.float32), LOW,
                     None if _available("cpu") else "the compiled extension is not built"),
    BackendUnderTest("triton", _TRITON_DEVICE, (torch.float32,), LOW,
                     None if _available("triton") else "triton is not installed or the backend is unavailable",
                     prefix="triton_"),
    BackendUnderTest("cuda", "cuda", (torch.float64, torch.float32), (torch.float32,) + LOW,
                     None if _available("cuda") else "the extension was built without its CUDA kernels",
                     marks=(pytest.mark.cuda,)),
    BackendUnderTest("cuda-emulation", "cpu", (torch.float64,), (torch.float32,) + LOW, _EMULATION,
                     route="cpu", namespace="rmask_cuda_emulation"),
]

# RMASK_PARITY_BACKENDS=cpu,triton runs those only (the AVX2 rerun of the cpu backend uses it).
_ONLY = [name for name in os.environ.get("RMASK_PARITY_BACKENDS", "").split(",") if name]
if _ONLY:
    BACKENDS = [backend for backend in BACKENDS if backend.name in _ONLY]


def _marks(backend):
    skip = [pytest.mark.skip(reason=f"{backend.name}: {backend.why_not}")] if backend.why_not else []
    return list(backend.marks) + skip


def backends(where=lambda backend: True):
    """pytest params over the backends (skipped, with the reason, where unavailable)."""
    return [pytest.param(b, id=b.name, marks=_marks(b)) for b in BACKENDS if where(b)]


def backends_and_dtypes(low_precision=False, where=lambda backend: True):
    """pytest params (backend, dtype) over each backend's dtypes (or its low-precision ones)."""
    return [
        pytest.param(b, dtype, id=f"{b.name}-{str(dtype).replace('torch.', '')}", marks=_marks(b))
        for b in BACKENDS if where(b)
        for dtype in (b.low_precision if low_precision else b.dtypes)
    ]
