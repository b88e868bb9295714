"""Running a model without training it, as the evaluation, the attacks and the training's test
pass all do: in eval mode with every module's own training flag restored after, on the model's
own device, batch by batch.
"""

from __future__ import annotations

import contextlib
import itertools
from typing import Iterator, Union

import torch
import torch.nn as nn

__all__ = ["check_batch_size", "evaluating", "model_device", "predict"]


def model_device(model: nn.Module, fallback: Union[str, torch.device] = "cpu") -> torch.device:
    """Where ``model`` lives: its first parameter's device, else its first buffer's (a model
    of buffers only, such as a normalization layer), else ``fallback``."""
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        return tensor.device
    return torch.device(fallback)


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode inside; restores each module's own training flag after (not one flag for all)."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


def check_batch_size(batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, batch_size: int,
            device: Union[str, torch.device, None] = None) -> torch.Tensor:
    """Predicted classes (int64, CPU) of ``model`` on ``images``, ``batch_size`` at a time on
    ``device`` (by default the model's), in eval mode with its training flags restored after."""
    check_batch_size(batch_size)
    device = torch.device(device) if device is not None else model_device(model)
    with evaluating(model):
        predictions = [model(batch.to(device)).argmax(1).cpu() for batch in images.split(batch_size)]
    return torch.cat(predictions) if predictions else torch.zeros(0, dtype=torch.long)
