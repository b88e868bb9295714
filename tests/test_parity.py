"""The masked-conv op's contract on every backend: F.conv2d(...) * mask in values (masked outputs
exactly zero) and gradients, epilogues, statistics, layouts, odd shapes, batch 0, every mask mode.

The backend is a parameter (tests/backends_under_test.py); the cases, the case builder and the
tolerances are tests/cases.py's. The oracle is the reference path in float64. Tests of one
backend's internals (tile shapes, caches, kernel variants, launch policies) live in their own
files: test_cpu_kernels.py, test_triton.py, cuda/."""

import itertools
import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rmask_kernels as rk
from rmask_kernels import reference
from rmask_kernels.backends import batch_vector_kernels

from backends_under_test import BACKENDS, backends, backends_and_dtypes
from cases import (GEOMETRIES, LOW_PRECISION_FLOOR, LOW_PRECISION_GRAD, TOLERANCE, check_against_reference,
                   conv_geometries, leaves_and_oracle, make_case, mask_cases, masked_outputs, output_size,
                   parity_cases, pair, random_case)
from helpers import python_subprocess

ALL = backends_and_dtypes()
OPS = backends(lambda b: b.name != "reference")  # backends with ops of their own
OPS_AND_DTYPES = backends_and_dtypes(where=lambda b: b.name != "reference")
ODD = GEOMETRIES["odd-stride2"]
WIDE_ODD = GEOMETRIES["wide-odd-stride2"]


@pytest.fixture(autouse=True)
def strict_fp32():
    """Both sides in strict fp32: the CUDA/Triton kernels follow cudnn.allow_tf32 as F.conv2d does,
    and TF32's ~1e-3 error would exceed the float32 tolerance (matters on a GPU only)."""
    allowed = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = allowed


def case(backend, geometry, mode, group_size, ratio=0.5, dtype=torch.float32, bias=True):
    return make_case(geometry, mode, group_size, ratio, dtype, bias, device=backend.device)


check = check_against_reference  # check(backend, x, weight, bias, mask, conv_args, ...)


@pytest.mark.parametrize("geometry,mode,group_size,ratio", parity_cases())
@pytest.mark.parametrize("backend,dtype", ALL)
def test_parity_with_reference(backend, dtype, geometry, mode, group_size, ratio):
    check(backend, *case(backend, geometry, mode, group_size, ratio, dtype))


@pytest.mark.parametrize("ratio", [0.0, 0.5, 0.9, 0.99])
@pytest.mark.parametrize("mode", ["neuron", "spatial"])
@pytest.mark.parametrize("backend,dtype", ALL)
def test_no_bias(backend, dtype, mode, ratio):
    x, weight, _, mask, conv_args = case(backend, ODD, mode, None, ratio, dtype, bias=False)
    check(backend, x, weight, None, mask, conv_args)


