"""Gradient attacks, hand-written in PyTorch: :func:`fgsm`, :func:`pgd`, :func:`mi_fgsm`,
:func:`cw_l2`, and :class:`Ensemble` to craft on several source models at once.

They take ``eps`` and ``step`` in [0, 1] pixel units (8/255, not 8); see the package docstring
for what every attack promises (untargeted, clipped to [0, 1], within eps, training flags
restored, no parameter gradients).
"""

from __future__ import annotations

import math
from typing import Iterable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..inference import evaluating
from .inputs import check_batch, check_count, check_nonnegative, per_example

__all__ = ["Ensemble", "cw_l2", "fgsm", "mi_fgsm", "pgd"]


def _input_gradient(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """d(sum of cross-entropy)/d(images). Summed, not averaged, so each example's
    gradient does not depend on the batch it was crafted in (foolbox does the same)."""
    images = images.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = F.cross_entropy(model(images), labels, reduction="sum")
        (gradient,) = torch.autograd.grad(loss, images)
    return gradient


def _project(adversarial: torch.Tensor, original: torch.Tensor, eps: float) -> torch.Tensor:
    # Written as foolbox writes it (x0 + clip(x - x0)), so the two PGDs agree bit for bit.
    return (original + (adversarial - original).clamp(-eps, eps)).clamp(0.0, 1.0)


def _check_iterative(images: torch.Tensor, labels: torch.Tensor, eps: float, step: float, iterations: int) -> None:
    """The arguments PGD and MI-FGSM share."""
    check_batch(images, labels)
    check_nonnegative("eps", eps)
    check_nonnegative("step", step)
    check_count("iterations", iterations)


def fgsm(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, eps: float) -> torch.Tensor:
    """Fast gradient sign method: ``clip(x + eps * sign(grad), 0, 1)``."""
    check_batch(images, labels)
    check_nonnegative("eps", eps)
    original = images.detach()
    if original.shape[0] == 0:
        return original.clone()
    with evaluating(model):
        gradient = _input_gradient(model, original, labels)
    return (original + eps * gradient.sign()).clamp(0.0, 1.0)


def pgd(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    eps: float,
    step: float,
    iterations: int,
    random_start: bool = False,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """L-inf projected gradient descent (Madry et al.): ``iterations`` sign steps of size
    ``step``, each followed by projection onto the eps ball and clipping to [0, 1].

    ``random_start`` starts from a uniform draw in the eps ball (the paper's runs do not);
    pass ``generator`` to make it reproducible.
    """
    _check_iterative(images, labels, eps, step, iterations)
    original = images.detach()
    if original.shape[0] == 0:
        return original.clone()
    adversarial = original.clone()
    if random_start:
        # Drawn on the generator's device so a CPU generator also serves a CUDA model.
        device = generator.device if generator is not None else original.device
        noise = torch.rand(original.shape, generator=generator, device=device, dtype=original.dtype)
        adversarial = (original + eps * (2 * noise.to(original.device) - 1)).clamp(0.0, 1.0)
    with evaluating(model):
        for _ in range(iterations):
            gradient = _input_gradient(model, adversarial, labels)
            adversarial = _project(adversarial + step * gradient.sign(), original, eps)
    return adversarial


def mi_fgsm(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    eps: float,
    step: float,
    iterations: int,
    mu: float = 1.0,
) -> torch.Tensor:
    """Momentum iterative FGSM (Dong et al. 2018):
    ``g <- mu * g + grad / ||grad||_1`` (L1 norm per example), ``x <- x + step * sign(g)``,
    then projection onto the eps ball and clipping to [0, 1].
    """
    _check_iterative(images, labels, eps, step, iterations)
    check_nonnegative("mu", mu)
    original = images.detach()
    if original.shape[0] == 0:
        return original.clone()
    adversarial = original.clone()
    momentum = torch.zeros_like(original)
    with evaluating(model):
        for _ in range(iterations):
            gradient = _input_gradient(model, adversarial, labels)
            # Per-example L1 normalization puts steps of every example on one scale; the
            # floor keeps a zero gradient (saturated softmax) from producing NaNs.
            l1_norm = gradient.abs().flatten(1).sum(1).clamp_min(torch.finfo(gradient.dtype).tiny)
            momentum = mu * momentum + gradient / per_example(l1_norm, gradient)
            adversarial = _project(adversarial + step * momentum.sign(), original, eps)
    return adversarial


def _margin(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Z_y - max_{i != y} Z_i per example (negative = misclassified)."""
    true_class = logits.gather(1, labels[:, None]).squeeze(1)
    others = logits.masked_fill(F.one_hot(labels, logits.shape[1]).bool(), float("-inf"))
    return true_class - others.amax(1)


def cw_l2(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    kappa: float = 40.0,
    lr: float = 5e-4,
    steps: int = 1000,
    binary_steps: int = 9,
    initial_c: float = 1e-2,
    abort_early: bool = True,
) -> torch.Tensor:
    """Untargeted Carlini-Wagner L2 attack (Carlini & Wagner 2017).

    Optimizes ``x' = (tanh(w) + 1) / 2`` (always inside [0, 1]) with Adam to minimize
    ``||x' - x||_2^2 + c * max(Z_y - max_{i!=y} Z_i, -kappa)``, with a binary search over
    ``c`` per example. Returns, per example, the smallest-L2 iterate that beat the true
    class by at least ``kappa`` logits (Carlini's success test, which is what makes
    kappa=40 examples transfer), or the original image when no iterate did.

    Paper settings: kappa 40, Adam lr 5e-4, up to 1000 steps. ``binary_steps=9`` is
    Carlini's reference default: starting from ``initial_c=1e-2`` (cleverhans' default;
    with kappa=40 the hinge term needs a larger c than Carlini's 1e-3, so starting there
    would mostly waste one round) and multiplying by 10 while no success is found, nine
    rounds reach c = 1e6, and once bracketed they bisect. ``abort_early`` stops a round
    when the total loss has not improved by 0.01% over a tenth of ``steps`` (Carlini's
    rule; hence "up to" 1000 steps).
    """
    check_batch(images, labels)
    check_nonnegative("kappa", kappa)
    check_nonnegative("lr", lr)
    check_count("steps", steps)
    check_count("binary_steps", binary_steps)
    check_nonnegative("initial_c", initial_c)
    original = images.detach()
    count = original.shape[0]
    if count == 0:
        return original.clone()
    # Shrink slightly so atanh stays finite for pixels at exactly 0 or 1.
    w_start = torch.atanh((2 * original - 1).clamp(-1, 1) * (1 - 1e-6))
    lower = torch.zeros(count, device=original.device)
    upper = torch.full((count,), math.inf, device=original.device)
    c = torch.full((count,), float(initial_c), device=original.device)
    best_squared_distance = torch.full((count,), math.inf, device=original.device)
    best = original.clone()
    check_every = max(steps // 10, 1)
    with evaluating(model):
        for _ in range(binary_steps):
            w = w_start.clone().requires_grad_(True)
            optimizer = torch.optim.Adam([w], lr=lr)
            succeeded = torch.zeros(count, dtype=torch.bool, device=original.device)
            previous_loss = math.inf
            for iteration in range(steps):
                with torch.enable_grad():
                    adversarial = (torch.tanh(w) + 1) / 2
                    logits = model(adversarial)
                    squared_distance = (adversarial - original).flatten(1).pow(2).sum(1)
                    margin = _margin(logits, labels)
                    loss = (squared_distance + c * margin.clamp_min(-kappa)).sum()
                    # Gradient w.r.t. w only: the model's parameters get no .grad.
                    (w.grad,) = torch.autograd.grad(loss, [w])
                # Record before stepping: these logits belong to this iterate.
                with torch.no_grad():
                    success = (margin <= -kappa) & (margin < 0)
                    succeeded |= success
                    improved = success & (squared_distance < best_squared_distance)
                    best_squared_distance = torch.where(improved, squared_distance, best_squared_distance)
                    best[improved] = adversarial[improved]
                if abort_early and iteration % check_every == 0:
                    if loss.item() > previous_loss * 0.9999:
                        break
                    previous_loss = loss.item()
                optimizer.step()
            # Success: c can shrink (bisect down). Failure: grow c tenfold until bracketed.
            upper = torch.where(succeeded, torch.minimum(upper, c), upper)
            lower = torch.where(succeeded, lower, torch.maximum(lower, c))
            c = torch.where(torch.isfinite(upper), (lower + upper) / 2, c * 10)
    return best.clamp(0.0, 1.0)


class Ensemble(nn.Module):
    """Average of the members' logits: craft on several source models at once."""

    def __init__(self, members: Iterable[nn.Module]):
        super().__init__()
        self.members = nn.ModuleList(members)
        if len(self.members) == 0:
            raise ValueError("Ensemble needs at least one member model")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.stack([member(images) for member in self.members]).mean(0)
