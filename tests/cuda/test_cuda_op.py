"""The CUDA kernels (csrc/cuda) on a GPU, what only a GPU shows: the current stream and device
guard, run-to-run determinism of the launches, agreement with the CPU kernels, and inductor
(torch.compile's default backend) around the op. Marked `cuda`: skipped without a GPU
(tests/conftest.py). The op's contract on CUDA tensors (values, gradients, epilogues, statistics,
layouts, low precision, opcheck, gradcheck) is tests/test_parity.py's, backend "cuda"; without a
GPU the kernels' arithmetic runs there on the host, backend "cuda-emulation"."""

import itertools

import pytest
import torch

import rmask_kernels as rk
from rmask_kernels import ops, reference

from cases import GEOMETRIES, TOLERANCE, make_case

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not ops.extension_loaded(), reason="extension not built"),
]
GEOMETRY = [[1, 1], [1, 1], [1, 1], 1]  # stride, padding, dilation, groups of the cases below


def cuda_case(name, mode, group_size, ratio, dtype=torch.float64):
    x, weight, bias, mask, _ = make_case(GEOMETRIES[name], mode, group_size, ratio, dtype, device="cuda")
    return x, weight, bias, mask, GEOMETRY


def index_of(mask, out_channels):
    return list(rk.kept_index(mask, out_channels))


@pytest.fixture(autouse=True)
def no_tf32():
    previous = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False  # the reference at full float32 precision
    yield
    torch.backends.cudnn.allow_tf32 = previous


def test_deterministic_and_matches_cpu_kernels():
    x, weight, bias, mask, conv_args = cuda_case("multi-grid-pass", "neuron", None, 0.7, torch.float32)
    index = index_of(mask, weight.shape[0])
    grad_output = torch.randn(x.shape[0], weight.shape[0], *mask.shape[1:], device=x.device)
    runs = [
        (
            torch.ops.rmask.masked_conv2d_stats(x, weight, bias, mask, *index, *conv_args),
            torch.ops.rmask.masked_conv2d_backward(grad_output, x, weight, mask, *index, *conv_args, [True, True, True]),
        )
        for _ in range(2)
    ]
    for a, b in zip(itertools.chain(*runs[0]), itertools.chain(*runs[1])):
        assert torch.equal(a, b), "no atomics: bit-identical run to run"
    cpu_index = [t.cpu() for t in index]
    y_cpu = torch.ops.rmask.masked_conv2d(x.cpu(), weight.cpu(), bias.cpu(), mask.cpu(), *cpu_index, *conv_args)
    torch.testing.assert_close(runs[0][0][0].cpu(), y_cpu, **TOLERANCE[torch.float32])


def test_current_stream_and_device_guard():
    x, weight, bias, mask, conv_args = cuda_case("basic", "spatial", None, 0.5)
    index = index_of(mask, weight.shape[0])
    expected = reference.masked_conv2d(x, weight, bias, mask, *conv_args)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        y = torch.ops.rmask.masked_conv2d(x, weight, bias, mask, *index, *conv_args)
    torch.cuda.current_stream().wait_stream(stream)
    torch.testing.assert_close(y, expected, **TOLERANCE[torch.float64])
    if torch.cuda.device_count() > 1:
        with torch.cuda.device(1):  # the kernels run on the tensors' device, not the current one
            y = torch.ops.rmask.masked_conv2d(x, weight, bias, mask, *index, *conv_args)
        torch.testing.assert_close(y, expected, **TOLERANCE[torch.float64])


def test_torch_compile_sees_one_op():
    x, weight, bias, mask, conv_args = cuda_case("basic", "neuron", None, 0.9, torch.float32)
    index = index_of(mask, weight.shape[0])

    def fn(a, w, b):
        return torch.ops.rmask.masked_conv2d(a, w, b, mask, *index, *conv_args, relu=True)

    leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
    y = torch.compile(fn, fullgraph=True)(*leaves)
    expected = reference.masked_conv2d(x, weight, bias, mask, *conv_args).clamp_min(0)
    torch.testing.assert_close(y, expected, **TOLERANCE[torch.float32])
    (grad,) = torch.autograd.grad(y.sum(), [leaves[0]])
    ref_leaf = x.clone().requires_grad_()
    (want,) = torch.autograd.grad(
        reference.masked_conv2d(ref_leaf, weight, bias, mask, *conv_args).clamp_min(0).sum(), [ref_leaf]
    )
    torch.testing.assert_close(grad, want, **TOLERANCE[torch.float32])
