"""rk.models.resnet18: the paper's CIFAR ResNet-18 with Random Mask placed by hand.

The oracle is `hand_forward`, a functional ResNet-18 written from the paper (F.conv2d,
F.batch_norm, masks drawn independently with rk.random_mask and layer_seed): mask after BN,
before ReLU; on the 2nd conv of a block before the residual add; on the 1x1 projection
shortcut of masked stages. Model comparisons run in float64 so only summation order (and
BN folding in eval mode) differs: 1e-9 is ample. float32 ResNet-18 forwards differ by
~1e-5 between conv algorithms, so float32 comparisons are avoided.
"""

import io

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import rmask_kernels as rk
from helpers import randomize_batchnorms
from rmask_kernels.masks import layer_seed

TIGHT = dict(rtol=1e-9, atol=1e-9)  # float64, summation order only
HAS_CPU = "cpu" in rk.available_backends()
needs_cpu = pytest.mark.skipif(not HAS_CPU, reason="the CPU extension is not built")

# Every conv of the CIFAR ResNet-18, with its stage (0 = stem) and output shape on 32x32.
STAGE_SHAPES = {0: (64, 32, 32), 1: (64, 32, 32), 2: (128, 16, 16), 3: (256, 8, 8), 4: (512, 4, 4)}


def conv_names_of_stage(stage):
    if stage == 0:
        return ["conv1"]
    names = [f"layer{stage}.{i}.conv{j}" for i in range(2) for j in (1, 2)]
    if stage > 1:
        names.append(f"layer{stage}.0.shortcut.0")
    return names


ALL_CONVS = {name: stage for stage in range(5) for name in conv_names_of_stage(stage)}
SHALLOW = {n for n, s in ALL_CONVS.items() if s in (0, 1, 2)}
DEEP = {n for n, s in ALL_CONVS.items() if s in (3, 4)}


def bn_name(conv_name):
    prefix, _, last = conv_name.rpartition(".")
    other = {"conv1": "bn1", "conv2": "bn2", "0": "1"}[last]
    return f"{prefix}.{other}" if prefix else other


def masked_units(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, rk.MaskedConvBN2d)}


def expected_mask(name, ratio, mode="neuron", group_size=None, seed=0):
    return rk.random_mask(STAGE_SHAPES[ALL_CONVS[name]], ratio, mode, group_size, seed=layer_seed(seed, name))


def conv_and_bn(model, conv_name):
    module = model.get_submodule(conv_name)
    if isinstance(module, rk.MaskedConvBN2d):
        return module.conv, module.bn
    assert type(module) is nn.Conv2d, f"{conv_name} is a {type(module).__name__}"
    return module, model.get_submodule(bn_name(conv_name))


def hand_forward(model, x, masks, training):
    """The paper's CIFAR ResNet-18 written out with F ops and ``model``'s parameters;
    ``masks`` {conv name: mask} multiplies that conv's BN output (before ReLU / the add)."""

    def conv_bn(name, inp):
        conv, bn = conv_and_bn(model, name)
        y = F.conv2d(inp, conv.weight, None, conv.stride, conv.padding)
        if training:  # batch statistics over all positions (before masking), as the paper
            y = F.batch_norm(y, None, None, bn.weight, bn.bias, training=True, eps=bn.eps)
        else:
            y = F.batch_norm(y, bn.running_mean, bn.running_var, bn.weight, bn.bias, training=False, eps=bn.eps)
        return y * masks[name] if name in masks else y

    out = F.relu(conv_bn("conv1", x))
    for stage in range(1, 5):
        for i in range(2):
            block = f"layer{stage}.{i}"
            h = F.relu(conv_bn(f"{block}.conv1", out))
            h = conv_bn(f"{block}.conv2", h)
            shortcut = conv_bn(f"{block}.shortcut.0", out) if stage > 1 and i == 0 else out
            out = F.relu(h + shortcut)
    out = F.avg_pool2d(out, 4).flatten(1)  # the paper's 4x4 average pool
    return F.linear(out, model.linear.weight, model.linear.bias)


# -- architecture -------------------------------------------------------------------------


