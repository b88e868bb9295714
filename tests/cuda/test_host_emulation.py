"""The CUDA kernels' arithmetic, checked on a machine without a GPU.

tests/cuda/host_emulation.cu runs the CUDA op bodies and their __host__ __device__ element
functions (csrc/cuda/masked_conv2d_kernel.cuh) on the host, one loop over every index, on CPU
tensors, as the ops rmask_cuda_emulation::*; here they are compared with the reference
F.conv2d(...) * mask (float64 oracle) and its autograd gradients. This covers index decoding,
which outputs are computed and which skipped, taps, stride, padding, dilation, groups, the
epilogue (bias, residual, ReLU), the statistics and the backward's reductions, memory formats
and reduced-precision accumulation. It does NOT exercise kernel launches, grid sizes, streams,
device memory or races: tests/cuda/test_cuda_op.py does, on a GPU.

The emulation library is built by `make cuda-check` (tests/cuda/build_host_emulation.py, with
nvcc, against the CUDA build of torch in .venv-cuda); elsewhere this file is skipped.
"""

import itertools
import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import conv_geometries  # tests/ (pytest puts it on sys.path)
from rmask_kernels import reference
from rmask_kernels.masks import kept_index, random_mask

BUILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "build", "cuda-emulation")
LIBRARY = os.environ.get("RMASK_CUDA_EMULATION", os.path.join(BUILD, "rmask_cuda_emulation.so"))


def _load():
    """None if loaded, else why not (the library is tied to the torch it was built against)."""
    version_file = os.path.join(os.path.dirname(LIBRARY), "torch_version.txt")
    if not os.path.exists(LIBRARY) or not os.path.exists(version_file):
        return f"{LIBRARY} not built (make cuda-check builds it)"
    with open(version_file) as f:
        built_for = f.read().strip()
    if built_for != torch.__version__:
        return f"built for torch {built_for}, this is torch {torch.__version__}"
    torch.ops.load_library(LIBRARY)
    return None


_SKIP = _load()
pytestmark = pytest.mark.skipif(_SKIP is not None, reason=f"CUDA host emulation: {_SKIP}")

ops = torch.ops.rmask_cuda_emulation
MODES = [("neuron", None), ("spatial", None), ("group", 2)]
# float64: only the summation order differs from the oracle.
TOLERANCE = dict(rtol=1e-10, atol=1e-10)

# (N, Cin, H, W, Cout, kernel, stride, padding, dilation, groups)
CONFIGS = [
    (2, 4, 8, 8, 6, 3, 1, 1, 1, 1),
    (2, 4, 9, 7, 6, 3, 2, 1, 1, 1),  # odd sizes, stride 2
    (1, 3, 10, 11, 4, (3, 5), (2, 1), (1, 2), 1, 1),  # rectangular kernel, mixed strides
    (2, 4, 12, 12, 4, 3, 1, 2, 2, 1),  # dilation
    (2, 4, 8, 8, 6, 1, 2, 0, 1, 1),  # 1x1 stride-2 projection shortcut
    (2, 4, 8, 8, 8, 3, 1, 1, 1, 2),  # groups 2
    (2, 4, 9, 9, 8, 3, 2, 1, 1, 4),  # depthwise with multiplier 2, stride 2, odd size
    (2, 3, 5, 5, 4, 5, 3, 0, 1, 1),  # kernel as large as the image
    (3, 2, 6, 5, 4, 2, 1, 0, (2, 1), 1),  # even kernel, anisotropic dilation
]


