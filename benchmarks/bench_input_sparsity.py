"""Input sparsity on CPU: a masked conv whose input is a masked unit's output (zero where the
input mask drops it), keep_in = keep_out = 0.1, batch 32.

    make bench      (runs this file with the other benchmark files, saves JSON, prints the tables)

Op level ("spatial->spatial", "neuron->neuron": the input mask's mode, then the output
mask's): "baseline" is what a user writes, F.conv2d(x, w, padding=1) * mask, with x already
zero where the input mask drops it; "cpu" is rk.masked_conv2d(..., input_mask=) on the
compiled kernels, which skip those inputs. Masked stages: the paper's ResNet-18 (ratio 0.9,
'012') run through its stem, layer1 and layer2 only, the models' wiring giving each block's
second conv (and layer1's first) its input mask; "reference" is the same model on the
reference path without input masks. Speedups are side by side (side_by_side.py); timings are
never asserted.
"""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import rmask_kernels as rk
from rmask_kernels.nn import MaskedConvBN2d
from side_by_side import side_by_side

SHAPES = {"32x64->64@32x32 s1": (32, 64, 32), "32x128->128@16x16 s1": (32, 128, 16)}  # (N, C, H)
PAIRINGS = ["spatial->spatial", "neuron->neuron"]
RATIO = 0.9  # masked on both sides: keep_in = keep_out = 0.1
ROUNDS = 9
HAS_CPU = "cpu" in rk.available_backends()


@pytest.mark.skipif(not HAS_CPU, reason="the compiled CPU kernels are not built")
@pytest.mark.parametrize("provider", ["baseline", "cpu"])
@pytest.mark.parametrize("pass_", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("pairing", PAIRINGS)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_input_sparse_conv(benchmark, shape, pairing, pass_, provider):
    n, c, h = SHAPES[shape]
    in_mode, mode = pairing.split("->")
    grad = pass_ != "fwd"
    torch.manual_seed(0)
    input_mask = rk.random_mask((c, h, h), RATIO, in_mode, seed=1)
    input_index = rk.kept_index(input_mask, c)
    x = (torch.randn(n, c, h, h) * input_mask).requires_grad_(grad)
    weight = torch.randn(c, c, 3, 3, requires_grad=grad)
    mask = rk.random_mask((c, h, h), RATIO, mode, seed=0)
    index = rk.kept_index(mask, c)
    benchmark.group = f"{shape} {pairing} {RATIO} {pass_}"
    benchmark.extra_info.update(
        shape=shape, mode=pairing, ratio=RATIO, pass_=pass_, provider=provider,
        threads=torch.get_num_threads(), torch=torch.__version__, cpu_capability=torch.backends.cpu.get_cpu_capability(),
        cpu_kernels=rk.backends.cpu_kernels(),
    )

    def step(which):
        def forward():
            if which == "baseline":
                return F.conv2d(x, weight, None, 1, 1) * mask
            return rk.masked_conv2d(x, weight, None, mask, 1, 1, backend="cpu", kept_index=index, input_mask=input_mask,
                                    input_index=input_index)

        if pass_ == "fwd":
            def run():
                with torch.no_grad():
                    forward()
            return None, run
        return None, lambda: forward().sum().backward()

    setup, target = step(provider)
    benchmark.pedantic(target, setup=setup, rounds=ROUNDS, warmup_rounds=1)
    if provider != "baseline":
        benchmark.extra_info.update(side_by_side(step("baseline"), (setup, target), 1 if benchmark.disabled else ROUNDS))


class MaskedStages(nn.Module):
    """The stem, layer1 and layer2 of a CIFAR ResNet: the stages '012' masks."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        m = self.model
        out = m.conv1(x)
        if not (isinstance(m.conv1, MaskedConvBN2d) and m.conv1.activation == "relu"):
            out = F.relu(m.bn1(out))
        return m.layer2(m.layer1(out))


def masked_stages(provider, mode):
    """The masked stages of the paper's ResNet-18: on the compiled kernels ("cpu", input masks
    wired), or the same model on the reference path without input masks ("reference")."""
    torch.manual_seed(0)
    model = rk.models.resnet18(mask_ratio=RATIO, mask_layers="shallow", mask_mode=mode, seed=0, bn_stats="kept",
                               backend="cpu")
    if provider == "reference":
        model = copy.deepcopy(model)
        for module in model.modules():
            if isinstance(module, MaskedConvBN2d):
                module.set_input_mask(None)
                module.conv.backend = "reference"
    return MaskedStages(model)


def stages_pass(stages, pass_, x):
    if pass_ == "inference":
        stages.eval()

        def infer():
            with torch.no_grad():
                stages(x)
        return infer
    stages.train()
    grad = torch.randn(x.shape[0], 128, x.shape[2] // 2, x.shape[3] // 2)

    def train_step():  # forward + backward, bn_stats="kept"
        stages.zero_grad()
        stages(x).backward(grad)
    return train_step


@pytest.mark.skipif(not HAS_CPU, reason="the compiled CPU kernels are not built")
@pytest.mark.parametrize("provider", ["reference", "cpu"])
@pytest.mark.parametrize("pass_", ["inference", "train step"])
@pytest.mark.parametrize("mode", ["neuron", "spatial"])
def test_resnet18_masked_stages(benchmark, mode, pass_, provider):
    x = torch.randn(32, 3, 32, 32)
    benchmark.group = f"resnet18 0.9 '012' {mode} masked stages, batch 32: {pass_}"
    benchmark.extra_info.update(
        shape="resnet18 masked stages b32", mode=mode, ratio=RATIO, pass_=pass_, provider=provider,
        threads=torch.get_num_threads(), torch=torch.__version__,
    )
    run = stages_pass(masked_stages(provider, mode), pass_, x)
    benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=1)
    if provider != "reference":
        reference = stages_pass(masked_stages("reference", mode), pass_, x)
        benchmark.extra_info.update(side_by_side((None, reference), (None, run), 1 if benchmark.disabled else ROUNDS))
