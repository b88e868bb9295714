"""``rmask``: the paper's experiments from the command line.

    rmask train --data digits --model small --mask-ratio 0.9 --epochs 20 --run-dir runs/rm09
    rmask train --run-dir runs/rm09 --resume --epochs 30
    rmask attack --source runs/source --data digits --attack fgsm-16 pgd-1-20-16 --out adv/
    rmask eval --target runs/normal runs/rm09 --adversarial adv/ --data digits --noise 16 --out results/
    rmask reproduce --plan digits --out study/
    torchrun --standalone --nproc_per_node 2 -m rmask_kernels.experiments.cli train --data cifar10 ...

(``python -m rmask_kernels.experiments.cli`` works wherever ``rmask`` does.)

Subcommands live in `COMMANDS` (name -> `Command`); a module adds one with `register`, giving
a function that adds its arguments to an argparse parser and one that runs it and returns the
exit status.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.nn as nn

from ..backends import BACKENDS
from ..nn import BN_STATS
from .attacks import (
    AttackSpec, AttackSpecError, Ensemble, attacks_by_name, craft, load_adversarial, parse_attack, save_adversarial,
)
from .checkpoint import atomic_write, load_checkpoint
from .data import DATASETS, ImageData, load_dataset
from .distributed import resolve_device
from .evaluate import (
    DECISION_ATTACKS, TransferResult, clean_accuracy, decision_based_eval, defense_success_rate, noise_robustness,
    patch_shuffle_accuracy, to_markdown, transfer_predictions, transfer_setting, white_box_result, write_csv,
)
from .inference import AMP_DTYPES, MixedPrecision
from .model_zoo import MODELS, load_model, mask_checksum, masks_of
from .plots import GridExamples, example_grid, plot_accuracy_vs_eps
from . import reproduce
from .train import BEST_CHECKPOINT, CONFIG_FILE, LAST_CHECKPOINT, PRESETS, TrainConfig, train


@dataclass(frozen=True)
class Command:
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


COMMANDS: Dict[str, Command] = {}


def register(name: str, help: str, add_arguments: Callable[[argparse.ArgumentParser], None],
             run: Callable[[argparse.Namespace], int]) -> None:
    """Add subcommand ``name``: ``add_arguments(parser)`` declares its options, ``run(args)``
    runs it and returns the exit status."""
    COMMANDS[name] = Command(help, add_arguments, run)


# ---------------------------------------------------------------------------------------------
# rmask train

_CONFIG_FIELDS = {field.name for field in dataclasses.fields(TrainConfig)}


def _add_train_arguments(parser: argparse.ArgumentParser) -> None:
    # Options left out stay out of the namespace (SUPPRESS): the dataset's recipe, or on
    # --resume the run's saved config, supplies them.
    unset = argparse.SUPPRESS
    cifar = TrainConfig()
    data = parser.add_argument_group("data")
    data.add_argument("--data", choices=DATASETS, default=unset, help="dataset (default: cifar10)")
    data.add_argument("--data-path", default=unset, help="CIFAR-10 archive/directory or MNIST directory")
    data.add_argument("--no-augment", dest="augment", action="store_false", default=unset,
                      help="no random crop / flip")
    data.add_argument("--limit-train", type=int, default=unset, metavar="N",
                      help="train on the first N images only (for smoke tests)")
    data.add_argument("--limit-test", type=int, default=unset, metavar="N",
                      help="evaluate on the first N test images only (for smoke tests)")

    model = parser.add_argument_group("model and Random Mask")
    model.add_argument("--model", choices=MODELS, default=unset,
                       help="network (default: resnet18 on cifar10, small on mnist and digits); resnet50, "
                            "densenet121, senet18: the paper's other source networks")
    model.add_argument("--mask-ratio", default=unset,
                       help="fraction of neurons masked, e.g. 0.9 (default 0: a normal network); the staged models "
                            "(resnet18, resnet50, densenet121, senet18) also take separate ratios per stage group, "
                            "e.g. '012:0.9,34:0.3'")
    model.add_argument("--mask-layers", default=unset,
                       help="where: shallow (default; stages '012' of the staged models, vgg19 first 4 convs), "
                            "deep, all, or stage digits like '0123'")
    model.add_argument("--mask-mode", choices=("neuron", "spatial", "same", "group"), default=unset,
                       help="neuron (default, the paper's), spatial ('same' in the paper), group")
    model.add_argument("--group-size", type=int, default=unset, help="channels per pattern with --mask-mode group")
    model.add_argument("--mask-seed", type=int, default=unset, help="seed of the masks (default 0)")
    model.add_argument("--bn-stats", choices=BN_STATS, default=unset,
                       help="BN batch statistics over all positions (default, the paper's) or the kept ones (faster)")
    model.add_argument("--backend", choices=BACKENDS, default=unset,
                       help="masked-conv implementation (default auto: the fused kernels; reference to compare)")

    controls = parser.add_argument_group(
        "the paper's controls (staged models: resnet18, resnet50, densenet121, senet18)"
    )
    controls.add_argument("--width-multiplier", type=float, default=unset, metavar="W",
                          help="channels of the stages --mask-layers selects times W (the paper: 2, '2x wider'; "
                               "default 1)")
    controls.add_argument("--channels-fraction", type=float, default=unset, metavar="F",
                          help="keep only this fraction of the selected stages' channels, and no masks (the paper's "
                               "'fewer channels instead of masks', e.g. 0.1; needs mask ratio 0; default 1)")
    controls.add_argument("--deep-dropout", default=unset, metavar="SPEC",
                          help="dropout in stages 3 and 4 in training: 'dropout2d:P' or 'dropblock:P:BLOCK' "
                               "(e.g. dropblock:0.1:3; default none)")

    optim = parser.add_argument_group("optimization (defaults: the paper's recipe for --data)")
    optim.add_argument("--epochs", type=int, default=unset,
                       help=f"default {cifar.epochs} on cifar10, {PRESETS['mnist']['epochs']} on mnist and digits")
    optim.add_argument("--batch-size", type=int, default=unset, help=f"global batch (default {cifar.batch_size})")
    optim.add_argument("--lr", type=float, default=unset, help=f"SGD learning rate (default {cifar.lr})")
    optim.add_argument("--momentum", type=float, default=unset, help=f"default {cifar.momentum}")
    optim.add_argument("--weight-decay", type=float, default=unset, help=f"default {cifar.weight_decay}")
    optim.add_argument("--milestones", type=int, nargs="*", default=unset, metavar="EPOCH",
                       help="epochs at which lr is multiplied by --gamma (default 150 250 on cifar10, 20 40 on mnist)")
    optim.add_argument("--gamma", type=float, default=unset, help=f"default {cifar.gamma}")
    optim.add_argument("--label-smoothing", type=float, default=unset, help="default 0 (the paper's control: 0.1)")
    optim.add_argument("--amp", choices=tuple(AMP_DTYPES), default=unset,
                       help="mixed precision (torch.autocast): bf16, or fp16 with a GradScaler (default: float32)")
    optim.add_argument("--seed", type=int, default=unset, help="initial weights, data order, augmentation (default 0)")
    optim.add_argument("--eval-batch-size", type=int, default=unset, help=f"default {cifar.eval_batch_size}")

    run = parser.add_argument_group("run")
    run.add_argument("--device", default=unset, help="cpu, cuda or cuda:N (default: cuda when available)")
    run.add_argument("--run-dir", type=Path, default=None,
                     help="output directory (default runs/<data>-<model>-<mask>-seed<seed>)")
    run.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its last.pt")
    run.add_argument("--quiet", action="store_true", help="no progress bars or per-epoch lines")
    run.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")


def default_run_dir(config: TrainConfig) -> Path:
    if isinstance(config.mask_ratio, dict):
        mask = "mask" + "+".join(f"{stages}_{ratio:g}" for stages, ratio in config.mask_ratio.items())
    elif config.mask_ratio > 0:
        mask = f"mask{config.mask_ratio:g}-{config.mask_layers}"
    else:
        mask = "normal"
    if config.mask_ratio and config.mask_mode != "neuron":
        mask += f"-{config.mask_mode}" + (f"{config.group_size}" if config.group_size else "")
    if config.width_multiplier != 1:
        mask += f"-width{config.width_multiplier:g}"
    if config.channels_fraction != 1:
        mask += f"-channels{config.channels_fraction:g}-{config.mask_layers}"
    if config.deep_dropout:
        mask += "-" + config.deep_dropout.replace(":", "_")
    amp = f"-{config.amp}" if config.amp else ""
    return Path("runs") / f"{config.data}-{config.model}-{mask}{amp}-seed{config.seed}"


def _saved_config(run_dir: Path) -> dict:
    """The config of the run in ``run_dir``: its config.json, else its last.pt's."""
    config_path = run_dir / CONFIG_FILE
    if config_path.is_file():
        try:
            return json.loads(config_path.read_text())
        except ValueError as error:
            raise ValueError(f"{config_path} is not valid JSON: {error}") from error
    if (run_dir / LAST_CHECKPOINT).is_file():
        return load_checkpoint(run_dir / LAST_CHECKPOINT)["config"]
    raise FileNotFoundError(f"nothing to resume in {run_dir}: no {CONFIG_FILE} or {LAST_CHECKPOINT}")