def make_case(config, mode, group_size, ratio, dtype=torch.float64):
    n, cin, h, w, cout, kernel, stride, padding, dilation, groups = config
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    pair = lambda v: (v, v) if isinstance(v, int) else tuple(v)  # noqa: E731
    stride, padding, dilation = pair(stride), pair(padding), pair(dilation)
    x = torch.randn(n, cin, h, w, dtype=dtype)
    weight = torch.randn(cout, cin // groups, kh, kw, dtype=dtype)
    bias = torch.randn(cout, dtype=dtype)
    out = F.conv2d(torch.zeros(1, cin, h, w), weight.float(), None, stride, padding, dilation, groups)
    mask = random_mask(tuple(out.shape[1:]), ratio, mode, group_size)
    conv_args = [list(stride), list(padding), list(dilation), groups]
    return x, weight, bias, mask, conv_args


def index_of(mask, out_channels):
    return list(kept_index(mask, out_channels))


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("mode,group_size", MODES)
@pytest.mark.parametrize("ratio", [0.0, 0.5, 0.9])
def test_forward_matches_reference(config, mode, group_size, ratio):
    x, weight, bias, mask, conv_args = make_case(config, mode, group_size, ratio)
    y = ops.masked_conv2d(x, weight, bias, mask, *index_of(mask, weight.shape[0]), *conv_args)
    expected = reference.masked_conv2d(x, weight, bias, mask, *conv_args)
    torch.testing.assert_close(y, expected, **TOLERANCE)
    assert (y[(~mask).expand_as(y)] == 0).all(), "masked outputs must be exactly zero"


@pytest.mark.parametrize("mode,group_size", MODES)
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("with_residual", [False, True])
def test_epilogue_relu_residual(mode, group_size, relu, with_residual):
    x, weight, bias, mask, conv_args = make_case(CONFIGS[1], mode, group_size, 0.5)
    expected = reference.masked_conv2d(x, weight, bias, mask, *conv_args)
    residual = torch.randn_like(expected) if with_residual else None
    y = ops.masked_conv2d(x, weight, bias, mask, *index_of(mask, weight.shape[0]), *conv_args, residual, relu=relu)
    if with_residual:
        expected = expected + residual  # at every position, masked ones too
    if relu:
        expected = expected.clamp_min(0)
    torch.testing.assert_close(y, expected, **TOLERANCE)
    assert y is not residual


@pytest.mark.parametrize("layout", ["channels_last", "permuted"])
def test_memory_formats(layout):
    x, weight, bias, mask, conv_args = make_case(CONFIGS[0], "neuron", None, 0.5)
    if layout == "channels_last":
        x_in = x.contiguous(memory_format=torch.channels_last)
    else:  # a non-contiguous view: the kernels address the input through its strides
        x_in = x.transpose(2, 3).contiguous().transpose(2, 3)
    residual = torch.randn(x.shape[0], weight.shape[0], 8, 8, dtype=x.dtype).contiguous(
        memory_format=torch.channels_last
    )
    index = index_of(mask, weight.shape[0])
    y = ops.masked_conv2d(x_in, weight, bias, mask, *index, *conv_args, residual)
    torch.testing.assert_close(y, reference.masked_conv2d(x, weight, bias, mask, *conv_args) + residual, **TOLERANCE)
    if layout == "channels_last":
        assert y.is_contiguous(memory_format=torch.channels_last), "output in the input's memory format"
        grad_input, _, _ = ops.masked_conv2d_backward(
            torch.randn_like(y), x_in, weight, mask, *index, *conv_args, [True, False, False]
        )
        assert grad_input.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("config", [CONFIGS[0], CONFIGS[1], CONFIGS[5], CONFIGS[6]])
@pytest.mark.parametrize("mode,group_size", MODES)
def test_stats_match_reference(config, mode, group_size):
    x, weight, bias, mask, conv_args = make_case(config, mode, group_size, 0.5)
    y, total, squares = ops.masked_conv2d_stats(x, weight, bias, mask, *index_of(mask, weight.shape[0]), *conv_args)
    expected = reference.masked_conv2d(x, weight, bias, mask, *conv_args)
    torch.testing.assert_close(y, expected, **TOLERANCE)
    want_total, want_squares = reference.channel_stats(expected)
    assert total.dtype == squares.dtype == torch.float64
    torch.testing.assert_close(total, want_total, **TOLERANCE)
    torch.testing.assert_close(squares, want_squares, **TOLERANCE)
    assert total.data_ptr() != squares.data_ptr()


def reference_grads(x, weight, bias, mask, conv_args, grad_output):
    leaves = [t.detach().clone().requires_grad_() for t in (x, weight, bias)]
    y = reference.masked_conv2d(*leaves, mask, *conv_args)
    return torch.autograd.grad(y, leaves, grad_output)


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("mode,group_size", MODES)
@pytest.mark.parametrize("ratio", [0.0, 0.7])
def test_backward_matches_autograd(config, mode, group_size, ratio):
    x, weight, bias, mask, conv_args = make_case(config, mode, group_size, ratio)
    grad_output = torch.randn_like(reference.masked_conv2d(x, weight, bias, mask, *conv_args))
    # grad_output is random at masked positions too: the kernels must ignore it there.
    want = reference_grads(x, weight, bias, mask, conv_args, grad_output)
    got = ops.masked_conv2d_backward(
        grad_output, x, weight, mask, *index_of(mask, weight.shape[0]), *conv_args, [True, True, True]
    )
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, **TOLERANCE)


