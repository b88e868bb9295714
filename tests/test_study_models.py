"""The study's other source networks (rk.models.resnet50, densenet121, senet18) with Random Mask
placed by hand, the paper's controls (width_multiplier, channels_fraction, deep_dropout,
DropBlock2d), and their path through ModelSpec, checkpoints and `rmask train`.

Oracles: rk.convert_model on the unmasked network given the convs of the selected stages
(conv + BN pairs found on the torch.fx graph), and each block written out with F ops and the
model's parameters and masks. Small inputs (8×8 and 16×16, as the embedded digits) keep every
network fast on two cores; comparisons run in float64, where only summation order and eval-mode
BN folding differ.
"""

import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import rmask_kernels as rk
from helpers import randomize_batchnorms
from rmask_kernels.convert import conv_output_shapes, select_layers
from rmask_kernels.experiments import cli
from rmask_kernels.experiments.checkpoint import load_checkpoint, save_checkpoint
from rmask_kernels.experiments.model_zoo import ModelSpec, build_model, load_model, masks_of
from rmask_kernels.experiments.train import TrainConfig
from rmask_kernels.masks import layer_seed

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

TIGHT = dict(rtol=1e-9, atol=1e-9)  # float64, summation order only
NEW_MODELS = {"resnet50": rk.models.resnet50, "densenet121": rk.models.densenet121, "senet18": rk.models.senet18}
STAGED = {"resnet18": rk.models.resnet18, **NEW_MODELS}
SELECTIONS = {"shallow": {0, 1, 2}, "deep": {3, 4}, "all": {0, 1, 2, 3, 4}, "13": {1, 3}}
DIGITS = dict(input_size=8, in_channels=1)


def stage_of(name):
    """The stage of a conv from its name: conv1 = stem, layerS / denseS / transS = stage S."""
    first = name.split(".")[0]
    return 0 if first == "conv1" else int(first[-1])


def mask_convs(model):
    """Every conv a mask may go on, by stage: all nn.Conv2d but squeeze-excitation's fc1/fc2."""
    return {n: stage_of(n) for n, m in model.named_modules()
            if isinstance(m, nn.Conv2d) and n.rpartition(".")[2] not in ("fc1", "fc2")}


def masked(model):
    """The modules holding a mask: MaskedConvBN2d units, and MaskedConv2d outside a unit."""
    units = {n: m for n, m in model.named_modules() if isinstance(m, rk.MaskedConvBN2d)}
    inside = {f"{n}.conv" for n in units}
    convs = {n: m for n, m in model.named_modules() if isinstance(m, rk.MaskedConv2d) and n not in inside}
    return {**units, **convs}


def build(name, **options):
    return STAGED[name](**{**DIGITS, **options})


# -- architecture ---------------------------------------------------------------------------


@pytest.mark.parametrize("name,parameters", [("resnet50", 23_520_842), ("densenet121", 6_956_298),
                                             ("senet18", 11_263_042)])
def test_unmasked_networks_are_the_cifar_ones(name, parameters):
    # resnet50, densenet121: kuangliu/pytorch-cifar's ResNet50() and DenseNet121() for 10 classes;
    # senet18: ResNet-18 plus two 1×1 convs with bias per block (planes/16 squeezed channels).
    model = NEW_MODELS[name]()
    assert sum(p.numel() for p in model.parameters()) == parameters
    assert not masked(model)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    small = NEW_MODELS[name](7, **DIGITS)
    assert small(torch.randn(2, 1, 8, 8)).shape == (2, 7)


def test_resnet18_is_unchanged_and_keeps_its_keys():
    model = rk.models.resnet18(mask_ratio=0.9)
    assert sum(p.numel() for p in model.parameters()) == 11_173_962
    keys = set(model.state_dict())
    assert {"conv1.conv.mask", "layer2.0.shortcut.0.conv.mask", "layer4.1.bn2.running_var", "linear.weight"} <= keys
    assert not any("drop" in k for k in keys)


