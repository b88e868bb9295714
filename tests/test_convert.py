"""rk.convert_model: Random Mask added to an existing CNN equals the hand-placed masks.

Oracles: the built-in rk.models.resnet18 (hand placement, checked against a functional
ResNet-18 in test_models.py), and small CNNs written here whose forward multiplies each
selected conv's BN output (or the output of a conv with no BN) by a mask drawn with
rk.random_mask(shape, ratio, mode, seed=layer_seed(seed, conv name)), before the ReLU.
Comparisons run in float64, where only summation order and eval-mode BN folding differ.
"""


import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import rmask_kernels as rk
from helpers import randomize_batchnorms
from rmask_kernels.masks import layer_seed

TIGHT = dict(rtol=1e-9, atol=1e-9)  # float64, summation order only


def masked_modules(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, (rk.MaskedConv2d, rk.MaskedConvBN2d))}


def units(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, rk.MaskedConvBN2d)}


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_state_equal(state, model):
    now = model.state_dict()
    assert list(now) == list(state)
    for key, value in state.items():
        assert torch.equal(now[key], value), f"{key} changed"


def assert_same_outputs(converted, hand, x):
    """Train mode (batch statistics; running statistics move the same way), then eval mode."""
    converted.train()
    hand.train()
    torch.testing.assert_close(converted(x), hand(x), **TIGHT)
    converted.eval()
    hand.eval()
    with torch.no_grad():
        torch.testing.assert_close(converted(x), hand(x), **TIGHT)


# -- a small hand-written CNN ------------------------------------------------------------

SMALL_SHAPES = {
    "conv1": (8, 16, 16), "conv2": (8, 16, 16), "conv3": (16, 8, 8), "conv4": (16, 8, 8), "conv5": (16, 8, 8),
}
SMALL_BN = {"conv1": "bn1", "conv2": "bn2", "conv3": "bn3", "conv4": "bn4"}  # conv5 has no BN


class SmallCNN(nn.Module):
    """conv-bn-relu x2 at 16x16, max-pool, conv-bn-relu x2 at 8x8, conv-relu (no BN) at 8x8,
    global average pool, linear. ``masks`` {conv name: mask} places masks by hand: after the
    conv's BN (or on the conv output when it has no BN), before the ReLU. ``bn_first``
    registers all BNs before the convs (the data flow is unchanged)."""

    def __init__(self, masks=None, bn_first=False):
        super().__init__()
        modules = {
            "conv1": nn.Conv2d(3, 8, 3, padding=1),  # with a bias, which BN folding must keep
            "bn1": nn.BatchNorm2d(8),
            "conv2": nn.Conv2d(8, 8, 3, padding=1, bias=False),
            "bn2": nn.BatchNorm2d(8),
            "conv3": nn.Conv2d(8, 16, 3, padding=1, bias=False),
            "bn3": nn.BatchNorm2d(16),
            "conv4": nn.Conv2d(16, 16, 3, padding=1, bias=False),
            "bn4": nn.BatchNorm2d(16),
            "conv5": nn.Conv2d(16, 16, 3, padding=1),
            "linear": nn.Linear(16, 5),
        }
        order = sorted(modules, key=lambda n: not n.startswith("bn")) if bn_first else list(modules)
        for name in order:
            self.add_module(name, modules[name])
        self.masks = dict(masks or {})

    def unit(self, name, x):
        y = getattr(self, name)(x)
        if name in SMALL_BN:
            y = getattr(self, SMALL_BN[name])(y)
        if name in self.masks:
            y = y * self.masks[name]
        return F.relu(y)

    def forward(self, x):
        x = self.unit("conv2", self.unit("conv1", x))
        x = F.max_pool2d(x, 2)
        x = self.unit("conv5", self.unit("conv4", self.unit("conv3", x)))
        return self.linear(x.mean(dim=(2, 3)))


class UntraceableCNN(SmallCNN):
    def forward(self, x):
        if x.mean() > 0:  # data-dependent Python control flow: torch.fx cannot trace this
            x = x.flip(-1)
        return super().forward(x)


def small_masks(names, ratio, mode="neuron", group_size=None, seed=0):
    return {n: rk.random_mask(SMALL_SHAPES[n], ratio, mode, group_size, seed=layer_seed(seed, n)) for n in names}