def _run_train(args: argparse.Namespace) -> int:
    overrides = {key: value for key, value in vars(args).items() if key in _CONFIG_FIELDS}
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.resume:
        if args.run_dir is None:
            raise ValueError("--resume needs --run-dir (the run to continue)")
        config = TrainConfig.from_dict({**_saved_config(args.run_dir), **overrides})
        run_dir = args.run_dir
    else:
        config = TrainConfig.for_data(overrides.pop("data", "cifar10"), **overrides)
        run_dir = args.run_dir if args.run_dir is not None else default_run_dir(config)
    train(config, run_dir, resume=args.resume, quiet=args.quiet)
    return 0


register("train", "train a model (the paper's recipe by default)", _add_train_arguments, _run_train)


# ---------------------------------------------------------------------------------------------
# Shared by rmask attack and rmask eval


def _add_data_and_run_arguments(parser: argparse.ArgumentParser, batch_size: int) -> None:
    parser.add_argument("--data", choices=DATASETS, required=True, help="dataset whose test images are used")
    parser.add_argument("--data-path", type=Path, default=None, help="CIFAR-10 archive/directory or MNIST directory")
    parser.add_argument("--limit", type=int, default=None, metavar="N", help="the first N test images only")
    parser.add_argument("--batch-size", type=int, default=batch_size, help=f"default {batch_size}")
    parser.add_argument("--seed", type=int, default=0, help="random starts, noise and shuffles (default 0)")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    parser.add_argument("--backend", choices=BACKENDS, default=None,
                        help="masked-conv implementation (default: the one each model was trained with)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--amp", choices=tuple(AMP_DTYPES), default=None,
                        help="run the models under torch.autocast in bf16 or fp16 (default: float32)")


