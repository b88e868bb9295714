"""``rmask``: the paper's experiments from the command line.

    rmask train --data digits --model small --mask-ratio 0.9 --epochs 20 --run-dir runs/rm09
    rmask train --run-dir runs/rm09 --resume --epochs 30
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
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

from ..backends import BACKENDS
from ..nn import BN_STATS
from .checkpoint import load_checkpoint
from .data import DATASETS
from .model_zoo import MODELS
from .train import CONFIG_FILE, LAST_CHECKPOINT, PRESETS, TrainConfig, train


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
                       help="network (default: resnet18 on cifar10, small on mnist and digits)")
    model.add_argument("--mask-ratio", default=unset,
                       help="fraction of neurons masked, e.g. 0.9 (default 0: a normal network); resnet18 also "
                            "takes separate ratios per stage group, e.g. '012:0.9,34:0.3'")
    model.add_argument("--mask-layers", default=unset,
                       help="where: shallow (default; resnet18 '012', vgg19 first 4 convs), deep, all, or "
                            "resnet18 stage digits like '0123'")
    model.add_argument("--mask-mode", choices=("neuron", "spatial", "same", "group"), default=unset,
                       help="neuron (default, the paper's), spatial ('same' in the paper), group")
    model.add_argument("--group-size", type=int, default=unset, help="channels per pattern with --mask-mode group")
    model.add_argument("--mask-seed", type=int, default=unset, help="seed of the masks (default 0)")
    model.add_argument("--bn-stats", choices=BN_STATS, default=unset,
                       help="BN batch statistics over all positions (default, the paper's) or the kept ones (faster)")
    model.add_argument("--backend", choices=BACKENDS, default=unset,
                       help="masked-conv implementation (default auto: the fused kernels; reference to compare)")

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
    return Path("runs") / f"{config.data}-{config.model}-{mask}-seed{config.seed}"


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