@pytest.mark.parametrize("selection", list(SELECTIONS))
@pytest.mark.parametrize("name", list(NEW_MODELS))
def test_masks_exactly_in_the_selected_stages(name, selection):
    ratio = 0.5
    model = build(name, mask_ratio=ratio, mask_layers=selection, seed=3)
    dense = build(name)
    convs = mask_convs(dense)
    shapes = conv_output_shapes(dense, torch.zeros(1, 1, 8, 8))
    holders = masked(model)
    stages = SELECTIONS[selection]
    assert set(holders) == {n for n, s in convs.items() if s in stages}
    for stage in range(5):  # the count per stage: every conv of a selected stage, none elsewhere
        expected = sum(s == stage for s in convs.values()) if stage in stages else 0
        assert sum(stage_of(n) == stage for n in holders) == expected
    for conv_name, holder in holders.items():
        assert tuple(holder.mask.shape) == shapes[conv_name], conv_name
        assert int((~holder.mask).sum()) == int(ratio * holder.mask.numel())
        assert torch.equal(holder.mask, rk.random_mask(shapes[conv_name], ratio, seed=layer_seed(3, conv_name)))
        if isinstance(holder, rk.MaskedConvBN2d):  # the BN moved into the unit, its slot is empty
            prefix, _, last = conv_name.rpartition(".")
            bn = {"conv1": "bn1", "conv2": "bn2", "conv3": "bn3", "0": "1"}[last]
            if name == "densenet121":
                assert last == "conv1" and holder.activation == "relu"
                bn = "bn2"  # a dense layer's bottleneck conv is followed by bn2
            assert isinstance(model.get_submodule(f"{prefix}.{bn}" if prefix else bn), nn.Identity)
    if name == "densenet121":  # the convs with no BN of their own carry a MaskedConv2d
        plain = {n for n, h in holders.items() if isinstance(h, rk.MaskedConv2d)}
        assert plain == {n for n in holders if not (n.startswith("dense") and n.endswith(".conv1"))}
    if name == "senet18":  # conv2 feeds the excitation: no activation in the unit
        assert all(h.activation is None for n, h in holders.items() if n.endswith("conv2"))


@pytest.mark.parametrize("name", list(NEW_MODELS))
def test_separate_ratios_per_stage_group(name):
    model = build(name, mask_ratio={"012": 0.9, "34": 0.3})
    for conv_name, holder in masked(model).items():
        ratio = 0.9 if stage_of(conv_name) <= 2 else 0.3
        assert int((~holder.mask).sum()) == int(ratio * holder.mask.numel())
    assert len(masked(model)) == len(mask_convs(model))


@pytest.mark.parametrize("name", list(NEW_MODELS))
def test_forward_and_backward_in_training_and_eval(name):
    model = build(name, mask_ratio=0.7, mask_layers="all", backend="reference")
    x = torch.randn(2, 1, 8, 8, requires_grad=True)
    model.train()
    out = model(x)
    assert out.shape == (2, 10)
    out.square().sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for parameter_name, parameter in model.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), parameter_name
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model(x)).all()


@pytest.mark.parametrize("name", list(NEW_MODELS))
def test_masked_outputs_are_exactly_zero_after_the_unit(name):
    """After BN and before the ReLU: a masked output leaves its unit as exactly 0 (or as
    relu(residual) where the unit adds the block's shortcut), in training and in eval."""
    model = randomize_batchnorms(build(name, mask_ratio=0.9, mask_layers="all", seed=2, backend="reference"))
    outputs = []
    hooks = [
        holder.register_forward_hook(
            lambda m, args, kwargs, out: outputs.append((out.detach(), m.mask, kwargs.get("residual"))),
            with_kwargs=True,
        )
        for holder in masked(model).values()
    ]
    x = torch.randn(2, 1, 8, 8)
    model.train()
    model(x)
    model.eval()
    with torch.no_grad():
        model(x)
    for hook in hooks:
        hook.remove()
    assert len(outputs) == 2 * len(masked(model))
    live = []
    for out, mask, residual in outputs:
        at_masked = torch.zeros_like(out) if residual is None else F.relu(residual)
        assert torch.equal(out * ~mask, at_masked * ~mask)
        live.append(out[mask.expand_as(out)] != 0)
    assert torch.cat(live).float().mean() > 0.3  # kept outputs are live (a ReLU zeroes about half)