def hand_placed(base, masks, cls=SmallCNN, **kwargs):
    """``base``'s weights with the masks placed by hand."""
    hand = cls(masks, **kwargs).double()
    hand.load_state_dict(base.state_dict())
    return hand


def small_input(batch=4):
    return torch.randn(batch, 3, 16, 16, dtype=torch.float64)


EXAMPLE_16 = torch.zeros(1, 3, 16, 16, dtype=torch.float64)


def check_small_conversion(converted, expected_names, ratio, mode="neuron", group_size=None, seed=0):
    assert set(masked_modules(converted)) - {f"{n}.conv" for n in units(converted)} == set(expected_names)
    for name in expected_names:
        module = converted.get_submodule(name)
        if name in SMALL_BN:
            assert type(module) is rk.MaskedConvBN2d, name
            assert isinstance(converted.get_submodule(SMALL_BN[name]), nn.Identity)
        else:  # no BN after it: the mask goes directly on the conv output
            assert type(module) is rk.MaskedConv2d, name
        assert module.mask.dtype == torch.bool
        assert torch.equal(module.mask, small_masks([name], ratio, mode, group_size, seed)[name]), name
    for name in set(SMALL_SHAPES) - set(expected_names):
        assert type(converted.get_submodule(name)) is nn.Conv2d
        if name in SMALL_BN:
            assert type(converted.get_submodule(SMALL_BN[name])) is nn.BatchNorm2d


# -- the built-in ResNet-18 ----------------------------------------------------------------


@pytest.mark.parametrize(
    "layers,mode,group_size,ratio",
    [("shallow", "neuron", None, 0.9), ("deep", "neuron", None, 0.5), ("shallow", "spatial", None, 0.9),
     ("shallow", "group", 16, 0.9)],
    ids=str,
)
def test_converted_resnet18_equals_builtin_masked_resnet18(layers, mode, group_size, ratio):
    base = randomize_batchnorms(rk.models.resnet18(mask_ratio=0.0)).double()
    before = snapshot(base)
    converted = rk.convert_model(
        base, ratio, layers=layers, mode=mode, group_size=group_size, seed=0,
        example_input=torch.zeros(1, 3, 32, 32, dtype=torch.float64),
    )
    hand = rk.models.resnet18(mask_ratio=ratio, mask_layers=layers, mask_mode=mode, group_size=group_size, seed=0)
    hand = hand.double()

    assert converted is not base
    assert_state_equal(before, base)  # inplace=False: the original is untouched
    assert not masked_modules(base)
    assert set(converted.state_dict()) == set(hand.state_dict())
    assert len(converted.state_dict()) == len(hand.state_dict())
    stages = (1, 2) if layers == "shallow" else (3, 4)
    expected = {f"layer{s}.{i}.conv{j}" for s in stages for i in range(2) for j in (1, 2)}
    expected |= {f"layer{s}.0.shortcut.0" for s in stages if s > 1} | ({"conv1"} if layers == "shallow" else set())
    assert set(units(converted)) == set(units(hand)) == expected and len(expected) == 10
    shapes = {(64, 32, 32), (128, 16, 16)} if layers == "shallow" else {(256, 8, 8), (512, 4, 4)}
    assert {(u.conv.out_channels, *u.mask.shape[-2:]) for u in units(converted).values()} == shapes
    assert set(masked_modules(converted)) == set(masked_modules(hand))
    for name, unit in units(hand).items():
        assert torch.equal(units(converted)[name].mask, unit.mask), f"{name}: masks differ"
        # the converted unit holds the original conv and BN (running statistics unchanged)
        original_conv = base.get_submodule(name)
        prefix, _, last = name.rpartition(".")
        bn_slot = {"conv1": "bn1", "conv2": "bn2", "0": "1"}[last]
        original_bn = base.get_submodule(f"{prefix}.{bn_slot}" if prefix else bn_slot)
        converted_unit = units(converted)[name]
        assert torch.equal(converted_unit.conv.weight, original_conv.weight)
        for key, value in original_bn.state_dict().items():
            assert torch.equal(converted_unit.bn.state_dict()[key], value), f"{name}.bn.{key}"
    assert converted.training and all(m.training for m in converted.modules())

    hand.load_state_dict(converted.state_dict())
    assert_same_outputs(converted, hand, torch.randn(2, 3, 32, 32, dtype=torch.float64))


# -- a hand-written CNN --------------------------------------------------------------------


