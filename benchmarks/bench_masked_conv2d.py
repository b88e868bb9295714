"""Masked conv speed, CPU: providers x mask mode x ratio on the paper's shallow shapes.

    .venv/bin/python -m pytest benchmarks/bench_masked_conv2d.py --benchmark-group-by=param:shape,param:mode,param:ratio

Providers: "baseline" (what a user writes: F.conv2d(...) * mask), "reference" (the package's
oracle path, the same maths through rk.masked_conv2d), "cpu" (the compiled kernel), "auto".
Timings are never asserted; read them side by side in one run.
"""

import pytest
import torch
import torch.nn.functional as F

import rmask_kernels as rk

# (N, Cin, Cout, H, stride): PERF.md's shapes (3x3, padding 1).
SHAPES = {
    "32x64->64@32 s1": (32, 64, 64, 32, 1),
    "32x128->128@16 s1": (32, 128, 128, 16, 1),
    "32x64->128@32 s2": (32, 64, 128, 32, 2),
}
PROVIDERS = ["baseline", "reference", "auto"] + (["cpu"] if "cpu" in rk.available_backends() else [])


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("ratio", [0.0, 0.5, 0.9])
@pytest.mark.parametrize("mode", ["spatial", "neuron"])
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("pass_", ["fwd", "fwd+bwd"])
def test_masked_conv2d(benchmark, shape, mode, ratio, provider, pass_):
    if provider == "cpu" and mode == "neuron" and ratio > 0:
        pytest.skip("the gather-per-channel kernel takes seconds on neuron masks (see NOTES.md)")
    n, cin, cout, h, stride = SHAPES[shape]
    out = (h - 1) // stride + 1
    x = torch.randn(n, cin, h, h, requires_grad=pass_ != "fwd")
    weight = torch.randn(cout, cin, 3, 3, requires_grad=pass_ != "fwd")
    bias = torch.randn(cout, requires_grad=pass_ != "fwd")
    mask = rk.random_mask((cout, out, out), ratio, mode, seed=0)
    index = rk.kept_index(mask)
    benchmark.extra_info.update(threads=torch.get_num_threads(), torch=torch.__version__)

    def forward():
        if provider == "baseline":
            return F.conv2d(x, weight, bias, stride, 1) * mask
        return rk.masked_conv2d(x, weight, bias, mask, stride, 1, backend=provider, kept_index=index)

    def run():
        if pass_ == "fwd":
            with torch.no_grad():
                return forward()
        forward().sum().backward()

    benchmark.pedantic(run, rounds=5, warmup_rounds=1)
