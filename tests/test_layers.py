"""The drop-in layers against hand-built PyTorch references.

MaskedConv2d is checked against ``nn.Conv2d(...)(x) * layer.mask`` with identical
parameters, RandomMask against ``x * mask``, MaskedConvBN2d against
``mask * BN(conv(x))`` built from nn.Conv2d + nn.BatchNorm2d copies, and its
``bn_stats="kept"`` mode against statistics written out by hand below.

Everything runs in float64 (the oracle's precision): the kernels differ from F.conv2d only
in summation order, so 1e-10 is ample; the folded eval-mode BN changes rounding of the
weight (w * s) as well, hence a slightly looser 1e-9 there.
"""

import copy
import io

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import rmask_kernels as rk

BACKENDS = ["reference", "auto"] + (["cpu"] if "cpu" in rk.available_backends() else [])
COMPILED = "cpu" if "cpu" in rk.available_backends() else "reference"
MODES = [("neuron", None), ("spatial", None), ("group", 2)]
RATIOS = [0.0, 0.5, 0.9]
# PyTorch's own notice for even kernels with padding="same", raised by the nn.Conv2d oracle.
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")
TOL64 = dict(rtol=1e-10, atol=1e-10)  # float64: only the summation order differs
TOL_FOLDED = dict(rtol=1e-9, atol=1e-9)  # float64, plus the rounding of the BN-folded weight

# (conv kwargs, input shape (N, C_in, H, W)): the configurations PyTorch's Conv2d tests
# cover, small. Output channels are even so group masks with group_size=2 apply.
CONV_CONFIGS = [
    (dict(in_channels=4, out_channels=6, kernel_size=3, padding=1), (2, 4, 8, 8)),
    (dict(in_channels=4, out_channels=6, kernel_size=1), (2, 4, 7, 9)),
    (dict(in_channels=4, out_channels=6, kernel_size=1, stride=2), (2, 4, 8, 8)),  # projection shortcut
    (dict(in_channels=3, out_channels=4, kernel_size=(3, 5), stride=(2, 1), padding=(1, 2)), (2, 3, 9, 10)),
    (dict(in_channels=4, out_channels=6, kernel_size=3, stride=2, padding=1), (3, 4, 9, 7)),  # odd sizes
    (dict(in_channels=4, out_channels=4, kernel_size=3, padding=2, dilation=2), (2, 4, 10, 10)),
    (dict(in_channels=4, out_channels=4, kernel_size=3, stride=2, padding=(2, 1), dilation=(2, 1)), (2, 4, 11, 9)),
    (dict(in_channels=3, out_channels=4, kernel_size=3, padding="same"), (2, 3, 7, 7)),
    (dict(in_channels=3, out_channels=4, kernel_size=(2, 4), padding="same"), (2, 3, 7, 8)),  # even: asymmetric
    (dict(in_channels=3, out_channels=4, kernel_size=4, padding="same", dilation=2), (2, 3, 9, 9)),
    (dict(in_channels=3, out_channels=4, kernel_size=3, padding="same", dilation=2), (2, 3, 8, 8)),
    (dict(in_channels=3, out_channels=4, kernel_size=3, padding="valid"), (2, 3, 7, 6)),
    (dict(in_channels=4, out_channels=8, kernel_size=3, padding=1, groups=2), (2, 4, 8, 8)),
    (dict(in_channels=4, out_channels=4, kernel_size=3, padding=1, groups=4), (2, 4, 8, 8)),  # depthwise
    (dict(in_channels=4, out_channels=8, kernel_size=3, padding=1, groups=4), (2, 4, 8, 8)),  # depthwise x2
    (dict(in_channels=4, out_channels=6, kernel_size=3, padding=1, bias=False), (2, 4, 8, 8)),
    (dict(in_channels=4, out_channels=6, kernel_size=3, padding=(1, 2), padding_mode="reflect"), (2, 4, 8, 8)),
    (dict(in_channels=4, out_channels=6, kernel_size=3, padding=1, padding_mode="replicate"), (2, 4, 8, 7)),
    (dict(in_channels=4, out_channels=6, kernel_size=3, stride=2, padding=2, padding_mode="circular"), (2, 4, 8, 8)),
    (dict(in_channels=3, out_channels=4, kernel_size=(2, 4), padding="same", padding_mode="circular"), (2, 3, 7, 8)),
    (dict(in_channels=3, out_channels=4, kernel_size=3, padding="same", padding_mode="reflect", bias=False), (2, 3, 6, 6)),
    (dict(in_channels=3, out_channels=4, kernel_size=5, stride=3), (2, 3, 5, 5)),  # kernel as large as the image
]


def config_id(config):
    kwargs, shape = config
    return ",".join(f"{k}={v}" for k, v in kwargs.items() if k not in ("in_channels",)) + f",x={shape}"


def build(conv_kwargs, dtype=torch.float64, **mask_kwargs):
    """A MaskedConv2d and an nn.Conv2d with identical configuration and parameters."""
    layer = rk.MaskedConv2d(**conv_kwargs, dtype=dtype, **mask_kwargs)
    conv = nn.Conv2d(**conv_kwargs, dtype=dtype)
    result = conv.load_state_dict(layer.state_dict(), strict=False)  # "mask" is the only extra key
    assert not result.missing_keys
    return layer, conv