def test_unmasked_model_is_the_standard_cifar_resnet18():
    model = rk.models.resnet18()
    assert not masked_units(model)
    assert not any(isinstance(m, (rk.MaskedConv2d, rk.RandomMask)) for m in model.modules())
    # kuangliu/pytorch-cifar ResNet18 for 10 classes: 11,173,962 parameters.
    assert sum(p.numel() for p in model.parameters()) == 11_173_962
    convs = {n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    assert convs == set(ALL_CONVS)
    assert model.linear.in_features == 512 and model.linear.out_features == 10
    assert rk.models.resnet18(num_classes=100).linear.out_features == 100

    model = randomize_batchnorms(model).double()
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    y = model(x)
    assert y.shape == (3, 10)
    torch.testing.assert_close(y, hand_forward(model, x, {}, training=True), **TIGHT)


@pytest.mark.parametrize(
    "mode,group_size", [("neuron", None), ("spatial", None), ("same", None), ("group", 16)], ids=str
)
def test_shallow_masks_the_papers_ten_units(mode, group_size):
    ratio = 0.9
    model = rk.models.resnet18(mask_ratio=ratio, mask_layers="shallow", mask_mode=mode, group_size=group_size)
    units = masked_units(model)
    assert set(units) == SHALLOW and len(units) == 10
    for name in SHALLOW:  # the BN moved into the unit; its old slot is an Identity
        assert isinstance(model.get_submodule(bn_name(name)), nn.Identity)
    for name in DEEP:
        assert type(model.get_submodule(name)) is nn.Conv2d
        assert type(model.get_submodule(bn_name(name))) is nn.BatchNorm2d
    masked_convs = {n for n, m in model.named_modules() if isinstance(m, rk.MaskedConv2d)}
    assert masked_convs == {f"{name}.conv" for name in SHALLOW}  # only inside the units

    for name, unit in units.items():
        channels, h, w = STAGE_SHAPES[ALL_CONVS[name]]
        mask = unit.mask
        assert mask.dtype == torch.bool
        if mode in ("spatial", "same"):
            assert mask.shape == (1, h, w)
            assert int((~mask).sum()) == int(ratio * h * w)
        else:
            assert mask.shape == (channels, h, w)
            patterns = channels if mode == "neuron" else channels // group_size
            assert int((~mask).sum()) == int(ratio * patterns * h * w) * (channels // patterns)
        if mode == "group":
            blocks = mask.view(channels // group_size, group_size, h, w)
            assert (blocks == blocks[:, :1]).all()
            assert not (blocks[0, 0] == blocks[1, 0]).all()
    shapes = {tuple(u.mask.shape[-2:]) for u in units.values()}
    assert shapes == {(32, 32), (16, 16)}
    assert model.layer2[0].shortcut[0] is units["layer2.0.shortcut.0"]


def test_deep_masks_layer3_and_layer4_with_shortcuts_and_not_the_stem():
    ratio = 0.5
    model = rk.models.resnet18(mask_ratio=ratio, mask_layers="deep")
    units = masked_units(model)
    assert set(units) == DEEP and len(units) == 10
    assert {"layer3.0.shortcut.0", "layer4.0.shortcut.0"} <= set(units)
    assert type(model.conv1) is nn.Conv2d and type(model.bn1) is nn.BatchNorm2d
    for name, unit in units.items():
        assert unit.mask.shape == STAGE_SHAPES[ALL_CONVS[name]]
        assert int((~unit.mask).sum()) == int(ratio * unit.mask.numel())
    assert {tuple(u.mask.shape) for u in units.values()} == {(256, 8, 8), (512, 4, 4)}


def test_all_masks_every_conv():
    model = rk.models.resnet18(mask_ratio=0.3, mask_layers="all")
    assert set(masked_units(model)) == set(ALL_CONVS) and len(ALL_CONVS) == 20
    assert not any(type(m) is nn.Conv2d for m in model.modules())


def test_separate_ratios_for_shallow_and_deep_stages():
    model = rk.models.resnet18(mask_ratio={"012": 0.9, "34": 0.3})
    units = masked_units(model)
    assert set(units) == set(ALL_CONVS)
    for name, unit in units.items():
        ratio = 0.9 if name in SHALLOW else 0.3
        assert unit.conv.mask_ratio == ratio
        assert int((~unit.mask).sum()) == int(ratio * unit.mask.numel()), name
    # the same masks as the single-ratio models with the same seed
    shallow = masked_units(rk.models.resnet18(mask_ratio=0.9, mask_layers="shallow"))
    deep = masked_units(rk.models.resnet18(mask_ratio=0.3, mask_layers="deep"))
    for name, unit in units.items():
        assert torch.equal(unit.mask, (shallow if name in SHALLOW else deep)[name].mask)


def test_masks_are_exact_count_seeded_and_distinct():
    ratio = 0.7
    a = masked_units(rk.models.resnet18(mask_ratio=ratio, seed=5))
    b = masked_units(rk.models.resnet18(mask_ratio=ratio, seed=5))
    c = masked_units(rk.models.resnet18(mask_ratio=ratio, seed=6))
    for name in SHALLOW:
        assert int((~a[name].mask).sum()) == int(ratio * a[name].mask.numel())
        assert torch.equal(a[name].mask, b[name].mask)
        assert not torch.equal(a[name].mask, c[name].mask), f"{name}: another seed gave the same mask"
        # drawn as documented: random_mask with the layer's seed (convert_model relies on it)
        assert torch.equal(a[name].mask, expected_mask(name, ratio, seed=5))
    same_shape = [n for n in SHALLOW if ALL_CONVS[n] in (0, 1)]  # 5 masks of shape 64x32x32
    assert len(same_shape) == 5
    for i, first in enumerate(same_shape):
        for second in same_shape[i + 1:]:
            assert not torch.equal(a[first].mask, a[second].mask), f"{first} and {second} share a mask"


def test_mask_does_not_depend_on_the_global_rng():
    torch.manual_seed(1)
    a = rk.models.resnet18(mask_ratio=0.5, seed=2)
    torch.manual_seed(2)
    b = rk.models.resnet18(mask_ratio=0.5, seed=2)
    assert not torch.equal(a.conv1.conv.weight, b.conv1.conv.weight)
    for name, unit in masked_units(a).items():
        assert torch.equal(unit.mask, masked_units(b)[name].mask)


@pytest.mark.parametrize(
    "mask_ratio,mask_layers,mode,group_size",
    [(0.9, "shallow", "neuron", None), (0.5, "deep", "spatial", None), ({"012": 0.9, "34": 0.3}, None, "group", 16)],
    ids=["shallow-neuron", "deep-spatial", "all-separate-group"],
)
def test_forward_equals_hand_written_paper_resnet18(mask_ratio, mask_layers, mode, group_size):
    kwargs = dict(mask_layers=mask_layers) if mask_layers else {}
    model = rk.models.resnet18(
        mask_ratio=mask_ratio, mask_mode=mode, group_size=group_size, seed=11, backend="reference", **kwargs
    )
    model = randomize_batchnorms(model).double()
    ratios = (
        {n: (mask_ratio["012"] if n in SHALLOW else mask_ratio["34"]) for n in ALL_CONVS}
        if isinstance(mask_ratio, dict)
        else {n: mask_ratio for n in (SHALLOW if mask_layers == "shallow" else DEEP)}
    )
    masks = {n: expected_mask(n, r, mode, group_size, seed=11) for n, r in ratios.items()}
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)

    model.train()
    torch.testing.assert_close(model(x), hand_forward(model, x, masks, training=True), **TIGHT)
    # eval: running statistics (updated by the forward above), BN folded into the masked conv
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), hand_forward(model, x, masks, training=False), **TIGHT)
    # the masks matter: the unmasked forward differs
    assert not torch.allclose(model(x), hand_forward(model, x, {}, training=False))


