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

__all__ = [
    "AMP_DTYPES", "MixedPrecision", "check_amp", "check_batch_size", "evaluating", "mixed_precision", "model_device",
    "predict",
]

# Mixed precision by name (rmask train --amp): the autocast dtype. fp16 also takes a GradScaler
# in training (its small gradients would flush to zero); bf16 has float32's range and needs none.
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def check_amp(amp) -> None:
    if amp is not None and amp not in AMP_DTYPES:
        raise ValueError(f"amp must be None (float32) or one of {tuple(AMP_DTYPES)}, got {amp!r}")


def mixed_precision(amp, device: Union[str, torch.device]):
    """``torch.autocast`` on ``device`` in ``amp``'s dtype ("bf16", "fp16"); no autocast for None."""
    check_amp(amp)
    if amp is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=AMP_DTYPES[amp])


class MixedPrecision(nn.Module):
    """``model`` run under ``amp``'s autocast (rmask attack/eval --amp), its output in float32:
    the logits that losses, attacks and predictions read."""

    def __init__(self, model: nn.Module, amp: str):
        super().__init__()
        check_amp(amp)
        self.model, self.amp = model, amp

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        with mixed_precision(self.amp, input.device):
            return self.model(input).float()


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
