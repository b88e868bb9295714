"""The masked-conv op's contract, written once: conv geometries, mask cases, the case builder,
tolerances and the hypothesis strategy that every backend's parity tests share
(tests/test_parity.py), plus the backend-internals tests that build cases the same way."""

import pytest
import torch
from hypothesis import assume
from hypothesis import strategies as st
from torch.nn.modules.utils import _pair as pair

import rmask_kernels as rk
from rmask_kernels import reference
from rmask_kernels.functional import conv_output_size, resolve_padding

# (N, C_in, H, W, C_out, kernel, stride, padding, dilation, groups), small: the configurations
# PyTorch's Conv2d tests cover, and those a kernel's own structure makes special.
GEOMETRIES = {
    "basic": (2, 4, 8, 8, 6, 3, 1, 1, 1, 1),
    "odd-stride2": (2, 4, 9, 7, 6, 3, 2, 1, 1, 1),
    "rectangular-mixed-strides": (1, 3, 10, 11, 4, (3, 5), (2, 1), (1, 2), 1, 1),
    "dilation": (2, 4, 12, 12, 4, 3, 1, 2, 2, 1),
    "1x1-stride2-shortcut": (2, 4, 8, 8, 6, 1, 2, 0, 1, 1),
    "groups": (2, 4, 8, 8, 8, 3, 1, 1, 1, 2),
    "depthwise": (2, 4, 8, 8, 4, 3, 1, 1, 1, 4),
    "depthwise-x2": (2, 4, 8, 8, 8, 3, 1, 1, 1, 4),
    "depthwise-x2-stride2-odd": (2, 4, 9, 9, 8, 3, 2, 1, 1, 4),
    "same": (2, 3, 7, 7, 4, 3, 1, "same", 1, 1),
    "same-asymmetric": (2, 3, 7, 8, 4, (2, 4), 1, "same", (2, 1), 1),
    "valid": (2, 3, 7, 7, 4, 3, 1, "valid", 1, 1),
    "kernel-as-large-as-the-image": (2, 3, 5, 5, 4, 5, 3, 0, 1, 1),
    "even-kernel-anisotropic-dilation": (3, 2, 6, 5, 4, 2, 1, 0, (2, 1), 1),
    "batch0": (0, 4, 8, 8, 6, 3, 1, 1, 1, 1),
    # 32 output channels: group-of-16 and spatial masks fill the Triton by-pattern kernels' N
    # dimension (tl.dot's smallest is 16), pattern blocks cut at conv-group boundaries.
    "wide": (2, 4, 8, 8, 32, 3, 1, 1, 1, 1),
    "wide-odd-stride2": (2, 4, 9, 7, 32, 3, 2, 1, 1, 1),
    "wide-rectangular": (1, 3, 8, 9, 32, (3, 5), (2, 1), (1, 2), 1, 1),
    "wide-dilation": (2, 4, 8, 8, 32, 3, 1, 1, 2, 1),
    "wide-1x1-stride2": (2, 4, 8, 8, 32, 1, 2, 0, 1, 1),
    "wide-groups": (2, 4, 8, 8, 32, 3, 1, 1, 1, 2),
    "wide-depthwise-x8": (2, 4, 7, 7, 32, 3, 1, 1, 1, 4),
    "wide-same-asymmetric": (1, 3, 7, 6, 32, (2, 4), 1, "same", (2, 1), 1),
    # More outputs than one CUDA grid pass covers; 33 images: 2 lane blocks and 1 on the CPU.
    "multi-grid-pass": (33, 16, 17, 17, 32, 3, 1, 1, 1, 1),
}

# (mode, group_size): a pattern per channel, one pattern for all, patterns per 2 channels, and
# per 16 (where C_out allows it: the Triton by-pattern kernels' tile width).
MASKS = [("neuron", None), ("spatial", None), ("group", 2), ("group", 16)]
RATIOS = [0.0, 0.5, 0.9]

# Against the float64 oracle. float64: only the summation order differs. float32: PyTorch's
# own conv differs from float64 by ~1e-6 relative; sums of up to a few hundred products.
TOLERANCE = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-4, atol=1e-4)}


def conv_tolerance(dtype, weight):
    """TOLERANCE for a conv with this weight: float32's absolute error grows with the number of
    products summed per output (C_in/groups * kh * kw) beyond the ~16 of the small cases."""
    fan_in = weight.shape[1] * weight.shape[2] * weight.shape[3]
    scale = max(1.0, fan_in / 16) if dtype == torch.float32 else 1.0
    base = TOLERANCE[dtype]
    return dict(rtol=base["rtol"], atol=base["atol"] * scale)