@pytest.mark.parametrize(
    "layers,expected,mode,group_size",
    [
        ("shallow", ["conv1", "conv2"], "neuron", None),
        ("deep", ["conv3", "conv4", "conv5"], "neuron", None),
        (["conv2", "conv5"], ["conv2", "conv5"], "neuron", None),
        ("all", list(SMALL_SHAPES), "spatial", None),
        ("all", list(SMALL_SHAPES), "group", 4),
    ],
    ids=str,
)
def test_small_cnn_conversion_equals_hand_placed_masks(layers, expected, mode, group_size):
    ratio, seed = 0.7, 3
    base = randomize_batchnorms(SmallCNN()).double()
    converted = rk.convert_model(
        base, ratio, layers=layers, mode=mode, group_size=group_size, seed=seed, example_input=EXAMPLE_16
    )
    check_small_conversion(converted, expected, ratio, mode, group_size, seed)
    hand = hand_placed(base, small_masks(expected, ratio, mode, group_size, seed))
    assert_same_outputs(converted, hand, small_input())
    # the masks matter: the original model gives other outputs
    base.eval()
    with torch.no_grad():
        assert not torch.allclose(base(small_input()), converted(small_input()))


def test_seed_selects_the_masks():
    base = SmallCNN().double()
    a = rk.convert_model(base, 0.5, layers="all", seed=1, example_input=EXAMPLE_16)
    b = rk.convert_model(base, 0.5, layers="all", seed=1, example_input=EXAMPLE_16)
    c = rk.convert_model(base, 0.5, layers="all", seed=2, example_input=EXAMPLE_16)
    for name in SMALL_SHAPES:
        mask = a.get_submodule(name).mask
        assert int((~mask).sum()) == int(0.5 * mask.numel())
        assert torch.equal(mask, b.get_submodule(name).mask)
        assert not torch.equal(mask, c.get_submodule(name).mask)
    assert not torch.equal(a.conv3.mask, a.conv4.mask)  # same shape, distinct layers


def test_model_torch_fx_cannot_trace_converts_by_registration_order():
    base = randomize_batchnorms(UntraceableCNN()).double()
    with pytest.raises(Exception):
        torch.fx.symbolic_trace(base)
    converted = rk.convert_model(base, 0.9, layers="all", seed=0, example_input=EXAMPLE_16)
    check_small_conversion(converted, list(SMALL_SHAPES), 0.9)
    hand = hand_placed(base, small_masks(SMALL_SHAPES, 0.9), cls=UntraceableCNN)
    x = small_input()
    assert_same_outputs(converted, hand, x)
    assert_same_outputs(converted, hand, -x)  # the other branch


def test_batchnorm_found_by_data_flow_when_registered_elsewhere():
    """All BNs registered before the convs: torch.fx pairs each conv with the BN it feeds."""
    base = randomize_batchnorms(SmallCNN(bn_first=True)).double()
    assert list(base._modules)[:5] == ["bn1", "bn2", "bn3", "bn4", "conv1"]
    converted = rk.convert_model(base, 0.9, layers="all", seed=0, example_input=EXAMPLE_16)
    check_small_conversion(converted, list(SMALL_SHAPES), 0.9)
    hand = hand_placed(base, small_masks(SMALL_SHAPES, 0.9), bn_first=True)
    assert_same_outputs(converted, hand, small_input())


class ConvReluBN(nn.Module):
    """conv -> ReLU -> BN (the BN does not follow the conv directly) -> conv -> BN."""

    def __init__(self, masks=None):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.masks = dict(masks or {})

    def forward(self, x):
        y = self.conv1(x)
        if "conv1" in self.masks:
            y = y * self.masks["conv1"]
        y = self.bn1(F.relu(y))
        y = self.bn2(self.conv2(y))
        if "conv2" in self.masks:
            y = y * self.masks["conv2"]
        return y


def test_conv_not_followed_by_batchnorm_is_masked_on_its_output():
    base = randomize_batchnorms(ConvReluBN()).double()
    converted = rk.convert_model(base, 0.5, layers="all", seed=0, example_input=torch.zeros(1, 3, 8, 8).double())
    assert type(converted.conv1) is rk.MaskedConv2d
    assert type(converted.bn1) is nn.BatchNorm2d  # stays after the ReLU
    assert type(converted.conv2) is rk.MaskedConvBN2d and isinstance(converted.bn2, nn.Identity)
    masks = {n: rk.random_mask((8, 8, 8), 0.5, seed=layer_seed(0, n)) for n in ("conv1", "conv2")}
    hand = ConvReluBN(masks).double()
    hand.load_state_dict(base.state_dict())
    assert_same_outputs(converted, hand, torch.randn(3, 3, 8, 8, dtype=torch.float64))