@pytest.mark.parametrize("output_mask", list(itertools.product([False, True], repeat=3)))
def test_backward_output_mask(output_mask):
    x, weight, bias, mask, conv_args = make_case(CONFIGS[5], "group", 2, 0.5)
    grad_output = torch.randn(x.shape[0], weight.shape[0], *mask.shape[1:], dtype=x.dtype)
    want = reference_grads(x, weight, bias, mask, conv_args, grad_output)
    got = ops.masked_conv2d_backward(
        grad_output, x, weight, mask, *index_of(mask, weight.shape[0]), *conv_args, list(output_mask)
    )
    for asked, g, r in zip(output_mask, got, want):
        if asked:
            torch.testing.assert_close(g, r, **TOLERANCE)
        else:
            assert g.numel() == 0, "an output not asked for is an empty tensor"


def test_broadcast_and_sliced_views():
    """Tensors are read through their strides: an expanded grad_output (stride 0, as from
    y.sum()), an expanded residual and a sliced input need no copy and give the same values."""
    x, weight, bias, mask, conv_args = make_case(CONFIGS[1], "spatial", None, 0.5)
    index = index_of(mask, weight.shape[0])
    shape = reference.masked_conv2d(x, weight, bias, mask, *conv_args).shape
    residual = torch.randn(1, shape[1], 1, shape[3], dtype=x.dtype).expand(shape)
    y = ops.masked_conv2d(x, weight, bias, mask, *index, *conv_args, residual)
    torch.testing.assert_close(y, reference.masked_conv2d(x, weight, bias, mask, *conv_args) + residual, **TOLERANCE)
    grad_output = torch.ones((), dtype=x.dtype).expand(shape)
    got = ops.masked_conv2d_backward(grad_output, x, weight, mask, *index, *conv_args, [True, True, True])
    for g, r in zip(got, reference_grads(x, weight, bias, mask, conv_args, grad_output.contiguous())):
        torch.testing.assert_close(g, r, **TOLERANCE)
    wide = torch.randn(x.shape[0], x.shape[1] + 3, x.shape[2] + 2, x.shape[3], dtype=x.dtype)
    sliced = wide[:, 1 : 1 + x.shape[1], 2:]
    y = ops.masked_conv2d(sliced, weight, bias, mask, *index, *conv_args)
    expected = reference.masked_conv2d(sliced.contiguous(), weight, bias, mask, *conv_args)
    torch.testing.assert_close(y, expected, **TOLERANCE)


