"""Decision-based attacks through foolbox (an optional extra): :func:`boundary_attack` and
:func:`hop_skip_jump`, the paper's decision-based evaluation, each returning a
:class:`DecisionAttackResult` (metric: its ``mean_squared_distortion``). Installing the extra:
``pip install 'rmask_kernels[attacks]'``; without it these raise an ImportError naming it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import warnings
from typing import Any, Dict, Iterator, Optional, Tuple

import torch
import torch.nn as nn

from ..inference import evaluating
from .inputs import check_batch, check_count, per_example

__all__ = ["DecisionAttackResult", "boundary_attack", "hop_skip_jump"]


def _import_foolbox():
    try:
        import foolbox
    except ImportError as error:
        raise ImportError(
            "decision-based attacks (Boundary, HopSkipJump) need foolbox: "
            "pip install 'rmask_kernels[attacks]' (or pip install foolbox==3.3.4)"
        ) from error
    return foolbox


@dataclasses.dataclass(frozen=True)
class DecisionAttackResult:
    """A decision-based attack's output.

    ``squared_distortion`` is per example the mean over pixels of (x' - x)^2 in [0, 1]
    units (the Boundary attack paper's MSE), NaN where no adversarial was found (then
    ``adversarial`` holds the original).
    """

    adversarial: torch.Tensor
    success: torch.Tensor
    squared_distortion: torch.Tensor

    @property
    def mean_squared_distortion(self) -> float:
        """The paper's metric: mean over the examples the attack succeeded on (larger =
        more robust); NaN when it succeeded on none."""
        if not bool(self.success.any()):
            return math.nan
        return float(self.squared_distortion[self.success].mean())


@contextlib.contextmanager
def _seeded(seed: Optional[int], device: torch.device) -> Iterator[None]:
    """foolbox draws from torch's global RNG; fork it so a seed does not leak out."""
    if seed is None:
        yield
        return
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _starting_points(foolbox, foolbox_model, model, images, labels) -> Tuple[torch.Tensor, torch.Tensor]:
    """Adversarial starting points: foolbox's default (blend towards uniform noise), and
    where noise never leaves the true class, the nearest image of the batch the model puts
    in another class. Returns (points, found)."""
    noise = foolbox.attacks.LinearSearchBlendedUniformNoiseAttack(directions=100, steps=50)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # we handle its failures below
        points = noise.run(foolbox_model, images, foolbox.criteria.Misclassification(labels))
    found = model(points).argmax(1) != labels
    if not bool(found.all()):
        predictions = model(images).argmax(1)
        distances = torch.cdist(images.flatten(1), images.flatten(1))
        usable = predictions[None, :] != labels[:, None]  # image j is adversarial for i
        distances = distances.masked_fill(~usable, math.inf)
        nearest = distances.argmin(1)
        fallback = ~found & usable.any(1)
        points = torch.where(per_example(fallback, points), images[nearest], points)
        found = found | fallback
    return points, found


def _decision_attack(attack_name: str, steps: int, options: Dict[str, Any], model: nn.Module,
                     images: torch.Tensor, labels: torch.Tensor, seed: Optional[int]) -> DecisionAttackResult:
    """Run ``foolbox.attacks.<attack_name>(steps=steps, **options)`` from `_starting_points`."""
    foolbox = _import_foolbox()
    check_count("steps", steps)
    attack = getattr(foolbox.attacks, attack_name)(steps=steps, **options)
    check_batch(images, labels)
    original = images.detach()
    adversarial = original.clone()
    success = torch.zeros(original.shape[0], dtype=torch.bool, device=original.device)
    if original.shape[0] > 0:
        with evaluating(model), _seeded(seed, original.device), torch.no_grad():
            foolbox_model = foolbox.PyTorchModel(model, bounds=(0, 1), device=original.device)
            points, found = _starting_points(foolbox, foolbox_model, model, original, labels)
            if bool(found.any()):
                adversarial[found] = attack.run(
                    foolbox_model, original[found], foolbox.criteria.Misclassification(labels[found]),
                    starting_points=points[found],
                )
            success = model(adversarial).argmax(1) != labels
    adversarial = torch.where(per_example(success, adversarial), adversarial, original)
    distortion = (adversarial - original).flatten(1).pow(2).mean(1)
    distortion = torch.where(success, distortion, torch.full_like(distortion, math.nan))
    return DecisionAttackResult(adversarial, success, distortion)


def boundary_attack(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    steps: int = 25000,
    seed: Optional[int] = None,
    **options: Any,
) -> DecisionAttackResult:
    """Boundary attack (Brendel et al. 2018) through foolbox's ``BoundaryAttack``; the
    paper's decision-based evaluation (metric: ``result.mean_squared_distortion``).

    ``steps`` defaults to foolbox's 25000; ``options`` go to ``foolbox.attacks.BoundaryAttack``
    (spherical_step, source_step, ...). ``seed`` makes the run reproducible without touching
    the global RNG. Needs the optional extra: ``pip install 'rmask_kernels[attacks]'``.
    """
    return _decision_attack("BoundaryAttack", steps, options, model, images, labels, seed)


def hop_skip_jump(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    steps: int = 64,
    seed: Optional[int] = None,
    **options: Any,
) -> DecisionAttackResult:
    """HopSkipJump (Chen et al. 2020, L2 version) through foolbox's ``HopSkipJumpAttack``.

    ``steps`` defaults to foolbox's 64; ``options`` go to the foolbox attack
    (initial_gradient_eval_steps, max_gradient_eval_steps, ...). Same result and extra as
    :func:`boundary_attack`.
    """
    return _decision_attack("HopSkipJumpAttack", steps, options, model, images, labels, seed)