def check_layer(layer, conv, x, grad=True, tol=TOL64):
    """layer(x) == conv(x) * layer.mask, masked outputs exactly zero, gradients equal."""
    x_ours = x.detach().clone().requires_grad_(grad)
    x_ref = x.detach().clone().requires_grad_(grad)
    y = layer(x_ours)
    mask = layer.mask
    assert mask is not None and mask.dtype == torch.bool
    expected = conv(x_ref) * mask
    assert y.shape == expected.shape and y.dtype == expected.dtype
    torch.testing.assert_close(y, expected, **tol)
    assert (y.detach()[(~mask).expand_as(y)] == 0).all(), "masked outputs must be exactly zero"
    if grad:
        grad_y = torch.randn_like(expected)
        ours = [x_ours, layer.weight] + ([layer.bias] if layer.bias is not None else [])
        theirs = [x_ref, conv.weight] + ([conv.bias] if conv.bias is not None else [])
        got = torch.autograd.grad(y, ours, grad_y)
        want = torch.autograd.grad(expected, theirs, grad_y)
        for name, g, r in zip(["input", "weight", "bias"], got, want):
            torch.testing.assert_close(g, r, **tol, msg=lambda m: f"grad of {name}: {m}")
    return y


# -- parity with the reference ---------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("config", CONV_CONFIGS, ids=config_id)
def test_every_conv_configuration(backend, config):
    conv_kwargs, shape = config
    layer, conv = build(conv_kwargs, mask_ratio=0.5, mask_mode="neuron", seed=0, backend=backend)
    check_layer(layer, conv, torch.randn(shape, dtype=torch.float64))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("config", [CONV_CONFIGS[0], CONV_CONFIGS[8], CONV_CONFIGS[14], CONV_CONFIGS[18]], ids=config_id)
@pytest.mark.parametrize("mode,group_size", MODES, ids=str)
@pytest.mark.parametrize("ratio", RATIOS)
def test_modes_and_ratios(backend, config, mode, group_size, ratio):
    conv_kwargs, shape = config
    layer, conv = build(conv_kwargs, mask_ratio=ratio, mask_mode=mode, group_size=group_size, backend=backend)
    check_layer(layer, conv, torch.randn(shape, dtype=torch.float64))
    c_out = conv_kwargs["out_channels"]
    expected_channels = 1 if mode == "spatial" else c_out
    assert layer.mask.shape[0] == expected_channels
    patterns = {"neuron": c_out, "spatial": 1, "group": c_out // 2}[mode]
    assert int((~layer.mask).sum()) * patterns // layer.mask.shape[0] == int(ratio * patterns * layer.mask[0].numel())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("config", [CONV_CONFIGS[0], CONV_CONFIGS[3], CONV_CONFIGS[13], CONV_CONFIGS[16]], ids=config_id)
@pytest.mark.parametrize("mode,group_size", [("neuron", None), ("spatial", None)], ids=str)
def test_unbatched_input(backend, config, mode, group_size):
    conv_kwargs, shape = config
    layer, conv = build(conv_kwargs, mask_ratio=0.5, mask_mode=mode, group_size=group_size, backend=backend)
    x = torch.randn(shape[1:], dtype=torch.float64)
    y = check_layer(layer, conv, x)
    assert y.dim() == 3
    torch.testing.assert_close(y, layer(x.unsqueeze(0))[0], **TOL64)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("config", [CONV_CONFIGS[0], CONV_CONFIGS[12], CONV_CONFIGS[17]], ids=config_id)
def test_batch_zero(backend, config):
    conv_kwargs, shape = config
    layer, conv = build(conv_kwargs, mask_ratio=0.5, mask_mode="spatial", backend=backend)
    y = check_layer(layer, conv, torch.randn((0,) + shape[1:], dtype=torch.float64))
    assert y.shape[0] == 0
    # The mask drawn from an empty batch is the layer's mask from then on.
    check_layer(layer, conv, torch.randn(shape, dtype=torch.float64))


@pytest.mark.parametrize("backend", BACKENDS)
def test_float32(backend):
    # float32 vs PyTorch's own float32 conv: both accumulate in fp32, ~1e-6 relative apart.
    layer, conv = build(CONV_CONFIGS[0][0], dtype=torch.float32, mask_ratio=0.9, mask_mode="spatial", backend=backend)
    check_layer(layer, conv, torch.randn(CONV_CONFIGS[0][1]), tol=dict(rtol=1e-4, atol=1e-5))


@pytest.mark.parametrize("config", [CONV_CONFIGS[0], CONV_CONFIGS[8], CONV_CONFIGS[13], CONV_CONFIGS[18]], ids=config_id)
@pytest.mark.parametrize("backend", BACKENDS)
def test_ratio_zero_is_exactly_conv2d(backend, config):
    conv_kwargs, shape = config
    layer, conv = build(conv_kwargs, mask_ratio=0.0, backend=backend)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    expected = conv(x)
    assert torch.equal(y, expected)
    assert bool(layer.mask.all())
    grad_y = torch.randn_like(y)
    assert torch.equal(torch.autograd.grad(y, x, grad_y)[0], torch.autograd.grad(expected, x, grad_y)[0])


def test_is_a_conv2d():
    layer = rk.MaskedConv2d(4, 6, 3, padding=1)
    assert isinstance(layer, nn.Conv2d)
    assert layer.mask_ratio == 0.5 and layer.mask_mode == "neuron"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["channels_last", "permuted", "sliced"])
