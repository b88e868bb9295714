"""The CUDA kernels (csrc/cuda) on a GPU: torch.ops.rmask.* on CUDA tensors against the
reference, gradients, opcheck, torch.compile, memory formats, streams and determinism.
Marked `cuda`: skipped without a GPU (tests/conftest.py). Without one, the kernels' arithmetic
is checked on the host by test_host_emulation.py.

The public rk.masked_conv2d picks its backend in rmask_kernels/backends.py; these tests call
the op directly, so they test the CUDA kernels whatever that routing says."""

import itertools

import pytest
import torch
import torch.nn.functional as F

import rmask_kernels as rk
from rmask_kernels import ops, reference

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not ops.extension_loaded(), reason="extension not built"),
]

MODES = [("neuron", None), ("spatial", None), ("group", 2)]
# float64: only the summation order differs; float32: PyTorch's (cuDNN, TF32 off) conv differs by ~1e-6.
TOLERANCE = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-4, atol=1e-4)}

# (N, Cin, H, W, Cout, kernel, stride, padding, dilation, groups)
CONFIGS = [
    (2, 4, 8, 8, 6, 3, 1, 1, 1, 1),
    (2, 4, 9, 7, 6, 3, 2, 1, 1, 1),  # odd sizes, stride 2
    (1, 3, 10, 11, 4, (3, 5), (2, 1), (1, 2), 1, 1),
    (2, 4, 12, 12, 4, 3, 1, 2, 2, 1),  # dilation
    (2, 4, 8, 8, 8, 3, 1, 1, 1, 2),  # groups 2
    (2, 4, 9, 9, 8, 3, 2, 1, 1, 4),  # depthwise x2
    (33, 16, 17, 17, 32, 3, 1, 1, 1, 1),  # more elements than one grid pass
    (0, 4, 8, 8, 6, 3, 1, 1, 1, 1),  # batch 0
]


def pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def make_case(config, mode, group_size, ratio, dtype=torch.float64, device="cuda"):
    n, cin, h, w, cout, kernel, stride, padding, dilation, groups = config
    kh, kw = pair(kernel)
    x = torch.randn(n, cin, h, w, dtype=dtype, device=device)
    weight = torch.randn(cout, cin // groups, kh, kw, dtype=dtype, device=device)
    bias = torch.randn(cout, dtype=dtype, device=device)
    out = F.conv2d(torch.zeros(1, cin, h, w), weight.cpu().float(), None, pair(stride), pair(padding), pair(dilation), groups)
    mask = rk.random_mask(tuple(out.shape[1:]), ratio, mode, group_size, device=device)
    return x, weight, bias, mask, [list(pair(stride)), list(pair(padding)), list(pair(dilation)), groups]


def index_of(mask, out_channels):
    return list(rk.kept_index(mask, out_channels))


@pytest.fixture(autouse=True)
def no_tf32():
    previous = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False  # the reference at full float32 precision
    yield
    torch.backends.cudnn.allow_tf32 = previous


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("ratio", [0.0, 0.5, 0.9])
@pytest.mark.parametrize("mode,group_size", MODES)
@pytest.mark.parametrize("config", CONFIGS)
def test_forward_and_backward_match_reference(config, mode, group_size, ratio, dtype):
    x, weight, bias, mask, conv_args = make_case(config, mode, group_size, ratio, dtype)
    index = index_of(mask, weight.shape[0])
    leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
    oracle = [t.detach().double().requires_grad_() for t in (x, weight, bias)]
    y = torch.ops.rmask.masked_conv2d(*leaves, mask, *index, *conv_args)
    expected = reference.masked_conv2d(*oracle, mask, *conv_args)
    assert y.device == x.device and y.dtype == dtype
    torch.testing.assert_close(y.double(), expected.detach(), **TOLERANCE[dtype])
    assert (y.detach()[(~mask).expand_as(y)] == 0).all()
    grad_output = torch.randn_like(expected)
    got = torch.autograd.grad(y, leaves, grad_output.to(dtype))
    want = torch.autograd.grad(expected, oracle, grad_output)
    for g, r in zip(got, want):
        torch.testing.assert_close(g.double(), r, **TOLERANCE[dtype])


@pytest.mark.parametrize("relu,with_residual", list(itertools.product([False, True], repeat=2)))
def test_epilogue_and_channels_last(relu, with_residual):
    x, weight, bias, mask, conv_args = make_case(CONFIGS[1], "neuron", None, 0.5)
    x = x.contiguous(memory_format=torch.channels_last)
    expected = reference.masked_conv2d(x, weight, bias, mask, *conv_args)
    residual = torch.randn_like(expected) if with_residual else None
    y = torch.ops.rmask.masked_conv2d(x, weight, bias, mask, *index_of(mask, 6), *conv_args, residual, relu=relu)
    expected = expected + residual if with_residual else expected
    expected = expected.clamp_min(0) if relu else expected
    torch.testing.assert_close(y, expected, **TOLERANCE[torch.float64])
    assert y.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("mode,group_size", MODES)
def test_stats_and_low_precision(mode, group_size, dtype):
    x, weight, bias, mask, conv_args = make_case(CONFIGS[6], mode, group_size, 0.5, dtype)
    y, total, squares = torch.ops.rmask.masked_conv2d_stats(x, weight, bias, mask, *index_of(mask, 32), *conv_args)
    oracle = reference.masked_conv2d(x.double(), weight.double(), bias.double(), mask, *conv_args)
    torch_error = (reference.masked_conv2d(x, weight, bias, mask, *conv_args).double() - oracle).abs().max().item()
    assert (y.double() - oracle).abs().max().item() <= 2 * torch_error + 1e-5
    want_total, want_squares = reference.channel_stats(y)  # of the output as stored
    torch.testing.assert_close(total, want_total, rtol=1e-10, atol=1e-8)
    torch.testing.assert_close(squares, want_squares, rtol=1e-10, atol=1e-8)


@pytest.mark.parametrize("output_mask", list(itertools.product([False, True], repeat=3)))
def test_backward_output_mask(output_mask):
    x, weight, bias, mask, conv_args = make_case(CONFIGS[4], "group", 2, 0.5)
    index = index_of(mask, weight.shape[0])
    grad_output = torch.randn(x.shape[0], weight.shape[0], *mask.shape[1:], dtype=x.dtype, device=x.device)
    leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
    want = torch.autograd.grad(reference.masked_conv2d(*leaves, mask, *conv_args), leaves, grad_output)
    got = torch.ops.rmask.masked_conv2d_backward(grad_output, x, weight, mask, *index, *conv_args, list(output_mask))
    for asked, g, r in zip(output_mask, got, want):
        if asked:
            torch.testing.assert_close(g, r, **TOLERANCE[torch.float64])
        else:
            assert g.numel() == 0


def test_deterministic_and_matches_cpu_kernels():
    x, weight, bias, mask, conv_args = make_case(CONFIGS[6], "neuron", None, 0.7, torch.float32)
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
    x, weight, bias, mask, conv_args = make_case(CONFIGS[0], "spatial", None, 0.5)
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


@pytest.mark.parametrize("mode,group_size", MODES)
def test_opcheck(mode, group_size):
    x, weight, bias, mask, conv_args = make_case(CONFIGS[1], mode, group_size, 0.5, torch.float32)
    index = index_of(mask, weight.shape[0])
    args = (x.requires_grad_(), weight.requires_grad_(), bias.requires_grad_(), mask, *index, *conv_args)
    torch.library.opcheck(torch.ops.rmask.masked_conv2d.default, args)
    residual = torch.randn(x.shape[0], weight.shape[0], *mask.shape[1:], device=x.device, requires_grad=True)
    torch.library.opcheck(torch.ops.rmask.masked_conv2d.default, args + (residual,), {"relu": True})
    torch.library.opcheck(torch.ops.rmask.masked_conv2d_stats.default, args)
    y = torch.ops.rmask.masked_conv2d(*args)
    backward_args = (torch.randn_like(y).detach(), x.detach(), weight.detach()) + args[3:] + ([True, True, True],)
    torch.library.opcheck(torch.ops.rmask.masked_conv2d_backward.default, backward_args)


def test_gradcheck_float64():
    x, weight, bias, mask, conv_args = make_case((2, 3, 6, 5, 4, 3, 2, 1, 1, 1), "neuron", None, 0.5)
    index = index_of(mask, weight.shape[0])
    inputs = tuple(t.requires_grad_() for t in (x, weight, bias))
    assert torch.autograd.gradcheck(
        lambda a, w, b: torch.ops.rmask.masked_conv2d(a, w, b, mask, *index, *conv_args), inputs, fast_mode=True
    )


def test_torch_compile_sees_one_op():
    x, weight, bias, mask, conv_args = make_case(CONFIGS[0], "neuron", None, 0.9, torch.float32)
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
