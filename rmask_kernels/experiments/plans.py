"""Plans of `rmask reproduce`: what a study trains, attacks and evaluates, read from a JSON file,
checked, and turned into steps named by a hash of their config.

A plan (the built-in ones are ``plans/digits.json`` and ``plans/paper.json`` beside this file)::

    {
      "data": "digits",                       dataset of every run (rmask train --data)
      "train": {"epochs": 10, ...},           TrainConfig fields shared by every run
      "limit_test": null,                     test images the attacks and evaluations use
      "batch_size": 128, "seed": 0,           of the attacks and evaluations
      "runs": [                               one training each
        {"model": "small"},                                        -> "normal"
        {"model": "small", "mask_ratio": 0.9},                     -> "shallow-0.9"
        {"model": "small", "mask_ratio": 0.9, "mode": "same"},     -> "shallow-0.9-same"
        {"model": "small", "mask_ratio": 0.5, "placement": "deep"} -> "deep-0.5"
        {"model": "resnet18", "control": "dropblock"},             -> "dropblock"
        {"name": "source-a", "model": "small", "seed": 100, "train": {...}}
      ],
      "targets": [...],                       run names evaluated (default: every run not a source)
      "sources": [...],                       black-box sources: every attack crafted on each
      "attacks": ["fgsm-8", "paper:pgd"],     rmask attack --attack specs
      "gray_box": [{"source": "gray-0.9", "targets": ["shallow-0.9"]}],
      "white_box": {"attacks": [...], "targets": [...], "limit": N},
      "noise": {"eps": [8, 16]},   "patch_shuffle": {"s": [2, 4, 8]},
      "decision": {"attack": "boundary", "n": 500, "steps": 25000, "targets": [...]}
    }

A run's ``seed`` seeds its weights, data order and masks. ``control`` names one of the paper's
controls (`CONTROLS`), ``train`` any other TrainConfig fields. Every error names the field, what
it expects and what it got (`PlanError`).

Steps (`build_steps`): one training per run, one attack set per source, one evaluation per
target. A step's key is ``<kind>-<name>-<hash>``, the hash over its config, which holds the
keys of the steps it reads: change a run and its training, the attacks crafted on it and the
evaluations reading them all get new keys. ``device`` and ``data_path`` are not part of any
config (where the data lives or what runs it does not change what is computed).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from .attacks import AttackSpec, AttackSpecError, attacks_by_name
from .data import DATASETS
from .evaluate import DECISION_ATTACKS
from .train import TrainConfig

__all__ = ["CONTROLS", "PLAN_DIRECTORY", "Plan", "PlanError", "Run", "Step", "build_steps", "load_plan", "shrink"]

PLAN_DIRECTORY = Path(__file__).with_name("plans")

# The paper's controls by the name they carry in tables: TrainConfig fields. Mask ratio and
# placement come from the run (wide-2x: a masked network with the masked stages twice as wide;
# channels-0.1: the placement's stages with a tenth of their channels and no masks).
CONTROLS: Dict[str, Dict[str, Any]] = {
    "wide-2x": {"width_multiplier": 2.0},
    "channels-0.1": {"channels_fraction": 0.1},
    "dropblock": {"deep_dropout": "dropblock:0.1:3"},
    "dropout2d": {"deep_dropout": "dropout2d:0.1"},
    "label-smoothing": {"label_smoothing": 0.1},
}
PLACEMENTS = ("shallow", "deep")
MODES = {"neuron": "neuron", "spatial": "spatial", "same": "spatial"}
_PLAN_KEYS = ("description", "data", "train", "limit_test", "batch_size", "seed", "runs", "targets", "sources",
              "attacks", "gray_box", "white_box", "noise", "patch_shuffle", "decision")
_RUN_KEYS = ("name", "model", "mask_ratio", "placement", "mode", "control", "seed", "train")
# Fields a run's "train" may not set: the run's own keys say them.
_RUN_OWNED = ("data", "data_path", "device", "mask_ratio", "mask_layers", "mask_mode", "seed", "mask_seed")


class PlanError(ValueError):
    """A plan that cannot run: the message names the field, the expected and the actual value."""


def _fail(where: str, expected: str, got: Any) -> PlanError:
    return PlanError(f"{where}: expected {expected}, got {got!r}")


def _check_keys(where: str, value: Any, known: Sequence[str]) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise _fail(where, "an object", value)
    unknown = sorted(set(value) - set(known))
    if unknown:
        raise PlanError(f"{where}: unknown field(s) {', '.join(unknown)}; known: {', '.join(known)}")
    return value


def _int(where: str, value: Any, minimum: int = 1, optional: bool = False) -> Optional[int]:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise _fail(where, f"an integer >= {minimum}" + (" or null" if optional else ""), value)
    return value


def _names(where: str, value: Any, known: Sequence[str]) -> Tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(name, str) for name in value):
        raise _fail(where, "a list of run names", value)
    for name in value:
        if name not in known:
            raise _fail(where, f"names of runs ({', '.join(known)})", name)
    return tuple(dict.fromkeys(value))


def _attacks(where: str, value: Any) -> Tuple[AttackSpec, ...]:
    if not isinstance(value, list) or not all(isinstance(name, str) for name in value):
        raise _fail(where, "a list of attack specs such as 'fgsm-8' or 'paper:pgd'", value)
    try:
        return tuple(attacks_by_name(value))
    except AttackSpecError as error:
        raise PlanError(f"{where}: {error}") from None


@dataclass(frozen=True)
class Run:
    """One training of the plan and how the tables name and group it."""

    name: str
    config: TrainConfig
    placement: str  # "shallow", "deep", or the stage digits
    mask_ratio: float
    mode: str  # "neuron" or "spatial"
    control: Optional[str]

    def labels(self) -> Dict[str, Any]:
        """The columns results.csv gives a target besides its name."""
        placed = self.mask_ratio or self.control not in (None, "label-smoothing")
        return {"model": self.config.model, "placement": self.placement if placed else "",
                "mask_ratio": self.mask_ratio, "mask_mode": self.mode if self.mask_ratio else "",
                "control": self.control or ""}


def run_name(mask_ratio: float, placement: str, mode: str, control: Optional[str]) -> str:
    """The table name of a run: the control's name, else normal / shallow-0.9 / shallow-0.9-same."""
    if control:
        return control
    if not mask_ratio:
        return "normal"
    return f"{placement}-{mask_ratio:g}" + ("-same" if mode == "spatial" else "")


