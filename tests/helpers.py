"""Shared test helpers (tests/ is on sys.path under pytest's default import mode). The op's
cases and tolerances are in cases.py."""

import os
import subprocess
import sys
import tempfile

import torch
import torch.nn as nn

import rmask_kernels as rk

# The folder holding the rmask_kernels package this process imported: the installed one, or a
# source tree that an editable install (or the test runner's path) put first.
PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(rk.__file__)))


def python_subprocess(args, env=None, **kwargs):
    """Run ``python ARGS`` (e.g. ["-c", code] or ["-m", "pytest", ...]) so that it imports the
    rmask_kernels package under test, the one this process imported: from a temporary working
    directory (never a source tree there by accident) with that package's folder first on
    PYTHONPATH. ``env`` adds to this process's environment (a value None removes the variable)."""
    environment = {**os.environ, **(env or {})}
    environment = {key: value for key, value in environment.items() if value is not None}
    paths = [PACKAGE_PARENT] + [p for p in environment.get("PYTHONPATH", "").split(os.pathsep) if p]
    environment["PYTHONPATH"] = os.pathsep.join(paths)
    with tempfile.TemporaryDirectory() as directory:
        return subprocess.run([sys.executable, *args], cwd=directory, env=environment, capture_output=True,
                              text=True, **kwargs)


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


def kept_fraction_mask(channels, keep):
    """A (channels, 16, 16) mask keeping exactly round(keep * 256) positions per channel,
    at a different place in each channel (channels > 1: one pattern per channel)."""
    kept = round(keep * 256)
    mask = torch.zeros(channels, 256, dtype=torch.bool)
    for c in range(channels):
        mask[c, (torch.arange(kept) * 7 + c) % 256] = True
    return mask.view(channels, 16, 16)
