"""Shared test helpers (tests/ is on sys.path under pytest's default import mode)."""

import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import assume
from hypothesis import strategies as st

import rmask_kernels as rk
from rmask_kernels.functional import conv_output_size


def randomize_batchnorms(model):
    """Non-trivial BN affine parameters and running statistics, so BN placement matters."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0.0, 0.5)
                module.running_mean.normal_(0.0, 0.2)
                module.running_var.uniform_(0.5, 2.0)
    return model


def make_case(config, mode, group_size, ratio, dtype=torch.float64, bias=True):
    """Fresh random (x, weight, bias, mask, conv kwargs) for a test configuration
    (N, Cin, H, W, Cout, kernel, stride, padding, dilation, groups) and mask mode."""
    n, cin, h, w, cout, kernel, stride, padding, dilation, groups = config
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    x = torch.randn(n, cin, h, w, dtype=dtype)
    weight = torch.randn(cout, cin // groups, kh, kw, dtype=dtype)
    b = torch.randn(cout, dtype=dtype) if bias else None
    out = F.conv2d(x[:1] if n else torch.zeros(1, cin, h, w, dtype=dtype), weight, None, stride, padding, dilation, groups)
    gsize = group_size if mode == "group" and cout % group_size == 0 else None
    mask = rk.random_mask(tuple(out.shape[1:]), ratio, mode if gsize or mode != "group" else "neuron", gsize)
    return x, weight, b, mask, dict(stride=stride, padding=padding, dilation=dilation, groups=groups)


def leaves_and_oracle(*tensors):
    """Fresh leaves of the inputs (in their dtype) and float64 leaves for the oracle."""
    return ([t.detach().clone().requires_grad_() for t in tensors],
            [t.detach().double().requires_grad_() for t in tensors])


@st.composite
def conv_geometries(draw, max_batch=3, max_size=9, max_kernel=4, max_groups=2, cout_per_group=st.integers(1, 3)):
    """A random valid convolution geometry for property tests: a dict of n, cin, cout, groups and
    the (height, width) pairs size, kernel, stride, padding, dilation and out (both >= 1)."""
    groups = draw(st.integers(1, max_groups))
    pair = lambda low, high: draw(st.tuples(st.integers(low, high), st.integers(low, high)))  # noqa: E731
    g = dict(n=draw(st.integers(0, max_batch)), groups=groups, cin=draw(st.integers(1, 3)) * groups,
             cout=draw(cout_per_group) * groups, size=pair(1, max_size), kernel=pair(1, max_kernel),
             stride=pair(1, 3), padding=pair(0, 2), dilation=pair(1, 2))
    padding4 = (g["padding"][0], g["padding"][0], g["padding"][1], g["padding"][1])
    g["out"] = conv_output_size(g["size"], g["kernel"], g["stride"], padding4, g["dilation"])
    assume(min(g["out"]) > 0)
    return g
