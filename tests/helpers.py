"""Shared test helpers (tests/ is on sys.path under pytest's default import mode)."""

import torch
import torch.nn as nn


def randomize_batchnorms(model):
    """Non-trivial BN affine parameters and running statistics, so BN placement matters."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0.0, 0.5)
                module.running_mean.normal_(0.0, 0.2)
                module.running_var.uniform_(0.5, 2.0)
    return model
