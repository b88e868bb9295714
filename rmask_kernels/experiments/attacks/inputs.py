"""What the attacks take, checked the same way everywhere: a batch of [0, 1] images with its
1-D integer labels, non-negative numbers and counts; and per-example values broadcast against
the images."""

from __future__ import annotations

import math
from typing import Any

import torch


def check_batch(images: torch.Tensor, labels: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor) or not images.is_floating_point():
        raise TypeError(f"images must be a floating-point tensor in [0, 1], got {describe(images)}")
    if images.dim() < 2:
        raise ValueError(f"images must have a batch dimension, got shape {tuple(images.shape)}")
    if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or labels.is_floating_point():
        raise TypeError(f"labels must be a 1-D integer tensor, got {describe(labels)}")
    if labels.shape[0] != images.shape[0]:
        raise ValueError(f"labels has {labels.shape[0]} entries but images has {images.shape[0]}")


def check_nonnegative(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def check_count(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {value!r}")


def describe(value: Any) -> str:
    """A value as error messages name it: a tensor's dtype and shape, else its type."""
    if isinstance(value, torch.Tensor):
        return f"tensor of dtype {value.dtype} and shape {tuple(value.shape)}"
    return type(value).__name__


def per_example(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[N] -> [N, 1, 1, ...] broadcastable against `like`."""
    return values.reshape(-1, *([1] * (like.dim() - 1)))
