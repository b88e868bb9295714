"""Whole model: the paper's Random-Mask ResNet-18 (ratio 0.9, shallow '012', neuron masks),
batch 32, 32x32, on the reference path vs the compiled kernels ("auto").

Train step = forward + backward + SGD step. With bn_stats="all" (the paper) BN needs every
position in training, so the convolution runs dense whatever the backend; bn_stats="kept"
lets training skip masked outputs too. Inference (eval, BN folded) uses the masked kernels.
"""

import pytest
import torch
import torch.nn.functional as F

import rmask_kernels as rk
from side_by_side import side_by_side

ROUNDS = 9
CONFIGS = {  # provider: (backend, bn_stats)
    "reference": ("reference", "all"),
    "auto bn_stats=all": ("auto", "all"),
    "auto bn_stats=kept": ("auto", "kept"),
}


def make_model(provider):
    backend, bn_stats = CONFIGS[provider]
    torch.manual_seed(0)
    return rk.models.resnet18(mask_ratio=0.9, mask_layers="shallow", seed=0, backend=backend, bn_stats=bn_stats)


def make_pass(model, pass_, x, y):
    """The timed call for one pass of `model`."""
    if pass_ == "train step":
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        model.train()

        def step():
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()

        return step
    model.eval()

    def infer():
        with torch.no_grad():
            model(x)

    return infer


@pytest.mark.parametrize("provider", list(CONFIGS))
@pytest.mark.parametrize("pass_", ["train step", "inference"])
def test_resnet18(benchmark, pass_, provider):
    x, y = torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))
    benchmark.group = f"resnet18 0.9 shallow neuron, batch 32: {pass_}"
    benchmark.extra_info.update(
        shape="resnet18 b32", mode="neuron", ratio=0.9, pass_=pass_, provider=provider,
        threads=torch.get_num_threads(), torch=torch.__version__,
    )
    run = make_pass(make_model(provider), pass_, x, y)
    benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=1)
    if provider != "reference":  # the speedup the report quotes: alternating runs, same conditions
        reference = make_pass(make_model("reference"), pass_, x, y)
        benchmark.extra_info.update(side_by_side((None, reference), (None, run), 1 if benchmark.disabled else ROUNDS))