def _run(where: str, value: Any, data: str, shared: Mapping[str, Any]) -> Run:
    value = _check_keys(where, value, _RUN_KEYS)
    ratio = value.get("mask_ratio", 0.0)
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio < 1:
        raise _fail(f"{where}.mask_ratio", "a number in [0, 1)", ratio)
    placement = value.get("placement", "shallow")
    if not isinstance(placement, str) or not (placement in PLACEMENTS or placement.isdigit()):
        raise _fail(f"{where}.placement", "'shallow', 'deep' or stage digits such as '012'", placement)
    mode = value.get("mode", "neuron")
    if mode not in MODES:
        raise _fail(f"{where}.mode", f"one of {', '.join(MODES)}", mode)
    control = value.get("control")
    if control is not None and control not in CONTROLS:
        raise _fail(f"{where}.control", f"null or one of {', '.join(CONTROLS)}", control)
    seed = _int(f"{where}.seed", value.get("seed", 0), minimum=0)
    extra = value.get("train", {})
    if not isinstance(extra, Mapping):
        raise _fail(f"{where}.train", "an object of TrainConfig fields", extra)
    owned = sorted(set(extra) & set(_RUN_OWNED))
    if owned:
        raise PlanError(f"{where}.train: {', '.join(owned)} cannot be set here (the run's own fields say them)")
    fields = {**shared, **(CONTROLS[control] if control else {}), **extra}
    if "model" in value:
        fields["model"] = value["model"]
    try:
        config = TrainConfig.for_data(data, **fields, mask_ratio=float(ratio), mask_layers=placement,
                                      mask_mode=MODES[mode], seed=seed, mask_seed=seed)
    except (TypeError, ValueError) as error:
        raise PlanError(f"{where}: {error}") from None
    name = value.get("name") or run_name(float(ratio), placement, MODES[mode], control)
    if not isinstance(name, str) or not name or "/" in name:
        raise _fail(f"{where}.name", "a non-empty name without '/'", name)
    return Run(name, config, placement, float(ratio), MODES[mode], control)