def test_conversion_with_ratio_zero_keeps_outputs():
    base = randomize_batchnorms(SmallCNN()).double()
    converted = rk.convert_model(base, 0.0, layers="all", example_input=EXAMPLE_16)
    assert_same_outputs(converted, base, small_input())


# -- selection rule ------------------------------------------------------------------------


def vgg_like(resolutions=5, convs_per_resolution=2, width=4):
    layers, in_channels = [], 3
    for stage in range(resolutions):
        for _ in range(convs_per_resolution):
            layers += [nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()]
            in_channels = width
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(width, 10))


def conv_names(model):
    return [n for n, m in model.named_modules() if type(m) is nn.Conv2d]


@pytest.mark.parametrize("convs_per_resolution", [2, 3])
def test_shallow_is_stem_and_first_half_of_resolutions_in_a_vgg_stack(convs_per_resolution):
    """Resolutions 32, 16, 8, 4, 2: "shallow" = the convs at 32 and 16 (VGG-19 in the paper:
    the first 4 convs), "deep" = the rest."""
    base = vgg_like(convs_per_resolution=convs_per_resolution)
    convs = conv_names(base)
    assert len(convs) == 5 * convs_per_resolution
    example = torch.zeros(1, 3, 32, 32)
    shallow = rk.convert_model(base, 0.9, layers="shallow", example_input=example)
    deep = rk.convert_model(base, 0.9, layers="deep", example_input=example)
    first = 2 * convs_per_resolution
    assert sorted(units(shallow), key=convs.index) == convs[:first]
    assert sorted(units(deep), key=convs.index) == convs[first:]
    sizes = [tuple(units(shallow)[n].mask.shape[-2:]) for n in convs[:first]]
    assert sizes == [(32, 32)] * convs_per_resolution + [(16, 16)] * convs_per_resolution
    x = torch.randn(2, 3, 32, 32)
    assert shallow(x).shape == deep(x).shape == (2, 10)


def test_shallow_keeps_the_stem_at_a_deep_resolution():
    """A stem with a stride (its own resolution) is always shallow."""
    base = nn.Sequential(
        nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.BatchNorm2d(4), nn.ReLU(),  # stem: 16x16
        nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),  # 16x16
        nn.Conv2d(4, 4, 3, stride=2, padding=1), nn.BatchNorm2d(4), nn.ReLU(),  # 8x8
        nn.Conv2d(4, 4, 3, stride=2, padding=1), nn.BatchNorm2d(4), nn.ReLU(),  # 4x4
        nn.Conv2d(4, 4, 3, stride=2, padding=1), nn.BatchNorm2d(4), nn.ReLU(),  # 2x2
    )
    converted = rk.convert_model(base, 0.5, example_input=torch.zeros(1, 3, 32, 32))
    assert set(units(converted)) == {"0", "3", "6"}


# -- inplace, BN statistics ---------------------------------------------------------------


def test_inplace_false_leaves_the_original_untouched():
    base = randomize_batchnorms(SmallCNN())
    before = snapshot(base)
    converted = rk.convert_model(base, 0.9, example_input=torch.zeros(1, 3, 16, 16))
    assert converted is not base
    assert masked_modules(converted) and not masked_modules(base)
    assert all(type(getattr(base, n)) is nn.Conv2d for n in SMALL_SHAPES)
    assert_state_equal(before, base)
    with torch.no_grad():  # the converted model has its own parameters
        converted.conv1.conv.weight.add_(1.0)
    assert torch.equal(base.conv1.weight, before["conv1.weight"])