# -- each block by hand ----------------------------------------------------------------------


def conv_bn_by_hand(conv_slot, bn_slot, x, training):
    """mask * BN(conv(x)) with the slots' parameters (mask only if the conv slot is a unit)."""
    if isinstance(conv_slot, rk.MaskedConvBN2d):
        conv, bn, mask = conv_slot.conv, conv_slot.bn, conv_slot.mask
    else:
        conv, bn, mask = conv_slot, bn_slot, None
    y = F.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding)
    return (batch_norm_by_hand(bn, y, training)) * (mask if mask is not None else 1)


def batch_norm_by_hand(bn, y, training):
    if training:  # batch statistics over all positions, as the paper
        return F.batch_norm(y, None, None, bn.weight, bn.bias, training=True, eps=bn.eps)
    return F.batch_norm(y, bn.running_mean, bn.running_var, bn.weight, bn.bias, training=False, eps=bn.eps)


def conv_by_hand(conv, x):
    y = F.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding)
    return y * conv.mask if isinstance(conv, rk.MaskedConv2d) else y


def bottleneck_by_hand(block, x, training):
    h = F.relu(conv_bn_by_hand(block.conv1, block.bn1, x, training))
    h = F.relu(conv_bn_by_hand(block.conv2, block.bn2, h, training))
    h = conv_bn_by_hand(block.conv3, block.bn3, h, training)
    shortcut = conv_bn_by_hand(block.shortcut[0], block.shortcut[1], x, training) if len(block.shortcut) else x
    return F.relu(h + shortcut)


def se_block_by_hand(block, x, training):
    h = F.relu(conv_bn_by_hand(block.conv1, block.bn1, x, training))
    h = conv_bn_by_hand(block.conv2, block.bn2, h, training)  # masked before the excitation
    w = torch.sigmoid(block.fc2(F.relu(block.fc1(h.mean(dim=(2, 3), keepdim=True)))))
    shortcut = conv_bn_by_hand(block.shortcut[0], block.shortcut[1], x, training) if len(block.shortcut) else x
    return F.relu(h * w + shortcut)


def dense_layer_by_hand(layer, x, training):
    h = F.relu(batch_norm_by_hand(layer.bn1, x, training))
    h = F.relu(conv_bn_by_hand(layer.conv1, layer.bn2, h, training))  # the mask after bn2, before its ReLU
    return torch.cat([conv_by_hand(layer.conv2, h), x], 1)


def transition_by_hand(transition, x, training):
    return F.avg_pool2d(conv_by_hand(transition.conv, F.relu(batch_norm_by_hand(transition.bn, x, training))), 2)