@dataclass(frozen=True)
class Plan:
    """A checked plan (see the module docstring)."""

    name: str
    data: str
    runs: Dict[str, Run]
    targets: Tuple[str, ...]
    sources: Tuple[str, ...]
    attacks: Tuple[AttackSpec, ...]
    gray_box: Tuple[Tuple[str, Tuple[str, ...]], ...]  # (source, targets)
    white_box: Optional[Dict[str, Any]]  # attacks (specs), targets, limit
    noise: Tuple[float, ...]
    patch_shuffle: Tuple[int, ...]
    decision: Optional[Dict[str, Any]]  # attack, n, steps, targets
    limit_test: Optional[int]
    batch_size: int
    seed: int
    description: str = ""


def parse_plan(value: Any, name: str = "plan") -> Plan:
    """Check a plan's JSON value; `PlanError` names the first bad field (``name: field: ...``)."""
    value = _check_keys(name, value, _PLAN_KEYS)
    data = value.get("data")
    if data not in DATASETS:
        raise _fail(f"{name}: data", f"one of {', '.join(DATASETS)}", data)
    shared = value.get("train", {})
    if not isinstance(shared, Mapping):
        raise _fail(f"{name}: train", "an object of TrainConfig fields", shared)
    owned = sorted(set(shared) & set(_RUN_OWNED))
    if owned:
        raise PlanError(f"{name}: train: {', '.join(owned)} cannot be set for every run (give them per run)")
    raw_runs = value.get("runs")
    if not isinstance(raw_runs, list) or not raw_runs:
        raise _fail(f"{name}: runs", "a non-empty list of runs", raw_runs)
    runs: Dict[str, Run] = {}
    for position, raw in enumerate(raw_runs):
        run = _run(f"{name}: runs[{position}]", raw, data, shared)
        if run.name in runs:
            raise PlanError(f"{name}: runs[{position}]: a second run named {run.name!r}; give one of them a 'name'")
        runs[run.name] = run
    known = tuple(runs)
    sources = _names(f"{name}: sources", value.get("sources", []), known)
    gray_box = []
    for position, raw in enumerate(value.get("gray_box", [])):
        where = f"{name}: gray_box[{position}]"
        raw = _check_keys(where, raw, ("source", "targets"))
        source = raw.get("source")
        if source not in known:
            raise _fail(f"{where}.source", f"the name of a run ({', '.join(known)})", source)
        gray_box.append((source, _names(f"{where}.targets", raw.get("targets"), known)))
    attack_sources = set(sources) | {source for source, _ in gray_box}
    default_targets = [run for run in known if run not in attack_sources]
    targets = _names(f"{name}: targets", value.get("targets", default_targets), known)
    if not targets:
        raise _fail(f"{name}: targets", "at least one run to evaluate", [])
    for source, gray_targets in gray_box:
        outside = [target for target in gray_targets if target not in targets]
        if outside:
            raise _fail(f"{name}: gray_box targets of {source}", f"runs among the targets ({', '.join(targets)})",
                        outside[0])
    attacks = _attacks(f"{name}: attacks", value.get("attacks", []))
    if attack_sources and not attacks:
        raise _fail(f"{name}: attacks", "attack specs for the sources", value.get("attacks"))

    white_box = None
    if value.get("white_box") is not None:
        raw = _check_keys(f"{name}: white_box", value["white_box"], ("attacks", "targets", "limit"))
        white_box = {"attacks": _attacks(f"{name}: white_box.attacks", raw.get("attacks")),
                     "targets": _names(f"{name}: white_box.targets", raw.get("targets", list(targets)), targets),
                     "limit": _int(f"{name}: white_box.limit", raw.get("limit"), optional=True)}
    noise: Tuple[float, ...] = ()
    if value.get("noise") is not None:
        raw = _check_keys(f"{name}: noise", value["noise"], ("eps",))
        eps = raw.get("eps")
        if not isinstance(eps, list) or not all(not isinstance(e, bool) and isinstance(e, (int, float))
                                                and 0 <= e <= 255 for e in eps):
            raise _fail(f"{name}: noise.eps", "a list of numbers in [0, 255] (/255)", eps)
        noise = tuple(eps)
    patch_shuffle: Tuple[int, ...] = ()
    if value.get("patch_shuffle") is not None:
        raw = _check_keys(f"{name}: patch_shuffle", value["patch_shuffle"], ("s",))
        grid = raw.get("s")
        if not isinstance(grid, list) or not all(not isinstance(s, bool) and isinstance(s, int) and s >= 1
                                                 for s in grid):
            raise _fail(f"{name}: patch_shuffle.s", "a list of positive integers (patches per side)", grid)
        patch_shuffle = tuple(grid)
    decision = None
    if value.get("decision") is not None:
        raw = _check_keys(f"{name}: decision", value["decision"], ("attack", "n", "steps", "targets"))
        attack = raw.get("attack", "boundary")
        if attack not in DECISION_ATTACKS:
            raise _fail(f"{name}: decision.attack", f"one of {', '.join(DECISION_ATTACKS)}", attack)
        decision = {"attack": attack, "n": _int(f"{name}: decision.n", raw.get("n", 500)),
                    "steps": _int(f"{name}: decision.steps", raw.get("steps"), optional=True),
                    "targets": _names(f"{name}: decision.targets", raw.get("targets", list(targets)), targets)}
    description = value.get("description", "")
    if not isinstance(description, str):
        raise _fail(f"{name}: description", "a string", description)
    return Plan(
        name=name, data=data, runs=runs, targets=targets, sources=sources, attacks=attacks,
        gray_box=tuple(gray_box), white_box=white_box, noise=noise, patch_shuffle=patch_shuffle, decision=decision,
        limit_test=_int(f"{name}: limit_test", value.get("limit_test"), optional=True),
        batch_size=_int(f"{name}: batch_size", value.get("batch_size", 128)),
        seed=_int(f"{name}: seed", value.get("seed", 0), minimum=0), description=description,
    )


