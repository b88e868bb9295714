"""Input masks wired from each masked unit into the conv that reads its output
(rmask_kernels/wiring.py): which convs get one, that the model computes exactly what it
computes without them, and that they follow the masks through checkpoints."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import rmask_kernels as rk
from rmask_kernels.nn import MaskedConv2d, MaskedConvBN2d
from rmask_kernels.wiring import find_wires, wire_input_masks


def masked_layers(model):
    """The masked layers by name: units, and convs that are not a unit's own."""
    layers = {name: m for name, m in model.named_modules() if isinstance(m, (MaskedConv2d, MaskedConvBN2d))}
    return {name: m for name, m in layers.items() if not isinstance(layers.get(name.rpartition(".")[0]), MaskedConvBN2d)}


def assert_same_outputs(model, reference, x):
    """``model`` and ``reference`` give the same outputs on ``x``, in training and in eval."""
    for training in (True, False):
        model.train(training), reference.train(training)
        torch.testing.assert_close(model(x), reference(x), rtol=1e-4, atol=1e-4)


def without_input_masks(model, backend):
    """A copy of ``model`` with no input masks, every masked layer on ``backend``."""
    twin = copy.deepcopy(model)
    for m in masked_layers(twin).values():
        m.set_input_mask(None)
        (m.conv if isinstance(m, MaskedConvBN2d) else m).backend = backend
    return twin


@pytest.mark.parametrize("mode", ["neuron", "spatial"])
def test_resnet18_block_convs_take_the_masks_of_the_units_before_them(mode):
    model = rk.models.resnet18(mask_ratio=0.9, mask_mode=mode, input_size=16)
    layers = masked_layers(model)
    expected = {"layer1.0.conv1": "conv1"}
    for stage in (1, 2):
        for block in (0, 1):
            expected[f"layer{stage}.{block}.conv2"] = f"layer{stage}.{block}.conv1"
    got = {name: m for name, m in layers.items() if m.input_mask is not None}
    assert set(got) == set(expected)
    for target, source in expected.items():
        assert torch.equal(layers[target].input_mask, layers[source].mask)
    # The residual add makes the next block's input dense: no input mask there.
    assert layers["layer1.1.conv1"].input_mask is None and layers["layer2.0.conv1"].input_mask is None
    assert layers["layer2.0.shortcut.0"].input_mask is None


@pytest.mark.parametrize("bn_stats", ["all", "kept"])
@pytest.mark.parametrize("mode", ["neuron", "spatial"])
def test_resnet18_with_input_masks_equals_the_reference_model(mode, bn_stats):
    # Outputs and every parameter's gradient, in training (both BN statistics) and in eval
    # (BN folded, ReLU and residual in the kernel's epilogue), against the same model on the
    # reference path without input masks.
    torch.manual_seed(0)
    model = rk.models.resnet18(mask_ratio=0.9, mask_mode=mode, input_size=16, bn_stats=bn_stats, backend="cpu")
    reference = without_input_masks(model, "reference")
    x = torch.randn(4, 3, 16, 16)
    for training in (True, False):
        model.train(training), reference.train(training)
        y, y_ref = model(x), reference(x)
        torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
        y.square().sum().backward()
        y_ref.square().sum().backward()
        for (name, p), p_ref in zip(model.named_parameters(), reference.parameters()):
            torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-3, atol=1e-3, msg=lambda m: f"{name}: {m}")
        model.zero_grad(), reference.zero_grad()


def test_vgg19_input_masks_follow_the_max_pools():
    model = rk.models.vgg19(mask_ratio=0.9, mask_layers="shallow", backend="cpu")
    layers = masked_layers(model)
    assert torch.equal(layers["features.3"].input_mask, layers["features.0"].mask)
    pooled = F.max_pool2d(layers["features.3"].mask.float(), 2) > 0  # kept where any of its window is
    assert torch.equal(layers["features.7"].input_mask, pooled)
    assert_same_outputs(model, without_input_masks(model, "reference"), torch.randn(2, 3, 32, 32))


def test_small_cnn_and_state_dict_keys():
    model = rk.models.small_cnn(mask_ratio=0.5)
    assert torch.equal(model.conv2.input_mask, model.conv1.mask)
    plain_keys = set(without_input_masks(model, "auto").state_dict())
    assert set(model.state_dict()) == plain_keys  # input masks are not saved


def test_input_masks_follow_a_loaded_checkpoint():
    model = rk.models.resnet18(mask_ratio=0.9, seed=1, input_size=16)
    other = rk.models.resnet18(mask_ratio=0.9, seed=2, input_size=16)
    assert not torch.equal(model.layer1[0].conv1.mask, other.layer1[0].conv1.mask)
    model.load_state_dict(other.state_dict())
    assert torch.equal(model.layer1[0].conv2.input_mask, other.layer1[0].conv1.mask)
    assert torch.equal(model.layer1[0].conv1.input_mask, other.conv1.mask)
    clone = copy.deepcopy(model)  # the hook and the wires travel with copies
    clone.load_state_dict(rk.models.resnet18(mask_ratio=0.9, seed=3, input_size=16).state_dict())
    assert torch.equal(clone.layer1[0].conv2.input_mask, clone.layer1[0].conv1.mask)


class _Chain(nn.Module):
    """conv -> BN -> ReLU -> avg-pool -> conv -> BN -> (+ x) -> conv: what convert_model sees."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c3 = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        y = F.avg_pool2d(F.relu(self.b1(self.c1(x))), 2)
        z = self.b2(self.c2(y))
        return self.c3(F.relu(z + y))


def test_convert_model_wires_through_zero_keeping_ops_only():
    model = rk.convert_model(_Chain(), 0.8, layers="all", example_input=torch.zeros(1, 3, 8, 8), backend="cpu")
    layers = masked_layers(model)
    assert torch.equal(layers["c2"].input_mask, F.avg_pool2d(layers["c1"].mask.float(), 2) > 0)
    assert layers["c3"].input_mask is None  # after a residual add
    assert_same_outputs(model, without_input_masks(model, "reference"), torch.randn(2, 3, 8, 8))


def test_models_that_do_not_trace_get_no_input_masks():
    class Branching(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = MaskedConv2d(3, 4, 3, padding=1, mask_ratio=0.5, output_size=(6, 6))
            self.b = MaskedConv2d(4, 4, 3, padding=1, mask_ratio=0.5, output_size=(6, 6))

        def forward(self, x):
            y = self.a(x)
            return self.b(y) if y.sum() > 0 else y  # data-dependent: fx cannot trace it

    model = Branching()
    assert find_wires(model) == [] and wire_input_masks(model) == []
    assert model.b.input_mask is None