def test_non_contiguous_and_channels_last_input(backend, layout):
    layer, conv = build(CONV_CONFIGS[0][0], mask_ratio=0.9, mask_mode="spatial", backend=backend)
    if layout == "channels_last":
        x = torch.randn(2, 4, 8, 8, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    elif layout == "permuted":
        x = torch.randn(2, 4, 8, 8, dtype=torch.float64).transpose(2, 3)
    else:
        x = torch.randn(2, 8, 8, 16, dtype=torch.float64)[:, ::2, :, ::2]
    assert not x.is_contiguous()
    y = check_layer(layer, conv, x)
    if layout == "channels_last":
        assert conv(x).is_contiguous(memory_format=torch.channels_last)
        assert y.is_contiguous(memory_format=torch.channels_last), "channels_last in, channels_last out, as nn.Conv2d"


# -- the mask's life cycle -------------------------------------------------------------------

@pytest.mark.parametrize("mode,group_size", MODES, ids=str)
def test_mask_built_at_construction_with_output_size(mode, group_size):
    layer = rk.MaskedConv2d(4, 6, 3, padding=1, mask_ratio=0.5, mask_mode=mode, group_size=group_size,
                            seed=7, output_size=(8, 8))
    expected_shape = (1, 8, 8) if mode == "spatial" else (6, 8, 8)
    assert layer.mask is not None and tuple(layer.mask.shape) == expected_shape and layer.mask.dtype == torch.bool
    # The layer's mask is the documented draw for its output shape and seed.
    assert torch.equal(layer.mask, rk.random_mask((6, 8, 8), 0.5, mode, group_size, seed=7))
    before = layer.mask.clone()
    layer(torch.randn(2, 4, 8, 8))
    assert torch.equal(layer.mask, before)


def test_output_size_as_int():
    layer = rk.MaskedConv2d(4, 6, 3, mask_ratio=0.5, output_size=6)
    assert tuple(layer.mask.shape) == (6, 6, 6)


def test_mask_built_at_first_forward_then_fixed():
    layer = rk.MaskedConv2d(4, 6, 3, stride=2, padding=1, mask_ratio=0.5, seed=3)
    assert layer.mask is None
    layer(torch.randn(2, 4, 9, 7))
    assert tuple(layer.mask.shape) == (6, 5, 4)
    assert torch.equal(layer.mask, rk.random_mask((6, 5, 4), 0.5, seed=3))
    first = layer.mask.clone()
    for _ in range(2):
        layer(torch.randn(3, 4, 9, 7))
        assert torch.equal(layer.mask, first)


@pytest.mark.parametrize("output_size", [None, (8, 8)])
def test_other_spatial_size_is_rejected_naming_both_sizes(output_size):
    layer = rk.MaskedConv2d(4, 6, 3, padding=1, mask_ratio=0.5, output_size=output_size)
    layer(torch.randn(1, 4, 8, 8))
    with pytest.raises(ValueError, match=r"output size \(8, 8\).*\(6, 6\)"):
        layer(torch.randn(1, 4, 6, 6))


def test_seed_none_reproducible_under_manual_seed_and_distinct():
    with torch.random.fork_rng():  # leave the global generator as it was for the other tests
        torch.manual_seed(11)
        a = rk.MaskedConv2d(4, 6, 3, output_size=(6, 6))
        b = rk.MaskedConv2d(4, 6, 3, output_size=(6, 6))
        torch.manual_seed(11)
        a_again = rk.MaskedConv2d(4, 6, 3, output_size=(6, 6))
    assert torch.equal(a.mask, a_again.mask)
    assert not torch.equal(a.mask, b.mask)


# -- persistence ----------------------------------------------------------------------------

def save_and_load(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer)


@pytest.mark.parametrize("mode,group_size", MODES, ids=str)
@pytest.mark.parametrize("fresh", ["same_seed", "other_seed", "other_seed_mask_not_drawn"])
def test_state_dict_round_trip(mode, group_size, fresh):
    kwargs = dict(mask_ratio=0.5, mask_mode=mode, group_size=group_size, backend=COMPILED, dtype=torch.float64)
    original = rk.MaskedConv2d(4, 6, 3, padding=1, seed=1, **kwargs)
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    y = original(x)
    state = original.state_dict()
    assert "mask" in state and state["mask"].dtype == torch.bool
    assert torch.equal(state["mask"], original.mask)

    if fresh == "same_seed":
        restored = rk.MaskedConv2d(4, 6, 3, padding=1, seed=1, output_size=(8, 8), **kwargs)
    elif fresh == "other_seed":
        restored = rk.MaskedConv2d(4, 6, 3, padding=1, seed=2, output_size=(8, 8), **kwargs)
        assert not torch.equal(restored.mask, original.mask)
    else:
        restored = rk.MaskedConv2d(4, 6, 3, padding=1, seed=2, **kwargs)
        assert restored.mask is None
    restored.load_state_dict(save_and_load(state))
    assert restored.mask.dtype == torch.bool and torch.equal(restored.mask, original.mask)
    assert torch.equal(restored.weight, original.weight) and torch.equal(restored.bias, original.bias)
    torch.testing.assert_close(restored(x), y, **TOL64)
    _, conv = build(dict(in_channels=4, out_channels=6, kernel_size=3, padding=1))
    conv.load_state_dict(state, strict=False)
    check_layer(restored, conv, x)


def test_load_rejects_a_mask_of_the_wrong_shape():
    layer = rk.MaskedConv2d(4, 6, 3, padding=1, output_size=(8, 8))
    state = rk.MaskedConv2d(4, 6, 3, padding=1, output_size=(6, 6)).state_dict()
    with pytest.raises(RuntimeError, match="mask"):
        layer.load_state_dict(state)
    bad = dict(layer.state_dict(), mask=layer.mask.float())
    with pytest.raises(RuntimeError, match="mask.*bool"):
        rk.MaskedConv2d(4, 6, 3, padding=1).load_state_dict(bad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_works_after_to_float64_and_deepcopy(backend):
    layer = rk.MaskedConv2d(4, 6, 3, padding=1, mask_ratio=0.9, mask_mode="spatial", backend=backend)
    layer(torch.randn(1, 4, 8, 8))
    layer = layer.to(torch.float64)
    assert layer.weight.dtype == torch.float64 and layer.mask.dtype == torch.bool
    conv = nn.Conv2d(4, 6, 3, padding=1, dtype=torch.float64)
    conv.load_state_dict(layer.state_dict(), strict=False)
    check_layer(layer, conv, torch.randn(2, 4, 8, 8, dtype=torch.float64))
    clone = copy.deepcopy(layer)
    check_layer(clone, conv, torch.randn(2, 4, 8, 8, dtype=torch.float64))


def test_repr_shows_ratio_and_mode():
    text = repr(rk.MaskedConv2d(4, 8, 3, mask_ratio=0.3, mask_mode="group", group_size=4))
    assert "mask_ratio=0.3" in text and "mask_mode=group" in text and "group_size=4" in text
    text = repr(rk.MaskedConv2d(4, 8, 3, mask_ratio=0.7, mask_mode="same"))
    assert "mask_ratio=0.7" in text and "mask_mode=spatial" in text


def test_gradcheck_float64():
    layer = rk.MaskedConv2d(2, 4, 3, stride=(2, 1), padding=1, mask_ratio=0.5, backend=COMPILED,
                            output_size=(3, 5), dtype=torch.float64)
    x = torch.randn(2, 2, 5, 5, dtype=torch.float64, requires_grad=True)
    weight = layer.weight.detach().clone().requires_grad_()
    bias = layer.bias.detach().clone().requires_grad_()

    def forward(x, weight, bias):
        return torch.func.functional_call(layer, {"weight": weight, "bias": bias}, (x,))

    assert torch.autograd.gradcheck(forward, (x, weight, bias), fast_mode=True)


# -- rejected arguments ----------------------------------------------------------------------

@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(mask_ratio=1.0), ValueError, r"mask_ratio must be in \[0, 1\).*got 1\.0"),
        (dict(mask_ratio=-0.5), ValueError, r"mask_ratio must be in \[0, 1\).*got -0\.5"),
        (dict(mask_ratio="0.5"), TypeError, r"mask_ratio must be a float"),
        (dict(mask_mode="channel"), ValueError, r"mode must be one of .*got 'channel'"),
        (dict(mask_mode="group"), ValueError, r"group_size must be a positive int with mode='group', got None"),
        (dict(mask_mode="group", group_size=4), ValueError, r"group_size must divide the 6 channels, got group_size=4"),
        (dict(group_size=2), ValueError, r"group_size is only used with mode='group'"),
        (dict(backend="gpu"), ValueError, r"backend must be one of .*got 'gpu'"),
        (dict(output_size=(8, 8, 8)), ValueError, r"output_size must be an int or a pair of ints, got \(8, 8, 8\)"),
    ],
)
def test_rejected_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        rk.MaskedConv2d(4, 6, 3, padding=1, **kwargs)