def load_plan(plan: Union[str, os.PathLike]) -> Plan:
    """A built-in plan by name (``digits``, ``paper``: `PLAN_DIRECTORY`) or a plan file."""
    path = Path(plan)
    if not path.suffix and not path.exists():
        path = PLAN_DIRECTORY / f"{plan}.json"
        if not path.is_file():
            built_in = sorted(file.stem for file in PLAN_DIRECTORY.glob("*.json"))
            raise PlanError(f"--plan: expected a plan file or one of {', '.join(built_in)}, got {str(plan)!r}")
    if not path.is_file():
        raise FileNotFoundError(f"--plan {path}: no such file")
    try:
        value = json.loads(path.read_text())
    except ValueError as error:
        raise PlanError(f"{path}: not valid JSON: {error}") from None
    return parse_plan(value, path.stem)


def shrink(plan: Plan, epochs: Optional[int] = None, limit_train: Optional[int] = None,
           limit_test: Optional[int] = None, smoke: bool = False) -> Plan:
    """The plan with every run's epochs / images overridden (None: unchanged). ``smoke``: the
    smallest plan of the same shape, for tests (1 epoch, 16 train and 8 test images, batch 8,
    iterative attacks 2 iterations, CW 2 steps, decision-based 2 images 5 steps)."""
    if smoke:
        epochs, limit_train, limit_test = epochs or 1, limit_train or 16, limit_test or 8
    train = {key: value for key, value in (("epochs", epochs), ("limit_train", limit_train),
                                           ("limit_test", limit_test)) if value is not None}
    if smoke:
        train.update(batch_size=8, eval_batch_size=8)
    runs = {name: dataclasses.replace(run, config=dataclasses.replace(run.config, **train))
            for name, run in plan.runs.items()}
    changes: Dict[str, Any] = {"runs": runs}
    if limit_test is not None:
        changes["limit_test"] = limit_test
    if smoke:
        changes.update(attacks=tuple(_small_attack(spec) for spec in plan.attacks), batch_size=8)
        if plan.white_box:
            changes["white_box"] = dict(plan.white_box, attacks=tuple(map(_small_attack, plan.white_box["attacks"])),
                                        limit=4)
        if plan.decision:
            changes["decision"] = dict(plan.decision, n=2, steps=5)
    return dataclasses.replace(plan, **changes)


