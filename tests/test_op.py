"""The masked-conv op against the reference (F.conv2d * mask), on every backend here.

The oracle runs in float64; kernels are compared in float64 (tight: only summation order
differs) and float32 (PyTorch's own conv differs from float64 by ~1e-6 relative)."""

import os
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import rmask_kernels as rk
from rmask_kernels import reference
from rmask_kernels.functional import conv_output_size, resolve_padding, select_backend

from helpers import conv_geometries, leaves_and_oracle, make_case

BACKENDS = [b for b in ("cpu", "auto") if b == "auto" or b in rk.available_backends()]
MODES = [("neuron", None), ("spatial", None), ("group", 2)]
RATIOS = [0.0, 0.5, 0.9]
TOLERANCE = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-4, atol=1e-4)}

# (N, Cin, H, W, Cout, kernel, stride, padding, dilation, groups): the configurations
# PyTorch's Conv2d tests cover, small.
CONFIGS = [
    (2, 4, 8, 8, 6, 3, 1, 1, 1, 1),
    (2, 4, 9, 7, 6, 3, 2, 1, 1, 1),  # odd sizes, stride 2
    (1, 3, 10, 11, 4, (3, 5), (2, 1), (1, 2), 1, 1),  # rectangular kernel, mixed strides
    (2, 4, 12, 12, 4, 3, 1, 2, 2, 1),  # dilation
    (2, 4, 8, 8, 6, 1, 2, 0, 1, 1),  # 1x1 stride-2 projection shortcut
    (2, 4, 8, 8, 8, 3, 1, 1, 1, 2),  # groups
    (2, 4, 8, 8, 4, 3, 1, 1, 1, 4),  # depthwise
    (2, 4, 8, 8, 8, 3, 1, 1, 1, 4),  # depthwise with multiplier 2
    (2, 3, 7, 7, 4, 3, 1, "same", 1, 1),
    (2, 3, 7, 8, 4, (2, 4), 1, "same", (2, 1), 1),  # asymmetric "same"
    (2, 3, 7, 7, 4, 3, 1, "valid", 1, 1),
    (2, 3, 5, 5, 4, 5, 3, 0, 1, 1),  # kernel as large as the image
    (0, 4, 8, 8, 6, 3, 1, 1, 1, 1),  # batch 0
]


def check_against_reference(x, weight, bias, mask, conv_args, backend, grad=True):
    tol = TOLERANCE[x.dtype]
    inputs = [t.detach().clone().requires_grad_(grad) if t is not None else None for t in (x, weight, bias)]
    oracle = [t.detach().double().requires_grad_(grad) if t is not None else None for t in (x, weight, bias)]
    y = rk.masked_conv2d(*inputs, mask=mask, backend=backend, **conv_args)
    expected = reference.masked_conv2d(*oracle, mask, **conv_args)
    assert y.dtype == x.dtype and y.shape == expected.shape
    torch.testing.assert_close(y.double(), expected.detach(), **tol)
    assert (y.detach()[(~mask).expand_as(y)] == 0).all(), "masked outputs must be exactly zero"
    if grad:
        grad_y = torch.randn_like(expected)
        got = torch.autograd.grad(y, [t for t in inputs if t is not None], grad_y.to(y.dtype))
        want = torch.autograd.grad(expected, [t for t in oracle if t is not None], grad_y)
        for g, r in zip(got, want):
            torch.testing.assert_close(g.double(), r, **tol)
    return y


