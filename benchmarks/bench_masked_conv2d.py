"""Masked conv speed on CPU: provider x pass x mask mode x ratio on the paper's shallow shapes.

    make bench      (runs this file and bench_resnet18.py, saves JSON, prints the ratio table)

Providers: "baseline" (what a user writes: F.conv2d(...) * mask, oneDNN underneath),
"reference" (the package's oracle path through rk.masked_conv2d), "cpu" (the compiled
kernels, forced) and "auto" (what the layers use). Passes: "fwd", "bwd" (the backward of a
fresh forward, timed alone), "fwd+bwd". Timings are never asserted. Each provider's median
comes from pytest-benchmark; the speedup the report quotes is measured side by side with the
baseline (alternating runs in one process: side_by_side.py).
"""

import pytest
import torch
import torch.nn.functional as F

import rmask_kernels as rk
from side_by_side import side_by_side

# (N, Cin, Cout, H, stride): the target shapes of docs/design.md (3x3, padding 1).
SHAPES = {
    "32x64->64@32x32 s1": (32, 64, 64, 32, 1),
    "32x128->128@16x16 s1": (32, 128, 128, 16, 1),
    "32x64->128@32x32 s2": (32, 64, 128, 32, 2),
}
PROVIDERS = ["baseline", "reference", "auto"] + (["cpu"] if "cpu" in rk.available_backends() else [])
RATIOS = [0.0, 0.3, 0.5, 0.7, 0.9]
ROUNDS = 9


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("mode", ["spatial", "neuron"])
@pytest.mark.parametrize("pass_", ["fwd", "bwd", "fwd+bwd"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_masked_conv2d(benchmark, shape, pass_, mode, ratio, provider):
    n, cin, cout, h, stride = SHAPES[shape]
    out = (h - 1) // stride + 1
    grad = pass_ != "fwd"
    x = torch.randn(n, cin, h, h, requires_grad=grad)
    weight = torch.randn(cout, cin, 3, 3, requires_grad=grad)
    bias = torch.randn(cout, requires_grad=grad)
    mask = rk.random_mask((cout, out, out), ratio, mode, seed=0)
    index = rk.kept_index(mask, cout)
    benchmark.group = f"{shape} {mode} {ratio} {pass_}"
    benchmark.extra_info.update(
        shape=shape, mode=mode, ratio=ratio, pass_=pass_, provider=provider,
        threads=torch.get_num_threads(), torch=torch.__version__, cpu_capability=torch.backends.cpu.get_cpu_capability(),
        cpu_kernels=rk.backends.cpu_kernels(),
    )

    def step(which):
        """(setup, target) for one pass of provider `which`, as benchmark.pedantic takes them."""

        def forward():
            if which == "baseline":
                return F.conv2d(x, weight, bias, stride, 1) * mask
            return rk.masked_conv2d(x, weight, bias, mask, stride, 1, backend=which, kept_index=index)

        if pass_ == "fwd":
            def run():
                with torch.no_grad():
                    forward()
            return None, run
        if pass_ == "fwd+bwd":
            return None, lambda: forward().sum().backward()

        def setup():
            y = forward()
            return (y, torch.ones_like(y)), {}
        return setup, lambda y, g: y.backward(g)

    setup, target = step(provider)
    benchmark.pedantic(target, setup=setup, rounds=ROUNDS, warmup_rounds=1)
    if provider != "baseline":  # the speedup the report quotes: alternating runs, same conditions
        benchmark.extra_info.update(side_by_side(step("baseline"), (setup, target), 1 if benchmark.disabled else ROUNDS))