def _small_attack(spec: AttackSpec) -> AttackSpec:
    if spec.iterations is not None:
        return dataclasses.replace(spec, iterations=min(spec.iterations, 2))
    if spec.steps is not None:
        return dataclasses.replace(spec, steps=min(spec.steps, 2), binary_steps=1)
    return spec


# ---------------------------------------------------------------------------------------------
# Steps

TRAIN, ATTACK, EVALUATE = "train", "attack", "eval"
_NOT_HASHED = ("device", "data_path")


@dataclass(frozen=True)
class Step:
    """One unit of work: ``kind`` (train, attack, eval), ``name`` (the run, source or target),
    ``config`` (JSON-able, holding the keys of the steps it reads) and those keys, ``depends``."""

    kind: str
    name: str
    config: Dict[str, Any]
    depends: Tuple[str, ...] = ()

    @property
    def key(self) -> str:
        """``<kind>-<name>-<12 hex digits of the config's SHA-256>``: the step's directory."""
        text = json.dumps({"kind": self.kind, "config": self.config}, sort_keys=True, separators=(",", ":"))
        return f"{self.kind}-{self.name}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"

    def to_dict(self) -> Dict[str, Any]:
        return {"kind": self.kind, "name": self.name, "config": self.config, "depends": list(self.depends)}

    @classmethod
    def from_dict(cls, value: Mapping[str, Any]) -> "Step":
        return cls(value["kind"], value["name"], copy.deepcopy(dict(value["config"])), tuple(value["depends"]))


def _train_step(run: Run) -> Step:
    config = {key: value for key, value in run.config.to_dict().items() if key not in _NOT_HASHED}
    return Step(TRAIN, run.name, {"train": config})


def build_steps(plan: Plan) -> List[Step]:
    """The plan's steps in an order that runs each after the steps it reads."""
    used = set(plan.targets) | set(plan.sources) | {source for source, _ in plan.gray_box}
    trains = {name: _train_step(run) for name, run in plan.runs.items() if name in used}
    common = {"data": plan.data, "limit_test": plan.limit_test, "batch_size": plan.batch_size, "seed": plan.seed}
    attacks: Dict[str, Step] = {}
    for source in dict.fromkeys([*plan.sources, *(source for source, _ in plan.gray_box)]):
        trained = trains[source].key
        attacks[source] = Step(ATTACK, source, {**common, "source": trained,
                                                "attacks": [str(spec) for spec in plan.attacks]}, (trained,))
    evaluations = []
    for target in plan.targets:
        transfer = [{"setting": "black-box", "source": source, "attack_step": attacks[source].key}
                    for source in plan.sources if source != target]
        transfer += [{"setting": "gray-box", "source": source, "attack_step": attacks[source].key}
                     for source, gray_targets in plan.gray_box if target in gray_targets and source != target]
        white_box = decision = None
        if plan.white_box and target in plan.white_box["targets"]:
            white_box = {"attacks": [str(spec) for spec in plan.white_box["attacks"]], "limit": plan.white_box["limit"]}
        if plan.decision and target in plan.decision["targets"]:
            decision = {key: plan.decision[key] for key in ("attack", "n", "steps")}
        trained = trains[target].key
        config = {**common, "target": trained, "labels": plan.runs[target].labels(), "transfer": transfer,
                  "white_box": white_box, "noise": list(plan.noise), "patch_shuffle": list(plan.patch_shuffle),
                  "decision": decision}
        evaluations.append(Step(EVALUATE, target, config, (trained, *(item["attack_step"] for item in transfer))))
    return [*trains.values(), *attacks.values(), *evaluations]