def _prepare(args: argparse.Namespace) -> None:
    """Checks and settings common to attack and eval, before anything slow runs."""
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be a positive number of images, got {args.limit}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be positive, got {args.batch_size}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)


def _test_data(args: argparse.Namespace) -> ImageData:
    _, test = load_dataset(args.data, args.data_path)
    return test if args.limit is None or args.limit >= len(test) else test.subset(slice(0, args.limit))


def _attack_specs(names: Sequence[str], flag: str) -> List[AttackSpec]:
    try:
        return attacks_by_name(names)
    except AttackSpecError as error:
        raise ValueError(f"{flag}: {error}") from None


def _checkpoint_file(path: Path) -> Path:
    """What `load_model` reads for ``path``: a run directory's best.pt, or the file itself."""
    return path / BEST_CHECKPOINT if path.is_dir() else path


def _model_name(path: Path) -> str:
    """A short name for tables: the run directory's name (``+last`` for its last.pt), or
    the checkpoint file's stem."""
    file = _checkpoint_file(path)
    if file.name in (BEST_CHECKPOINT, LAST_CHECKPOINT):
        run = file.resolve().parent.name
        return run if file.name == BEST_CHECKPOINT else f"{run}+last"
    return file.stem


@dataclass(frozen=True, eq=False)
class _Model:
    name: str
    path: Path  # the checkpoint file
    model: nn.Module
    masked: bool  # has Random-Mask layers


def _load_models(paths: Sequence[Path], flag: str, args: argparse.Namespace, device: torch.device) -> List[_Model]:
    for path in paths:
        if not path.exists():
            raise FileNotFoundError(f"{flag} {path}: no such file or directory")
    names = [_model_name(path) for path in paths]
    if len(set(names)) < len(names):
        names = [str(path) for path in paths]  # run directories with equal names: keep them apart
    models = []
    for name, path in zip(names, paths):
        model = load_model(path, device, args.backend)
        model = MixedPrecision(model, args.amp) if args.amp else model
        models.append(_Model(name, _checkpoint_file(path).resolve(), model, bool(masks_of(model))))
    return models


def _file_name(spec: AttackSpec) -> str:
    # The short name, or the canonical form (with ':' ',' '=') when a parameter is off its default.
    return re.sub(r"[^A-Za-z0-9.=-]+", "_", spec.short_name)


