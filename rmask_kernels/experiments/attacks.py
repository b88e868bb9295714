"""Adversarial attacks for the paper's transfer experiments, hand-written in PyTorch.

Conventions (shared with the rest of rmask_kernels.experiments):

- Models take images in [0, 1] pixel space, shape [N, C, H, W] (normalization is a layer
  inside the model), and return logits.
- The attack functions take ``eps`` and ``step`` in [0, 1] pixel units (8/255, not 8).
  :class:`AttackSpec` holds the paper's /255 units and converts when it runs.
- Attacks are untargeted; outputs are clipped to [0, 1] and stay within ``eps`` (L-inf)
  of the input. Each attack runs the model in eval mode and restores every module's
  training flag afterwards; gradients are taken w.r.t. the input only, so nothing
  accumulates in the parameters' ``.grad``.

Gradient attacks: :func:`fgsm`, :func:`pgd`, :func:`mi_fgsm`, :func:`cw_l2`.
Crafting and storage for the transfer protocol: :func:`craft`, :func:`save_adversarial`,
:func:`load_adversarial`. Decision-based attacks (optional extra, foolbox):
:func:`boundary_attack`, :func:`hop_skip_jump`.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import math
import os
import re
import warnings
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .checkpoint import atomic_write

__all__ = [
    "AdversarialFileError",
    "AttackSpec",
    "AttackSpecError",
    "DecisionAttackResult",
    "Ensemble",
    "PAPER_GRID",
    "attacks_by_name",
    "boundary_attack",
    "craft",
    "cw_l2",
    "fgsm",
    "hop_skip_jump",
    "index_csv_path",
    "load_adversarial",
    "mi_fgsm",
    "parse_attack",
    "pgd",
    "save_adversarial",
]


# --------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------


@contextlib.contextmanager
def _evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode for the attack; restores each module's own flag (not one flag for all)."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


def _check_batch(images: torch.Tensor, labels: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor) or not images.is_floating_point():
        raise TypeError(f"images must be a floating-point tensor in [0, 1], got {_describe(images)}")
    if images.dim() < 2:
        raise ValueError(f"images must have a batch dimension, got shape {tuple(images.shape)}")
    if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or labels.is_floating_point():
        raise TypeError(f"labels must be a 1-D integer tensor, got {_describe(labels)}")
    if labels.shape[0] != images.shape[0]:
        raise ValueError(f"labels has {labels.shape[0]} entries but images has {images.shape[0]}")


def _check_nonnegative(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def _check_count(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {value!r}")


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor of dtype {value.dtype} and shape {tuple(value.shape)}"
    return type(value).__name__


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


def _per_example(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[N] -> [N, 1, 1, ...] broadcastable against `like`."""
    return values.reshape(-1, *([1] * (like.dim() - 1)))


@torch.no_grad()
def _predict(model: nn.Module, images: torch.Tensor, batch_size: int, device: torch.device) -> torch.Tensor:
    predictions = [
        model(batch.to(device)).argmax(1).cpu() for batch in images.split(batch_size)
    ]
    return torch.cat(predictions) if predictions else torch.zeros(0, dtype=torch.long)


def _model_device(model: nn.Module, fallback: torch.device) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return fallback


# --------------------------------------------------------------------------------------
# Gradient attacks ([0, 1] units)
# --------------------------------------------------------------------------------------