def test_inplace_true_modifies_the_model():
    base = randomize_batchnorms(SmallCNN())
    converted = rk.convert_model(base, 0.9, example_input=torch.zeros(1, 3, 16, 16), inplace=True)
    assert converted is base
    assert type(base.conv1) is rk.MaskedConvBN2d and isinstance(base.bn1, nn.Identity)
    assert set(units(base)) == {"conv1", "conv2"}


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("training", [True, False])
def test_conversion_does_not_change_batchnorm_statistics(inplace, training):
    base = randomize_batchnorms(SmallCNN()).train(training)
    with torch.no_grad():
        base.bn1.num_batches_tracked.fill_(7)
    stats = {n: {k: v.clone() for k, v in getattr(base, SMALL_BN[n]).state_dict().items()} for n in SMALL_BN}
    converted = rk.convert_model(base, 0.5, layers="all", example_input=torch.zeros(1, 3, 16, 16), inplace=inplace)
    for name, expected in stats.items():
        bn = converted.get_submodule(name).bn
        for key, value in expected.items():
            assert torch.equal(bn.state_dict()[key], value), f"{name}: {key} changed"
        if not inplace:
            for key, value in getattr(base, SMALL_BN[name]).state_dict().items():
                assert torch.equal(value, expected[key]), f"original {SMALL_BN[name]}.{key} changed"
    assert converted.training == training


@pytest.mark.parametrize("training", [True, False])
def test_converted_model_keeps_the_train_or_eval_mode_of_every_module(training):
    base = SmallCNN().train(training)
    converted = rk.convert_model(base, 0.5, layers="all", example_input=torch.zeros(1, 3, 16, 16))
    wrong = [name for name, m in converted.named_modules() if m.training != training]
    assert not wrong, f"modules in the wrong mode after converting a model with training={training}: {wrong}"


# -- rejected arguments --------------------------------------------------------------------


@pytest.mark.parametrize(
    "ratio,kwargs,error,match",
    [
        (0.5, dict(layers=["conv1", "nope"]), ValueError, r"nope"),
        (0.5, dict(layers=["bn1"]), ValueError, r"bn1.*not nn\.Conv2d"),
        (0.5, dict(layers="middle"), ValueError, r"layers must be one of .*'middle'"),
        (1.0, {}, ValueError, r"ratio must be in \[0, 1\).*1\.0"),
        (-0.1, {}, ValueError, r"ratio must be in \[0, 1\).*-0\.1"),
        ("0.5", {}, TypeError, r"ratio must be a float"),
        (0.5, dict(mode="checker"), ValueError, r"mode must be one of .*'checker'"),
        (0.5, dict(mode="group"), ValueError, r"group_size must be a positive int"),
        (0.5, dict(mode="group", group_size=3), ValueError, r"group_size must divide the 8 channels"),
        (0.5, dict(mode="neuron", group_size=4), ValueError, r"group_size is only used with mode='group'"),
        (0.5, dict(example_input=[0.0, 1.0]), TypeError, r"example_input must be a tensor"),
    ],
    ids=str,
)
def test_rejected_arguments(ratio, kwargs, error, match):
    base = SmallCNN()
    before = snapshot(base)
    kwargs = {"example_input": torch.zeros(1, 3, 16, 16), **kwargs}
    with pytest.raises(error, match=match):
        rk.convert_model(base, ratio, inplace=True, **kwargs)
    assert not masked_modules(base)  # a rejected call changes nothing
    assert_state_equal(before, base)


def test_rejected_inplace_conversion_leaves_the_model_unconverted():
    """conv3 (16 channels) accepts group_size 16, conv1 (8 channels) does not: the call is
    rejected, and an in-place conversion must not leave conv3 converted behind."""
    base = SmallCNN()
    before = snapshot(base)
    with pytest.raises(ValueError, match=r"group_size must divide the 8 channels"):
        rk.convert_model(base, 0.5, layers=["conv3", "conv1"], mode="group", group_size=16,
                         example_input=torch.zeros(1, 3, 16, 16), inplace=True)
    assert not masked_modules(base), "a rejected in-place conversion left masked layers behind"
    assert_state_equal(before, base)


def test_missing_example_input_is_a_type_error():
    with pytest.raises(TypeError, match="example_input"):
        rk.convert_model(SmallCNN(), 0.5)


def test_already_converted_model_is_rejected():
    converted = rk.convert_model(SmallCNN(), 0.5, example_input=torch.zeros(1, 3, 16, 16))
    with pytest.raises(ValueError, match=r"already has Random-Mask layers.*conv1"):
        rk.convert_model(converted, 0.5, example_input=torch.zeros(1, 3, 16, 16))


def test_model_without_convs_is_rejected():
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 2))
    with pytest.raises(ValueError, match=r"ran no nn\.Conv2d"):
        rk.convert_model(model, 0.5, example_input=torch.zeros(1, 3, 2, 2))