def test_rejected_input_rank():
    layer = rk.MaskedConv2d(4, 6, 3, padding=1)
    with pytest.raises(ValueError, match=r"input must be \(N, C, H, W\) or \(C, H, W\), got \(8, 8\)"):
        layer(torch.randn(8, 8))


# -- RandomMask --------------------------------------------------------------------------------

@pytest.mark.parametrize("mode,group_size", MODES, ids=str)
def test_random_mask_module(mode, group_size):
    module = rk.RandomMask((4, 6, 5), 0.5, mode, group_size, seed=5)
    assert torch.equal(module.mask, rk.random_mask((4, 6, 5), 0.5, mode, group_size, seed=5))
    x = torch.randn(3, 4, 6, 5)
    assert torch.equal(module(x), x * module.mask)
    assert torch.equal(module(x[0]), x[0] * module.mask)  # unbatched
    assert "mask" in module.state_dict()
    assert "ratio=0.5" in repr(module)


def test_random_mask_module_rejects_other_shapes():
    module = rk.RandomMask((4, 6, 5), 0.5, seed=5)
    with pytest.raises(ValueError, match=r"RandomMask: input must end in shape \(4, 6, 5\).*got \(3, 4, 5, 6\)"):
        module(torch.randn(3, 4, 5, 6))
    with pytest.raises(ValueError, match=r"ratio must be in \[0, 1\)"):
        rk.RandomMask((4, 6, 5), 1.0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ratio", [0.0, 0.5])
@pytest.mark.parametrize("in_mode", ["neuron", "spatial"])
@pytest.mark.parametrize("config", [CONV_CONFIGS[0], CONV_CONFIGS[12], CONV_CONFIGS[16], CONV_CONFIGS[8]],
                         ids=config_id)
def test_input_mask_set_by_hand(backend, config, in_mode, ratio):
    # layer(x) == conv(x * input_mask) * mask, gradients too (0 where the input mask drops the
    # input); padding modes that copy input entries see them masked; state_dict keys unchanged.
    conv_kwargs, shape = config
    layer, conv = build(conv_kwargs, mask_ratio=ratio, backend=backend)
    keys = set(layer.state_dict())
    input_mask = rk.random_mask((1 if in_mode == "spatial" else shape[1], *shape[2:]), 0.6, in_mode)
    layer.set_input_mask(input_mask)
    assert set(layer.state_dict()) == keys and f"input_mask={tuple(input_mask.shape)}" in repr(layer)
    x = torch.randn(shape, dtype=torch.float64)
    x_ours, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    y = layer(x_ours)
    expected = conv(x_ref * input_mask) * layer.mask
    torch.testing.assert_close(y, expected, **TOL64)
    grad_y = torch.randn_like(y)
    got = torch.autograd.grad(y, [x_ours, layer.weight], grad_y)
    want = torch.autograd.grad(expected, [x_ref, conv.weight], grad_y)
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, **TOL64)
    assert (got[0][(~input_mask).expand_as(x)] == 0).all()
    # The layer keeps the input mask's index, built with it and again after an in-place edit.
    assert all(torch.equal(a, b) for a, b in zip(layer.input_index(), rk.kept_index(input_mask, shape[1])))
    with torch.no_grad():
        layer.input_mask.logical_not_()
    assert all(torch.equal(a, b) for a, b in zip(layer.input_index(), rk.kept_index(layer.input_mask, shape[1])))
    torch.testing.assert_close(layer(x), conv(x * layer.input_mask) * layer.mask, **TOL64)
    layer.set_input_mask(None)
    assert layer.input_index() is None
    torch.testing.assert_close(layer(x), conv(x) * layer.mask, **TOL64)