def fgsm(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, eps: float) -> torch.Tensor:
    """Fast gradient sign method: ``clip(x + eps * sign(grad), 0, 1)``."""
    _check_batch(images, labels)
    _check_nonnegative("eps", eps)
    original = images.detach()
    if original.shape[0] == 0:
        return original.clone()
    with _evaluating(model):
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
    _check_batch(images, labels)
    _check_nonnegative("eps", eps)
    _check_nonnegative("step", step)
    _check_count("iterations", iterations)
    original = images.detach()
    if original.shape[0] == 0:
        return original.clone()
    adversarial = original.clone()
    if random_start:
        # Drawn on the generator's device so a CPU generator also serves a CUDA model.
        device = generator.device if generator is not None else original.device
        noise = torch.rand(original.shape, generator=generator, device=device, dtype=original.dtype)
        adversarial = (original + eps * (2 * noise.to(original.device) - 1)).clamp(0.0, 1.0)
    with _evaluating(model):
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
    _check_batch(images, labels)
    _check_nonnegative("eps", eps)
    _check_nonnegative("step", step)
    _check_count("iterations", iterations)
    _check_nonnegative("mu", mu)
    original = images.detach()
    if original.shape[0] == 0:
        return original.clone()
    adversarial = original.clone()
    momentum = torch.zeros_like(original)
    with _evaluating(model):
        for _ in range(iterations):
            gradient = _input_gradient(model, adversarial, labels)
            # Per-example L1 normalization puts steps of every example on one scale; the
            # floor keeps a zero gradient (saturated softmax) from producing NaNs.
            l1 = gradient.abs().flatten(1).sum(1).clamp_min(torch.finfo(gradient.dtype).tiny)
            momentum = mu * momentum + gradient / _per_example(l1, gradient)
            adversarial = _project(adversarial + step * momentum.sign(), original, eps)
    return adversarial