@pytest.mark.parametrize(
    "name,path,by_hand",
    [("resnet50", "layer2.0", bottleneck_by_hand), ("resnet50", "layer1.0", bottleneck_by_hand),
     ("senet18", "layer2.0", se_block_by_hand), ("senet18", "layer1.1", se_block_by_hand),
     ("densenet121", "dense2.3", dense_layer_by_hand), ("densenet121", "trans2", transition_by_hand)],
    ids=str,
)
def test_blocks_equal_the_paper_placement_by_hand(name, path, by_hand):
    model = build(name, mask_ratio=0.7, mask_layers="all", seed=5, input_size=16, backend="reference")
    model = randomize_batchnorms(model).double()
    block = model.get_submodule(path)
    captured = {}
    block.register_forward_hook(lambda m, args, out: captured.update(input=args[0].detach()))  # returns None
    model.train()
    model(torch.randn(2, 1, 16, 16, dtype=torch.float64))
    x = torch.randn_like(captured["input"])
    first = getattr(block, "conv1", None)
    if getattr(first, "input_mask", None) is not None:  # the block reads a masked unit's output: 0 there
        x = x * first.input_mask
    assert any(isinstance(m, (rk.MaskedConv2d, rk.MaskedConvBN2d)) for m in block.modules())
    torch.testing.assert_close(block(x), by_hand(block, x, training=True), **TIGHT)
    block.eval()
    with torch.no_grad():  # BN folded into the masked convs
        torch.testing.assert_close(block(x), by_hand(block, x, training=False), **TIGHT)


# -- rk.convert_model gives the same network ------------------------------------------------


@pytest.mark.parametrize("selection", ["shallow", "deep"])
@pytest.mark.parametrize("name", list(NEW_MODELS))
def test_convert_model_of_the_unmasked_network_equals_the_hand_masked_one(name, selection):
    ratio, seed = 0.5, 4
    base = randomize_batchnorms(build(name, backend="reference")).double()
    names = [n for n, s in mask_convs(base).items() if s in SELECTIONS[selection]]
    converted = rk.convert_model(base, ratio, layers=names, seed=seed, backend="reference",
                                 example_input=torch.zeros(1, 1, 8, 8, dtype=torch.float64))
    hand = build(name, mask_ratio=ratio, mask_layers=selection, seed=seed, backend="reference").double()
    converted_state, hand_state = converted.state_dict(), hand.state_dict()
    assert list(converted_state) == list(hand_state)
    assert {k: v.shape for k, v in converted_state.items()} == {k: v.shape for k, v in hand_state.items()}
    assert {n: type(m) for n, m in converted.named_modules()} == {n: type(m) for n, m in hand.named_modules()}
    for key in masks_of(hand):
        assert torch.equal(converted_state[key], hand_state[key]), key
    hand.load_state_dict(converted_state)
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    for mode in ("train", "eval"):
        getattr(converted, mode)()
        getattr(hand, mode)()
        with torch.set_grad_enabled(mode == "train"):
            torch.testing.assert_close(converted(x), hand(x), **TIGHT)


def test_convert_model_shallow_by_resolution_takes_one_more_resnet50_conv():
    # Documented in rmask_kernels/models/resnet.py: layer3.0.conv1 (1×1, stride 1) runs at
    # layer2's resolution, so convert_model's resolution rule counts it as shallow.
    dense = rk.models.resnet50()
    shapes = conv_output_shapes(dense, torch.zeros(1, 3, 32, 32))
    stages = mask_convs(dense)
    by_stage = {n for n, s in stages.items() if s <= 2}
    assert set(select_layers(shapes, "shallow")) == by_stage | {"layer3.0.conv1"}


# -- the controls ----------------------------------------------------------------------------


def out_channels(model):
    return {n: m.out_channels for n, m in model.named_modules()
            if isinstance(m, nn.Conv2d) and n.rpartition(".")[2] not in ("fc1", "fc2")}


def conv_widths(model):
    """out_channels by the unmasked network's conv names (a unit's inner .conv counted as the unit)."""
    units = {n for n, m in model.named_modules() if isinstance(m, rk.MaskedConvBN2d)}
    widths = {}
    for n, c in out_channels(model).items():
        widths[n[: -len(".conv")] if n[: -len(".conv")] in units else n] = c
    return widths