def _natural_key(path: Path) -> list:
    # fgsm-8 before fgsm-16: numbers compare as numbers.
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


# ---------------------------------------------------------------------------------------------
# rmask attack


def _add_attack_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--source", type=Path, action="extend", nargs="+", required=True, metavar="RUN_OR_CKPT",
                        help="source model: a run directory (its best.pt) or a checkpoint; several: their ensemble "
                             "(averaged logits)")
    parser.add_argument("--attack", action="extend", nargs="+", required=True, metavar="SPEC",
                        help="attacks, eps and step in /255: fgsm-8, pgd-1-20-16 (step-iters-eps), mi-fgsm-1-20-16, "
                             "cw-l2-40, 'pgd:eps=8,step=2,iters=7,random_start=true'; 'paper' for the paper's grid, "
                             "'paper:pgd' for one family of it")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR",
                        help="writes DIR/<attack>.pt and DIR/<attack>.csv (the index) per attack")
    _add_data_and_run_arguments(parser, batch_size=128)


def _run_attack(args: argparse.Namespace) -> int:
    _prepare(args)
    specs = _attack_specs(args.attack, "--attack")
    device = resolve_device(args.device)
    test = _test_data(args)
    sources = _load_models(args.source, "--source", args, device)
    source = sources[0].model if len(sources) == 1 else Ensemble(loaded.model for loaded in sources).eval()
    # What eval needs to name the setting (white-, gray- or black-box) of each target.
    source_meta = [
        {"name": loaded.name, "path": str(loaded.path), "masked": loaded.masked,
         "mask_checksum": mask_checksum(loaded.model)}
        for loaded in sources
    ]
    generator = torch.Generator().manual_seed(args.seed)  # PGD's random start, if asked for
    for spec in specs:
        crafted = craft(source, test.images, test.labels, spec, batch_size=args.batch_size, generator=generator)
        meta = {
            "short_name": spec.short_name, "sources": source_meta, "data": args.data,
            "data_path": str(args.data_path) if args.data_path is not None else None,
            "limit": args.limit, "seed": args.seed,
        }
        path = save_adversarial(args.out / f"{_file_name(spec)}.pt", crafted, meta)
        crafted_count = len(crafted["index"])
        fooled = int((crafted["source_prediction"] != crafted["label"]).sum())
        rate = f"{fooled / crafted_count:.1%}" if crafted_count else "n/a"
        print(f"{spec.short_name}: {crafted_count}/{crafted['num_images']} test images crafted (those the source "
              f"classifies correctly), source fooled on {fooled} ({rate}) -> {path}", flush=True)
    return 0


register("attack", "craft adversarial examples on source model(s) for the transfer experiments",
         _add_attack_arguments, _run_attack)


# ---------------------------------------------------------------------------------------------
# rmask eval

_TRANSFER_COLUMNS = ("target", "attack", "source", "setting", "clean_accuracy", "defense_success_rate",
                     "transfer_rate", "counted")
RESULTS_MARKDOWN, RESULTS_CSV = "results.md", "results.csv"
ACCURACY_PLOT, EXAMPLES_PLOT = "accuracy_vs_eps.png", "examples.png"


def _add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", type=Path, action="extend", nargs="+", required=True, metavar="RUN_OR_CKPT",
                        help="models to evaluate: run directories (their best.pt) or checkpoints")
    parser.add_argument("--adversarial", type=Path, action="extend", nargs="+", default=[], metavar="DIR_OR_FILE",
                        help="examples from rmask attack: .pt files, or directories of them")
    parser.add_argument("--white-box", action="extend", nargs="+", default=[], metavar="SPEC",
                        help="attack each target directly with these specs (as rmask attack --attack)")
    parser.add_argument("--noise", type=float, action="extend", nargs="+", default=[], metavar="EPS",
                        help="accuracy under Gaussian noise, sigma eps/2 truncated to ±eps (eps in /255)")
    parser.add_argument("--patch-shuffle", type=int, action="extend", nargs="+", default=[], metavar="S",
                        help="accuracy with each image cut into an S×S grid of patches, randomly permuted (paper: 2 4 8)")
    parser.add_argument("--boundary", type=int, default=None, metavar="N",
                        help="decision-based attack on N correctly classified images (needs foolbox)")
    parser.add_argument("--decision-attack", choices=DECISION_ATTACKS, default="boundary",
                        help="the attack --boundary runs (default boundary)")
    parser.add_argument("--decision-steps", type=int, default=None,
                        help="its steps (default foolbox's: boundary 25000, hop-skip-jump 64)")
    parser.add_argument("--examples", type=int, default=8, metavar="N",
                        help=f"examples in {EXAMPLES_PLOT} (default 8)")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR",
                        help=f"writes {RESULTS_MARKDOWN}, {RESULTS_CSV} (+ one CSV per other table) and the plots")
    _add_data_and_run_arguments(parser, batch_size=256)


