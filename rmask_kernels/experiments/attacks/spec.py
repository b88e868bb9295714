"""Attack specs in the paper's units (eps and step in /255): :class:`AttackSpec`, the string
forms :func:`parse_attack` reads (``pgd:eps=16,step=1,iters=20`` and short names such as
``pgd-1-20-16``), the paper's grid :data:`PAPER_GRID`, and :func:`attacks_by_name`, which
resolves the CLI's names. ``AttackSpec.run`` converts to [0, 1] pixel units and runs the
gradient attack.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Dict, Iterable, List, Optional, Tuple, Union

import torch
import torch.nn as nn

from .gradient import cw_l2, fgsm, mi_fgsm, pgd

__all__ = ["PAPER_GRID", "AttackSpec", "AttackSpecError", "attacks_by_name", "parse_attack"]


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


def _key(field: str) -> str:
    """How ``field`` is written in the canonical string form."""
    return _FIELD_KEY.get(field, field)

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
                parts.append(f"{_key(field)}={text}")
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
                f"{text!r}: the short form of {name} is {name}-{'-'.join(map(_key, fields))}"
                f" ({len(fields)} numbers), got {len(numbers)}"
            )
        values = {
            field: _parse_value(text, _key(field), field, number)
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
            takes = ", ".join(map(_key, _FIELDS[name]))
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
                    f"unknown paper family {name!r}; known: {', '.join('paper:' + known for known in PAPER_GRID)}"
                )
            specs.extend(PAPER_GRID[family])
        else:
            specs.append(parse_attack(name))
    return list(dict.fromkeys(specs))