@pytest.mark.parametrize("name", list(STAGED))
def test_width_multiplier_doubles_the_masked_stages(name):
    base = conv_widths(build(name))
    wide = build(name, mask_ratio=0.5, mask_layers="shallow", width_multiplier=2)
    widths = conv_widths(wide)
    assert widths.keys() == base.keys()
    for conv_name, channels in widths.items():
        stage = stage_of(conv_name)
        if stage <= 2:
            assert channels == 2 * base[conv_name], conv_name
        elif not conv_name.startswith("trans"):  # a transition halves whatever it gets
            assert channels == base[conv_name], conv_name
    holders = masked(wide)
    assert {stage_of(n) for n in holders} == {0, 1, 2}
    for conv_name, holder in holders.items():
        assert holder.mask.shape[0] == widths[conv_name]
    assert wide(torch.randn(2, 1, 8, 8)).shape == (2, 10)


@pytest.mark.parametrize("name", list(STAGED))
def test_channels_fraction_narrows_the_selected_stages_and_masks_nothing(name):
    base = conv_widths(build(name))
    narrow = build(name, mask_layers="shallow", channels_fraction=0.1)
    assert not masked(narrow)
    for conv_name, channels in conv_widths(narrow).items():
        stage = stage_of(conv_name)
        if stage <= 2:  # planes / growth scaled, then expanded (4× in bottlenecks): about a tenth
            assert abs(channels - 0.1 * base[conv_name]) <= 0.025 * base[conv_name] + 1, conv_name
            if name == "resnet18" or conv_name.endswith("conv2"):
                assert channels == max(1, round(0.1 * base[conv_name])), conv_name
        elif not conv_name.startswith("trans"):
            assert channels == base[conv_name], conv_name
    assert narrow(torch.randn(2, 1, 8, 8)).shape == (2, 10)


@pytest.mark.parametrize(
    "name,spec,kind,count",
    [("resnet18", "dropout2d:0.2", nn.Dropout2d, 4), ("resnet50", "dropblock:0.1:3", rk.models.DropBlock2d, 9),
     ("senet18", "dropblock:0.1:3", rk.models.DropBlock2d, 4), ("densenet121", "dropout2d:0.1", nn.Dropout2d, 40)],
    ids=str,
)
def test_deep_dropout_goes_in_stages_3_and_4_only(name, spec, kind, count):
    model = build(name, mask_ratio=0.5, deep_dropout=spec)
    drops = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Dropout2d, rk.models.DropBlock2d))}
    assert len(drops) == count and all(isinstance(m, kind) for m in drops.values())
    assert {stage_of(n) for n in drops} == {3, 4}
    plain = build(name, mask_ratio=0.5)
    assert list(model.state_dict()) == list(plain.state_dict())  # no state: the same checkpoint keys
    plain.load_state_dict(model.state_dict())
    x = torch.randn(2, 1, 8, 8)
    model.eval()
    plain.eval()
    with torch.no_grad():  # identity in eval
        assert torch.equal(model(x), plain(x))
    model.train()
    model(x).sum().backward()


@pytest.mark.parametrize(
    "options,match",
    [
        (dict(width_multiplier=0), r"width_multiplier must be a positive number, got 0"),
        (dict(width_multiplier="2"), r"width_multiplier must be a positive number, got '2'"),
        (dict(channels_fraction=1.5), r"channels_fraction must be in \(0, 1\].*got 1.5"),
        (dict(channels_fraction=-0.1), r"channels_fraction must be a positive number, got -0.1"),
        (dict(width_multiplier=2, channels_fraction=0.5), r"width_multiplier or channels_fraction, not both"),
        (dict(mask_ratio=0.9, channels_fraction=0.1), r"expected mask_ratio 0 .* got mask_ratio=0.9"),
        (dict(deep_dropout="dropblock:0.1"), r"deep_dropout must be .*got 'dropblock:0.1'"),
        (dict(deep_dropout="dropout2d:1.5"), r"deep_dropout must be .*got 'dropout2d:1.5'"),
        (dict(deep_dropout="dropblock:0.1:0"), r"deep_dropout must be .*got 'dropblock:0.1:0'"),
        (dict(deep_dropout="dropout:0.1"), r"deep_dropout must be .*got 'dropout:0.1'"),
    ],
    ids=str,
)
@pytest.mark.parametrize("name", ["resnet18", "densenet121"])
def test_bad_control_values_are_clear_errors(name, options, match):
    with pytest.raises(ValueError, match=match):
        build(name, **options)
    with pytest.raises(ValueError, match=match):
        ModelSpec(name, 10, 1, 8, (0.5,), (0.25,), **options)


