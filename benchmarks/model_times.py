"""Whole Random-Mask ResNet-18 inference, fused kernels vs the reference path, side by side
in a fresh process (not pytest): the A/B command for changes that move the whole model
(output cache on/off, how the kernels store their outputs).

    .venv/bin/python benchmarks/model_times.py               # 3 x 15 alternating rounds
    RMASK_CPU_CACHE_MB=0 .venv/bin/python benchmarks/model_times.py   # output cache off

`make bench`'s model rows measure the same pair inside the long benchmark process, after the
conv benchmarks; both are side by side, but the allocator's state differs between them.
"""

import pathlib
import sys

import torch

import rmask_kernels as rk

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from side_by_side import side_by_side  # noqa: E402


def main():
    torch.manual_seed(0)
    x = torch.randn(32, 3, 32, 32)
    fused = rk.models.resnet18(mask_ratio=0.9, mask_layers="shallow", mask_mode="neuron", seed=0).eval()
    reference = rk.models.resnet18(mask_ratio=0.9, mask_layers="shallow", mask_mode="neuron", seed=0,
                                   backend="reference").eval()
    reference.load_state_dict(fused.state_dict())
    with torch.no_grad():
        for _ in range(3):
            result = side_by_side((None, lambda: reference(x)), (None, lambda: fused(x)), 15)
            print(f"reference {result['side_by_side_baseline_ms']:.1f} ms, fused {result['side_by_side_ms']:.1f} ms: "
                  f"{result['side_by_side_speedup']:.2f}x", flush=True)


if __name__ == "__main__":
    main()
