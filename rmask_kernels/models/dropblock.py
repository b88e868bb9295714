"""DropBlock (Ghiasi, Lin, Le, "DropBlock: A regularization method for convolutional networks",
NeurIPS 2018): dropout of contiguous square blocks of a feature map, one of the paper's controls
in the deep stages."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def check_drop_probability(p, name: str = "p") -> float:
    if isinstance(p, bool) or not isinstance(p, (int, float)):
        raise TypeError(f"{name} must be a float in [0, 1), got {type(p).__name__} {p!r}")
    if not 0.0 <= float(p) < 1.0:
        raise ValueError(f"{name} must be in [0, 1) (the fraction of units dropped), got {p}")
    return float(p)


def check_block_size(block_size, name: str = "block_size") -> int:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"{name} must be a positive int, got {block_size!r}")
    return block_size


class DropBlock2d(nn.Module):
    """In training, zero ``block_size`` × ``block_size`` blocks of each (N, C, H, W) feature
    map, independently per sample and channel, about a fraction ``p`` of all units, and scale
    the rest by (units / units kept) over the whole tensor; in eval mode the identity.

    Block seeds are drawn where a whole block fits, with probability
    gamma = p / block² · (H·W) / ((H - block + 1)(W - block + 1)) (the paper's formula: it
    ignores overlaps, so slightly fewer than p are dropped). A block larger than the map is
    clipped to min(block_size, H, W), so small maps (a 4×4 last stage) work too.
    """

    def __init__(self, p: float, block_size: int):
        super().__init__()
        self.p = check_drop_probability(p)
        self.block_size = check_block_size(block_size)

    def block_mask(self, shape, device) -> torch.Tensor:
        """A float mask of ``shape`` (N, C, H, W): 0 in the dropped blocks, 1 elsewhere."""
        n, c, h, w = shape
        block = min(self.block_size, h, w)
        gamma = self.p / block**2 * (h * w) / ((h - block + 1) * (w - block + 1))
        seeds = torch.bernoulli(torch.full((n, c, h - block + 1, w - block + 1), gamma, device=device))
        # A seed at (i, j) drops rows i..i+block-1 and columns j..j+block-1: a max-pool over the
        # seeds padded by block - 1 on every side gives exactly the union of those blocks.
        padded = F.pad(seeds, (block - 1, block - 1, block - 1, block - 1))
        return 1.0 - F.max_pool2d(padded, block, stride=1)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return input
        if input.dim() != 4:
            raise ValueError(f"DropBlock2d: input must be (N, C, H, W), got shape {tuple(input.shape)}")
        if input.numel() == 0:
            return input
        mask = self.block_mask(input.shape, input.device)
        scale = mask.numel() / mask.sum().clamp(min=1.0)
        return input * (mask * scale).to(input.dtype)

    def extra_repr(self) -> str:
        return f"p={self.p}, block_size={self.block_size}"