def test_controls_are_for_the_staged_models():
    for name in ("vgg19", "small"):
        with pytest.raises(ValueError, match=f"width_multiplier is for .*expected 1.0 for {name}, got 2"):
            ModelSpec(name, 10, 1, 32, (0.5,), (0.25,), width_multiplier=2)
        with pytest.raises(ValueError, match="deep_dropout is for"):
            TrainConfig(model=name, deep_dropout="dropout2d:0.1")
    assert ModelSpec("small", 10, 1, 32, (0.5,), (0.25,), deep_dropout="none").deep_dropout is None


# -- DropBlock2d -----------------------------------------------------------------------------


def expected_drop_rate(p, block, size):
    """The exact expected fraction dropped: a unit is dropped unless every seed whose block
    covers it stays off (seeds drawn with the paper's gamma where a whole block fits)."""
    gamma = p / block**2 * size**2 / (size - block + 1) ** 2
    seeds = torch.arange(size - block + 1)
    covering = torch.tensor([int(((seeds <= i) & (i < seeds + block)).sum()) for i in range(size)])
    counts = covering.view(-1, 1) * covering.view(1, -1)
    return float((1 - (1 - gamma) ** counts.double()).mean())


def test_dropblock_is_the_identity_in_eval_and_at_p_0():
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(rk.models.DropBlock2d(0.5, 3).eval()(x), x)
    assert torch.equal(rk.models.DropBlock2d(0.0, 3).train()(x), x)


@pytest.mark.parametrize("p,block,size", [(0.1, 3, 32), (0.2, 5, 16), (0.3, 7, 4)], ids=str)
def test_dropblock_zeroes_blocks_at_the_expected_rate_and_rescales(p, block, size):
    torch.manual_seed(0)
    drop = rk.models.DropBlock2d(p, block).train()
    x = torch.rand(64, 64, size, size) + 1.0  # never 0: a 0 in the output is a dropped unit
    y = drop(x)
    dropped = y == 0
    rate = float(dropped.float().mean())
    clipped = min(block, size)
    # 4096 independent maps: the rate's standard deviation is at most 0.5 / 64 (one seed a map, 4×4).
    assert abs(rate - expected_drop_rate(p, clipped, size)) < 0.03
    assert abs(rate - p) < max(0.05, 0.5 * p)  # the paper's gamma aims at p (overlaps and edges: a little less)
    # Rescaled by units / units kept over the whole tensor.
    kept = ~dropped
    torch.testing.assert_close(y[kept], x[kept] * dropped.numel() / kept.sum())
    # The dropped units are a union of whole clipped × clipped blocks: opening the drop map
    # (erosion, then dilation, by that square) leaves it unchanged.
    d = dropped.float()
    eroded = -F.max_pool2d(-d, clipped, stride=1)  # 1 at the corner of every wholly dropped block
    opened = F.max_pool2d(F.pad(eroded, (clipped - 1,) * 4), clipped, stride=1)
    assert torch.equal(opened, d)
    assert dropped.any() and kept.any()


