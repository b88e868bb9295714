"""rk.masked_conv2d's own behaviour, whichever backend runs: the arguments it rejects and how,
backend availability and fallback, "auto"'s choice of backend, torch.compile. The op's
contract on each backend is tests/test_parity.py's."""

import pytest
import torch

import rmask_kernels as rk
from rmask_kernels import reference
from rmask_kernels.functional import select_backend

from cases import make_case
from helpers import kept_fraction_mask, python_subprocess


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


@pytest.mark.parametrize(
    "input_mask,error,match",
    [
        (torch.ones(4, 7, 8, dtype=torch.bool), ValueError,
         r"input_mask has shape \(4, 7, 8\) but this convolution's input is \(4, 8, 8\).*another size"),
        (torch.ones(3, 8, 8, dtype=torch.bool), ValueError, r"input_mask has shape \(3, 8, 8\).*\(1, 8, 8\)"),
        (torch.ones(8, 8, dtype=torch.bool), ValueError, r"input_mask has shape \(8, 8\)"),
        (torch.ones(4, 8, 8), TypeError, r"input_mask must be a bool tensor .*got dtype torch.float32"),
        ([[True]], TypeError, "input_mask must be a bool tensor, got list"),
        (torch.ones(4, 8, 8, dtype=torch.bool, device="meta"), ValueError,
         "input_mask must be on the input's device cpu, got meta"),
    ],
)
def test_rejected_input_mask(input_mask, error, match):
    x, weight, mask = _ok()
    with pytest.raises(error, match=match):
        rk.masked_conv2d(x, weight, None, mask, padding=1, input_mask=input_mask)


def test_input_index_given_or_cached():
    # The input mask's index: given (checked against the mask once) or built once per mask tensor;
    # the result is that of input * input_mask either way.
    x, weight, mask = _ok()
    input_mask, other = (rk.random_mask((4, 8, 8), 0.5, "neuron", seed=seed) for seed in (1, 2))
    backend = "cpu" if "cpu" in rk.available_backends() else "reference"
    expected = rk.masked_conv2d(x * input_mask, weight, None, mask, padding=1, backend="reference")
    for index in (None, rk.kept_index(input_mask, 4)):
        got = rk.masked_conv2d(x, weight, None, mask, padding=1, backend=backend, input_mask=input_mask,
                               input_index=index)
        torch.testing.assert_close(got, expected)
    with pytest.raises(ValueError, match=r"input_index does not match the mask \(4, 8, 8\) of a conv with 4 output "
                                         r"channels: .* list other kept"):
        rk.masked_conv2d(x, weight, None, mask, padding=1, input_mask=input_mask, input_index=rk.kept_index(other, 4))
    with pytest.raises(ValueError, match="input_index is the index of an input_mask, got it without one"):
        rk.masked_conv2d(x, weight, None, mask, padding=1, input_index=rk.kept_index(input_mask, 4))


def test_too_small_input_rejected():
    with pytest.raises(ValueError, match=r"input of spatial size \(2, 2\) is too small for kernel \(3, 3\)"):
        rk.masked_conv2d(torch.randn(1, 4, 2, 2), torch.randn(6, 4, 3, 3), mask=rk.random_mask((6, 1, 1), 0.5))


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


@pytest.mark.parametrize("kwargs", [dict(relu=True), dict(residual=True)], ids=str)
def test_channel_stats_exclude_relu_and_residual(kwargs):
    x, weight, mask = _ok()
    if kwargs.get("residual"):
        kwargs = dict(residual=torch.zeros(x.shape[0], weight.shape[0], *mask.shape[1:]))
    with pytest.raises(ValueError, match="channel_stats cannot be combined with relu or residual"):
        rk.masked_conv2d(x, weight, None, mask, padding=1, channel_stats=True, **kwargs)


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
    result = python_subprocess(["-c", code])
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


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
    if rk.backends.batch_vector_kernels(torch.float32, 1, 32, 3):
        assert select_backend("auto", x, neuron) == "cpu"
        # One image fills 1 of 16 lanes: a 0.9 mask does not pay for that. The fixed part is padded
        # too: 2 images need keep <= 0.05 (below 0.75 * 2 / 16), 8 images keep <= 0.35 (AVX-512).
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


@pytest.mark.skipif("cpu" not in rk.available_backends(), reason="extension not built")
@pytest.mark.parametrize("mode", ["neuron", "spatial"])
def test_auto_counts_the_backward_when_there_will_be_one(mode):
    # Between the forward-only crossover and the fwd+bwd one, "auto" takes dense conv for
    # inference and the kernel for a call that will be differentiated; keep 1.0 stays dense.
    kernels = rk.backends.cpu_kernels()
    if not rk.backends.batch_vector_kernels(torch.float32, 1, 32, 3):
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


def test_reference_is_twice_differentiable():
    # The oracle itself (each backend's gradcheck is test_parity's).
    x, weight, bias, mask, conv_args = make_case((2, 3, 6, 5, 4, 3, 2, 1, 1, 1), "neuron", None, 0.5)
    inputs = tuple(t.requires_grad_() for t in (x, weight, bias))
    assert torch.autograd.gradgradcheck(
        lambda a, w, b: reference.masked_conv2d(a, w, b, mask, **conv_args), inputs, fast_mode=True
    )


@pytest.mark.parametrize("backend", ["auto"])
def test_torch_compile_sees_one_op(backend):
    # fullgraph: no graph break in auto's choice of backend nor around the op; aot_eager also
    # traces the registered backward (each backend named explicitly: test_parity's).
    layer = rk.MaskedConv2d(4, 6, 3, padding=1, mask_ratio=0.9, output_size=(8, 8), backend=backend)
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    y = compiled(x)
    (grad,) = torch.autograd.grad(y.sum(), [x])
    expected = reference.masked_conv2d(x, layer.weight, layer.bias, layer.mask, padding=1)
    (want,) = torch.autograd.grad(expected.sum(), [x])
    torch.testing.assert_close(y, expected)
    torch.testing.assert_close(grad, want)