# Low precision: the output's error vs the float64 oracle may be at most ~2x that of PyTorch's
# own conv in the same dtype (which rounds an fp32-accumulated result once), plus this floor for
# shapes where PyTorch happens to be near exact. Gradients: relative to their largest entry,
# within a few roundings of the dtype (eps: 2^-8 bf16, 2^-11 fp16).
LOW_PRECISION_FLOOR = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-1}
LOW_PRECISION_GRAD = {torch.float32: 1e-4, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def mask_cases(geometry):
    """The (mode, group_size) cases that apply to a geometry: group masks need C_out divisible
    by the group size."""
    out_channels = geometry[4]
    return [(mode, size) for mode, size in MASKS if size is None or (out_channels % size == 0 and size < out_channels)]


def parity_cases(ratios=RATIOS):
    """pytest params (geometry, mode, group_size, ratio) over every geometry, mask and ratio."""
    return [
        pytest.param(geometry, mode, size, ratio, id=f"{name}-{mode}{size or ''}-{ratio}")
        for name, geometry in GEOMETRIES.items()
        for mode, size in mask_cases(geometry)
        for ratio in ratios
    ]


def output_size(geometry):
    """(H_out, W_out) of a geometry, "same"/"valid" padding included."""
    _, _, h, w, _, kernel, stride, padding, dilation, _ = geometry
    if isinstance(padding, str):
        padding4 = resolve_padding(padding, pair(kernel), pair(stride), pair(dilation))
    else:
        ph, pw = pair(padding)
        padding4 = (ph, ph, pw, pw)
    return conv_output_size((h, w), pair(kernel), pair(stride), padding4, pair(dilation))


def make_case(geometry, mode, group_size, ratio, dtype=torch.float64, bias=True, device="cpu"):
    """Fresh random (x, weight, bias, mask, conv kwargs) for a geometry and mask case."""
    n, cin, h, w, cout, kernel, stride, padding, dilation, groups = geometry
    x = torch.randn(n, cin, h, w, dtype=dtype, device=device)
    weight = torch.randn(cout, cin // groups, *pair(kernel), dtype=dtype, device=device)
    b = torch.randn(cout, dtype=dtype, device=device) if bias else None
    mask = rk.random_mask((cout, *output_size(geometry)), ratio, mode, group_size, device=device)
    return x, weight, b, mask, dict(stride=stride, padding=padding, dilation=dilation, groups=groups)


def leaves_and_oracle(*tensors):
    """Fresh leaves of the inputs (in their dtype) and float64 leaves for the oracle; None stays None."""
    return ([t.detach().clone().requires_grad_() if t is not None else None for t in tensors],
            [t.detach().double().requires_grad_() if t is not None else None for t in tensors])


def masked_outputs(y, mask):
    """The values of ``y`` at the positions ``mask`` drops."""
    return y.detach()[(~mask).expand_as(y)]


def check_against_reference(run, x, weight, bias, mask, conv_args, grad=True, tolerance=None, input_mask=None,
                            **kwargs):
    """``run(x, weight, bias, mask=mask, **conv_args, **kwargs)`` (a backend's masked conv) against
    the float64 oracle: values, masked outputs exactly zero and (with grad) the gradient of every
    tensor argument. With ``input_mask`` (passed on to ``run``) the oracle's input is
    ``x * input_mask``, and the input's gradient must be exactly 0 where it is False. Returns
    the output."""
    tolerance = tolerance or conv_tolerance(x.dtype, weight)
    inputs, oracle = leaves_and_oracle(x, weight, bias)
    if not grad:
        inputs = [t.detach() if t is not None else None for t in inputs]
    if input_mask is not None:
        kwargs = dict(kwargs, input_mask=input_mask)
    y = run(*inputs, mask=mask, **conv_args, **kwargs)
    oracle_input = oracle[0] * input_mask if input_mask is not None else oracle[0]
    expected = reference.masked_conv2d(oracle_input, *oracle[1:], mask, **conv_args)
    assert y.dtype == x.dtype and y.shape == expected.shape and y.device == x.device
    torch.testing.assert_close(y.double(), expected.detach(), **tolerance)
    assert (masked_outputs(y, mask) == 0).all(), "masked outputs must be exactly zero"
    if grad:
        grad_y = torch.randn_like(expected)
        leaves = [t for t in inputs if t is not None]
        got = torch.autograd.grad(y, leaves, grad_y.to(y.dtype))
        want = torch.autograd.grad(expected, [t for t in oracle if t is not None], grad_y)
        for name, g, r in zip(("input", "weight", "bias"), got, want):
            torch.testing.assert_close(g.double(), r, **tolerance, msg=lambda m: f"grad {name}: {m}")
        if input_mask is not None:
            assert (got[0][(~input_mask).expand_as(x)] == 0).all(), "masked inputs' gradient must be exactly zero"
    return y


@st.composite
def conv_geometries(draw, max_batch=3, max_size=9, max_kernel=4, max_groups=2, cout_per_group=st.integers(1, 3)):
    """A random valid convolution geometry for property tests: a dict of n, cin, cout, groups and
    the (height, width) pairs size, kernel, stride, padding, dilation and out (both >= 1)."""
    groups = draw(st.integers(1, max_groups))

    def two(low, high):
        return draw(st.tuples(st.integers(low, high), st.integers(low, high)))

    g = dict(n=draw(st.integers(0, max_batch)), groups=groups, cin=draw(st.integers(1, 3)) * groups,
             cout=draw(cout_per_group) * groups, size=two(1, max_size), kernel=two(1, max_kernel),
             stride=two(1, 3), padding=two(0, 2), dilation=two(1, 2))
    padding4 = (g["padding"][0], g["padding"][0], g["padding"][1], g["padding"][1])
    g["out"] = conv_output_size(g["size"], g["kernel"], g["stride"], padding4, g["dilation"])
    assume(min(g["out"]) > 0)
    return g


def random_case(geometry, mode, ratio, bias, dtype=torch.float64, device="cpu", group_size=None):
    """(x, weight, bias, mask, conv kwargs) for a geometry drawn by conv_geometries."""
    g = geometry
    if mode == "group" and group_size is None:
        group_size = next(k for k in (3, 2, 1) if g["cout"] % k == 0)
    mask = rk.random_mask((g["cout"], *g["out"]), ratio, mode, group_size if mode == "group" else None, device=device)
    x = torch.randn(g["n"], g["cin"], *g["size"], dtype=dtype, device=device)
    weight = torch.randn(g["cout"], g["cin"] // g["groups"], *g["kernel"], dtype=dtype, device=device)
    b = torch.randn(g["cout"], dtype=dtype, device=device) if bias else None
    return x, weight, b, mask, dict(stride=g["stride"], padding=g["padding"], dilation=g["dilation"], groups=g["groups"])