def test_dropblock_differentiates_and_rejects_bad_arguments():
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    torch.manual_seed(1)
    y = rk.models.DropBlock2d(0.3, 3).train()(x)
    y.sum().backward()  # the gradient is the scaled block mask
    assert torch.equal(x.grad == 0, y.detach() == 0)
    assert x.grad[x.grad != 0].unique().numel() == 1
    with pytest.raises(ValueError, match=r"p must be in \[0, 1\).*got 1.0"):
        rk.models.DropBlock2d(1.0, 3)
    with pytest.raises(ValueError, match="block_size must be a positive int, got 0"):
        rk.models.DropBlock2d(0.1, 0)
    with pytest.raises(ValueError, match=r"input must be \(N, C, H, W\), got shape \(4, 8, 8\)"):
        rk.models.DropBlock2d(0.1, 3).train()(torch.randn(4, 8, 8))


# -- ModelSpec, checkpoints, rmask train -------------------------------------------------------


def digits_spec(name, **options):
    return ModelSpec(name, 10, 1, 8, (0.5,), (0.25,), **options)


@pytest.mark.parametrize(
    "name,options",
    [
        ("resnet50", dict(mask_ratio=0.5)),
        ("densenet121", dict(mask_ratio=0.5, mask_layers="deep")),
        ("senet18", dict(mask_ratio="012:0.9,34:0.3")),
        ("resnet18", dict(mask_ratio=0.9, width_multiplier=2)),
        ("resnet18", dict(channels_fraction=0.1)),
        ("resnet18", dict(mask_ratio=0.5, deep_dropout="dropblock:0.1:3")),
        ("densenet121", dict(mask_ratio=0.5, width_multiplier=2.0, deep_dropout="dropout2d:0.1")),
        ("senet18", dict(mask_layers="all", channels_fraction=0.25)),
        ("resnet50", dict(mask_ratio=0.5, mask_layers="13", deep_dropout="dropblock:0.2:2")),
    ],
    ids=str,
)
def test_state_dict_round_trip_through_the_model_spec(tmp_path, name, options):
    spec = digits_spec(name, backend="reference", **options)
    assert ModelSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    model = build_model(spec, init_seed=0)
    path = tmp_path / "model.pt"
    save_checkpoint(path, {"config": {}, "model_spec": spec.to_dict(), "model": model.state_dict(), "epoch": 1})
    loaded = load_model(path)  # another network, built from the saved spec alone
    assert type(loaded.net) is type(model.net)
    assert list(loaded.state_dict()) == list(model.state_dict())
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    model.eval()
    x = torch.rand(2, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))


def test_a_spec_or_config_saved_without_the_controls_loads_with_their_defaults():
    saved = digits_spec("resnet18", mask_ratio=0.9).to_dict()
    for field in ("width_multiplier", "channels_fraction", "deep_dropout"):
        del saved[field]
    spec = ModelSpec.from_dict(saved)
    assert (spec.width_multiplier, spec.channels_fraction, spec.deep_dropout) == (1.0, 1.0, None)
    current = digits_spec("resnet18", mask_ratio=0.9)
    assert spec == current and list(build_model(spec).state_dict()) == list(build_model(current).state_dict())
    config = TrainConfig(data="digits", model="resnet18").to_dict()
    for field in ("width_multiplier", "channels_fraction", "deep_dropout"):
        del config[field]
    assert TrainConfig.from_dict(config) == TrainConfig(data="digits", model="resnet18")


TINY = ["--data", "digits", "--limit-train", "64", "--limit-test", "32", "--epochs", "1", "--batch-size", "32",
        "--quiet"]


@pytest.mark.parametrize(
    "name,options",
    [("resnet50", ["--mask-ratio", "0.5"]),
     ("densenet121", ["--mask-ratio", "0.5", "--deep-dropout", "dropblock:0.1:3"]),
     ("senet18", ["--mask-ratio", "0.5", "--width-multiplier", "2"])],
    ids=str,
)
def test_rmask_train_runs_the_study_models(tmp_path, name, options):
    assert cli.main(["train", *TINY, "--model", name, *options, "--run-dir", str(tmp_path)]) == 0
    saved = load_checkpoint(tmp_path / "last.pt")
    assert saved["model_spec"]["name"] == name and saved["epoch"] == 1
    model = load_model(tmp_path)
    assert type(model.net) is type(NEW_MODELS[name]())
    assert {stage_of(n) for n in masked(model.net)} == {0, 1, 2}
    if name == "senet18":
        assert model.net.layer1[0].conv1.conv.out_channels == 128 and model.net.layer3[0].conv1.out_channels == 256
    if name == "densenet121":
        assert saved["config"]["deep_dropout"] == "dropblock:0.1:3"