def test_first_units_equal_mask_times_bn_of_conv():
    """layer2[0] by hand from plain nn.Conv2d/nn.BatchNorm2d copies: the mask is applied after
    BN, before the ReLU, on conv2 before the residual add, and on the projection shortcut."""
    model = randomize_batchnorms(rk.models.resnet18(mask_ratio=0.9, seed=4, backend="reference")).double()
    block = model.layer2[0]
    copies = {}
    for name in ("conv1", "conv2", "shortcut.0"):
        unit = block.get_submodule(name)
        conv = nn.Conv2d(unit.conv.in_channels, unit.conv.out_channels, unit.conv.kernel_size, unit.conv.stride,
                         unit.conv.padding, bias=False).double()
        conv.load_state_dict({"weight": unit.conv.weight})
        bn = nn.BatchNorm2d(unit.conv.out_channels).double()
        bn.load_state_dict(unit.bn.state_dict())
        copies[name] = (conv, bn, unit.mask)
    x = torch.randn(2, 64, 32, 32, dtype=torch.float64)

    def unit(name, inp):
        conv, bn, mask = copies[name]
        return mask * bn(conv(inp))

    captured = {}
    handle = block.conv1.register_forward_hook(lambda m, a, out: captured.setdefault("conv1", out))
    y = block(x)
    handle.remove()
    # conv1's unit applies the block's ReLU in its epilogue (the F.relu after it is then a no-op)
    torch.testing.assert_close(captured["conv1"], F.relu(unit("conv1", x)), **TIGHT)
    expected = F.relu(unit("conv2", F.relu(unit("conv1", x))) + unit("shortcut.0", x))
    torch.testing.assert_close(y, expected, **TIGHT)
    # both ran BN in training mode: the running statistics moved the same way
    torch.testing.assert_close(block.conv2.bn.running_var, copies["conv2"][1].running_var, **TIGHT)