def _adversarial_files(paths: Sequence[Path]) -> List[Path]:
    files: List[Path] = []
    for path in paths:
        if path.is_dir():
            found = sorted(path.glob("*.pt"), key=_natural_key)
            if not found:
                raise ValueError(f"--adversarial {path}: no adversarial-example files (*.pt) in this directory")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"--adversarial {path}: no such file or directory")
    return list(dict.fromkeys(files))


def _transfer_row(target: _Model, attack: str, family: str, eps: Optional[float], source: str, setting: str,
                  clean: float, result: TransferResult) -> Dict[str, Any]:
    return {"target": target.name, "attack": attack, "source": source, "setting": setting,
            "clean_accuracy": clean, **result.as_row(), "family": family, "eps": eps}


def _family(spec_text: Optional[str], fallback: str) -> str:
    try:
        return parse_attack(spec_text).name
    except (AttackSpecError, TypeError):
        return fallback


def _note(message: str) -> None:
    print(f"rmask eval: note: {message}", file=sys.stderr)


def _run_eval(args: argparse.Namespace) -> int:
    _prepare(args)
    files = _adversarial_files(args.adversarial)
    white_box = _attack_specs(args.white_box, "--white-box") if args.white_box else []
    for eps in args.noise:
        if not 0 <= eps <= 255:
            raise ValueError(f"--noise {eps:g}: eps must be in [0, 255] (/255 units)")
    if args.boundary is not None and args.boundary < 1:
        raise ValueError(f"--boundary must be a positive number of images, got {args.boundary}")
    if not (files or white_box or args.noise or args.patch_shuffle or args.boundary):
        raise ValueError("nothing to evaluate: give --adversarial, --white-box, --noise, --patch-shuffle or --boundary")
    device = resolve_device(args.device)
    test = _test_data(args)
    height, width = test.image_size
    for s in args.patch_shuffle:  # before any slow work
        if s < 1 or height % s or width % s:
            raise ValueError(f"--patch-shuffle {s}: must be a positive divisor of the image size {height}×{width}")
    targets = _load_models(args.target, "--target", args, device)
    order = {target.name: position for position, target in enumerate(targets)}
    clean = {target.name: clean_accuracy(target.model, test, args.batch_size) for target in targets}
    # The example grid shows what fools the first Random-Mask target.
    shown = next((target for target in targets if target.masked), None)
    examples = GridExamples(max(args.examples, 0))

    transfer: List[Dict[str, Any]] = []
    for file in files:
        crafted = load_adversarial(file)
        meta = crafted["meta"]
        if meta.get("data") not in (None, args.data):
            raise ValueError(f"{file} was crafted on {meta['data']} test images, not --data {args.data}")
        attack = meta.get("short_name") or meta.get("attack") or file.stem
        sources = meta.get("sources") or []
        source_names = ", ".join(source.get("name", "?") for source in sources) or "?"
        source_fooled = crafted["source_prediction"] != crafted["label"]
        for target in targets:
            predictions = transfer_predictions(target.model, crafted, test, args.batch_size)
            setting = transfer_setting(sources, target.path, target.masked)
            if setting == "white-box" and len(sources) == 1:
                # Crafted on this very model: the same numbers as --white-box gives (the paper's
                # filter would make the rate 0 by construction).
                result = white_box_result(dict(crafted, source_prediction=predictions.adversarial))
            else:
                result = defense_success_rate(predictions.adversarial, predictions.clean, crafted["label"], source_fooled)
            transfer.append(_transfer_row(target, attack, _family(meta.get("attack"), attack), meta.get("eps"),
                                          source_names, setting, clean[target.name], result))
            if target is shown:
                examples.add(test, crafted, predictions.adversarial, predictions.transferred(crafted))

    generator = torch.Generator().manual_seed(args.seed)
    for spec in white_box:
        for target in targets:
            crafted = craft(target.model, test.images, test.labels, spec, batch_size=args.batch_size, generator=generator)
            transfer.append(_transfer_row(target, spec.short_name, spec.name, spec.eps, target.name, "white-box",
                                          clean[target.name], white_box_result(crafted)))
            if target is shown:
                examples.add(test, crafted, crafted["source_prediction"], crafted["source_prediction"] != crafted["label"])
    transfer.sort(key=lambda row: order[row["target"]])  # stable: attacks keep their order per target

    noise = [
        {"target": target.name, "eps": int(eps) if eps.is_integer() else eps, "clean_accuracy": clean[target.name],
         "accuracy": noise_robustness(target.model, test, eps / 255, args.batch_size, seed=args.seed)}
        for target in targets for eps in args.noise
    ]
    shuffled = [
        {"target": target.name, "s": s, "clean_accuracy": clean[target.name],
         "accuracy": patch_shuffle_accuracy(target.model, test, s, args.batch_size, seed=args.seed)}
        for target in targets for s in args.patch_shuffle
    ]
    decision: List[Dict[str, Any]] = []
    if args.boundary:
        try:
            for target in targets:
                result = decision_based_eval(target.model, test, args.decision_attack, n=args.boundary,
                                             steps=args.decision_steps, seed=args.seed, batch_size=args.batch_size)
                decision.append({"target": target.name, **result.as_row()})
        except ImportError as error:
            _note(f"--boundary skipped: {error}")

    # (title, rows, markdown columns, decimals, CSV file); distortions are small numbers.
    tables = [
        ("Transfer: defense success rate (target accuracy on examples that fooled the source, among those "
         "it classifies correctly when clean)", transfer, _TRANSFER_COLUMNS, 3, RESULTS_CSV),
        ("Random noise (Gaussian, sigma eps/2 truncated to ±eps; eps in /255)", noise, None, 3, "noise.csv"),
        ("Patch shuffling (s×s grid of patches, randomly permuted)", shuffled, None, 3, "patch_shuffle.csv"),
        ("Decision-based attack (mean squared distortion, larger = more robust)", decision, None, 6, "decision.csv"),
    ]
    markdown = "".join(
        f"## {title}\n\n{to_markdown(rows, columns, digits)}\n" for title, rows, columns, digits, _ in tables if rows
    )
    print(markdown, end="", flush=True)
    atomic_write(args.out / RESULTS_MARKDOWN, lambda handle: handle.write(markdown.encode()))
    for _, rows, _, _, name in tables:
        if rows:
            write_csv(args.out / name, rows)
    _plot(args, transfer, examples, shown, test)
    print(f"results: {args.out / RESULTS_MARKDOWN}", flush=True)
    return 0