def _margin(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Z_y - max_{i != y} Z_i per example (negative = misclassified)."""
    true = logits.gather(1, labels[:, None]).squeeze(1)
    others = logits.masked_fill(F.one_hot(labels, logits.shape[1]).bool(), float("-inf"))
    return true - others.amax(1)


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
    _check_batch(images, labels)
    _check_nonnegative("kappa", kappa)
    _check_nonnegative("lr", lr)
    _check_count("steps", steps)
    _check_count("binary_steps", binary_steps)
    _check_nonnegative("initial_c", initial_c)
    original = images.detach()
    count = original.shape[0]
    if count == 0:
        return original.clone()
    # Shrink slightly so atanh stays finite for pixels at exactly 0 or 1.
    w_start = torch.atanh((2 * original - 1).clamp(-1, 1) * (1 - 1e-6))
    lower = torch.zeros(count, device=original.device)
    upper = torch.full((count,), math.inf, device=original.device)
    c = torch.full((count,), float(initial_c), device=original.device)
    best_l2 = torch.full((count,), math.inf, device=original.device)
    best = original.clone()
    check_every = max(steps // 10, 1)
    with _evaluating(model):
        for _ in range(binary_steps):
            w = w_start.clone().requires_grad_(True)
            optimizer = torch.optim.Adam([w], lr=lr)
            succeeded = torch.zeros(count, dtype=torch.bool, device=original.device)
            previous_loss = math.inf
            for iteration in range(steps):
                with torch.enable_grad():
                    adversarial = (torch.tanh(w) + 1) / 2
                    logits = model(adversarial)
                    l2 = (adversarial - original).flatten(1).pow(2).sum(1)
                    margin = _margin(logits, labels)
                    loss = (l2 + c * margin.clamp_min(-kappa)).sum()
                    # Gradient w.r.t. w only: the model's parameters get no .grad.
                    (w.grad,) = torch.autograd.grad(loss, [w])
                # Record before stepping: these logits belong to this iterate.
                with torch.no_grad():
                    success = (margin <= -kappa) & (margin < 0)
                    succeeded |= success
                    improved = success & (l2 < best_l2)
                    best_l2 = torch.where(improved, l2, best_l2)
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


# --------------------------------------------------------------------------------------
# Attack specs in the paper's /255 units
# --------------------------------------------------------------------------------------


class AttackSpecError(ValueError):
    """An attack spec (string or AttackSpec fields) that cannot be used."""


_ALIASES = {
    "fgsm": "fgsm",
    "pgd": "pgd",
    "mi-fgsm": "mi-fgsm",
    "mifgsm": "mi-fgsm",
    "mi_fgsm": "mi-fgsm",
    "cw-l2": "cw-l2",
    "cw_l2": "cw-l2",
    "cwl2": "cw-l2",
    "cw": "cw-l2",
}

_CW_DEFAULTS = {"kappa": 40.0, "lr": 5e-4, "steps": 1000, "binary_steps": 9, "initial_c": 1e-2}

# Which AttackSpec fields each attack takes; None = required, otherwise the default.
_FIELDS: Dict[str, Dict[str, Any]] = {
    "fgsm": {"eps": None},
    "pgd": {"eps": None, "step": None, "iterations": None, "random_start": False},
    "mi-fgsm": {"eps": None, "step": None, "iterations": None, "mu": 1.0},
    "cw-l2": dict(_CW_DEFAULTS),
}

# Spellings in the string form -> AttackSpec field.
_KEYS = {
    "eps": "eps",
    "step": "step",
    "iters": "iterations",
    "iterations": "iterations",
    "mu": "mu",
    "random_start": "random_start",
    "kappa": "kappa",
    "lr": "lr",
    "steps": "steps",
    "binary_steps": "binary_steps",
    "initial_c": "initial_c",
}
_FIELD_KEY = {"iterations": "iters"}  # the field's name in the canonical string form

_INT_FIELDS = {"iterations", "steps", "binary_steps"}
_BOOL_FIELDS = {"random_start"}


def _number(value: float) -> str:
    """Shortest text that parses back to the same float: 16.0 -> '16', 0.0005 -> '0.0005'."""
    text = repr(float(value))
    return text[:-2] if text.endswith(".0") else text


@dataclasses.dataclass(frozen=True)
class AttackSpec:
    """One attack with its parameters in the paper's units: eps and step in /255.

    ``str(spec)`` is the canonical string form (``pgd:eps=16,step=1,iters=20``) and
    ``spec.short_name`` the compact one for CLIs (``pgd-1-20-16``, i.e. step-iters-eps as
    the paper lists them); :func:`parse_attack` reads both back.
    """

    name: str
    eps: Optional[float] = None
    step: Optional[float] = None
    iterations: Optional[int] = None
    mu: Optional[float] = None
    random_start: bool = False
    kappa: Optional[float] = None
    lr: Optional[float] = None
    steps: Optional[int] = None
    binary_steps: Optional[int] = None
    initial_c: Optional[float] = None

    def __post_init__(self) -> None:
        name = _ALIASES.get(str(self.name).lower())
        if name is None:
            raise AttackSpecError(
                f"unknown attack {self.name!r}; known: {', '.join(_FIELDS)}"
            )
        object.__setattr__(self, "name", name)
        accepted = _FIELDS[name]
        for field in dataclasses.fields(self):
            if field.name == "name":
                continue
            value = getattr(self, field.name)
            if field.name not in accepted:
                if value != field.default:
                    raise AttackSpecError(
                        f"{name} does not take {field.name!r} (it takes: {', '.join(accepted)})"
                    )
                continue
            if value is None:
                value = accepted[field.name]
                if value is None:
                    raise AttackSpecError(f"{name} needs {field.name!r}")
            object.__setattr__(self, field.name, self._normalize(field.name, value))

    def _normalize(self, field: str, value: Any) -> Any:
        if field in _BOOL_FIELDS:
            if not isinstance(value, bool):
                raise AttackSpecError(f"{field!r} must be true or false, got {value!r}")
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise AttackSpecError(f"{field!r} must be a finite number, got {value!r}")
        if value < 0:
            raise AttackSpecError(f"{field!r} must be >= 0, got {value!r}")
        if field in _INT_FIELDS:
            if value != int(value):
                raise AttackSpecError(f"{field!r} must be a whole number, got {value!r}")
            return int(value)
        return float(value)  # so AttackSpec(eps=16) == AttackSpec(eps=16.0) prints alike

    def __str__(self) -> str:
        accepted = _FIELDS[self.name]
        parts = []
        for field, default in accepted.items():
            value = getattr(self, field)
            # Required fields always; optional ones only when not at their default,
            # except CW's kappa, which is what tells CW runs apart.
            if default is None or value != default or field == "kappa":
                text = str(value).lower() if field in _BOOL_FIELDS else _number(value)
                parts.append(f"{_FIELD_KEY.get(field, field)}={text}")
        return f"{self.name}:{','.join(parts)}"

    @property
    def short_name(self) -> str:
        """``fgsm-8``, ``pgd-1-20-16``, ``mi-fgsm-1-20-16``, ``cw-l2-40``; the canonical
        string form when a parameter is off its default (random start, mu != 1, ...)."""
        if self.name == "fgsm":
            return f"fgsm-{_number(self.eps)}"
        if (self.name == "pgd" and not self.random_start) or (self.name == "mi-fgsm" and self.mu == 1.0):
            return f"{self.name}-{_number(self.step)}-{self.iterations}-{_number(self.eps)}"
        if self.name == "cw-l2" and all(
            getattr(self, field) == default for field, default in _CW_DEFAULTS.items() if field != "kappa"
        ):
            return f"cw-l2-{_number(self.kappa)}"
        return str(self)

    def run(
        self,
        model: nn.Module,
        images: torch.Tensor,
        labels: torch.Tensor,
        generator: Optional[torch.Generator] = None,
    ) -> torch.Tensor:
        """Run the attack, converting eps and step from /255 to [0, 1] pixel units."""
        if self.name == "fgsm":
            return fgsm(model, images, labels, self.eps / 255)
        if self.name == "pgd":
            return pgd(
                model, images, labels, self.eps / 255, self.step / 255, self.iterations,
                random_start=self.random_start, generator=generator,
            )
        if self.name == "mi-fgsm":
            return mi_fgsm(model, images, labels, self.eps / 255, self.step / 255, self.iterations, mu=self.mu)
        return cw_l2(
            model, images, labels, kappa=self.kappa, lr=self.lr, steps=self.steps,
            binary_steps=self.binary_steps, initial_c=self.initial_c,
        )


def _parse_value(spec_text: str, key: str, field: str, text: str) -> Any:
    if field in _BOOL_FIELDS:
        lowered = text.lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise AttackSpecError(f"{key!r} in {spec_text!r} must be true or false, got {text!r}")
    try:
        return float(text)
    except ValueError:
        raise AttackSpecError(f"{key!r} in {spec_text!r} must be a number, got {text!r}") from None


# Short forms: name-number-number...; longest alias first so "cw-l2-40" is not "cw" + "l2-40".
_SHORT_FIELDS = {
    "fgsm": ("eps",),
    "pgd": ("step", "iterations", "eps"),
    "mi-fgsm": ("step", "iterations", "eps"),
    "cw-l2": ("kappa",),
}
_SHORT_FORM = re.compile(
    r"^(?P<name>%s)-(?P<numbers>[0-9.]+(?:-[0-9.]+)*)$"
    % "|".join(re.escape(alias) for alias in sorted(_ALIASES, key=len, reverse=True))
)


def parse_attack(text: str) -> AttackSpec:
    """Parse ``pgd:eps=16,step=1,iters=20`` (eps and step in /255), a short name such as
    ``pgd-1-20-16`` (step-iters-eps), ``fgsm-8``, ``mi-fgsm-1-20-16`` or ``cw-l2-40``.

    Keys: eps, step, iters (or iterations), mu, random_start, and for CW kappa, lr, steps,
    binary_steps, initial_c. Errors name the offending field.
    """
    if not isinstance(text, str) or not text.strip():
        raise AttackSpecError(f"empty attack spec {text!r}")
    text = text.strip()
    short = _SHORT_FORM.match(text.lower())
    if short is not None and ":" not in text:
        name = _ALIASES[short.group("name")]
        numbers = short.group("numbers").split("-")
        fields = _SHORT_FIELDS[name]
        if len(numbers) != len(fields):
            raise AttackSpecError(
                f"{text!r}: the short form of {name} is {name}-{'-'.join(_FIELD_KEY.get(f, f) for f in fields)}"
                f" ({len(fields)} numbers), got {len(numbers)}"
            )
        values = {
            field: _parse_value(text, _FIELD_KEY.get(field, field), field, number)
            for field, number in zip(fields, numbers)
        }
        return AttackSpec(name, **values)

    name, _, rest = text.partition(":")
    if name.strip().lower() not in _ALIASES:
        raise AttackSpecError(f"unknown attack {name.strip()!r} in {text!r}; known: {', '.join(_FIELDS)}")
    name = _ALIASES[name.strip().lower()]
    values: Dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, equals, value = item.partition("=")
        key = key.strip().lower()
        if not equals or not value.strip():
            raise AttackSpecError(f"{item!r} in {text!r} is not key=value")
        field = _KEYS.get(key)
        if field is None or field not in _FIELDS[name]:
            takes = ", ".join(_FIELD_KEY.get(f, f) for f in _FIELDS[name])
            raise AttackSpecError(f"unknown field {key!r} for {name} in {text!r} (it takes: {takes})")
        if field in values:
            raise AttackSpecError(f"field {key!r} given twice in {text!r}")
        values[field] = _parse_value(text, key, field, value.strip())
    try:
        return AttackSpec(name, **values)
    except AttackSpecError as error:
        raise AttackSpecError(f"{text!r}: {error}") from None


# The paper's grid (eps and step in /255, no random start). PGD is listed as (step,
# iterations, eps) in the paper's order. MI-FGSM: the paper gives only mu=1, so it runs
# on the same six (step, iterations, eps) triples as PGD — the natural reading, and it
# makes PGD and MI-FGSM rows directly comparable.
_PAPER_ITERATIVE = ((1, 20, 16), (2, 10, 16), (1, 40, 32), (1, 10, 8), (2, 20, 32), (2, 7, 8))

PAPER_GRID: Dict[str, Tuple[AttackSpec, ...]] = {
    "fgsm": tuple(AttackSpec("fgsm", eps=eps) for eps in (8, 16, 32)),
    "pgd": tuple(
        AttackSpec("pgd", eps=eps, step=step, iterations=iterations)
        for step, iterations, eps in _PAPER_ITERATIVE
    ),
    "mi-fgsm": tuple(
        AttackSpec("mi-fgsm", eps=eps, step=step, iterations=iterations, mu=1.0)
        for step, iterations, eps in _PAPER_ITERATIVE
    ),
    "cw-l2": (AttackSpec("cw-l2", kappa=40.0),),
}


def attacks_by_name(names: Union[str, AttackSpec, Iterable[Union[str, AttackSpec]]]) -> List[AttackSpec]:
    """Resolve CLI names to specs: ``paper`` (the whole grid), ``paper:pgd`` (one family
    of it: fgsm, pgd, mi-fgsm, cw-l2), or any spec :func:`parse_attack` reads. A single
    string is one name (spec strings contain commas). Duplicates are dropped, order kept.
    """
    if isinstance(names, (str, AttackSpec)):
        names = [names]
    specs: List[AttackSpec] = []
    for name in names:
        if isinstance(name, AttackSpec):
            specs.append(name)
            continue
        key = name.strip().lower()
        if key == "paper":
            specs.extend(spec for family in PAPER_GRID.values() for spec in family)
        elif key.startswith("paper:"):
            family = _ALIASES.get(key[len("paper:"):])
            if family is None:
                raise AttackSpecError(
                    f"unknown paper family {name!r}; known: {', '.join('paper:' + f for f in PAPER_GRID)}"
                )
            specs.extend(PAPER_GRID[family])
        else:
            specs.append(parse_attack(name))
    return list(dict.fromkeys(specs))


# --------------------------------------------------------------------------------------
# Crafting on a source model, 8-bit storage
# --------------------------------------------------------------------------------------


def _to_uint8(images: torch.Tensor) -> torch.Tensor:
    # Rounding, not truncation: truncation would bias every pixel down by half a level.
    return (images.clamp(0, 1) * 255).round().to(torch.uint8)


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
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if isinstance(images, torch.Tensor) and images.dtype == torch.uint8:
        images = images.float() / 255
    _check_batch(images, labels)
    device = _model_device(source, images.device)
    with _evaluating(source):
        clean_prediction = _predict(source, images, batch_size, device)
        index = torch.nonzero(clean_prediction == labels.cpu()).flatten()
        chosen_images, chosen_labels = images[index.to(images.device)], labels[index.to(labels.device)]
        crafted = [
            _to_uint8(spec.run(source, batch.to(device), batch_labels.to(device), generator=generator)).cpu()
            for batch, batch_labels in zip(chosen_images.split(batch_size), chosen_labels.split(batch_size))
        ]
        adversarial = (
            torch.cat(crafted)
            if crafted
            else torch.zeros((0, *images.shape[1:]), dtype=torch.uint8)
        )
        source_prediction = _predict(source, adversarial.float() / 255, batch_size, device)
    return {
        "adversarial": adversarial,
        "index": index.long(),
        "label": chosen_labels.cpu().long(),
        "source_prediction": source_prediction.long(),
        "attack": str(spec),
        "eps": spec.eps,
        "num_images": int(images.shape[0]),
    }


class AdversarialFileError(ValueError):
    """A saved adversarial-example file that is missing pieces, truncated or inconsistent."""


_FORMAT = "rmask_kernels.adversarial"
_FORMAT_VERSION = 1
_ARRAYS = ("adversarial", "index", "label", "source_prediction")


def index_csv_path(path: Union[str, os.PathLike]) -> Path:
    """The human-readable index beside a saved file: ``x.pt`` -> ``x.csv``."""
    return Path(path).with_suffix(".csv")


def save_adversarial(
    path: Union[str, os.PathLike],
    crafted: Mapping[str, Any],
    meta: Optional[Mapping[str, Any]] = None,
) -> Path:
    """Save :func:`craft`'s output as one ``.pt`` file plus an index CSV beside it
    (``index,label,source_prediction`` per row), both written atomically.

    The metadata stored is ``attack``, ``eps`` and ``num_images`` from ``crafted``,
    updated with ``meta`` (e.g. ``{"source": "resnet18 seed 0"}``); it must be JSON-like
    (so it loads with ``weights_only=True`` and reads in any tool). Returns the path.
    """
    path = Path(path)
    payload = _validated(crafted, str(path))
    stored_meta = {key: crafted[key] for key in ("attack", "eps", "num_images") if key in crafted}
    stored_meta.update(meta or {})
    try:
        stored_meta = json.loads(json.dumps(stored_meta))
    except (TypeError, ValueError) as error:
        raise ValueError(f"meta for {path} must be JSON-serializable: {error}") from None
    payload.update(format=_FORMAT, version=_FORMAT_VERSION, meta=stored_meta)

    def write_tensors(handle) -> None:
        torch.save(payload, handle)

    def write_index(handle) -> None:
        text = io.StringIO()
        writer = csv.writer(text, lineterminator="\n")
        writer.writerow(["index", "label", "source_prediction"])
        writer.writerows(
            zip(payload["index"].tolist(), payload["label"].tolist(), payload["source_prediction"].tolist())
        )
        handle.write(text.getvalue().encode())

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, write_tensors)
    atomic_write(index_csv_path(path), write_index)
    return path


def _validated(data: Mapping[str, Any], where: str) -> Dict[str, torch.Tensor]:
    missing = [key for key in _ARRAYS if key not in data]
    if missing:
        raise AdversarialFileError(f"{where}: missing {', '.join(missing)}")
    adversarial = data["adversarial"]
    if not isinstance(adversarial, torch.Tensor) or adversarial.dtype != torch.uint8 or adversarial.dim() < 2:
        raise AdversarialFileError(
            f"{where}: 'adversarial' must be a uint8 tensor [N, C, H, W], got {_describe(adversarial)}"
        )
    count = adversarial.shape[0]
    arrays = {"adversarial": adversarial}
    for key in _ARRAYS[1:]:
        value = data[key]
        integer = isinstance(value, torch.Tensor) and not value.is_floating_point() and value.dtype != torch.bool
        if not integer or value.dim() != 1:
            raise AdversarialFileError(f"{where}: {key!r} must be a 1-D integer tensor, got {_describe(value)}")
        if value.shape[0] != count:
            raise AdversarialFileError(f"{where}: {key!r} has {value.shape[0]} entries but there are {count} images")
        arrays[key] = value.long()
    return arrays


def load_adversarial(path: Union[str, os.PathLike]) -> Dict[str, Any]:
    """Load a file written by :func:`save_adversarial`: the four tensors and ``meta``.
    Raises :class:`AdversarialFileError` naming the file when it is truncated, not such a
    file, or its tensors disagree in length."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"adversarial-example file not found: {path}")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated zip, bad pickle, ...: all mean "not readable"
        raise AdversarialFileError(f"{path}: not a readable adversarial-example file ({error})") from error
    if not isinstance(data, dict) or data.get("format") != _FORMAT:
        raise AdversarialFileError(f"{path}: not an adversarial-example file (no {_FORMAT!r} format tag)")
    if data.get("version") != _FORMAT_VERSION:
        raise AdversarialFileError(f"{path}: unsupported format version {data.get('version')!r}")
    loaded: Dict[str, Any] = _validated(data, str(path))
    loaded["meta"] = dict(data.get("meta") or {})
    return loaded


# --------------------------------------------------------------------------------------
# Decision-based attacks through foolbox (optional extra)
# --------------------------------------------------------------------------------------


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


def _starting_points(fb, fmodel, model, images, labels) -> Tuple[torch.Tensor, torch.Tensor]:
    """Adversarial starting points: foolbox's default (blend towards uniform noise), and
    where noise never leaves the true class, the nearest image of the batch the model puts
    in another class. Returns (points, found)."""
    noise = fb.attacks.LinearSearchBlendedUniformNoiseAttack(directions=100, steps=50)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # we handle its failures below
        points = noise.run(fmodel, images, fb.criteria.Misclassification(labels))
    found = model(points).argmax(1) != labels
    if not bool(found.all()):
        predictions = model(images).argmax(1)
        distances = torch.cdist(images.flatten(1), images.flatten(1))
        usable = predictions[None, :] != labels[:, None]  # image j is adversarial for i
        distances = distances.masked_fill(~usable, math.inf)
        nearest = distances.argmin(1)
        fallback = ~found & usable.any(1)
        points = torch.where(_per_example(fallback, points), images[nearest], points)
        found = found | fallback
    return points, found


def _decision_attack(attack, model, images, labels, seed) -> DecisionAttackResult:
    fb = _import_foolbox()
    _check_batch(images, labels)
    original = images.detach()
    adversarial = original.clone()
    success = torch.zeros(original.shape[0], dtype=torch.bool, device=original.device)
    if original.shape[0] > 0:
        with _evaluating(model), _seeded(seed, original.device), torch.no_grad():
            fmodel = fb.PyTorchModel(model, bounds=(0, 1), device=original.device)
            points, found = _starting_points(fb, fmodel, model, original, labels)
            if bool(found.any()):
                adversarial[found] = attack.run(
                    fmodel, original[found], fb.criteria.Misclassification(labels[found]),
                    starting_points=points[found],
                )
            success = model(adversarial).argmax(1) != labels
    adversarial = torch.where(_per_example(success, adversarial), adversarial, original)
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
    fb = _import_foolbox()
    _check_count("steps", steps)
    return _decision_attack(fb.attacks.BoundaryAttack(steps=steps, **options), model, images, labels, seed)


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
    fb = _import_foolbox()
    _check_count("steps", steps)
    return _decision_attack(fb.attacks.HopSkipJumpAttack(steps=steps, **options), model, images, labels, seed)