def test_rmask_train_controls_resume_and_old_runs(tmp_path, capsys):
    # A run with controls resumes from its saved config alone, exactly (DropBlock draws from the
    # global generator, whose state the checkpoint restores); changing a control is refused.
    run, straight = tmp_path / "narrow", tmp_path / "straight"
    options = ["--model", "resnet18", "--channels-fraction", "0.1", "--mask-layers", "all", "--deep-dropout",
               "dropblock:0.2:2"]
    assert cli.main(["train", *TINY, *options, "--run-dir", str(run)]) == 0
    assert cli.main(["train", "--run-dir", str(run), "--resume", "--epochs", "2", "--quiet"]) == 0
    assert cli.main(["train", *TINY, *options, "--epochs", "2", "--run-dir", str(straight)]) == 0
    resumed, uninterrupted = load_checkpoint(run / "last.pt"), load_checkpoint(straight / "last.pt")
    assert resumed["epoch"] == 2 and resumed["model"].keys() == uninterrupted["model"].keys()
    for key, value in uninterrupted["model"].items():
        assert torch.equal(resumed["model"][key], value), key
    assert cli.main(["train", "--run-dir", str(run), "--resume", "--epochs", "3", "--channels-fraction", "0.2",
                     "--quiet"]) == 1
    assert "channels_fraction: 0.1 -> 0.2" in capsys.readouterr().err
    # A run saved before the controls existed (no such fields anywhere) still resumes.
    old = tmp_path / "old"
    assert cli.main(["train", *TINY, "--model", "small", "--mask-ratio", "0.5", "--run-dir", str(old)]) == 0
    fields = ("width_multiplier", "channels_fraction", "deep_dropout")
    config = json.loads((old / "config.json").read_text())
    (old / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k not in fields}))
    checkpoint = load_checkpoint(old / "last.pt")
    for part in ("config", "model_spec"):
        checkpoint[part] = {k: v for k, v in checkpoint[part].items() if k not in fields}
    save_checkpoint(old / "last.pt", {k: v for k, v in checkpoint.items() if k not in ("format", "format_version")})
    assert cli.main(["train", "--run-dir", str(old), "--resume", "--epochs", "2", "--quiet"]) == 0
    assert load_checkpoint(old / "last.pt")["epoch"] == 2


@pytest.mark.parametrize(
    "arguments,message",
    [(["--model", "resnet18", "--width-multiplier", "0"], "width_multiplier must be a positive number, got 0.0"),
     (["--model", "vgg19", "--width-multiplier", "2"], "width_multiplier is for"),
     (["--model", "senet18", "--deep-dropout", "dropblock:x:3"], "deep_dropout must be")],
    ids=str,
)
def test_rmask_train_rejects_bad_controls(tmp_path, capsys, arguments, message):
    assert cli.main(["train", *TINY, *arguments, "--run-dir", str(tmp_path / "run")]) == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_default_run_directory_names_the_controls():
    config = TrainConfig(data="digits", model="senet18", mask_ratio=0.9, width_multiplier=2,
                         deep_dropout="dropblock:0.1:3")
    assert cli.default_run_dir(config).name == "digits-senet18-mask0.9-shallow-width2-dropblock_0.1_3-seed0"
    config = TrainConfig(data="digits", model="resnet50", channels_fraction=0.1)
    assert cli.default_run_dir(config).name == "digits-resnet50-normal-channels0.1-shallow-seed0"