def _plot(args: argparse.Namespace, transfer: List[Dict[str, Any]], examples: GridExamples,
          shown: Optional[_Model], test: ImageData) -> None:
    try:  # matplotlib is an optional extra, imported when a figure is drawn
        # Rows without an eps (CW) or with nothing counted have no point on the plot.
        if any(row["eps"] is not None and not math.isnan(row["defense_success_rate"]) for row in transfer):
            plot_accuracy_vs_eps(transfer, args.out / ACCURACY_PLOT)
        if examples.count:
            example_grid(*examples.tensors(), args.out / EXAMPLES_PLOT, n=examples.count, classes=test.classes,
                         title=f"Adversarial examples that fool {shown.name}")
        elif transfer and args.examples > 0:
            reason = "no target has Random-Mask layers" if shown is None else f"no example fools {shown.name}"
            _note(f"no {EXAMPLES_PLOT}: {reason}")
    except ImportError as error:
        _note(f"no plots: {error}")


register("eval", "evaluate target models: transfer (black/gray-box), white-box, noise, patch shuffling, "
         "decision-based", _add_eval_arguments, _run_eval)


# ---------------------------------------------------------------------------------------------
# rmask reproduce (rmask_kernels/experiments/reproduce.py)

register("reproduce", "run a plan's whole study (train, attack, evaluate) resumably and write its report",
         reproduce.add_arguments, reproduce.run)


# ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rmask", description="Random-Mask CNN experiments (arXiv 2007.14249).")
    subcommands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in COMMANDS.items():
        subparser = subcommands.add_parser(name, help=command.help, description=command.help)
        command.add_arguments(subparser)
        subparser.set_defaults(run=command.run)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Run ``rmask`` with ``argv`` (default: sys.argv[1:]); returns the exit status. Bad input
    (a missing or damaged file, an invalid option value) is reported in one line, status 1."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, OSError) as error:  # CheckpointError is a ValueError
        print(f"rmask {args.command}: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