def test_input_mask_checks():
    layer = rk.MaskedConv2d(4, 6, 3, padding=1, mask_ratio=0.5, seed=0)
    with pytest.raises(ValueError, match=r"input_mask must be a bool tensor of shape \(4 or 1, H_in, W_in\), got "
                                         r"torch.bool of shape \(3, 8, 8\)"):
        layer.set_input_mask(torch.ones(3, 8, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="got torch.float32 of shape"):
        layer.set_input_mask(torch.ones(4, 8, 8))
    layer.set_input_mask(torch.ones(4, 8, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"input_mask has shape \(4, 8, 8\) but this convolution's input is "
                                         r"\(4, 9, 9\)"):
        layer(torch.randn(2, 4, 9, 9))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("state", ["train-all", "train-kept", "eval"])
def test_conv_bn_unit_input_mask(backend, state):
    # act(mask * BN(conv(x * input_mask))) in every BN state.
    unit, conv, bn = build_unit(mask_ratio=0.5, backend=backend, activation="relu",
                                bn_stats="kept" if state == "train-kept" else "all")
    input_mask = rk.random_mask((3, 7, 6), 0.6, "neuron", seed=3)
    unit.set_input_mask(input_mask)
    assert unit.input_mask is unit.conv.input_mask
    unit.train(state != "eval")
    x = torch.randn(3, 3, 7, 6, dtype=torch.float64)
    reference_unit = copy.deepcopy(unit)
    reference_unit.set_input_mask(None)
    torch.testing.assert_close(unit(x), reference_unit(x * input_mask), **TOL64)


# -- MaskedConvBN2d ------------------------------------------------------------------------------

def build_unit(conv_kwargs=None, dtype=torch.float64, **unit_kwargs):
    """A MaskedConvBN2d with non-trivial BN parameters and running stats, and nn copies of
    its conv and BN."""
    conv_kwargs = conv_kwargs or dict(in_channels=3, out_channels=4, kernel_size=3, padding=1)
    unit = rk.MaskedConvBN2d(**conv_kwargs, dtype=dtype, **unit_kwargs)
    c = conv_kwargs["out_channels"]
    with torch.no_grad():
        unit.bn.weight.copy_(torch.rand(c, dtype=dtype) + 0.5)
        unit.bn.bias.copy_(torch.randn(c, dtype=dtype))
        unit.bn.running_mean.copy_(torch.randn(c, dtype=dtype))
        unit.bn.running_var.copy_(torch.rand(c, dtype=dtype) + 0.5)
    conv = nn.Conv2d(**dict(conv_kwargs, bias=unit.conv.bias is not None), dtype=dtype)
    conv.load_state_dict(unit.conv.state_dict(), strict=False)
    bn = copy.deepcopy(unit.bn)
    return unit, conv, bn


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", [None, "relu"])
@pytest.mark.parametrize("mode,group_size", MODES, ids=str)
def test_conv_bn_train_all_stats_is_mask_after_bn(backend, activation, mode, group_size):
    unit, conv, bn = build_unit(mask_ratio=0.5, mask_mode=mode, group_size=group_size, backend=backend,
                                activation=activation, bn_stats="all")
    unit.train()
    bn.train()
    x = torch.randn(3, 3, 7, 6, dtype=torch.float64)
    x_ours, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    y = unit(x_ours)
    expected = unit.mask * bn(conv(x_ref))
    if activation == "relu":
        expected = F.relu(expected)
    torch.testing.assert_close(y, expected, **TOL64)
    assert (y.detach()[(~unit.mask).expand_as(y)] == 0).all()
    torch.testing.assert_close(unit.bn.running_mean, bn.running_mean, **TOL64)
    torch.testing.assert_close(unit.bn.running_var, bn.running_var, **TOL64)
    assert int(unit.bn.num_batches_tracked) == int(bn.num_batches_tracked) == 1
    grad_y = torch.randn_like(y)
    got = torch.autograd.grad(y, [x_ours, unit.conv.weight, unit.bn.weight, unit.bn.bias], grad_y)
    want = torch.autograd.grad(expected, [x_ref, conv.weight, bn.weight, bn.bias], grad_y)
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, **TOL64)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", [None, "relu"])
@pytest.mark.parametrize(
    "conv_kwargs",
    [
        dict(in_channels=3, out_channels=4, kernel_size=3, padding=1),
        dict(in_channels=4, out_channels=4, kernel_size=3, stride=2, padding=1, groups=2, bias=True),
        dict(in_channels=3, out_channels=4, kernel_size=3, padding=1, padding_mode="reflect"),
    ],
    ids=["plain", "strided-groups-bias", "reflect"],
)
@pytest.mark.parametrize("ratio", [0.0, 0.5, 0.9])
def test_conv_bn_eval_folds_bn_into_the_conv(backend, activation, conv_kwargs, ratio):
    unit, conv, bn = build_unit(conv_kwargs, mask_ratio=ratio, mask_mode="neuron", backend=backend,
                                activation=activation)
    if conv.bias is not None:
        with torch.no_grad():
            conv.bias.copy_(torch.randn_like(conv.bias))
            unit.conv.bias.copy_(conv.bias)
    unit.eval()
    bn.eval()
    x = torch.randn(2, conv_kwargs["in_channels"], 8, 8, dtype=torch.float64)
    running = (unit.bn.running_mean.clone(), unit.bn.running_var.clone())
    y = unit(x)
    expected = unit.mask * bn(conv(x))
    if activation == "relu":
        expected = F.relu(expected)
    torch.testing.assert_close(y, expected, **TOL_FOLDED)
    assert (y[(~unit.mask).expand_as(y)] == 0).all()
    assert torch.equal(unit.bn.running_mean, running[0]) and torch.equal(unit.bn.running_var, running[1])
    # Unbatched input in eval mode too.
    torch.testing.assert_close(unit(x[0]), expected[0], **TOL_FOLDED)


# The eval-mode fold is cached (MaskedConvBN2d._inference_weight_and_bias) and rebuilt exactly
# when something it is folded from changes.

def eval_unit_with_bias():
    unit, _, _ = build_unit(dict(in_channels=3, out_channels=4, kernel_size=3, padding=1, bias=True),
                            mask_ratio=0.5, backend=COMPILED, activation="relu", seed=0, output_size=(6, 6))
    with torch.no_grad():
        # Weights of unit scale: conv outputs of ~5 against BN shifts of ~1, so the ReLU keeps
        # about half of them (the default init's small outputs left every one below zero at times).
        unit.conv.weight.copy_(torch.randn_like(unit.conv.weight))
        unit.conv.bias.copy_(torch.randn_like(unit.conv.bias))
    return unit.eval()


def unit_oracle(unit, x):
    """relu(mask * BN(conv(x))) with nn copies of the unit's current parameters and buffers."""
    conv = nn.Conv2d(3, 4, 3, padding=1, bias=unit.conv.bias is not None, dtype=unit.conv.weight.dtype)
    conv.load_state_dict(unit.conv.state_dict(), strict=False)
    bn = nn.BatchNorm2d(4, eps=unit.bn.eps, dtype=unit.conv.weight.dtype)
    bn.load_state_dict(unit.bn.state_dict())
    return F.relu(unit.mask * bn.eval()(conv(x)))


def test_conv_bn_eval_fold_is_cached_and_equals_the_fold():
    unit = eval_unit_with_bias()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        first = unit(x)
        cached = unit._folded
        second = unit(x)
        weight, bias = unit.folded_weight_and_bias()
    assert cached is not None and unit._folded is cached, "the second call must reuse the fold"
    assert torch.equal(cached.weight, weight) and torch.equal(cached.bias, bias)
    assert not cached.weight.requires_grad and not cached.bias.requires_grad
    assert torch.equal(first, second)
    torch.testing.assert_close(first, unit_oracle(unit, x), **TOL_FOLDED)


def _step(unit):
    optimizer = torch.optim.SGD(unit.parameters(), lr=0.1)
    for parameter in unit.parameters():
        parameter.grad = torch.randn_like(parameter)
    optimizer.step()


def _load_other(unit):
    other, _, _ = build_unit(dict(in_channels=3, out_channels=4, kernel_size=3, padding=1, bias=True))
    state = {k: v for k, v in other.state_dict().items() if k != "conv.mask"}
    unit.load_state_dict(state, strict=False)


def _train_then_eval(unit):
    unit.train()(torch.randn(4, 3, 6, 6, dtype=torch.float64) * 3 + 1)  # updates BN's running statistics
    unit.eval()


def _train_bn_alone(unit):
    # The unit stays in eval mode; BN's running statistics change (without a version bump).
    unit.bn.train()(torch.randn(4, 4, 6, 6, dtype=torch.float64) * 3 + 1)
    unit.bn.eval()


def _replace_weight(unit):
    unit.conv.weight = nn.Parameter(torch.randn_like(unit.conv.weight))


def _round_trip_through_half(unit):
    # The conv's parameters keep their identity and version, their data is new and rounded
    # (the BN's buffers would be replaced: the conv alone tests the parameters).
    unit.conv.half().double()


def _set_eps(unit):
    unit.bn.eps = 0.5


def _in_place(get, edit):
    def change(unit):
        with torch.no_grad():
            edit(get(unit))
    return change


SOURCE_CHANGES = {
    "conv.weight": _in_place(lambda u: u.conv.weight, lambda t: t.mul_(1.5)),
    "conv.bias": _in_place(lambda u: u.conv.bias, lambda t: t.add_(1)),
    "bn.weight": _in_place(lambda u: u.bn.weight, lambda t: t.mul_(2)),
    "bn.bias": _in_place(lambda u: u.bn.bias, lambda t: t.sub_(1)),
    "bn.running_mean": _in_place(lambda u: u.bn.running_mean, lambda t: t.add_(1)),
    "bn.running_var": _in_place(lambda u: u.bn.running_var, lambda t: t.mul_(3)),
    "bn.eps": _set_eps,
    "optimizer step": _step,
    "load_state_dict": _load_other,
    "train then eval": _train_then_eval,
    "bn trained alone": _train_bn_alone,
    "parameter replaced": _replace_weight,
    "to half and back": _round_trip_through_half,
}


@pytest.mark.parametrize("change", SOURCE_CHANGES.values(), ids=SOURCE_CHANGES.keys())
def test_conv_bn_eval_fold_cache_follows_every_source(change):
    unit = eval_unit_with_bias()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        before = unit(x)
    change(unit)
    with torch.no_grad():
        after = unit(x)
        expected = unit_oracle(unit, x)
    assert not torch.allclose(before, expected), "the change must change the output (else the test proves nothing)"
    torch.testing.assert_close(after, expected, **TOL_FOLDED)


def test_conv_bn_eval_gradients_reach_the_parameters():
    # Eval mode with parameters requiring grad (e.g. a gradient w.r.t. the weights): the fold
    # runs in the graph even when a cached one exists.
    unit = eval_unit_with_bias()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        unit(x)
    assert unit._folded is not None
    x_ours, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    y = unit(x_ours)
    conv = nn.Conv2d(3, 4, 3, padding=1, dtype=torch.float64)
    conv.load_state_dict(unit.conv.state_dict(), strict=False)
    bn = copy.deepcopy(unit.bn)
    expected = F.relu(unit.mask * bn(conv(x_ref)))
    torch.testing.assert_close(y, expected, **TOL_FOLDED)
    grad_y = torch.randn_like(y)
    ours = [x_ours, unit.conv.weight, unit.conv.bias, unit.bn.weight, unit.bn.bias]
    got = torch.autograd.grad(y, ours, grad_y)
    want = torch.autograd.grad(expected, [x_ref, conv.weight, conv.bias, bn.weight, bn.bias], grad_y)
    for name, g, r in zip(["input", "conv weight", "conv bias", "bn weight", "bn bias"], got, want):
        torch.testing.assert_close(g, r, **TOL_FOLDED, msg=lambda m: f"grad of {name}: {m}")


@pytest.mark.parametrize("build_in_inference_mode", [False, True], ids=["no_grad", "inference_mode"])
def test_conv_bn_eval_frozen_unit_serves_the_cache_with_input_gradients(build_in_inference_mode):
    # A frozen model (no parameter requires grad), differentiated w.r.t. its input (as an attack
    # does): the cached fold serves, and the input gradient is the oracle's. A fold cached in
    # inference mode is not served outside it (inference tensors cannot be saved for backward).
    unit = eval_unit_with_bias().requires_grad_(False)
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    with torch.inference_mode() if build_in_inference_mode else torch.no_grad():
        unit(x)
    x_ours, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    y = unit(x_ours)
    cached = unit._folded
    unit(x_ours)
    assert unit._folded is cached
    expected = unit_oracle(unit, x_ref)
    torch.testing.assert_close(y, expected, **TOL_FOLDED)
    grad_y = torch.randn_like(y)
    torch.testing.assert_close(
        torch.autograd.grad(y, x_ours, grad_y)[0], torch.autograd.grad(expected, x_ref, grad_y)[0], **TOL_FOLDED
    )


@pytest.mark.parametrize("copy_with", ["deepcopy", "pickle"])
def test_conv_bn_eval_fold_cache_is_not_saved_or_copied(copy_with):
    unit = eval_unit_with_bias()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    keys = set(unit.state_dict())
    with torch.no_grad():
        expected = unit(x)
    assert unit._folded is not None and set(unit.state_dict()) == keys
    if copy_with == "deepcopy":
        clone = copy.deepcopy(unit)
    else:
        buffer = io.BytesIO()
        torch.save(unit, buffer)
        buffer.seek(0)
        clone = torch.load(buffer, weights_only=False)
    assert clone._folded is None
    with torch.no_grad():
        torch.testing.assert_close(clone(x), expected, **TOL64)
        clone.bn.running_mean.add_(1)  # the copy's tensors are its own: the original's fold stands
        assert torch.equal(unit(x), expected)
        torch.testing.assert_close(clone(x), unit_oracle(clone, x), **TOL_FOLDED)


def kept_stats_reference(y, mask, gamma, beta, eps):
    """BN with per-channel mean and biased variance over the kept positions of ``y`` only;
    masked outputs are zero. Returns (output, mean, biased var, kept count per channel)."""
    kept = mask.expand_as(y).to(y.dtype)
    count = kept.sum(dim=(0, 2, 3))
    mean = (y * kept).sum(dim=(0, 2, 3)) / count
    var = (((y - mean.view(1, -1, 1, 1)) ** 2) * kept).sum(dim=(0, 2, 3)) / count
    normalized = (y - mean.view(1, -1, 1, 1)) / torch.sqrt(var.view(1, -1, 1, 1) + eps)
    out = kept * (normalized * gamma.view(1, -1, 1, 1) + beta.view(1, -1, 1, 1))
    return out, mean, var, count


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode,group_size", MODES, ids=str)
@pytest.mark.parametrize("ratio", [0.5, 0.9])
@pytest.mark.parametrize("activation", [None, "relu"])
def test_conv_bn_kept_stats(backend, mode, group_size, ratio, activation):
    # A fixed seed whose masks keep at least one position in every channel (checked below),
    # so every channel has kept statistics and an unbiased variance.
    unit, conv, bn = build_unit(mask_ratio=ratio, mask_mode=mode, group_size=group_size, backend=backend,
                                activation=activation, bn_stats="kept", seed=0, output_size=(7, 6))
    unit.train()
    running_mean, running_var = bn.running_mean.clone(), bn.running_var.clone()
    mask = unit.mask
    assert bool((mask.sum(dim=(1, 2)) >= 1).all())
    x = torch.randn(3, 3, 7, 6, dtype=torch.float64)
    x_ours, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    y = unit(x_ours)
    expected, mean, var, count = kept_stats_reference(conv(x_ref), mask, bn.weight, bn.bias, bn.eps)
    if activation == "relu":
        expected = F.relu(expected)
    torch.testing.assert_close(y, expected, **TOL64)
    assert (y.detach()[(~mask).expand_as(y)] == 0).all()
    # Running stats: momentum 0.1, the unbiased variance over the kept positions.
    momentum = 0.1
    want_mean = (1 - momentum) * running_mean + momentum * mean.detach()
    want_var = (1 - momentum) * running_var + momentum * (var * count / (count - 1)).detach()
    torch.testing.assert_close(unit.bn.running_mean, want_mean, **TOL64)
    torch.testing.assert_close(unit.bn.running_var, want_var, **TOL64)
    assert int(unit.bn.num_batches_tracked) == 1
    grad_y = torch.randn_like(y)
    got = torch.autograd.grad(y, [x_ours, unit.conv.weight, unit.bn.weight, unit.bn.bias], grad_y)
    want = torch.autograd.grad(expected, [x_ref, conv.weight, bn.weight, bn.bias], grad_y)
    for name, g, r in zip(["input", "conv weight", "bn weight", "bn bias"], got, want):
        torch.testing.assert_close(g, r, **TOL64, msg=lambda m: f"grad of {name}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bn_stats", ["all", "kept"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("activation", [None, "relu"])
def test_conv_bn_residual(backend, bn_stats, training, activation):
    # act(mask * BN(conv(x)) + residual): in eval mode inside the kernel's epilogue.
    unit, _, _ = build_unit(mask_ratio=0.5, backend=backend, bn_stats=bn_stats, activation=activation, seed=0,
                            output_size=(7, 6))
    plain = copy.deepcopy(unit)
    plain.activation = None
    unit.train(training), plain.train(training)
    x = torch.randn(3, 3, 7, 6, dtype=torch.float64)
    residual = torch.randn(3, 4, 7, 6, dtype=torch.float64)
    x_fused, x_plain = x.clone().requires_grad_(), x.clone().requires_grad_()
    r_fused, r_plain = residual.clone().requires_grad_(), residual.clone().requires_grad_()
    y = unit(x_fused, residual=r_fused)
    expected = plain(x_plain) + r_plain
    expected = F.relu(expected) if activation == "relu" else expected
    torch.testing.assert_close(y, expected, **TOL64)
    torch.testing.assert_close(unit.bn.running_mean, plain.bn.running_mean, **TOL64)
    grad_y = torch.randn_like(y)
    got = torch.autograd.grad(y, [x_fused, r_fused, unit.conv.weight], grad_y)
    want = torch.autograd.grad(expected, [x_plain, r_plain, plain.conv.weight], grad_y)
    for name, g, r in zip(["input", "residual", "conv weight"], got, want):
        torch.testing.assert_close(g, r, **TOL64, msg=lambda m: f"grad of {name}: {m}")
    # Unbatched input and residual: the same as a batch of one.
    torch.testing.assert_close(unit(x[0], residual=residual[0]), unit(x[:1], residual=residual[:1])[0], **TOL64)


def test_conv_bn_kept_stats_differ_from_all_stats():
    # The two statistics really differ on the same data (the test above is not vacuous).
    x = torch.randn(3, 3, 7, 6, dtype=torch.float64)
    kept, _, _ = build_unit(mask_ratio=0.5, seed=4, bn_stats="kept")
    every = copy.deepcopy(kept)
    every.bn_stats = "all"
    assert not torch.allclose(kept(x), every(x))


def test_conv_bn_ratio_zero_is_conv_then_bn():
    unit, conv, bn = build_unit(mask_ratio=0.0, bn_stats="kept")
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    torch.testing.assert_close(unit(x), bn(conv(x)), **TOL64)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(activation="gelu"), r"activation must be one of .*got 'gelu'"),
        (dict(bn_stats="masked"), r"bn_stats must be one of .*got 'masked'"),
        (dict(mask_ratio=1.0), r"mask_ratio must be in \[0, 1\)"),
    ],
)
def test_conv_bn_rejected_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        rk.MaskedConvBN2d(3, 4, 3, padding=1, **kwargs)


