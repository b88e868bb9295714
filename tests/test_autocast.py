"""Layers, models and converted models under torch.autocast: they behave like the nn.Conv2d
models they replace (the dtypes nn.Conv2d and BatchNorm2d give, every backend "auto" may pick
giving the reference path's values). The op's own autocast rule, on every backend, is
tests/test_parity.py's (test_autocast_*)."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import rmask_kernels as rk

from cases import LOW_PRECISION_GRAD
from helpers import kept_fraction_mask

# CPU autocast here (no GPU): the layers' rule is the same for every device type.
DTYPES = [torch.bfloat16, torch.float16]
BACKENDS = ["auto"] + [b for b in ("cpu",) if b in rk.available_backends()]


def close(ours, theirs, dtype):
    """Within a few low-precision roundings of the largest value (both computed in ``dtype``)."""
    scale = theirs.detach().double().abs().max() + 1
    return (ours.detach().double() - theirs.detach().double()).abs().max() <= LOW_PRECISION_GRAD[dtype] * scale


def small_cnn_with_grouped_and_depthwise_convs():
    """The CNN of the report that crashed: a grouped dilated conv, then a depthwise one."""
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=2, dilation=2, groups=4), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    )


@pytest.mark.parametrize("bn_stats", ["all", "kept"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_converted_cnn_runs_and_matches_its_reference_path(dtype, backend, bn_stats):
    torch.manual_seed(0)
    net, x = small_cnn_with_grouped_and_depthwise_convs(), torch.randn(8, 3, 12, 12)
    ours = rk.convert_model(net, 0.9, layers="all", example_input=x, backend=backend, bn_stats=bn_stats)
    theirs = rk.convert_model(net, 0.9, layers="all", example_input=x, backend="reference", bn_stats=bn_stats)
    for training in (True, False):  # a training step first: eval then folds trained statistics
        ours.train(training), theirs.train(training)
        with torch.autocast("cpu", dtype=dtype):
            y, want = ours(x), theirs(x)
            dense = net.train(training)(x)
        assert y.dtype == want.dtype == dense.dtype
        assert close(y, want, dtype), (training, (y - want).abs().max())
        if training:
            (y.float().square().sum()).backward()
            (want.float().square().sum()).backward()
            for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
                assert p.grad.dtype == p.dtype == torch.float32, name
                assert close(p.grad, q.grad, dtype), name


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_masked_conv2d_layer_returns_what_conv2d_returns(dtype, backend):
    layer = rk.MaskedConv2d(4, 8, 3, padding=1, mask_ratio=0.7, output_size=(9, 9), backend=backend)
    dense = nn.Conv2d(4, 8, 3, padding=1)
    dense.load_state_dict({k: v for k, v in layer.state_dict().items() if k != "mask"})
    x = torch.randn(2, 4, 9, 9)
    with torch.autocast("cpu", dtype=dtype):
        y, want = layer(x), dense(x) * layer.mask
    assert y.dtype == want.dtype == dtype
    assert close(y, want, dtype)


@pytest.mark.parametrize("residual_dtype", [torch.float32, "autocast"])
@pytest.mark.parametrize("bn_stats", ["all", "kept"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_conv_bn_unit_gives_one_dtype_in_training_and_eval(backend, bn_stats, residual_dtype):
    dtype = torch.bfloat16
    unit = rk.MaskedConvBN2d(4, 8, 3, padding=1, mask_ratio=0.6, output_size=(7, 7), backend=backend,
                             activation="relu", bn_stats=bn_stats)
    dense_conv, dense_bn = nn.Conv2d(4, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
    dense_conv.weight.data.copy_(unit.conv.weight.data)
    x = torch.randn(3, 4, 7, 7)
    residual = torch.randn(3, 8, 7, 7, dtype=dtype if residual_dtype == "autocast" else residual_dtype)
    for training in (True, False):
        unit.train(training), dense_bn.train(training)
        with torch.autocast("cpu", dtype=dtype):
            y = unit(x, residual)
            plain = dense_bn(dense_conv(x))  # what nn.Conv2d + BatchNorm2d give under autocast
        assert y.dtype == plain.dtype == dtype, training
        assert torch.isfinite(y).all()
    # The same unit without autocast, on the same (bf16-rounded) values, agrees.
    unit.train(False)
    with torch.autocast("cpu", dtype=dtype):
        y = unit(x, residual)
    want = unit(x.to(dtype).float(), residual.to(dtype).float())
    assert close(y, want, dtype)


def test_kept_statistics_stay_float32_under_autocast():
    # bn_stats="kept" normalizes with float32 statistics of the bf16 conv output, as BatchNorm2d
    # does under autocast: the normalized output has bf16's error, not the statistics' too.
    unit = rk.MaskedConvBN2d(8, 16, 3, padding=1, mask_ratio=0.5, output_size=(8, 8), bn_stats="kept")
    x = torch.randn(16, 8, 8, 8) * 30 + 100  # a large mean: bf16 statistics would lose it
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = unit(x)
    assert y.dtype == torch.bfloat16
    # Per channel over kept outputs: mean 0, variance 1 after BN (weight 1, bias 0).
    values = y.float().transpose(0, 1).reshape(16, -1)
    keep = unit.conv.mask.expand(16, 8, 8).reshape(16, -1).repeat(1, 16)
    for channel in range(16):
        kept_values = values[channel][keep[channel]]
        assert abs(kept_values.mean().item()) < 0.05
        assert abs(kept_values.var(unbiased=False).item() - 1) < 0.05


@pytest.mark.parametrize("model", ["resnet18", "small_cnn"])
def test_models_train_a_step_with_fp16_and_a_grad_scaler(model):
    # fp16 with GradScaler: the scaled loss's gradients through our backward are finite where
    # the dense model's are, and the step updates the parameters.
    torch.manual_seed(0)
    build = {"resnet18": lambda: rk.models.resnet18(mask_ratio=0.9, input_size=16),
             "small_cnn": lambda: rk.models.small_cnn(mask_ratio=0.9, input_size=12, in_channels=3)}[model]
    net = build()
    x, labels = torch.randn(4, 3, *(2 * (16 if model == "resnet18" else 12,))), torch.randint(0, 10, (4,))
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**14)
    before = [p.detach().clone() for p in net.parameters()]
    with torch.autocast("cpu", dtype=torch.float16):
        loss = F.cross_entropy(net(x), labels)
    assert loss.dtype == torch.float32
    scaler.scale(loss).backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)
    scaler.step(optimizer)
    scaler.update()
    assert scaler.get_scale() == 2.0**14  # no step skipped for an inf/NaN gradient
    assert any(not torch.equal(p, q) for p, q in zip(net.parameters(), before))


def test_torch_compile_of_a_converted_model_under_autocast():
    torch.manual_seed(0)
    net, x = small_cnn_with_grouped_and_depthwise_convs(), torch.randn(2, 3, 12, 12)
    model = rk.convert_model(net, 0.9, layers="all", example_input=x).eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = model(x)
        y = torch.compile(model, backend="aot_eager")(x)
    assert y.dtype == want.dtype == torch.bfloat16
    assert close(y, want, torch.bfloat16)


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_traces_auto_and_autocast_in_one_graph(backend, autocast):
    # fullgraph: "auto"'s choice (which asks the extension once per kind of call) and the
    # autocast rule trace without a graph break; inductor runs the op as it is.
    torch._dynamo.reset()
    layer = rk.MaskedConv2d(4, 32, 3, padding=1, mask_ratio=0.9, output_size=(8, 8), backend=backend)
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = torch.compile(layer, backend="inductor", fullgraph=True)(x)
        want = layer(x)
    assert y.dtype == want.dtype == (torch.bfloat16 if autocast else torch.float32)
    torch.testing.assert_close(y, want)
    (grad,) = torch.autograd.grad(y.float().sum(), [x])
    (want_grad,) = torch.autograd.grad(want.float().sum(), [x])
    if autocast:  # a bfloat16 conv's gradient: inductor may round its intermediates elsewhere than eager
        assert close(grad, want_grad, torch.bfloat16)  # does (on CPUs without native bfloat16)
    else:
        torch.testing.assert_close(grad, want_grad)


@pytest.mark.skipif(not rk.backends.batch_vector_kernels(torch.float32, 1, 32, 3), reason="no float32 batch-vector kernels")
def test_auto_under_autocast_races_the_dense_conv_in_its_dtype():
    # Where the CPU runs bfloat16 convs natively, the dense conv under autocast is about twice as
    # fast as in float32: "auto" takes the float32 kernels only to the lower autocast limits.
    from rmask_kernels.functional import float32_kernels_under_autocast as takes_kernels

    x, weight = torch.randn(32, 6, 16, 16), torch.randn(6, 6, 3, 3)
    rows_limit = rk.backends.AUTOCAST_BF16_MAX_KEEP["rows"]
    float32_limit = rk.backends.BATCH_VECTOR_MAX_KEEP[rk.backends.cpu_kernels()]
    between = kept_fraction_mask(6, (rows_limit + float32_limit) / 2)  # above the bfloat16 limit, below float32's
    below = kept_fraction_mask(6, rows_limit / 2)
    with torch.no_grad():
        dtype = torch.bfloat16
        with torch.autocast("cpu", dtype=dtype):
            assert takes_kernels(dtype, "auto", x, weight, None, below, None, 1, None)
            assert takes_kernels(dtype, "auto", x, weight, None, between, None, 1, None) == (not rk.backends.NATIVE_BF16)
            assert takes_kernels(dtype, "cpu", x, weight, None, between, None, 1, None)  # forced: wherever they serve
        dtype = torch.float16
        with torch.autocast("cpu", dtype=dtype):  # no native float16 conv assumed: float32's limits
            assert takes_kernels(dtype, "auto", x, weight, None, between, None, 1, None)