def test_fully_masked_pattern_and_batch_zero():
    x, weight, bias, mask, conv_args = make_case(CONFIGS[0], "neuron", None, 0.5)
    mask[2] = False  # one channel with nothing kept: its pattern's range is empty
    index = index_of(mask, weight.shape[0])
    y = ops.masked_conv2d(x, weight, bias, mask, *index, *conv_args)
    torch.testing.assert_close(y, reference.masked_conv2d(x, weight, bias, mask, *conv_args), **TOLERANCE)
    grad_output = torch.randn_like(y)
    got = ops.masked_conv2d_backward(grad_output, x, weight, mask, *index, *conv_args, [True, True, True])
    for g, r in zip(got, reference_grads(x, weight, bias, mask, conv_args, grad_output)):
        torch.testing.assert_close(g, r, **TOLERANCE)
    empty = x[:0]
    y0 = ops.masked_conv2d(empty, weight, bias, mask, *index, *conv_args)
    assert y0.shape == (0, *y.shape[1:])
    _, total, squares = ops.masked_conv2d_stats(empty, weight, bias, mask, *index, *conv_args)
    assert (total == 0).all() and (squares == 0).all()
    gx, gw, gb = ops.masked_conv2d_backward(y0, empty, weight, mask, *index, *conv_args, [True, True, True])
    assert gx.shape == empty.shape and (gw == 0).all() and (gb == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode,group_size", MODES)
def test_low_precision(dtype, mode, group_size):
    """Float accumulation: the error vs the float64 oracle is at most ~2x PyTorch's own
    conv in that dtype (plus a floor for dtypes whose own conv happens to be exact-ish)."""
    x64, w64, b64, mask, conv_args = make_case(CONFIGS[1], mode, group_size, 0.5)
    x, weight, bias = x64.to(dtype), w64.to(dtype), b64.to(dtype)
    index = index_of(mask, weight.shape[0])
    oracle = reference.masked_conv2d(x.double(), weight.double(), bias.double(), mask, *conv_args)
    floor = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-1}[dtype]
    torch_error = (reference.masked_conv2d(x, weight, bias, mask, *conv_args).double() - oracle).abs().max().item()
    y = ops.masked_conv2d(x, weight, bias, mask, *index, *conv_args)
    assert y.dtype == dtype
    assert (y.double() - oracle).abs().max().item() <= 2 * torch_error + floor
    grad_output = torch.randn_like(oracle)
    want = reference_grads(x64, w64, b64, mask, conv_args, grad_output.to(dtype).double())
    got = ops.masked_conv2d_backward(grad_output.to(dtype), x, weight, mask, *index, *conv_args, [True, True, True])
    for g, r in zip(got, want):
        assert g.dtype == dtype
        scale = r.abs().max().item() + 1
        assert (g.double() - r).abs().max().item() <= floor * scale * 4


def test_argument_errors():
    x, weight, bias, mask, conv_args = make_case(CONFIGS[0], "neuron", None, 0.5)
    index = index_of(mask, weight.shape[0])
    with pytest.raises(RuntimeError, match="residual must have the output's shape"):
        ops.masked_conv2d(x, weight, bias, mask, *index, *conv_args, torch.zeros(1, dtype=x.dtype))
    with pytest.raises(RuntimeError, match="position_channels must list"):
        ops.masked_conv2d(x, weight, bias, mask, *index[:3], index[3][:-1], *conv_args)
    with pytest.raises(RuntimeError, match="grad_output must have shape"):
        ops.masked_conv2d_backward(x, x, weight, mask, *index, *conv_args, [True, True, True])
    with pytest.raises(RuntimeError, match="mask must have shape"):
        ops.masked_conv2d(x, weight, bias, mask[:, :-1], *index, *conv_args)


@settings(max_examples=40, deadline=None)
@given(
    geometry=conv_geometries(max_groups=3),
    mode=st.sampled_from(["neuron", "spatial", "group"]),
    ratio=st.sampled_from([0.0, 0.3, 0.8, 0.95]),
    seed=st.integers(0, 2**31 - 1),
)
def test_random_configurations(geometry, mode, ratio, seed):
    """Forward and every gradient on random geometries (hypothesis), against the reference."""
    geo = geometry
    cout = geo["cout"]
    group_size = next((k for k in (2, 3, 1) if cout % k == 0), 1) if mode == "group" else None
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(geo["n"], geo["cin"], *geo["size"], dtype=torch.float64, generator=generator)
    weight = torch.randn(cout, geo["cin"] // geo["groups"], *geo["kernel"], dtype=torch.float64, generator=generator)
    bias = torch.randn(cout, dtype=torch.float64, generator=generator)
    mask = random_mask((cout, *geo["out"]), ratio, mode, group_size, seed=seed)
    conv_args = [list(geo["stride"]), list(geo["padding"]), list(geo["dilation"]), geo["groups"]]
    index = index_of(mask, cout)
    y = ops.masked_conv2d(x, weight, bias, mask, *index, *conv_args)
    torch.testing.assert_close(y, reference.masked_conv2d(x, weight, bias, mask, *conv_args), **TOLERANCE)
    grad_output = torch.randn(y.shape, dtype=torch.float64, generator=generator)
    got = ops.masked_conv2d_backward(grad_output, x, weight, mask, *index, *conv_args, [True, True, True])
    for g, r in zip(got, reference_grads(x, weight, bias, mask, conv_args, grad_output)):
        torch.testing.assert_close(g, r, **TOLERANCE)