@pytest.mark.parametrize("ratio", [0.5, 0.9])
@pytest.mark.parametrize("mode,group_size", mask_cases(WIDE_ODD), ids=str)
@pytest.mark.parametrize("backend,dtype", backends_and_dtypes(low_precision=True))
def test_low_precision_near_pytorchs_own(backend, dtype, mode, group_size, ratio):
    # The kernels accumulate in fp32: the error vs the fp64 oracle is at most ~2x that of
    # PyTorch's own conv in the same dtype; the statistics are of the output as stored.
    x, weight, bias, mask, conv_args = case(backend, WIDE_ODD, mode, group_size, ratio, torch.float32)
    x, weight, bias = x.to(dtype), weight.to(dtype), bias.to(dtype)
    inputs, oracle = leaves_and_oracle(x, weight, bias)
    ours = backend(*inputs, mask=mask, **conv_args)
    expected = reference.masked_conv2d(*oracle, mask, **conv_args)
    theirs = reference.masked_conv2d(x.float(), weight.float(), bias.float(), mask, **conv_args).to(dtype)
    assert ours.dtype == dtype
    limit = 2 * (theirs.double() - expected).abs().max() + LOW_PRECISION_FLOOR[dtype]
    assert (ours.double() - expected).abs().max() <= limit
    assert (masked_outputs(ours, mask) == 0).all()
    grad_y = torch.randn_like(expected).to(dtype)
    for g, r in zip(torch.autograd.grad(ours, inputs, grad_y), torch.autograd.grad(expected, oracle, grad_y.double())):
        assert g.dtype == dtype
        assert (g.double() - r).abs().max() <= LOW_PRECISION_GRAD[dtype] * (r.abs().max() + 1)
    y, total, squares = backend(x, weight, bias, mask=mask, channel_stats=True, **conv_args)
    want_total, want_squares = reference.channel_stats(y)
    torch.testing.assert_close(total, want_total, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(squares, want_squares, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("epilogue", ["none", "add+relu"])
@pytest.mark.parametrize("mode,group_size", mask_cases(WIDE_ODD), ids=str)
@pytest.mark.parametrize("backend,dtype", backends_and_dtypes(low_precision=True))
def test_autocast_casts_as_conv2d_does(backend, dtype, mode, group_size, epilogue):
    # Under torch.autocast the op casts its float32 arguments (residual included: one fused
    # op) to the autocast dtype, as F.conv2d does, and returns that dtype; the gradients reach
    # the float32 leaves in float32. Error vs the float64 oracle on the cast inputs: at most
    # ~2x that of F.conv2d * mask under the same autocast.
    x, weight, bias, mask, conv_args = case(backend, WIDE_ODD, mode, group_size, 0.5, torch.float32)
    add_relu = epilogue == "add+relu"
    residual = torch.randn(x.shape[0], weight.shape[0], *mask.shape[1:], device=x.device) if add_relu else None
    inputs, _ = leaves_and_oracle(x, weight, bias, residual)
    _, oracle = leaves_and_oracle(*(t.to(dtype) if t is not None else None for t in (x, weight, bias, residual)))

    def epilogue_of(y, residual):
        return F.relu(y + residual) if add_relu else y

    with torch.autocast(backend.device, dtype=dtype):
        ours = backend(*inputs[:3], mask=mask, residual=inputs[3], relu=add_relu, **conv_args)
        theirs = epilogue_of(F.conv2d(x, weight, bias, **conv_args) * mask,
                             residual.to(dtype) if add_relu else None)
    expected = epilogue_of(reference.masked_conv2d(*oracle[:3], mask, **conv_args), oracle[3])
    assert ours.dtype == theirs.dtype == dtype
    limit = 2 * (theirs.double() - expected).abs().max() + LOW_PRECISION_FLOOR[dtype]
    assert (ours.double() - expected).abs().max() <= limit
    if not add_relu:
        assert (masked_outputs(ours, mask) == 0).all()
    grad_y = torch.randn_like(expected).to(dtype)
    # The oracle's ReLU gate is ours: where an output near 0 rounds to the other side, the two
    # gates differ and so would whole gradient terms.
    pre_relu = reference.masked_conv2d(*oracle[:3], mask, **conv_args) + (oracle[3] if add_relu else 0)
    gated = grad_y.double() * (ours.detach() > 0) if add_relu else grad_y.double()
    wanted = [t for t in inputs if t is not None]
    for g, t, r in zip(torch.autograd.grad(ours, wanted, grad_y), wanted,
                       torch.autograd.grad(pre_relu, [t for t in oracle if t is not None], gated)):
        assert g.dtype == t.dtype == torch.float32
        assert (g.double() - r).abs().max() <= LOW_PRECISION_GRAD[dtype] * (r.abs().max() + 1)
    with torch.autocast(backend.device, dtype=dtype):
        y, total, squares = backend(x, weight, bias, mask=mask, channel_stats=True, **conv_args)
    assert y.dtype == dtype and total.dtype == squares.dtype == torch.float64
    # The statistics of the output as stored, or (the CPU's float32 kernels under autocast) of
    # the float32 output before it was rounded to the autocast dtype: within that rounding.
    want_total, want_squares = reference.channel_stats(y)
    y64, eps = y.double(), torch.finfo(dtype).eps
    assert ((total - want_total).abs() <= eps * y64.abs().sum((0, 2, 3)) + 1e-6).all()
    assert ((squares - want_squares).abs() <= 2 * eps * y64.square().sum((0, 2, 3)) + 1e-6).all()


@pytest.mark.parametrize("backend,dtype", backends_and_dtypes(low_precision=True))
def test_autocast_rules_of_the_ops_themselves(backend, dtype):
    # The ops called directly (torch.ops.rmask.*) follow autocast too: float32 arguments are
    # cast, float64 ones are not (as autocast leaves float64 alone).
    x, weight, bias, mask, index, geometry_args = op_args(backend, ODD, "neuron", None)
    conv, stats = backend.op("masked_conv2d"), backend.op("masked_conv2d_stats")
    with torch.autocast(backend.device, dtype=dtype):
        y = conv(x, weight, bias, mask, *index, *geometry_args, relu=True)
        y_stats, total, _ = stats(x, weight, bias, mask, *index, *geometry_args)
    assert y.dtype == y_stats.dtype == dtype and total.dtype == torch.float64
    want = conv(x.to(dtype), weight.to(dtype), bias.to(dtype), mask, *index, *geometry_args, relu=True)
    torch.testing.assert_close(y, want, rtol=0, atol=0)
    if torch.float64 in backend.dtypes:
        with torch.autocast(backend.device, dtype=dtype):
            y64 = conv(x.double(), weight.double(), bias.double(), mask, *index, *geometry_args)
        assert y64.dtype == torch.float64


def test_mixed_dtypes_outside_autocast_stay_an_error():
    x, weight, bias, mask, conv_args = make_case(ODD, "neuron", None, 0.5, torch.float32)
    with pytest.raises(TypeError, match="weight dtype must match input dtype torch.bfloat16, got torch.float32"):
        rk.masked_conv2d(x.bfloat16(), weight, bias, mask=mask, **conv_args)


@pytest.mark.parametrize("layout", ["channels_last", "permuted", "sliced", "weight-and-mask-strided"])
@pytest.mark.parametrize("mode", ["neuron", "spatial"])
@pytest.mark.parametrize("backend,dtype", ALL)
def test_memory_formats_and_strides(backend, dtype, mode, layout):
    x, weight, bias, mask, conv_args = case(backend, ODD, mode, None, 0.5, dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "permuted":
        x = x.transpose(2, 3).contiguous().transpose(2, 3)
    elif layout == "sliced":
        x = torch.randn(2, 8, 9, 14, dtype=dtype, device=backend.device)[:, ::2, :, ::2]
    else:
        weight = weight.transpose(2, 3).contiguous().transpose(2, 3)
        mask = mask.transpose(1, 2).contiguous().transpose(1, 2)
    y = check(backend, x, weight, bias, mask, conv_args)
    channels_last = layout == "channels_last"
    expected_format = torch.channels_last if channels_last else torch.contiguous_format
    assert y.is_contiguous(memory_format=expected_format), "output in the input's memory format, as F.conv2d"
    if channels_last:
        leaf = x.detach().requires_grad_()
        (grad,) = torch.autograd.grad(backend(leaf, weight, bias, mask, **conv_args).sum(), [leaf])
        assert grad.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("ratio", [0.01, 0.99, 0.999])
@pytest.mark.parametrize("mode", ["neuron", "spatial"])
@pytest.mark.parametrize("backend,dtype", ALL)
def test_ratios_near_the_ends(backend, dtype, mode, ratio):
    check(backend, *case(backend, (2, 4, 16, 16, 8, 3, 1, 1, 1, 1), mode, None, ratio, dtype))


@pytest.mark.parametrize("kept", ["all", "none", "one-channel-none"])
@pytest.mark.parametrize("backend,dtype", ALL)
def test_all_kept_and_fully_masked(backend, dtype, kept):
    x, weight, bias, mask, conv_args = case(backend, GEOMETRIES["basic"], "neuron", None, 0.5, dtype)
    if kept == "one-channel-none":
        mask[2] = False  # a pattern with nothing kept: its range of the index is empty
    else:
        mask = torch.full_like(mask, kept == "all")
    y = check(backend, x, weight, bias, mask, conv_args)
    assert kept != "none" or (y == 0).all()


@pytest.mark.parametrize("backend", backends())
def test_unbatched_input(backend):
    x, weight, bias, mask, conv_args = case(backend, ODD, "spatial", None, 0.5, torch.float32)
    y = backend(x[0], weight, bias, mask, **conv_args)
    torch.testing.assert_close(y, reference.masked_conv2d(x[:1], weight, bias, mask, **conv_args)[0],
                               **TOLERANCE[torch.float32])


@pytest.mark.parametrize("backend", backends())
def test_batch_zero(backend):
    x, weight, bias, mask, conv_args = case(backend, GEOMETRIES["batch0"], "neuron", None, 0.5)
    inputs = [t.detach().clone().requires_grad_() for t in (x, weight, bias)]
    y = backend(*inputs, mask=mask, **conv_args)
    assert y.shape == (0, *mask.shape)
    grads = torch.autograd.grad(y.sum(), inputs)
    assert [tuple(g.shape) for g in grads] == [tuple(t.shape) for t in inputs]
    assert all((g == 0).all() for g in grads[1:])
    y, total, squares = backend(x, weight, bias, mask, channel_stats=True, **conv_args)
    assert y.shape == (0, *mask.shape) and (total == 0).all() and (squares == 0).all()


@pytest.mark.parametrize("epilogue", ["relu", "add", "add+relu"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "residual_channels_last"])
@pytest.mark.parametrize("mode,group_size", mask_cases(WIDE_ODD), ids=str)
@pytest.mark.parametrize("backend,dtype", ALL)
def test_relu_and_residual_epilogues(backend, dtype, mode, group_size, layout, epilogue):
    # relu?(conv * mask + residual): the residual lands on every position, masked ones too.
    x, weight, bias, mask, conv_args = case(backend, WIDE_ODD, mode, group_size, 0.5, dtype)
    relu, add = "relu" in epilogue, "add" in epilogue
    residual = torch.randn(x.shape[0], weight.shape[0], *mask.shape[1:], dtype=dtype, device=backend.device)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    if layout == "residual_channels_last":  # a layout other than the output's
        residual = residual.contiguous(memory_format=torch.channels_last)
    inputs, oracle = leaves_and_oracle(x, weight, bias, residual if add else None)
    y = backend(*inputs[:3], mask=mask, relu=relu, residual=inputs[3], **conv_args)
    expected = reference.masked_conv2d(*oracle[:3], mask, **conv_args) + (oracle[3] if add else 0)
    expected = F.relu(expected) if relu else expected
    torch.testing.assert_close(y.double(), expected, **TOLERANCE[dtype])
    at_masked = residual if add else torch.zeros_like(residual)
    at_masked = F.relu(at_masked) if relu else at_masked
    assert torch.equal(masked_outputs(y, mask), masked_outputs(at_masked, mask))
    if layout == "channels_last":
        assert y.is_contiguous(memory_format=torch.channels_last)
    grad_y = torch.randn_like(expected)
    leaves = [t for t in inputs if t is not None]
    got = torch.autograd.grad(y, leaves, grad_y.to(dtype))
    want = torch.autograd.grad(expected, [t for t in oracle if t is not None], grad_y)
    for g, r in zip(got, want):
        torch.testing.assert_close(g.double(), r, **TOLERANCE[dtype])


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("geometry", ["wide-odd-stride2", "wide-depthwise-x8"])
@pytest.mark.parametrize("backend,dtype", ALL + backends_and_dtypes(low_precision=True))
def test_residual_and_relu_in_every_dtype_with_groups(backend, dtype, geometry, layout):
    # relu(conv * mask + residual) in every dtype, with groups > 1, channels_last too (on the
    # CPU: the portable kernels' cases). Low precision: the error within ~2x that of PyTorch's
    # own conv, add and ReLU in fp32 rounded to the dtype; masked outputs exactly relu(residual).
    x, weight, bias, mask, conv_args = case(backend, GEOMETRIES[geometry], "neuron", None, 0.5, torch.float64)
    residual = torch.randn(x.shape[0], weight.shape[0], *mask.shape[1:], dtype=torch.float64, device=x.device)
    x, weight, bias, residual = (t.to(dtype) for t in (x, weight, bias, residual))
    memory_format = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x, residual = x.contiguous(memory_format=memory_format), residual.contiguous(memory_format=memory_format)
    y = backend(x, weight, bias, mask=mask, relu=True, residual=residual, **conv_args)
    assert y.dtype == dtype and y.is_contiguous(memory_format=memory_format)
    expected = F.relu(reference.masked_conv2d(x.double(), weight.double(), bias.double(), mask, **conv_args)
                      + residual.double())
    if dtype in TOLERANCE:
        torch.testing.assert_close(y.double(), expected, **TOLERANCE[dtype])
    else:
        theirs = F.relu(reference.masked_conv2d(x.float(), weight.float(), bias.float(), mask, **conv_args)
                        + residual.float()).to(dtype)
        limit = 2 * (theirs.double() - expected).abs().max() + LOW_PRECISION_FLOOR[dtype]
        assert (y.double() - expected).abs().max() <= limit
    assert torch.equal(masked_outputs(y, mask), masked_outputs(F.relu(residual), mask))


@pytest.mark.parametrize("geometry", [ODD, GEOMETRIES["wide-groups"]], ids=["odd-stride2", "wide-groups"])
@pytest.mark.parametrize("mode,group_size", [("neuron", None), ("spatial", None), ("group", 2)], ids=str)
@pytest.mark.parametrize("backend,dtype", ALL)
def test_channel_stats_in_the_same_pass(backend, dtype, geometry, mode, group_size):
    # Sum and sum of squares per channel over the kept outputs, and gradients through all three.
    x, weight, bias, mask, conv_args = case(backend, geometry, mode, group_size, 0.5, dtype)
    inputs, oracle = leaves_and_oracle(x, weight, bias)
    y, total, squares = backend(*inputs, mask=mask, channel_stats=True, **conv_args)
    assert total.dtype == squares.dtype == torch.float64 and total.shape == (weight.shape[0],)
    assert total.data_ptr() != squares.data_ptr()
    expected = reference.masked_conv2d(*oracle, mask, **conv_args)
    want_total, want_squares = reference.channel_stats(expected)
    torch.testing.assert_close(y.double(), expected, **TOLERANCE[dtype])
    torch.testing.assert_close(total, want_total, **TOLERANCE[dtype])
    # sums of squares: values up to ~1e3, so the float32 outputs' rounding shows in absolute terms
    torch.testing.assert_close(squares, want_squares, rtol=TOLERANCE[dtype]["rtol"], atol=TOLERANCE[dtype]["atol"] * 10)
    g_y, g_total, g_squares = torch.randn_like(expected), torch.randn_like(want_total), torch.randn_like(want_squares)
    loss = (y.double() * g_y).sum() + (total * g_total).sum() + (squares * g_squares).sum()
    want_loss = (expected * g_y).sum() + (want_total * g_total).sum() + (want_squares * g_squares).sum()
    loose = dict(rtol=1e-3, atol=1e-3) if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-9)
    for got, want in zip(torch.autograd.grad(loss, inputs), torch.autograd.grad(want_loss, oracle)):
        torch.testing.assert_close(got.double(), want, **loose)


@pytest.mark.parametrize("epilogue", ["none", "relu+residual", "stats"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("in_mode,mode,group_size", [("neuron", "neuron", None), ("spatial", "spatial", None),
                                                    ("neuron", "spatial", None), ("spatial", "group", 2)], ids=str)
@pytest.mark.parametrize("geometry", [ODD, GEOMETRIES["groups"]], ids=["odd-stride2", "groups"])
@pytest.mark.parametrize("backend,dtype", ALL)
def test_input_mask(backend, dtype, geometry, in_mode, mode, group_size, layout, epilogue):
    # conv(input * input_mask) * mask, values and gradients: the input's gradient is 0 where the
    # input mask drops it; every mask pairing, epilogue and layout.
    x, weight, bias, mask, conv_args = case(backend, geometry, mode, group_size, 0.5, dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    input_mask = rk.random_mask(tuple(x.shape[1:]), 0.6, in_mode, device=x.device)
    residual = torch.randn(output_size(geometry), dtype=dtype, device=x.device)
    residual = residual.expand(x.shape[0], weight.shape[0], *residual.shape).contiguous()
    extra = {"none": {}, "relu+residual": dict(relu=True, residual=residual), "stats": dict(channel_stats=True)}
    inputs, oracle = leaves_and_oracle(x, weight, bias)
    result = backend(*inputs, mask=mask, input_mask=input_mask, **conv_args, **extra[epilogue])
    expected = reference.masked_conv2d(oracle[0] * input_mask, *oracle[1:], mask, **conv_args)
    if epilogue == "relu+residual":
        expected = F.relu(expected + residual.double())
    y = result[0] if epilogue == "stats" else result
    torch.testing.assert_close(y.double(), expected, **TOLERANCE[dtype])
    if epilogue != "relu+residual":
        assert (masked_outputs(y, mask) == 0).all()
    if epilogue == "stats":
        for got, want in zip(result[1:], reference.channel_stats(expected)):
            torch.testing.assert_close(got, want, rtol=TOLERANCE[dtype]["rtol"], atol=TOLERANCE[dtype]["atol"] * 10)
    g_y = torch.randn_like(expected)
    got = torch.autograd.grad(y, [t for t in inputs if t is not None], g_y.to(y.dtype))
    want = torch.autograd.grad(expected, [t for t in oracle if t is not None], g_y)
    for name, g, r in zip(("input", "weight", "bias"), got, want):
        torch.testing.assert_close(g.double(), r, **TOLERANCE[dtype], msg=lambda m: f"grad {name}: {m}")
    assert (got[0][(~input_mask).expand_as(x)] == 0).all()


@pytest.mark.parametrize("backend", OPS)
def test_input_mask_with_batch_zero_and_unbatched_input(backend):
    x, weight, bias, mask, conv_args = case(backend, ODD, "neuron", None, 0.5)
    input_mask = rk.random_mask(tuple(x.shape[1:]), 0.5, "neuron", device=x.device)
    empty = backend(x[:0], weight, bias, mask=mask, input_mask=input_mask, **conv_args)
    assert empty.shape == (0, *reference.masked_conv2d(x, weight, bias, mask, **conv_args).shape[1:])
    y = backend(x[0], weight, bias, mask=mask, input_mask=input_mask, **conv_args)
    expected = reference.masked_conv2d((x[:1] * input_mask).double(), weight.double(), bias.double(), mask, **conv_args)
    torch.testing.assert_close(y.double(), expected[0], **TOLERANCE[x.dtype])


@pytest.mark.parametrize("in_mode", [None, "neuron", "spatial"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("mode,group_size", [("neuron", None), ("spatial", None), ("group", 13)], ids=str)
@pytest.mark.parametrize("backend", backends(lambda b: torch.float32 in b.dtypes))
def test_large_odd_shapes(backend, mode, group_size, layout, in_mode):
    # Batch, channels and sizes that fill no SIMD block or tile evenly (17 images: 16 lanes + 1),
    # with and without an input mask (kept channels listed per input position, or taps dropped).
    geometry = (17, 11, 23, 19, 13, (3, 5), (2, 1), (1, 2), 1, 1)
    x, weight, bias, mask, conv_args = case(backend, geometry, mode, group_size, 0.6)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    input_mask = None if in_mode is None else rk.random_mask(
        (1 if in_mode == "spatial" else x.shape[1], *x.shape[2:]), 0.7, in_mode, device=x.device)
    y = check(backend, x, weight, bias, mask, conv_args, input_mask=input_mask)
    if layout == "channels_last":
        assert y.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("backend", backends())
def test_deterministic_bit_identical_runs(backend):
    # No atomics: the same call twice gives the same bits, forward, statistics and gradients.
    x, weight, bias, mask, conv_args = case(backend, (3, 8, 9, 9, 32, 3, 1, 1, 1, 1), "group", 16, 0.5)
    runs = []
    for _ in range(2):
        xs, ws, bs = (t.clone().requires_grad_() for t in (x, weight, bias))
        y, total, squares = backend(xs, ws, bs, mask, channel_stats=True, **conv_args)
        y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(0)).to(y.device))
        runs.append((y.detach(), total, squares, xs.grad, ws.grad, bs.grad))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", backends(lambda b: torch.float64 in b.dtypes))
def test_gradcheck_float64(backend):
    x, weight, bias, mask, conv_args = case(backend, (2, 3, 6, 5, 4, 3, 2, 1, 1, 1), "neuron", None, 0.5,
                                            torch.float64)
    inputs = tuple(t.requires_grad_() for t in (x, weight, bias))
    assert torch.autograd.gradcheck(lambda a, w, b: backend(a, w, b, mask, **conv_args), inputs, fast_mode=True)


@pytest.mark.parametrize("only", ["input", "weight", "bias", "residual"])
@pytest.mark.parametrize("backend", backends())
def test_one_differentiable_argument_is_enough_for_a_graph(backend, only):
    # rk.masked_conv2d calls the op below its autograd kernel when nothing needs a gradient:
    # any single argument that requires grad must still get one, and under no_grad none.
    dtype = backend.dtypes[0]
    x, weight, bias, mask, conv_args = case(backend, ODD, "neuron", None, 0.5, dtype)
    residual = torch.randn(x.shape[0], weight.shape[0], *mask.shape[1:], dtype=dtype, device=backend.device)
    tensors = dict(input=x, weight=weight, bias=bias, residual=residual)
    tensors[only] = tensors[only].clone().requires_grad_()
    with torch.no_grad():
        assert backend(**tensors, mask=mask, relu=True, **conv_args).grad_fn is None
    y = backend(**tensors, mask=mask, relu=True, **conv_args)
    oracle = {name: t.detach().double().requires_grad_(name == only) for name, t in tensors.items()}
    expected = F.relu(reference.masked_conv2d(oracle["input"], oracle["weight"], oracle["bias"], mask, **conv_args)
                      + oracle["residual"])
    grad_y = torch.randn_like(expected)
    (got,) = torch.autograd.grad(y, tensors[only], grad_y.to(dtype))
    (want,) = torch.autograd.grad(expected, oracle[only], grad_y)
    torch.testing.assert_close(got.double(), want, **TOLERANCE[dtype])


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(geometry=conv_geometries(cout_per_group=st.sampled_from([1, 2, 3, 16])),
       mode=st.sampled_from(["neuron", "spatial", "group"]), ratio=st.floats(0.0, 0.95), bias=st.booleans())
@pytest.mark.parametrize("backend", backends())
def test_property_random_configurations(backend, geometry, mode, ratio, bias):
    dtype = backend.dtypes[0]
    group_size = 8 if mode == "group" and geometry["cout"] % 16 == 0 else None
    check(backend, *random_case(geometry, mode, ratio, bias, dtype, backend.device, group_size))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(geometry=conv_geometries(cout_per_group=st.sampled_from([1, 2, 3, 16])),
       in_mode=st.sampled_from(["neuron", "spatial"]), mode=st.sampled_from(["neuron", "spatial", "group"]),
       in_ratio=st.floats(0.0, 0.95), ratio=st.floats(0.0, 0.95))
@pytest.mark.parametrize("backend", backends())
def test_property_input_mask(backend, geometry, in_mode, mode, in_ratio, ratio):
    dtype = backend.dtypes[0]
    group_size = 8 if mode == "group" and geometry["cout"] % 16 == 0 else None
    x, weight, bias, mask, conv_args = random_case(geometry, mode, ratio, True, dtype, backend.device, group_size)
    input_mask = rk.random_mask(tuple(x.shape[1:]), in_ratio, in_mode, device=backend.device)
    check(backend, x, weight, bias, mask, conv_args, input_mask=input_mask)


# -- each backend's own ops ---------------------------------------------------------------------

def op_args(backend, geometry, mode, group_size, dtype=torch.float32):
    """A case as the op's positional arguments (index built, padding resolved: no "same")."""
    x, weight, bias, mask, conv_args = case(backend, geometry, mode, group_size, 0.5, dtype)
    index = [t.to(backend.device) for t in rk.kept_index(mask, weight.shape[0])]
    geometry_args = [list(pair(conv_args["stride"])), list(pair(conv_args["padding"])),
                     list(pair(conv_args["dilation"])), conv_args["groups"]]
    return x, weight, bias, mask, index, geometry_args


@pytest.mark.parametrize("backend", OPS)
def test_ops_check_the_kept_index_sizes(backend):
    # Every op checks the index's sizes and dtypes, with the same messages (its values are
    # rk.check_kept_index's, once, in Python: test_a_bad_kept_index_is_one_error_on_every_backend).
    x, weight, bias, mask, (offsets, positions, by_position, channels), geometry_args = op_args(
        backend, ODD, "neuron", None)
    out_channels, positions_per_pattern = weight.shape[0], mask.shape[1] * mask.shape[2]
    conv = backend.op("masked_conv2d")
    cases = [
        ((offsets, positions, by_position, channels[:-1]),
         f"position_channels must list the {channels.numel()} kept \\(position, channel\\) pairs of "
         f"kept_offsets/kept_positions, got {channels.numel() - 1}"),
        ((offsets[:5], positions, by_position, channels),
         f"kept_offsets describes 4 mask patterns, which must divide the {out_channels} output channels"),
        ((offsets, positions, by_position[:-1], channels),
         f"position_offsets must be a 1-D int64 tensor of Hout \\* Wout \\+ 1 = {positions_per_pattern + 1} entries"),
        ((offsets, positions.int(), by_position, channels), "kept_positions must be a 1-D int64 tensor, got"),
        ((offsets, positions.repeat(3), by_position, channels.repeat(3)),
         f"kept_positions lists {3 * positions.numel()} positions, more than the {out_channels} patterns"),
    ]
    for index, message in cases:
        with pytest.raises(RuntimeError, match=message):
            conv(x, weight, bias, mask, *index, *geometry_args)


@pytest.mark.parametrize("mode,group_size", [("neuron", None), ("spatial", None), ("group", 2)], ids=str)
@pytest.mark.parametrize("backend", OPS)
def test_opcheck(backend, mode, group_size):
    # A spatial mask costs one program per kernel under the Triton interpreter; opcheck calls each op many times.
    x, weight, bias, mask, index, geometry_args = op_args(backend, ODD, mode, group_size)
    residual = torch.randn(x.shape[0], weight.shape[0], *mask.shape[1:], device=x.device, requires_grad=True)
    args = (x.requires_grad_(), weight.requires_grad_(), bias.requires_grad_(), mask, *index, *geometry_args)
    torch.library.opcheck(backend.op("masked_conv2d").default, args)
    torch.library.opcheck(backend.op("masked_conv2d").default, args + (residual,), {"relu": True})
    torch.library.opcheck(backend.op("masked_conv2d_stats").default, args)
    y = backend.op("masked_conv2d")(*args)
    backward_args = (torch.randn_like(y).detach(), x.detach(), weight.detach()) + args[3:] + ([True, True, True],)
    torch.library.opcheck(backend.op("masked_conv2d_backward").default, backward_args)


def input_mask_args(input_mask, in_channels):
    """An input mask and its lists, as the ops take them (the by-position part of its kept index)."""
    return (input_mask, *rk.kept_index(input_mask, in_channels)[2:])


@pytest.mark.parametrize("in_mode,mode", [("neuron", "neuron"), ("spatial", "spatial"), ("spatial", "neuron")], ids=str)
@pytest.mark.parametrize("backend", OPS)
def test_opcheck_input_mask(backend, in_mode, mode):
    x, weight, bias, mask, index, geometry_args = op_args(backend, ODD, mode, None)
    input_mask = rk.random_mask(tuple(x.shape[1:]), 0.5, in_mode, device=x.device)
    masked = input_mask_args(input_mask, x.shape[1])
    args = (x.requires_grad_(), weight.requires_grad_(), bias.requires_grad_(), mask, *index, *geometry_args)
    torch.library.opcheck(backend.op("masked_conv2d").default, args + (None, *masked))
    torch.library.opcheck(backend.op("masked_conv2d_stats").default, args + masked)
    y = backend.op("masked_conv2d")(*args, None, *masked)
    backward_args = (torch.randn_like(y).detach(), x.detach(), weight.detach()) + args[3:] + ([True, True, True],)
    torch.library.opcheck(backend.op("masked_conv2d_backward").default, backward_args + (None, *masked))


def bad_input_masks(x):
    """(input mask, offsets, channels, message) cases every op rejects, for input ``x``."""
    _, channels, height, width = x.shape
    good = torch.ones(channels, height, width, dtype=torch.bool, device=x.device)
    _, offsets, listed = input_mask_args(good, channels)
    positions = height * width
    return [
        (good[:, :-1], offsets, listed,
         f"input_mask must have shape \\({channels} or 1, {height}, {width}\\) for this input, got"),
        (good[:2] if channels > 2 else good[:1].expand(3, -1, -1), offsets, listed, "input_mask must have shape"),
        (good.float(), offsets, listed, "input_mask must be a bool tensor"),
        (good, None, listed, "input_mask comes with its lists input_offsets and input_channels .*got no input_offsets"),
        (good, offsets, None, "got no input_channels"),
        (None, offsets, listed, "input_offsets and input_channels are the lists of an input_mask, got them without one"),
        (good, offsets.int(), listed, "input_offsets must be a 1-D int64 tensor, got"),
        (good, offsets, listed.view(channels, -1), "input_channels must be a 1-D int64 tensor, got"),
        (good, offsets[:-1], listed, f"input_offsets must have H \\* W \\+ 1 = {positions + 1} entries for this input, "
                                     f"got {positions}"),
    ]


@pytest.mark.parametrize("backend", OPS)
def test_ops_reject_a_bad_input_mask(backend):
    x, weight, bias, mask, index, geometry_args = op_args(backend, ODD, "neuron", None)
    conv, stats, backward = (backend.op(name) for name in ("masked_conv2d", "masked_conv2d_stats",
                                                           "masked_conv2d_backward"))
    grad = torch.randn(x.shape[0], weight.shape[0], *mask.shape[1:], device=x.device)
    for *masked, message in bad_input_masks(x):
        with pytest.raises(RuntimeError, match=message):
            conv(x, weight, bias, mask, *index, *geometry_args, None, *masked)
        with pytest.raises(RuntimeError, match=message):
            stats(x, weight, bias, mask, *index, *geometry_args, *masked)
        with pytest.raises(RuntimeError, match=message):
            backward(grad, x, weight, mask, *index, *geometry_args, [True, True, True], None, *masked)


@pytest.mark.parametrize("in_mode", ["neuron", "spatial"])
def test_cpu_kernels_check_the_input_lists_they_read(in_mode):
    # The CPU kernels index memory with the lists: values that would read out of place are an
    # error there (their agreement with the mask is rk.check_kept_index's, in Python).
    backend = next(b for b in BACKENDS if b.name == "cpu")
    if backend.why_not:
        pytest.skip(backend.why_not)
    x, weight, bias, mask, index, geometry_args = op_args(backend, ODD, in_mode, None)
    if not batch_vector_kernels(x.dtype, 1, x.shape[0], weight.shape[2]):
        pytest.skip("the portable CPU kernels serve here: they multiply the mask out and read no list")
    channels = x.shape[1]
    input_mask = rk.random_mask(tuple(x.shape[1:]), 0.5, in_mode, device=x.device)
    input_mask, offsets, listed = input_mask_args(input_mask, channels)
    ends_elsewhere, out_of_range, repeated = offsets.clone(), listed.clone(), listed.clone()
    ends_elsewhere[-1] += 1
    out_of_range[0] = channels
    kept = (offsets[1:] - offsets[:-1]).nonzero()[0, 0]  # a position that keeps some channels
    two_kept = ((offsets[1:] - offsets[:-1]) >= 2).nonzero()[0, 0]
    repeated[offsets[two_kept] + 1] = repeated[offsets[two_kept]]
    cases = [(ends_elsewhere, listed, f"input_offsets must run from 0 to the {listed.numel()} entries of input_channels"),
             (offsets, out_of_range, f"input_channels must list ascending channels in \\[0, {channels}\\) at each "
                                     f"position, got {channels} at position {kept}"),
             (offsets, repeated, f"ascending channels .* at position {two_kept}")]
    grad = torch.randn(x.shape[0], weight.shape[0], *mask.shape[1:])
    conv, backward = backend.op("masked_conv2d"), backend.op("masked_conv2d_backward")
    for bad_offsets, bad_channels, message in cases:
        with pytest.raises(RuntimeError, match=message):
            conv(x, weight, bias, mask, *index, *geometry_args, None, input_mask, bad_offsets, bad_channels)
        with pytest.raises(RuntimeError, match=message):
            backward(grad, x, weight, mask, *index, *geometry_args, [True, True, True], None, input_mask, bad_offsets,
                     bad_channels)


@pytest.mark.parametrize("output_mask", list(itertools.product([False, True], repeat=3)), ids=str)
@pytest.mark.parametrize("backend", OPS)
def test_backward_op_computes_what_it_is_asked(backend, output_mask):
    dtype = backend.dtypes[0]
    x, weight, bias, mask, index, geometry_args = op_args(backend, GEOMETRIES["groups"], "group", 2, dtype)
    grad_output = torch.randn(x.shape[0], weight.shape[0], *mask.shape[1:], dtype=dtype, device=x.device)
    leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
    want = torch.autograd.grad(reference.masked_conv2d(*leaves, mask, *geometry_args), leaves, grad_output)
    got = backend.op("masked_conv2d_backward")(grad_output, x, weight, mask, *index, *geometry_args, list(output_mask))
    for asked, g, r in zip(output_mask, got, want):
        if asked:
            torch.testing.assert_close(g, r, **TOLERANCE[dtype])
        else:
            assert g.numel() == 0, "an output not asked for is an empty tensor"


@pytest.mark.parametrize("mode", ["neuron", "spatial"])
@pytest.mark.parametrize("backend", OPS)
def test_backward_op_reads_grad_output_only_where_kept(backend, mode):
    # BN's backward leaves meaningless values at masked positions: NaN there changes nothing.
    x, weight, bias, mask, index, geometry_args = op_args(backend, ODD, mode, None, backend.dtypes[0])
    grad = torch.randn(x.shape[0], weight.shape[0], *mask.shape[1:], dtype=x.dtype, device=x.device)
    noisy = torch.where(mask, grad, torch.full_like(grad, float("nan")))
    backward = backend.op("masked_conv2d_backward")
    clean = backward(grad * mask, x, weight, mask, *index, *geometry_args, [True, True, True])
    for got, want in zip(backward(noisy, x, weight, mask, *index, *geometry_args, [True, True, True]), clean):
        assert torch.equal(got, want)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("ratio", [0.5, 0.9])
@pytest.mark.parametrize("geometry,mode,group_size", [(ODD, "neuron", None), (ODD, "spatial", None),
                                                      (ODD, "group", 2), (WIDE_ODD, "spatial", None),
                                                      (WIDE_ODD, "group", 16)],
                         ids=["neuron", "spatial", "group2", "wide-spatial", "wide-group16"])
@pytest.mark.parametrize("backend,dtype", OPS_AND_DTYPES)
def test_backward_op_gates_grad_output_by_relu_output(backend, dtype, geometry, mode, group_size, ratio, layout):
    # relu_output (the forward's output when it fused a ReLU) gates grad_output inside the op:
    # the same gradients, bias included, as grad_output * (relu_output > 0) without it. NaN
    # where the gate is closed: such grad_output is never read (the ReLU's own backward gives 0).
    x, weight, bias, mask, conv_args = case(backend, geometry, mode, group_size, ratio, dtype)
    if layout == "channels_last":  # the gate then in another layout than grad_output
        x = x.contiguous(memory_format=torch.channels_last)
    index = [t.to(backend.device) for t in rk.kept_index(mask, weight.shape[0])]
    geometry_args = [list(pair(conv_args["stride"])), list(pair(conv_args["padding"])),
                     list(pair(conv_args["dilation"])), conv_args["groups"]]
    residual = torch.randn(x.shape[0], weight.shape[0], *mask.shape[1:], dtype=dtype, device=x.device)
    relu_output = backend.op("masked_conv2d")(x, weight, bias, mask, *index, *geometry_args, residual, relu=True)
    assert (relu_output == 0).any() and (relu_output > 0).any()
    grad = torch.randn_like(relu_output, memory_format=torch.contiguous_format)
    open_ = relu_output > 0
    backward = backend.op("masked_conv2d_backward")
    want = backward(torch.where(open_, grad, 0.0), x, weight, mask, *index, *geometry_args, [True, True, True])
    noisy = torch.where(open_, grad, float("nan"))
    got = backward(noisy, x, weight, mask, *index, *geometry_args, [True, True, True], relu_output)
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, **TOLERANCE[dtype])
    assert got[0].is_contiguous(memory_format=torch._prims_common.suggest_memory_format(x))
    only_bias = backward(noisy, x, weight, mask, *index, *geometry_args, [False, False, True],
                         relu_output=relu_output)[2]
    torch.testing.assert_close(only_bias, want[2], **TOLERANCE[dtype])


@pytest.mark.parametrize("backend", OPS)
def test_backward_op_gate_with_a_batch_of_zero_and_bad_shapes(backend):
    x, weight, bias, mask, index, geometry_args = op_args(backend, GEOMETRIES["batch0"], "neuron", None)
    relu_output = backend.op("masked_conv2d")(x, weight, bias, mask, *index, *geometry_args, relu=True)
    backward = backend.op("masked_conv2d_backward")
    grad_input, grad_weight, grad_bias = backward(torch.randn_like(relu_output), x, weight, mask, *index,
                                                  *geometry_args, [True, True, True], relu_output)
    assert grad_input.shape == x.shape
    assert grad_weight.shape == weight.shape and (grad_weight == 0).all()
    assert grad_bias.shape == bias.shape and (grad_bias == 0).all()
    x, weight, bias, mask, index, geometry_args = op_args(backend, ODD, "neuron", None)
    grad = torch.randn(x.shape[0], weight.shape[0], *mask.shape[1:], device=x.device)
    with pytest.raises(RuntimeError, match="relu_output must have"):
        backward(grad, x, weight, mask, *index, *geometry_args, [True, True, True], grad[:, :-1])
    with pytest.raises(RuntimeError, match="relu_output"):
        backward(grad, x, weight, mask, *index, *geometry_args, [True, True, True], grad.double())


@pytest.mark.parametrize("backend", OPS)
def test_opcheck_backward_with_relu_output(backend):
    x, weight, bias, mask, index, geometry_args = op_args(backend, ODD, "neuron", None)
    relu_output = backend.op("masked_conv2d")(x, weight, bias, mask, *index, *geometry_args, relu=True)
    args = (torch.randn_like(relu_output), x, weight, mask, *index, *geometry_args, [True, True, True], relu_output)
    torch.library.opcheck(backend.op("masked_conv2d_backward").default, args)


@pytest.mark.parametrize("backend", OPS)
def test_ops_read_expanded_and_sliced_views(backend):
    # Tensors are read through their strides: an expanded grad_output (stride 0, as from y.sum()),
    # an expanded residual and a sliced input give the values of their contiguous copies.
    dtype = backend.dtypes[0]
    x, weight, bias, mask, index, geometry_args = op_args(backend, ODD, "spatial", None, dtype)
    conv = backend.op("masked_conv2d")
    shape = (x.shape[0], weight.shape[0], *mask.shape[1:])
    residual = torch.randn(1, shape[1], 1, shape[3], dtype=dtype, device=x.device).expand(shape)
    y = conv(x, weight, bias, mask, *index, *geometry_args, residual)
    torch.testing.assert_close(y, conv(x, weight, bias, mask, *index, *geometry_args, residual.contiguous()),
                               **TOLERANCE[dtype])
    grad_output = torch.ones((), dtype=dtype, device=x.device).expand(shape)
    backward = backend.op("masked_conv2d_backward")
    got = backward(grad_output, x, weight, mask, *index, *geometry_args, [True, True, True])
    want = backward(grad_output.contiguous(), x, weight, mask, *index, *geometry_args, [True, True, True])
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, **TOLERANCE[dtype])
    wide = torch.randn(x.shape[0], x.shape[1] + 3, x.shape[2] + 2, x.shape[3], dtype=dtype, device=x.device)
    sliced = wide[:, 1:1 + x.shape[1], 2:]
    torch.testing.assert_close(conv(sliced, weight, bias, mask, *index, *geometry_args),
                               reference.masked_conv2d(sliced, weight, bias, mask, *geometry_args), **TOLERANCE[dtype])


@pytest.mark.parametrize("backend", backends())
def test_a_bad_kept_index_is_one_error_on_every_backend(backend, monkeypatch):
    # The index's values are checked once per (index, mask) pair, in Python, whatever runs
    # after (rk.check_kept_index): again only when one of them is modified in place.
    x, weight, bias, mask, conv_args = case(backend, ODD, "neuron", None)
    other = rk.kept_index(rk.random_mask(tuple(mask.shape), 0.5, seed=7, device=mask.device))
    with pytest.raises(ValueError, match=r"kept_index does not match the mask .*list other kept positions"):
        backend(x, weight, bias, mask=mask, kept_index=other, **conv_args)
    checks = []
    monkeypatch.setattr(rk.functional, "check_kept_index",
                        lambda *args: checks.append(args) or rk.check_kept_index(*args))
    index = rk.kept_index(mask)
    for _ in range(2):
        backend(x, weight, bias, mask=mask, kept_index=index, **conv_args)
    assert len(checks) == 1
    mask[0, 0, 0] = ~mask[0, 0, 0]
    with pytest.raises(ValueError, match="kept_index does not match the mask"):
        backend(x, weight, bias, mask=mask, kept_index=index, **conv_args)


@pytest.mark.parametrize("backend", backends(lambda b: b.name in ("reference", "cpu", "cuda")
                                             or (b.name == "triton" and b.device == "cuda")))
def test_torch_compile_sees_one_op(backend):
    # fullgraph: no graph break around the op; aot_eager also traces the registered backward.
    layer = rk.MaskedConv2d(4, 32, 3, padding=1, mask_ratio=0.9, output_size=(8, 8), backend=backend.route)
    layer = layer.to(backend.device)
    x = torch.randn(2, 4, 8, 8, device=backend.device, requires_grad=True)
    y = torch.compile(layer, backend="aot_eager", fullgraph=True)(x)
    (grad,) = torch.autograd.grad(y.sum(), [x])
    expected = reference.masked_conv2d(x, layer.weight, layer.bias, layer.mask, padding=1)
    (want,) = torch.autograd.grad(expected.sum(), [x])
    torch.testing.assert_close(y, expected, **TOLERANCE[torch.float32])
    torch.testing.assert_close(grad, want, **TOLERANCE[torch.float32])


@pytest.mark.skipif("cpu" not in rk.available_backends() or rk.backends.cpu_kernels() != "avx512",
                    reason="needs an AVX-512 CPU (elsewhere the suite runs the AVX2 or portable kernels directly)")
def test_cpu_backend_again_on_the_avx2_kernels():
    # The cpu backend above ran the AVX-512 kernels; run its parity cases and the CPU kernels'
    # internals tests again on the AVX2 ones (ATen's capability picks them at startup).
    tests = os.path.dirname(os.path.abspath(__file__))
    result = python_subprocess(
        ["-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", os.path.join(tests, "test_parity.py"),
         os.path.join(tests, "test_cpu_kernels.py"), "-k", "not avx2"],
        env={"ATEN_CPU_CAPABILITY": "avx2", "RMASK_PARITY_BACKENDS": "cpu"},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and " failed" not in result.stdout