# float32 runs the batch-vector kernels (AVX2 CPUs), float64 the portable ones.
DTYPES = [torch.float32, torch.float64]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("config", CONFIGS, ids=str)
@pytest.mark.parametrize("mode,group_size", MODES, ids=lambda v: str(v))
@pytest.mark.parametrize("ratio", RATIOS)
def test_parity_with_reference(backend, config, mode, group_size, ratio, dtype):
    x, weight, bias, mask, conv_args = make_case(config, mode, group_size, ratio, dtype)
    check_against_reference(x, weight, bias, mask, conv_args, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bias", [True, False])
def test_float32_and_no_bias(backend, bias):
    x, weight, b, mask, conv_args = make_case(CONFIGS[1], "neuron", None, 0.5, torch.float32, bias)
    check_against_reference(x, weight, b, mask, conv_args, backend)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_error_near_pytorchs_own(dtype):
    # The kernel accumulates low-precision inputs in fp32; its error vs the fp64 oracle may
    # be at most ~2x that of PyTorch's own conv in the same dtype (STYLE.md).
    x, weight, b, mask, conv_args = make_case(CONFIGS[0], "neuron", None, 0.5, torch.float32)
    x, weight, b = x.to(dtype), weight.to(dtype), b.to(dtype)
    oracle = reference.masked_conv2d(x.double(), weight.double(), b.double(), mask, **conv_args)
    ours = rk.masked_conv2d(x, weight, b, mask, backend=BACKENDS[0], **conv_args)
    theirs = reference.masked_conv2d(x.float(), weight.float(), b.float(), mask, **conv_args).to(dtype)
    assert ours.dtype == dtype
    assert (ours.double() - oracle).abs().max() <= 2 * (theirs.double() - oracle).abs().max() + 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["channels_last", "permuted", "sliced"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_non_contiguous_and_channels_last(backend, layout, dtype):
    x, weight, bias, mask, conv_args = make_case(CONFIGS[1], "neuron", None, 0.5, dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "permuted":
        x = x.transpose(2, 3).contiguous().transpose(2, 3)
    else:
        x = torch.randn(2, 8, 9, 14, dtype=dtype)[:, ::2, :, ::2]
    assert not x.is_contiguous()
    y = check_against_reference(x, weight, bias, mask, conv_args, backend)
    expected_format = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    assert y.is_contiguous(memory_format=expected_format), "output in the input's memory format, as F.conv2d"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_non_contiguous_weight_and_mask(backend, dtype):
    x, weight, bias, mask, conv_args = make_case(CONFIGS[0], "neuron", None, 0.5, dtype)
    weight = weight.transpose(2, 3).contiguous().transpose(2, 3)
    mask = mask.transpose(1, 2).contiguous().transpose(1, 2)
    check_against_reference(x, weight, bias, mask, conv_args, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ratio", [0.01, 0.99, 0.999])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ratios_near_the_ends(backend, ratio, dtype):
    x, weight, bias, mask, conv_args = make_case((2, 4, 16, 16, 8, 3, 1, 1, 1, 1), "neuron", None, ratio, dtype)
    check_against_reference(x, weight, bias, mask, conv_args, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kept", [True, False])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_all_kept_and_fully_masked(backend, kept, dtype):
    x, weight, bias, mask, conv_args = make_case(CONFIGS[0], "neuron", None, 0.0, dtype)
    mask = torch.full_like(mask, kept)
    y = check_against_reference(x, weight, bias, mask, conv_args, backend)
    if not kept:
        assert (y == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_unbatched_input(backend):
    x, weight, bias, mask, conv_args = make_case(CONFIGS[1], "spatial", None, 0.5)
    y = rk.masked_conv2d(x[0], weight, bias, mask, backend=backend, **conv_args)
    torch.testing.assert_close(y, reference.masked_conv2d(x[:1], weight, bias, mask, **conv_args)[0])


def test_deterministic_bit_identical_runs():
    x, weight, bias, mask, conv_args = make_case((4, 8, 12, 12, 8, 3, 1, 1, 1, 1), "neuron", None, 0.5, torch.float32)
    runs = []
    for _ in range(2):
        xs, ws, bs = (t.clone().requires_grad_() for t in (x, weight, bias))
        y = rk.masked_conv2d(xs, ws, bs, mask, backend=BACKENDS[0], **conv_args)
        y.backward(torch.ones_like(y))
        runs.append((y.detach(), xs.grad, ws.grad, bs.grad))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_gradcheck_float64():
    x, weight, bias, mask, conv_args = make_case((2, 3, 6, 5, 4, 3, 2, 1, 1, 1), "neuron", None, 0.5)
    inputs = tuple(t.requires_grad_() for t in (x, weight, bias))

    def fn(a, w, b):
        return rk.masked_conv2d(a, w, b, mask, backend=BACKENDS[0], **conv_args)

    assert torch.autograd.gradcheck(fn, inputs, fast_mode=True)
    assert torch.autograd.gradgradcheck(
        lambda a, w, b: reference.masked_conv2d(a, w, b, mask, **conv_args), inputs, fast_mode=True
    )


def test_only_the_needed_gradients():
    x, weight, bias, mask, conv_args = make_case(CONFIGS[0], "neuron", None, 0.5)
    weight.requires_grad_()
    y = rk.masked_conv2d(x, weight, bias, mask, backend=BACKENDS[0], **conv_args)
    (grad_weight,) = torch.autograd.grad(y.sum(), [weight])
    expected = reference.masked_conv2d(x, weight, bias, mask, **conv_args)
    (want,) = torch.autograd.grad(expected.sum(), [weight])
    torch.testing.assert_close(grad_weight, want)
    x.requires_grad_()
    weight.requires_grad_(False)
    y = rk.masked_conv2d(x, weight, bias, mask, backend=BACKENDS[0], **conv_args)
    (grad_x,) = torch.autograd.grad(y.sum(), [x])
    (want,) = torch.autograd.grad(reference.masked_conv2d(x, weight, bias, mask, **conv_args).sum(), [x])
    torch.testing.assert_close(grad_x, want)


@pytest.mark.skipif("cpu" not in rk.available_backends(), reason="extension not built")
@pytest.mark.parametrize("config", [CONFIGS[1], CONFIGS[5], CONFIGS[-1]], ids=str)
@pytest.mark.parametrize("mode,group_size", MODES, ids=lambda v: str(v))
def test_opcheck(config, mode, group_size):
    x, weight, bias, mask, conv_args = make_case(config, mode, group_size, 0.5, torch.float32)
    index = rk.kept_index(mask, weight.shape[0])
    padding = resolve_padding(conv_args["padding"], weight.shape[2:], (1, 1), (1, 1))[::2]
    args = (
        x.requires_grad_(), weight.requires_grad_(), bias.requires_grad_(), mask, *index,
        list(torch.nn.modules.utils._pair(conv_args["stride"])), list(padding),
        list(torch.nn.modules.utils._pair(conv_args["dilation"])), conv_args["groups"],
    )
    torch.library.opcheck(torch.ops.rmask.masked_conv2d.default, args)
    y = torch.ops.rmask.masked_conv2d(*args)
    backward_args = (torch.randn_like(y).detach(), x.detach(), weight.detach()) + args[3:] + ([True, True, True],)
    assert len(args) == 12
    torch.library.opcheck(torch.ops.rmask.masked_conv2d_backward.default, backward_args)


@settings(max_examples=40, deadline=None)
@given(geometry=conv_geometries(), mode=st.sampled_from(["neuron", "spatial", "group"]), ratio=st.floats(0.0, 0.95),
       bias=st.booleans())
def test_property_random_configurations(geometry, mode, ratio, bias):
    g = geometry
    group_size = g["cout"] // g["groups"] if mode == "group" else None
    mask = rk.random_mask((g["cout"], *g["out"]), ratio, mode, group_size)
    x = torch.randn(g["n"], g["cin"], *g["size"], dtype=torch.float64)
    weight = torch.randn(g["cout"], g["cin"] // g["groups"], *g["kernel"], dtype=torch.float64)
    b = torch.randn(g["cout"], dtype=torch.float64) if bias else None
    conv_args = dict(stride=g["stride"], padding=g["padding"], dilation=g["dilation"], groups=g["groups"])
    check_against_reference(x, weight, b, mask, conv_args, BACKENDS[0])


# -- rejected inputs ------------------------------------------------------------------

def _ok():
    x = torch.randn(2, 4, 8, 8)
    weight = torch.randn(6, 4, 3, 3)
    mask = rk.random_mask((6, 8, 8), 0.5)
    return x, weight, mask


@pytest.mark.parametrize(
    "change,error,match",
    [
        (lambda x, w, m: (x, w, rk.random_mask((6, 7, 7), 0.5)), ValueError, r"mask has shape \(6, 7, 7\).*\(6, 8, 8\)"),
        (lambda x, w, m: (x, w, rk.random_mask((5, 8, 8), 0.5)), ValueError, r"mask has shape \(5, 8, 8\)"),
        (lambda x, w, m: (x, w, m.float()), TypeError, r"mask must be a bool tensor.*float32"),
        (lambda x, w, m: (x, w, None), TypeError, "mask is required"),
        (lambda x, w, m: (x[0, 0], w, m), ValueError, r"input must be a 4-D.*\(8, 8\)"),
        (lambda x, w, m: (x, w[0], m), ValueError, r"weight must be a 4-D.*\(4, 3, 3\)"),
        (lambda x, w, m: (x.double(), w, m), TypeError, "weight dtype must match input dtype torch.float64"),
        (lambda x, w, m: (x.long(), w, m), TypeError, "input must be a floating point tensor, got dtype torch.int64"),
        (lambda x, w, m: (x[:, :3], w, m), ValueError, "input has 3 channels but weight"),
        (lambda x, w, m: (x, w, m.to("meta")), ValueError, r"mask must be on the input's device cpu, got meta"),
    ],
)
def test_rejected_inputs(change, error, match):
    x, weight, mask = change(*_ok())
    with pytest.raises(error, match=match):
        rk.masked_conv2d(x, weight, None, mask, padding=1)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(backend="gpu"), ValueError, "backend must be one of .* got 'gpu'"),
        (dict(padding="full"), ValueError, "padding must be 'same', 'valid'.* got 'full'"),
        (dict(padding="same", stride=2), ValueError, r"padding='same' is not supported for strided.*\(2, 2\)"),
        (dict(padding=-1), ValueError, "padding must be non-negative, got -1"),
        (dict(stride=0, padding=1), ValueError, r"stride and dilation must be positive, got stride=\(0, 0\)"),
        (dict(groups=0, padding=1), ValueError, "groups must be a positive int, got 0"),
        (dict(stride=(1, 2, 3), padding=1), ValueError, r"stride must be an int or a pair of ints, got \(1, 2, 3\)"),
        (dict(bias=torch.randn(5), padding=1), ValueError, r"bias must be a torch.float32 tensor of shape \(6,\)"),
    ],
)
def test_rejected_arguments(kwargs, error, match):
    x, weight, mask = _ok()
    kwargs.setdefault("bias", None)
    with pytest.raises(error, match=match):
        rk.masked_conv2d(x, weight, mask=mask, **kwargs)


def test_too_small_input_rejected():
    with pytest.raises(ValueError, match=r"input of spatial size \(2, 2\) is too small for kernel \(3, 3\)"):
        rk.masked_conv2d(torch.randn(1, 4, 2, 2), torch.randn(6, 4, 3, 3), mask=rk.random_mask((6, 1, 1), 0.5))


@pytest.mark.skipif("cpu" not in rk.available_backends(), reason="extension not built")
def test_op_rejects_inconsistent_index():
    x, weight, mask = _ok()
    offsets, positions, by_position, channels = rk.kept_index(mask)

    def call(*index, stride=(1, 1)):
        return torch.ops.rmask.masked_conv2d(x, weight, None, mask, *index, list(stride), [1, 1], [1, 1], 1)

    with pytest.raises(RuntimeError, match=r"kept_positions must lie in \[0, 64\)"):
        call(offsets, positions + 64, by_position, channels)
    with pytest.raises(RuntimeError, match="kept_offsets must start at 0 and end at kept_positions.numel()"):
        call(offsets, positions[:-1], by_position, channels)
    with pytest.raises(RuntimeError, match="kept_offsets describes 4 mask patterns, which must divide the 6"):
        call(offsets[:5], positions, by_position, channels)
    with pytest.raises(RuntimeError, match="position_offsets must be a 1-D int64 tensor of Hout \\* Wout \\+ 1 = 65"):
        call(offsets, positions, by_position[:-1], channels)
    with pytest.raises(RuntimeError, match="position_offsets/position_channels must list the .* kept"):
        call(offsets, positions, by_position, channels[:-1])
    with pytest.raises(RuntimeError, match=r"position_channels must lie in \[0, 6\)"):
        call(offsets, positions, by_position, channels + 6)
    with pytest.raises(RuntimeError, match=r"mask must have shape \(6 or 1, 4, 4\) for this convolution.s output, got \[6, 8, 8\]"):
        call(offsets, positions, by_position, channels, stride=(2, 2))


def test_unavailable_backend_falls_back_with_a_message():
    x, weight, mask = _ok()
    # A CPU build lacks the CUDA kernels; a CUDA build has them, but they do not run CPU tensors.
    reason = "runs on CUDA tensors" if "cuda" in rk.available_backends() else "not available"
    with pytest.warns(RuntimeWarning, match=f"backend='cuda' {reason}.*falling back to the reference"):
        y = rk.masked_conv2d(x, weight, None, mask, padding=1, backend="cuda")
    torch.testing.assert_close(y, reference.masked_conv2d(x, weight, None, mask, padding=1))


def test_available_backends():
    names = rk.available_backends()
    assert names[0] == "reference"
    assert ("cpu" in names) == rk.ops.extension_loaded()


def test_package_works_without_the_extension():
    # A missing _C (not built) must leave a working package on the reference path, warned once
    # (and the Triton backend where triton is installed: it needs no compiled code, test_triton.py).
    code = (
        "import importlib.util, sys, warnings; sys.modules['rmask_kernels._C'] = None\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    import torch, rmask_kernels as rk\n"
        "assert any('compiled extension not available' in str(w.message) for w in caught), caught\n"
        "triton = ['triton'] if importlib.util.find_spec('triton') is not None else []\n"
        "assert rk.available_backends() == ['reference'] + triton, rk.available_backends()\n"
        "x = torch.randn(2, 3, 6, 6); w = torch.randn(4, 3, 3, 3); m = rk.random_mask((4, 6, 6), 0.5)\n"
        "y = rk.masked_conv2d(x, w, None, m, padding=1)\n"
        "assert torch.allclose(y, torch.nn.functional.conv2d(x, w, None, 1, 1) * m)\n"
        "layer = rk.MaskedConv2d(3, 4, 3, padding=1, mask_ratio=0.5, seed=0); layer(x)\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


@pytest.mark.skipif("cpu" not in rk.available_backends(), reason="extension not built")
def test_cpu_kernels_follow_the_cpu_capability():
    # ATen's capability (which ATEN_CPU_CAPABILITY can lower) picks the batch-vector kernels.
    expected = {"AVX512": "avx512", "AVX2": "avx2"}.get(torch.backends.cpu.get_cpu_capability(), "portable")
    assert rk.backends.cpu_kernels() == expected


@pytest.mark.skipif("cpu" not in rk.available_backends() or rk.backends.cpu_kernels() == "portable",
                    reason="the output cache serves the batch-vector kernels")
@pytest.mark.parametrize("mode", ["neuron", "spatial"])
def test_large_outputs_reuse_freed_memory(mode):
    # A freed output of >= 1 MiB goes to the cache, and the next output of its size takes it
    # (already mapped: no page faults); the tensors are ordinary (resizable, correct).
    x, weight = torch.randn(8, 16, 32, 32), torch.randn(64, 16, 3, 3)
    mask = rk.random_mask((64, 32, 32), 0.5, mode)
    y = rk.masked_conv2d(x, weight, None, mask, padding=1, backend="cpu")
    address, before = y.data_ptr(), rk.backends.cpu_output_cache()
    assert before["limit_bytes"] == int(os.environ.get("RMASK_CPU_CACHE_MB", "256")) << 20
    if before["limit_bytes"] < 8 << 20:
        pytest.skip("RMASK_CPU_CACHE_MB set below this test's output")
    del y
    assert rk.backends.cpu_output_cache()["cached_bytes"] == before["cached_bytes"] + 8 * 64 * 32 * 32 * 4
    y = rk.masked_conv2d(x, weight, None, mask, padding=1, backend="cpu")
    assert y.data_ptr() == address and rk.backends.cpu_output_cache() == before
    torch.testing.assert_close(y, reference.masked_conv2d(x, weight, None, mask, padding=1), rtol=1e-4, atol=1e-4)
    y.resize_(16, 64, 32, 32)  # storage grows like any tensor's
    assert y.shape == (16, 64, 32, 32)


@pytest.mark.skipif("cpu" not in rk.available_backends(), reason="extension not built")
@pytest.mark.parametrize("value,works", [("0", True), ("12", True), ("lots", False)])
def test_output_cache_limit_from_the_environment(value, works):
    code = (
        "import torch, rmask_kernels as rk\n"
        "m = rk.random_mask((64, 32, 32), 0.5, 'neuron')\n"
        "y = rk.masked_conv2d(torch.randn(8, 16, 32, 32), torch.randn(64, 16, 3, 3), None, m, padding=1, backend='cpu')\n"
        "del y\n"
        "print(rk.backends.cpu_output_cache())\n"
    )
    result = subprocess.run([sys.executable, "-c", code], env={**os.environ, "RMASK_CPU_CACHE_MB": value},
                            capture_output=True, text=True)
    if works:
        assert result.returncode == 0, result.stderr[-2000:]
        limit = int(value) << 20
        cached = 8 * 64 * 32 * 32 * 4 if limit >= 8 * 64 * 32 * 32 * 4 else 0
        assert f"'cached_bytes': {cached}, 'limit_bytes': {limit}" in result.stdout
    else:
        assert result.returncode != 0 and "RMASK_CPU_CACHE_MB must be a number of megabytes >= 0, got 'lots'" in result.stderr


@pytest.mark.skipif("cpu" not in rk.available_backends() or rk.backends.cpu_kernels() == "portable",
                    reason="the output cache serves the batch-vector kernels")
def test_output_cache_releases_the_oldest_blocks_over_its_limit():
    # 3 MB: a 2 MB output freed, then a 1.5 MB one: the 2 MB block (freed first) is released.
    code = (
        "import torch, rmask_kernels as rk\n"
        "def out(n):\n"
        "    m = rk.random_mask((64, 32, 32), 0.5, 'neuron')\n"
        "    return rk.masked_conv2d(torch.randn(n, 16, 32, 32), torch.randn(64, 16, 3, 3), None, m, padding=1, backend='cpu')\n"
        "a, b = out(8), out(6)\n"
        "del a\n"
        "print(rk.backends.cpu_output_cache()['cached_bytes'])\n"
        "del b\n"
        "print(rk.backends.cpu_output_cache()['cached_bytes'])\n"
    )
    result = subprocess.run([sys.executable, "-c", code], env={**os.environ, "RMASK_CPU_CACHE_MB": "3"},
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == [str(2 << 20), str(3 << 19)]


@pytest.mark.skipif(
    "cpu" not in rk.available_backends() or rk.backends.cpu_kernels() != "avx512",
    reason="needs an AVX-512 CPU (the AVX2 kernels are what the suite runs elsewhere)",
)
def test_avx2_kernels_on_an_avx512_cpu():
    # The suite above ran the AVX-512 kernels; run this file again on the AVX2 ones.
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2"}
    command = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__,
               "-k", "not avx2_kernels_on_an_avx512_cpu"]
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert " passed" in result.stdout


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("ratio", [0.0, 0.3])
@pytest.mark.parametrize("mode,out_channels", [("neuron", 23), ("spatial", 70)])
def test_every_tile_shape(layout, ratio, mode, out_channels):
    # 40 images: a full tile of 32 and a tail of 16 (AVX-512) or 16 + 16 + 8 (AVX2); 70 input
    # channels: whole vectors of input channels plus remainders in grad-weight; 23 output
    # channels: up to 23 kept at one position, more than any one tile holds. Spatial masks
    # take the per-image kernel: 70 output channels are a full tile of 64 (AVX-512) plus a
    # partial vector, and 30 or 21 kept positions full tiles of 6 plus a tail.
    config = (40, 70, 6, 5, out_channels, 3, 1, 1, 1, 1)
    x, weight, bias, mask, conv_args = make_case(config, mode, None, ratio, torch.float32)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    check_against_reference(x, weight, bias, mask, conv_args, BACKENDS[0])


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("ratio", [0.3, 0.7])
def test_batch_last_rows_in_whole_and_partial_blocks(ratio, layout):
    # NCHW rows go batch-last in 16 x 16 blocks (AVX-512) where 16 images and 16 columns
    # remain, 8 x 8 blocks elsewhere (NHWC rows: 8 x 8 blocks of images x channels): 40 images
    # are two whole blocks and 8 more, a row of 37 two whole blocks and 5 more columns, 37
    # input and 40 output channels whole blocks and a remainder; forward (input rows),
    # grad-input (back out of the panels) and the kept output gradients all go through them.
    config = (40, 37, 3, 37, 40, 3, 1, 1, 1, 1)
    x, weight, bias, mask, conv_args = make_case(config, "neuron", None, ratio, torch.float32)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    check_against_reference(x, weight, bias, mask, conv_args, BACKENDS[0])


@pytest.mark.parametrize("epilogue", ["none", "residual+relu", "stats"])
def test_neuron_rows_wider_than_64_outputs(epilogue):
    # The neuron forward copies each output row out of its staging row loading only the kept
    # values, from a bit per (channel, column) in 64-bit words (the staging row is never
    # zeroed): rows of 150 outputs are three words and a tail past the last whole vector.
    x, weight, bias, mask, conv_args = make_case((3, 4, 4, 150, 6, 3, 1, 1, 1, 1), "neuron", None, 0.5, torch.float32)
    residual = torch.randn(3, 6, 4, 150) if epilogue == "residual+relu" else None
    expected = reference.masked_conv2d(x.double(), weight.double(), bias.double(), mask, **conv_args)
    for _ in range(2):  # the second call finds the first call's values in the staging rows
        result = rk.masked_conv2d(x, weight, bias, mask, backend=BACKENDS[0], relu=residual is not None,
                                  residual=residual, channel_stats=epilogue == "stats", **conv_args)
    y = result[0] if epilogue == "stats" else result
    if residual is not None:
        expected = F.relu(expected + residual.double())
    torch.testing.assert_close(y.double(), expected, **TOLERANCE[torch.float32])
    at_masked = torch.zeros_like(y) if residual is None else F.relu(residual)
    assert torch.equal(y[(~mask).expand_as(y)], at_masked[(~mask).expand_as(y)])
    if epilogue == "stats":
        torch.testing.assert_close(result[1], expected.sum(dim=(0, 2, 3)), rtol=1e-4, atol=1e-3)
        torch.testing.assert_close(result[2], expected.square().sum(dim=(0, 2, 3)), rtol=1e-4, atol=1e-2)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("ratio", [0.3, 0.95])
@pytest.mark.parametrize("epilogue", ["none", "residual", "residual+relu"])
def test_spatial_write_out(layout, ratio, epilogue):
    # The spatial kernel keeps only the kept outputs and writes each output vector expanded
    # from them: 19x23 = 437 positions per plane are 27 whole vectors of 16 (or 54 of 8) plus
    # a tail of 5, planes of 437 floats leave most vectors unaligned, and at ratio 0.95 most
    # vectors have nothing kept while at 0.3 some have everything. 70 channels: 4 whole
    # 16-channel blocks of the input transpose and the weight packing plus a remainder.
    config = (5, 70, 19, 23, 70, 3, 1, 1, 1, 1)
    x, weight, bias, mask, conv_args = make_case(config, "spatial", None, ratio, torch.float32)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    residual = torch.randn(5, 70, 19, 23) if epilogue != "none" else None
    relu = epilogue == "residual+relu"
    y = rk.masked_conv2d(x, weight, bias, mask, backend=BACKENDS[0], relu=relu, residual=residual, **conv_args)
    expected = reference.masked_conv2d(x.double(), weight.double(), bias.double(), mask, **conv_args)
    if residual is not None:
        expected = expected + residual.double()
    if relu:
        expected = F.relu(expected)
    torch.testing.assert_close(y.double(), expected, **TOLERANCE[torch.float32])
    if residual is None:
        assert (y[(~mask).expand_as(y)] == 0).all(), "masked outputs must be exactly zero"
    assert y.is_contiguous(memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format)


@pytest.mark.parametrize("stride,dilation", [(2, 1), (1, 2)])
def test_spatial_lays_out_every_input_it_reads(stride, dilation):
    # The spatial kernels lay out only the blocks of input positions that some kept output
    # reads (per-thread scratch keeps the rest from the call before). One kept position at a
    # time, every position of the plane, each call on fresh input after a dense call has
    # filled the scratch with other values: a block read but not laid out gives wrong sums.
    x_shape, weight = (6, 20, 18, 19), torch.randn(24, 20, 3, 3)
    conv_args = dict(stride=stride, padding=1, dilation=dilation)
    out_h, out_w = conv_output_size(x_shape[2:], (3, 3), (stride, stride), (1, 1, 1, 1), (dilation, dilation))
    for p in range(out_h * out_w):
        rk.masked_conv2d(torch.randn(x_shape), weight, None, torch.ones(1, out_h, out_w, dtype=torch.bool),
                         backend=BACKENDS[0], **conv_args)
        mask = torch.zeros(1, out_h * out_w, dtype=torch.bool)
        mask[0, p] = True
        mask = mask.view(1, out_h, out_w)
        x = torch.randn(x_shape)
        for grad in (False, True):
            check_against_reference(x, weight, None, mask, conv_args, BACKENDS[0], grad=grad)


@pytest.mark.skipif("cpu" not in rk.available_backends(), reason="extension not built")
def test_auto_takes_the_kernel_where_it_pays_off():
    x = torch.randn(32, 4, 16, 16)
    sparse = rk.random_mask((6, 16, 16), 0.9, "spatial")
    dense = rk.random_mask((6, 16, 16), 0.05, "neuron")
    assert select_backend("auto", x, sparse, out_channels=6) == "cpu"
    assert select_backend("auto", x, dense) == "reference"
    assert select_backend("cpu", x, dense) == "cpu"
    assert select_backend("reference", x, sparse, out_channels=6) == "reference"
    # The portable kernels (float64, groups) pay off only for few patterns at high ratios.
    neuron = rk.random_mask((6, 16, 16), 0.9, "neuron")
    assert select_backend("auto", x.double(), neuron) == "reference"
    assert select_backend("auto", x.double(), sparse, out_channels=6) == "cpu"
    if rk.backends.batch_vector_kernels(torch.float32, 1):
        assert select_backend("auto", x, neuron) == "cpu"
        # One image fills 1 of 16 lanes: a 0.9 mask no longer pays for that. The fixed part is
        # padded too: 2 images need keep <= 0.05 (not 0.75 * 2 / 16), 8 images keep <= 0.35 (AVX-512).
        assert select_backend("auto", x[:1], neuron) == "reference"
        assert select_backend("auto", x[:2], kept_fraction_mask(6, 0.04)) == "cpu"
        assert select_backend("auto", x[:2], kept_fraction_mask(6, 0.08)) == "reference"
        assert select_backend("auto", x[:8], kept_fraction_mask(6, 0.3)) == "cpu"
        assert select_backend("auto", x[:8], kept_fraction_mask(6, 0.45)) == "reference"
        # Spatial masks take the per-image kernels: sparse pays off up to a higher keep, and
        # for a single image too.
        assert select_backend("auto", x, rk.random_mask((6, 16, 16), 0.22, "spatial"), out_channels=6) == "cpu"
        assert select_backend("auto", x, rk.random_mask((6, 16, 16), 0.1, "neuron")) == "reference"
        assert select_backend("auto", x[:1], sparse, out_channels=6) == "cpu"
        assert select_backend("auto", x, rk.random_mask((6, 16, 16), 0.02, "spatial"), out_channels=6) == "reference"


def kept_fraction_mask(channels, keep):
    """A (channels, 16, 16) mask keeping exactly round(keep * 256) positions per channel,
    at a different place in each channel (channels > 1: one pattern per channel)."""
    kept = round(keep * 256)
    mask = torch.zeros(channels, 256, dtype=torch.bool)
    for c in range(channels):
        mask[c, (torch.arange(kept) * 7 + c) % 256] = True
    return mask.view(channels, 16, 16)


@pytest.mark.skipif("cpu" not in rk.available_backends(), reason="extension not built")
@pytest.mark.parametrize("mode", ["neuron", "spatial"])
def test_auto_counts_the_backward_when_there_will_be_one(mode):
    # Between the forward-only crossover and the fwd+bwd one, "auto" takes dense conv for
    # inference and the kernel for a call that will be differentiated; keep 1.0 stays dense.
    kernels = rk.backends.cpu_kernels()
    if not rk.backends.batch_vector_kernels(torch.float32, 1):
        pytest.skip(f"the {kernels} kernels have one crossover")
    table = ("SPATIAL" if mode == "spatial" else "BATCH_VECTOR") + "_MAX_KEEP"
    forward_only, with_grad = (getattr(rk.backends, table + suffix)[kernels] for suffix in ("", "_WITH_GRAD"))
    mask = kept_fraction_mask(1 if mode == "spatial" else 6, (forward_only + with_grad) / 2)
    x, weight = torch.randn(32, 4, 16, 16), torch.randn(6, 4, 3, 3)
    assert select_backend("auto", x, mask, out_channels=6) == "reference"
    assert select_backend("auto", x, mask, out_channels=6, with_grad=True) == "cpu"
    assert select_backend("auto", x, kept_fraction_mask(6, 1.0), with_grad=True) == "reference"
    # masked_conv2d tells the two apart by torch.is_grad_enabled() and requires_grad.
    def runs_kernel(x, weight, grad_enabled=True):
        with torch.profiler.profile() as prof, torch.set_grad_enabled(grad_enabled):
            rk.masked_conv2d(x, weight, None, mask, padding=1)
        return "rmask::masked_conv2d" in {event.name for event in prof.events()}

    assert not runs_kernel(x, weight)
    assert runs_kernel(x, weight.requires_grad_())
    assert runs_kernel(x.requires_grad_(), weight.detach())
    assert not runs_kernel(x, weight, grad_enabled=False)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("mode,group_size", MODES, ids=lambda v: str(v))
def test_large_odd_shapes(backend, layout, mode, group_size):
    # Batch, channels and sizes that fill no SIMD block evenly (17 images: 16 lanes + 1).
    config = (17, 11, 23, 19, 13, (3, 5), (2, 1), (1, 2), 1, 1)
    x, weight, bias, mask, conv_args = make_case(config, mode, 13 if mode == "group" else None, 0.6, torch.float32)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    y = check_against_reference(x, weight, bias, mask, conv_args, backend)
    if layout == "channels_last":
        assert y.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
@pytest.mark.parametrize("mode,group_size", MODES, ids=lambda v: str(v))
def test_fused_relu_epilogue(backend, mode, group_size, dtype):
    x, weight, bias, mask, conv_args = make_case(CONFIGS[1], mode, group_size, 0.5, dtype)
    inputs, oracle = leaves_and_oracle(x, weight, bias)
    y = rk.masked_conv2d(*inputs, mask=mask, backend=backend, relu=True, **conv_args)
    expected = F.relu(reference.masked_conv2d(*oracle, mask, **conv_args))
    torch.testing.assert_close(y.double(), expected, **TOLERANCE[dtype])
    assert (y.detach() >= 0).all() and (y.detach()[(~mask).expand_as(y)] == 0).all()
    grad_y = torch.randn_like(expected)
    for got, want in zip(torch.autograd.grad(y, inputs, grad_y.to(dtype)), torch.autograd.grad(expected, oracle, grad_y)):
        torch.testing.assert_close(got.double(), want, **TOLERANCE[dtype])


@pytest.mark.skipif("cpu" not in rk.available_backends(), reason="extension not built")
def test_opcheck_fused_relu():
    x, weight, bias, mask, conv_args = make_case(CONFIGS[0], "neuron", None, 0.5, torch.float32)
    args = (x.requires_grad_(), weight.requires_grad_(), bias.requires_grad_(), mask, *rk.kept_index(mask),
            [1, 1], [1, 1], [1, 1], 1)
    torch.library.opcheck(torch.ops.rmask.masked_conv2d.default, args, {"relu": True})


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
@pytest.mark.parametrize("mode,group_size", MODES, ids=lambda v: str(v))
def test_channel_stats_in_the_same_pass(backend, mode, group_size, dtype):
    # Sum and sum of squares per channel over the kept outputs, and gradients through all three.
    x, weight, bias, mask, conv_args = make_case(CONFIGS[1], mode, group_size, 0.5, dtype)
    inputs, oracle = leaves_and_oracle(x, weight, bias)
    y, total, squares = rk.masked_conv2d(*inputs, mask=mask, backend=backend, channel_stats=True, **conv_args)
    assert total.dtype == squares.dtype == torch.float64 and total.shape == (weight.shape[0],)
    expected = reference.masked_conv2d(*oracle, mask, **conv_args)
    want_total, want_squares = expected.sum(dim=(0, 2, 3)), expected.square().sum(dim=(0, 2, 3))
    torch.testing.assert_close(y.double(), expected, **TOLERANCE[dtype])
    torch.testing.assert_close(total, want_total, **TOLERANCE[dtype])
    torch.testing.assert_close(squares, want_squares, rtol=TOLERANCE[dtype]["rtol"], atol=TOLERANCE[dtype]["atol"] * 10)
    g_y, g_total, g_squares = torch.randn_like(expected), torch.randn_like(want_total), torch.randn_like(want_squares)
    loss = (y.double() * g_y).sum() + (total * g_total).sum() + (squares * g_squares).sum()
    want_loss = (expected * g_y).sum() + (want_total * g_total).sum() + (want_squares * g_squares).sum()
    for got, want in zip(torch.autograd.grad(loss, inputs), torch.autograd.grad(want_loss, oracle)):
        torch.testing.assert_close(got.double(), want, rtol=1e-3 if dtype == torch.float32 else 1e-9, atol=1e-3 if dtype == torch.float32 else 1e-9)


@pytest.mark.parametrize("kwargs", [dict(relu=True), dict(residual=True)], ids=str)
def test_channel_stats_exclude_relu_and_residual(kwargs):
    x, weight, mask = _ok()
    if kwargs.get("residual"):
        kwargs = dict(residual=torch.zeros(x.shape[0], weight.shape[0], *mask.shape[1:]))
    with pytest.raises(ValueError, match="channel_stats cannot be combined with relu or residual"):
        rk.masked_conv2d(x, weight, None, mask, padding=1, channel_stats=True, **kwargs)


@pytest.mark.parametrize("relu", [False, True], ids=["add", "add+relu"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "residual_channels_last"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
@pytest.mark.parametrize("mode,group_size", MODES, ids=lambda v: str(v))
def test_fused_residual_epilogue(backend, mode, group_size, dtype, layout, relu):
    # relu?(conv * mask + residual): the residual lands on every position, masked ones too.
    x, weight, bias, mask, conv_args = make_case(CONFIGS[1], mode, group_size, 0.5, dtype)
    residual = torch.randn(x.shape[0], weight.shape[0], *mask.shape[1:], dtype=dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    if layout == "residual_channels_last":  # a layout other than the output's
        residual = residual.contiguous(memory_format=torch.channels_last)
    inputs, oracle = leaves_and_oracle(x, weight, bias, residual)
    y = rk.masked_conv2d(*inputs[:3], mask=mask, backend=backend, relu=relu, residual=inputs[3], **conv_args)
    expected = reference.masked_conv2d(*oracle[:3], mask, **conv_args) + oracle[3]
    expected = F.relu(expected) if relu else expected
    torch.testing.assert_close(y.double(), expected, **TOLERANCE[dtype])
    at_masked = F.relu(residual) if relu else residual
    assert torch.equal(y.detach()[(~mask).expand_as(y)], at_masked[(~mask).expand_as(y)])
    grad_y = torch.randn_like(expected)
    for got, want in zip(torch.autograd.grad(y, inputs, grad_y.to(dtype)), torch.autograd.grad(expected, oracle, grad_y)):
        torch.testing.assert_close(got.double(), want, **TOLERANCE[dtype])


@pytest.mark.parametrize("only", ["input", "weight", "bias", "residual"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_one_differentiable_argument_is_enough_for_a_graph(backend, only):
    # rk.masked_conv2d calls the op below its autograd kernel when nothing needs a gradient:
    # any single argument that requires grad must still get one, and under no_grad none.
    x, weight, bias, mask, conv_args = make_case(CONFIGS[1], "neuron", None, 0.5)
    residual = torch.randn(x.shape[0], weight.shape[0], *mask.shape[1:], dtype=x.dtype)
    tensors = dict(input=x, weight=weight, bias=bias, residual=residual)
    tensors[only] = tensors[only].clone().requires_grad_()
    with torch.no_grad():
        assert rk.masked_conv2d(**tensors, mask=mask, backend=backend, relu=True, **conv_args).grad_fn is None
    y = rk.masked_conv2d(**tensors, mask=mask, backend=backend, relu=True, **conv_args)
    oracle = {name: t.detach().requires_grad_(name == only) for name, t in tensors.items()}
    expected = F.relu(reference.masked_conv2d(oracle["input"], oracle["weight"], oracle["bias"], mask, **conv_args)
                      + oracle["residual"])
    grad_y = torch.randn_like(expected)
    (got,) = torch.autograd.grad(y, tensors[only], grad_y)
    (want,) = torch.autograd.grad(expected, oracle[only], grad_y)
    torch.testing.assert_close(got, want, **TOLERANCE[x.dtype])


@pytest.mark.skipif("cpu" not in rk.available_backends(), reason="extension not built")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_opcheck_fused_residual(dtype):
    x, weight, bias, mask, conv_args = make_case(CONFIGS[0], "neuron", None, 0.5, dtype)
    residual = torch.randn(x.shape[0], weight.shape[0], *mask.shape[1:], dtype=dtype, requires_grad=True)
    args = (x.requires_grad_(), weight.requires_grad_(), bias.requires_grad_(), mask, *rk.kept_index(mask),
            [1, 1], [1, 1], [1, 1], 1, residual)
    torch.library.opcheck(torch.ops.rmask.masked_conv2d.default, args, {"relu": True})


@pytest.mark.parametrize(
    "residual,match",
    [
        (torch.zeros(2, 6, 8, 7), r"residual must have the output's shape \(2, 6, 8, 8\), got \(2, 6, 8, 7\)"),
        (torch.zeros(2, 6, 8, 8, dtype=torch.float64), r"residual must be a torch.float32 tensor on cpu, got torch.float64"),
        ("not a tensor", r"residual must have the output's shape .*got str"),
    ],
    ids=["shape", "dtype", "type"],
)
def test_rejected_residual(residual, match):
    x, weight, mask = torch.randn(2, 4, 8, 8), torch.randn(6, 4, 3, 3), rk.random_mask((6, 8, 8), 0.5)
    with pytest.raises(ValueError, match=match):
        rk.masked_conv2d(x, weight, None, mask, padding=1, residual=residual)


@pytest.mark.skipif("cpu" not in rk.available_backends(), reason="extension not built")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_opcheck_channel_stats(dtype):
    x, weight, bias, mask, conv_args = make_case(CONFIGS[1], "neuron", None, 0.5, dtype)
    args = (x.requires_grad_(), weight.requires_grad_(), bias.requires_grad_(), mask, *rk.kept_index(mask),
            [2, 2], [1, 1], [1, 1], 1)
    torch.library.opcheck(torch.ops.rmask.masked_conv2d_stats.default, args)


@pytest.mark.skipif("cpu" not in rk.available_backends(), reason="extension not built")
@pytest.mark.parametrize("backend", ["cpu", "auto"])
def test_torch_compile_sees_one_op(backend):
    # fullgraph: no graph break around the op (nor in auto's choice); aot_eager also traces
    # the registered backward.
    layer = rk.MaskedConv2d(4, 6, 3, padding=1, mask_ratio=0.9, output_size=(8, 8), backend=backend)
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    y = compiled(x)
    (grad,) = torch.autograd.grad(y.sum(), [x])
    expected = reference.masked_conv2d(x, layer.weight, layer.bias, layer.mask, padding=1)
    (want,) = torch.autograd.grad(expected.sum(), [x])
    torch.testing.assert_close(y, expected)
    torch.testing.assert_close(grad, want)
