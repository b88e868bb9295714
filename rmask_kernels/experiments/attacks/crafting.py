"""Crafting adversarial examples on a source model for the transfer protocol: :func:`craft`
attacks the test images the source classifies correctly and keeps the results as 8-bit
images, rounded, as they are saved (`saved.save_adversarial`) and reloaded."""

from __future__ import annotations

from typing import Any, Dict, Optional, Union

import torch
import torch.nn as nn

from ..data import from_uint8, to_uint8
from ..inference import check_batch_size, model_device, predict
from .inputs import check_batch
from .spec import AttackSpec, parse_attack

__all__ = ["craft"]


def craft(
    source: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    spec: Union[AttackSpec, str],
    batch_size: int = 128,
    generator: Optional[torch.Generator] = None,
) -> Dict[str, Any]:
    """Craft adversarial examples on ``source`` for the transfer protocol.

    Keeps the test images the source classifies correctly, attacks them in batches on the
    source's device, and stores them as 8-bit images (rounded). ``images`` are floats in
    [0, 1] or uint8; when they are 8-bit the eps bound holds exactly after rounding.

    Returns a dict with ``adversarial`` (uint8 [M, C, H, W], CPU), ``index`` (the
    positions in ``images``), ``label`` (true labels), ``source_prediction`` (the source on
    the ROUNDED adversarials, i.e. what it sees when they are reloaded), plus ``attack``
    (the spec string), ``eps`` (/255, None for CW) and ``num_images`` (how many were
    offered, so the source's clean accuracy is ``len(index) / num_images``).

    ``generator`` feeds PGD's random start; batches draw from it in turn, so a seeded run
    is reproducible for a given ``batch_size``.
    """
    if isinstance(spec, str):
        spec = parse_attack(spec)
    check_batch_size(batch_size)
    if isinstance(images, torch.Tensor) and images.dtype == torch.uint8:
        images = from_uint8(images)
    check_batch(images, labels)
    device = model_device(source, fallback=images.device)
    clean_prediction = predict(source, images, batch_size, device)
    index = torch.nonzero(clean_prediction == labels.cpu()).flatten()
    chosen_images, chosen_labels = images[index.to(images.device)], labels[index.to(labels.device)]
    crafted = [
        to_uint8(spec.run(source, batch.to(device), batch_labels.to(device), generator=generator)).cpu()
        for batch, batch_labels in zip(chosen_images.split(batch_size), chosen_labels.split(batch_size))
    ]
    adversarial = torch.cat(crafted) if crafted else torch.zeros((0, *images.shape[1:]), dtype=torch.uint8)
    source_prediction = predict(source, from_uint8(adversarial), batch_size, device)
    return {
        "adversarial": adversarial,
        "index": index.long(),
        "label": chosen_labels.cpu().long(),
        "source_prediction": source_prediction.long(),
        "attack": str(spec),
        "eps": spec.eps,
        "num_images": int(images.shape[0]),
    }
