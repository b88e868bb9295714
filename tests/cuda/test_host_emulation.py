"""The host emulation of the CUDA kernels (tests/cuda/host_emulation.cu): its own checks.

The emulation runs the CUDA op bodies and their __host__ __device__ element functions
(csrc/cuda/masked_conv2d_kernel.cuh) on the host, one loop over every index, on CPU tensors, as
the ops rmask_cuda_emulation::*. The op's contract on it (values, gradients, epilogues,
statistics, layouts, low precision: the kernels' arithmetic, not launches, grid sizes, streams
or races) is tests/test_parity.py's, backend "cuda-emulation"; here are the argument checks
the CUDA op bodies make. Built by `make cuda-check` (tests/cuda/build_host_emulation.py, with
nvcc, against the CUDA build of torch in .venv-cuda); elsewhere this file is skipped.
"""

import pytest
import torch

from backends_under_test import BACKENDS, load_cuda_emulation  # tests/ (pytest puts it on sys.path)
from cases import GEOMETRIES, make_case
from rmask_kernels.masks import kept_index

_SKIP = load_cuda_emulation()
pytestmark = pytest.mark.skipif(_SKIP is not None, reason=f"CUDA host emulation: {_SKIP}")


def test_argument_errors():
    x, weight, bias, mask, conv_args = make_case(GEOMETRIES["basic"], "neuron", None, 0.5)
    geometry = [[1, 1], [1, 1], [1, 1], 1]
    ops = torch.ops.rmask_cuda_emulation
    index = list(kept_index(mask, weight.shape[0]))
    with pytest.raises(RuntimeError, match="residual must have the output's shape"):
        ops.masked_conv2d(x, weight, bias, mask, *index, *geometry, torch.zeros(1, dtype=x.dtype))
    with pytest.raises(RuntimeError, match="position_channels must list"):
        ops.masked_conv2d(x, weight, bias, mask, *index[:3], index[3][:-1], *geometry)
    with pytest.raises(RuntimeError, match="grad_output must have shape"):
        ops.masked_conv2d_backward(x, x, weight, mask, *index, *geometry, [True, True, True])
    with pytest.raises(RuntimeError, match="mask must have shape"):
        ops.masked_conv2d(x, weight, bias, mask[:, :-1], *index, *geometry)


def test_the_parity_suite_reaches_the_emulation():
    # The parity suite's cuda-emulation backend goes through rk.masked_conv2d: the emulation's
    # ops must be what runs, forward and backward, not the CPU kernels of the same route.
    backend = next(b for b in BACKENDS if b.name == "cuda-emulation")
    x, weight, bias, mask, conv_args = make_case(GEOMETRIES["basic"], "neuron", None, 0.5)
    x.requires_grad_()
    with torch.profiler.profile() as profile:
        backend(x, weight, bias, mask, **conv_args).sum().backward()
    names = {event.name for event in profile.events()}
    assert {"rmask_cuda_emulation::masked_conv2d", "rmask_cuda_emulation::masked_conv2d_backward"} <= names
    assert not any(name.startswith("rmask::") for name in names), names