def test_conv_bn_kept_stats_leave_fully_masked_channels_running_stats_alone():
    unit = rk.MaskedConvBN2d(3, 4, 3, padding=1, mask_ratio=0.5, output_size=(6, 6), bn_stats="kept")
    unit.conv.mask[1] = False  # channel 1 keeps nothing (an in-place edit the layer must notice)
    with torch.no_grad():
        unit.bn.running_mean.fill_(0.25)
        unit.bn.running_var.fill_(2.0)
    unit.train()(torch.randn(2, 3, 6, 6))
    assert unit.bn.running_mean[1].item() == 0.25 and unit.bn.running_var[1].item() == 2.0
    assert unit.bn.running_mean[0].item() != 0.25


def test_mask_edited_in_place_is_honoured(backend="cpu"):
    layer = rk.MaskedConv2d(3, 4, 3, padding=1, mask_ratio=0.5, output_size=(6, 6), backend=backend)
    x = torch.randn(2, 3, 6, 6)
    layer(x)
    layer.mask[:, :3] = False
    conv = nn.Conv2d(3, 4, 3, padding=1)
    conv.load_state_dict(layer.state_dict(), strict=False)
    torch.testing.assert_close(layer(x), conv(x) * layer.mask)


def test_mask_edited_in_place_still_checks_the_size():
    layer = rk.MaskedConv2d(3, 4, 3, padding=1, mask_ratio=0.5, output_size=(6, 6))
    layer.mask[:, 0] = False
    with pytest.raises(ValueError, match=r"built for output size \(6, 6\).*\(7, 7\)"):
        layer(torch.randn(1, 3, 7, 7))