@pytest.mark.parametrize(
    "backend,mode", [("reference", "neuron"), pytest.param("cpu", "spatial", marks=needs_cpu)], ids=str
)
def test_masked_outputs_of_every_unit_are_exactly_zero(backend, mode):
    model = randomize_batchnorms(rk.models.resnet18(mask_ratio=0.9, mask_mode=mode, backend=backend, seed=2))
    outputs = []
    hooks = [
        unit.register_forward_hook(
            lambda m, args, kwargs, out: outputs.append((out.detach(), m.mask, kwargs.get("residual"))),
            with_kwargs=True,
        )
        for unit in masked_units(model).values()
    ]
    x = torch.randn(2, 3, 32, 32)
    model.train()
    model(x)
    model.eval()
    with torch.no_grad():
        model(x)
    for hook in hooks:
        hook.remove()
    assert len(outputs) == 20
    assert sum(residual is not None for *_, residual in outputs) == 8  # every masked block's conv2, both passes
    for out, mask, residual in outputs:
        # Masked outputs are exactly 0, or exactly relu(shortcut) where the unit adds one.
        at_masked = torch.zeros_like(out) if residual is None else F.relu(residual)
        assert torch.equal(out * ~mask, at_masked * ~mask)
        # kept outputs are live (units feeding a ReLU apply it: about half of those are 0)
        assert (out[mask.expand_as(out)] != 0).float().mean() > 0.25


def test_state_dict_round_trip_restores_masks_and_outputs():
    source = randomize_batchnorms(rk.models.resnet18(mask_ratio=0.9, seed=0, backend="reference")).double()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    state = source.state_dict()
    assert state["conv1.conv.mask"].dtype == torch.bool
    assert state["layer2.0.shortcut.0.conv.mask"].shape == (128, 16, 16)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)

    # the target draws other masks; the cpu backend uses the index lists rebuilt on load
    backend = "cpu" if HAS_CPU else "reference"
    target = rk.models.resnet18(mask_ratio=0.9, seed=1, backend=backend).double()
    assert not torch.equal(target.conv1.mask, source.conv1.mask)
    target.load_state_dict(torch.load(buffer))
    for name, unit in masked_units(source).items():
        assert torch.equal(masked_units(target)[name].mask, unit.mask)
    source.eval()
    target.eval()
    with torch.no_grad():
        torch.testing.assert_close(target(x), source(x), **TIGHT)


@needs_cpu
@pytest.mark.parametrize("bn_stats,mode", [("kept", "neuron"), ("all", "spatial")], ids=str)
def test_train_step_cpu_backend_matches_reference(bn_stats, mode):
    """One SGD step (the paper's optimizer settings) gives the same loss, gradients
    and running statistics on both backends, then the same eval outputs.
    bn_stats="kept" runs the CPU kernel in training; "all" runs it in eval (folded BN)."""
    models = {
        backend: rk.models.resnet18(
            mask_ratio=0.9, mask_mode=mode, seed=3, bn_stats=bn_stats, backend=backend
        ).double()
        for backend in ("reference", "cpu")
    }
    randomize_batchnorms(models["reference"])
    models["cpu"].load_state_dict(models["reference"].state_dict())
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    target = torch.randint(0, 10, (2,))
    results = {}
    for backend, model in models.items():
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
        loss = F.cross_entropy(model(x), target)
        loss.backward()
        optimizer.step()  # the same gradients give the same step: compare gradients and buffers
        model.eval()
        with torch.no_grad():
            eval_out = model(x)
        grads = {n: p.grad for n, p in model.named_parameters()}
        results[backend] = (loss.detach(), grads, dict(model.named_buffers()), eval_out)
    (loss_r, grads_r, buffers_r, eval_r), (loss_c, grads_c, buffers_c, eval_c) = results["reference"], results["cpu"]
    torch.testing.assert_close(loss_c, loss_r, **TIGHT)
    assert grads_c.keys() == grads_r.keys() and buffers_c.keys() == buffers_r.keys()
    assert grads_r["conv1.conv.weight"].abs().sum() > 0
    for kind, got, want in (("grad", grads_c, grads_r), ("buffer", buffers_c, buffers_r)):
        for name in want:
            assert_close_fast(got[name], want[name], f"{kind} {name}")
    torch.testing.assert_close(eval_c, eval_r, **TIGHT)


