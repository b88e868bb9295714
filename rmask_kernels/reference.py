"""The oracle: dense convolution, then the mask. Every kernel is tested against this, and it
is the fallback when no compiled backend serves a tensor."""

import torch
import torch.nn.functional as F


def masked_conv2d(input, weight, bias, mask, stride=1, padding=0, dilation=1, groups=1):
    """``F.conv2d(input, weight, bias, ...) * mask`` with ``mask`` (C or 1, H_out, W_out), bool."""
    return F.conv2d(input, weight, bias, stride, padding, dilation, groups) * mask


def channel_stats(output):
    """Per output channel, the float64 sum and sum of squares of ``output`` over the batch and
    positions (masked outputs are 0, so: over the kept ones): what masked_conv2d_stats returns."""
    wide = output.double()
    return wide.sum(dim=(0, 2, 3)), wide.square().sum(dim=(0, 2, 3))
