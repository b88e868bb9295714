"""The CPU kernels of BN over kept outputs (csrc/cpu/kept_batch_norm.cpp), which
rmask_kernels.kept_batch_norm runs for float32 NCHW CPU tensors, against the same function's
formula in float64 (the path every other dtype and device takes): outputs, masked outputs
exactly zero, and the gradients of y, BN's weight and bias."""

import pytest
import torch

import rmask_kernels as rk
from rmask_kernels.kept_batch_norm import kept_batch_norm, use_cpu_kernels

pytestmark = pytest.mark.skipif("cpu" not in rk.available_backends(), reason="extension not built")

TOLERANCE = dict(rtol=1e-4, atol=1e-4)


def statistics(y, mask):
    """count, mean, rstd of y over its kept positions (as MaskedConvBN2d computes them)."""
    count = (mask.sum(dim=(1, 2)).expand(y.shape[1]) * y.shape[0]).clamp(min=1).to(y.dtype)
    mean = y.sum((0, 2, 3)) / count
    var = (y.square().sum((0, 2, 3)) / count - mean.square()).clamp(min=0)
    return count, mean, torch.rsqrt(var + 1e-5)


def run(y, mask, weight, bias, relu, grad_out, residual=None):
    """kept_batch_norm's output and the gradients of y, weight, bias, residual (None where absent)."""
    leaves = [t.detach().requires_grad_() if t is not None else None for t in (y, weight, bias, residual)]
    count, mean, rstd = (s.detach() for s in statistics(leaves[0].detach(), mask))
    out = kept_batch_norm(leaves[0], mask, count, mean, rstd, leaves[1], leaves[2], relu, leaves[3])
    present = [t for t in leaves if t is not None]
    grads = iter(torch.autograd.grad(out, present, grad_out))
    return out, [next(grads) if t is not None else None for t in leaves]


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("mode", ["neuron", "spatial"])
# (3, 5, 10, 13): planes of 130 floats, the backward's streamed chunks of 64 and a tail, on
# planes that start 16-byte aligned and planes that do not.
@pytest.mark.parametrize("shape", [(5, 6, 7, 9), (0, 4, 5, 5), (3, 1, 16, 16), (4, 3, 1, 1), (3, 5, 10, 13)])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("with_residual", [False, True], ids=["", "residual"])
def test_kernels_match_the_formula(relu, mode, shape, affine, with_residual):
    n, c, h, w = shape
    torch.manual_seed(sum(shape) + 2 * relu + affine + 4 * with_residual)
    mask = rk.random_mask((c, h, w), 0.5, mode, seed=3)
    y = torch.randn(n, c, h, w) * mask  # a masked conv's output: zero where masked
    weight, bias = (torch.randn(c), torch.randn(c)) if affine else (None, None)
    residual = torch.randn(n, c, h, w) if with_residual else None
    assert use_cpu_kernels(y, mask, weight, bias, residual)
    grad_out = torch.randn(n, c, h, w)
    out, grads = run(y, mask, weight, bias, relu, grad_out, residual)
    as64 = lambda t: t.double() if t is not None else None  # noqa: E731
    want, want_grads = run(as64(y), mask, as64(weight), as64(bias), relu, grad_out.double(), as64(residual))
    torch.testing.assert_close(out.double(), want, **TOLERANCE)
    masked = (~mask).expand_as(out)
    if residual is None:
        assert (out[masked] == 0).all(), "masked outputs must be exactly zero"
    else:  # the residual alone there, through the ReLU
        expected = residual.clamp_min(0) if relu else residual
        assert torch.equal(out[masked], expected[masked]), "masked outputs must be the residual exactly"
    kept = mask.expand_as(y)
    torch.testing.assert_close(grads[0][kept].double(), want_grads[0][kept], **TOLERANCE)
    for name, got, expected in zip(("weight", "bias", "residual"), grads[1:], want_grads[1:]):
        if expected is not None:
            torch.testing.assert_close(got.double(), expected, **TOLERANCE, msg=lambda m: f"grad {name}: {m}")


def test_non_contiguous_gradient_and_layouts_the_kernels_do_not_take():
    mask = rk.random_mask((4, 6, 6), 0.5, "neuron", seed=1)
    y = torch.randn(3, 4, 6, 6) * mask
    weight, bias = torch.randn(4), torch.randn(4)
    # The gradient of a sum is expanded (stride 0): the kernels read it as given.
    out, grads = run(y, mask, weight, bias, True, torch.ones(1, 1, 1, 1).expand(3, 4, 6, 6))
    want, want_grads = run(y.double(), mask, weight.double(), bias.double(), True, torch.ones(3, 4, 6, 6).double())
    torch.testing.assert_close(out.double(), want, **TOLERANCE)
    torch.testing.assert_close(grads[1].double(), want_grads[1], **TOLERANCE)
    # channels_last, float64 and a non-contiguous mask take the formula.
    assert not use_cpu_kernels(y.contiguous(memory_format=torch.channels_last), mask)
    assert not use_cpu_kernels(y.double(), mask)
    assert not use_cpu_kernels(y, mask.transpose(1, 2))


def test_double_backward_differentiates_the_formula():
    mask = rk.random_mask((3, 5, 5), 0.5, "spatial", seed=2)
    y = (torch.randn(2, 3, 5, 5, dtype=torch.float64) * mask).requires_grad_()
    weight, bias = torch.randn(3, dtype=torch.float64, requires_grad=True), torch.randn(3, dtype=torch.float64)
    count, mean, rstd = (s.detach() for s in statistics(y.detach(), mask))
    torch.autograd.gradgradcheck(lambda y, w: kept_batch_norm(y, mask, count, mean, rstd, w, bias, False),
                                 (y, weight))


@pytest.mark.parametrize("bad,match", [
    (dict(mask=torch.ones(3, 4, 4, dtype=torch.bool)), r"mask must be a contiguous bool tensor of shape \(4 or 1, 5, 5\), got shape \[3, 4, 4\]"),
    (dict(scale=torch.ones(3)), r"scale must be a contiguous float32 vector of 4 values, got shape \[3\]"),
    (dict(y=torch.zeros(2, 4, 5, 5, dtype=torch.float64)), r"y must be a contiguous 4-D float32 CPU tensor"),
])
def test_kernels_reject_bad_arguments(bad, match):
    arguments = dict(y=torch.zeros(2, 4, 5, 5), mask=torch.ones(4, 5, 5, dtype=torch.bool), scale=torch.ones(4),
                     shift=torch.zeros(4))
    arguments.update(bad)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.rmask.cpu_kept_batch_norm(*arguments.values(), False)