def assert_close_fast(actual, expected, what):
    """assert_close for the ~11M gradient entries of ResNet-18 without isclose's temporaries."""
    if actual.dtype == torch.bool or not actual.is_floating_point():
        assert torch.equal(actual, expected), what
        return
    bound = TIGHT["atol"] + TIGHT["rtol"] * expected.abs()
    if not bool(((actual - expected).abs() <= bound).all()):
        torch.testing.assert_close(actual, expected, **TIGHT, msg=lambda m: f"{what}: {m}")


def test_eval_under_no_grad():
    model = randomize_batchnorms(rk.models.resnet18(mask_ratio=0.9, backend="reference")).eval()
    before = {n: b.clone() for n, b in model.named_buffers()}
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        y = model(x)
        again = model(x)
    assert y.shape == (3, 10) and not y.requires_grad and torch.isfinite(y).all()
    assert torch.equal(y, again)
    for name, value in model.named_buffers():
        assert torch.equal(value, before[name]), f"eval changed {name}"
    # per-sample in eval: a sample's output does not depend on the rest of the batch
    with torch.no_grad():
        torch.testing.assert_close(model(x[:1]), y[:1], rtol=1e-4, atol=1e-5)  # float32 conv algorithms


def test_kept_bn_stats_trains_with_statistics_over_kept_positions():
    model = rk.models.resnet18(mask_ratio=0.9, seed=8, bn_stats="kept", backend="reference")
    model = randomize_batchnorms(model).double()
    unit = model.layer2[0].shortcut[0]  # neuron mask: a different kept count per channel
    old_mean, old_var = unit.bn.running_mean.clone(), unit.bn.running_var.clone()
    captured = {}
    unit.register_forward_hook(lambda m, args, out: captured.update(input=args[0].detach(), output=out.detach()))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    loss = F.cross_entropy(model(x), torch.randint(0, 10, (2,)))
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    weight, gamma, beta = (t.detach().clone() for t in (unit.conv.weight, unit.bn.weight, unit.bn.bias))
    optimizer.step()
    assert not torch.equal(unit.conv.weight, weight)

    # the unit by hand: BN with mean and variance over the kept positions of each channel
    mask = unit.mask
    conv = F.conv2d(captured["input"], weight, None, 2)
    count = mask.sum(dim=(1, 2)) * conv.shape[0]
    assert count.unique().numel() > 1
    mean = (conv * mask).sum(dim=(0, 2, 3)) / count
    var = (((conv - mean.view(1, -1, 1, 1)) * mask) ** 2).sum(dim=(0, 2, 3)) / count
    normalized = (conv - mean.view(1, -1, 1, 1)) / torch.sqrt(var + unit.bn.eps).view(1, -1, 1, 1)
    expected = (normalized * gamma.view(1, -1, 1, 1) + beta.view(1, -1, 1, 1)) * mask
    torch.testing.assert_close(captured["output"], expected, **TIGHT)
    momentum = unit.bn.momentum
    torch.testing.assert_close(unit.bn.running_mean, (1 - momentum) * old_mean + momentum * mean, **TIGHT)
    unbiased = var * count / (count - 1)
    torch.testing.assert_close(unit.bn.running_var, (1 - momentum) * old_var + momentum * unbiased, **TIGHT)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(mask_ratio=1.0), ValueError, r"mask_ratio must be in \[0, 1\)"),
        (dict(mask_ratio=-0.1), ValueError, r"mask_ratio must be in \[0, 1\)"),
        (dict(mask_ratio=0.5, mask_layers="middle"), ValueError, r"mask_layers must be .*'middle'"),
        (dict(mask_ratio=0.5, mask_layers="015"), ValueError, r"mask_layers .*'015'"),
        (dict(mask_ratio={"012": 0.9, "23": 0.3}), ValueError, r"stage 2 twice"),
        (dict(mask_ratio={"012": 1.5}), ValueError, r"mask_ratio\['012'\]"),
        (dict(mask_ratio=0.5, mask_mode="checker"), ValueError, r"mode must be one of .*'checker'"),
        (dict(mask_ratio=0.5, mask_mode="group", group_size=48), ValueError, r"group_size must divide the 64"),
    ],
    ids=str,
)
def test_rejected_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        rk.models.resnet18(**kwargs)
