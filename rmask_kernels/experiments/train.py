"""Training with the paper's recipe: run directories, exact resume, DistributedDataParallel.

``train(config, run_dir)`` writes into ``run_dir``:

    config.json   the TrainConfig (JSON)
    log.jsonl     one JSON object per epoch: epoch, lr, train_loss, train_accuracy,
                  test_loss, test_accuracy, seconds, global_step (accuracies are fractions)
    last.pt       checkpoint after the latest epoch (see checkpoint.py); ``resume=True`` continues it
    best.pt       checkpoint of the epoch with the best test accuracy

Exact resume: the data order of an epoch comes from (seed, epoch) alone, the augmentation
generator's state and the global RNG states are saved every epoch, so a run interrupted and
resumed from last.pt ends with the same weights, bit for bit, as one that was not (on CPU;
on GPU only as far as the kernels are deterministic).

Several processes: launched by ``torchrun`` (RANK / WORLD_SIZE / LOCAL_RANK in the
environment), every rank builds the same model and masks from the config, takes its shard of
each epoch's order, and DDP averages the gradients (gloo on CPU, nccl on GPU). ``batch_size``
is the global batch, split evenly. BatchNorm statistics are per rank during a step (DDP's
default, no SyncBatchNorm) and averaged across ranks after each epoch. Only rank 0 writes files.
The process plumbing (process group, collectives, DDP wrapping) lives in `distributed`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import sys
import time
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from .. import __version__
from ..backends import BACKENDS
from ..nn import BN_STATS
from .checkpoint import (
    atomic_write, capture_rng_state, dataclass_from_dict, load_checkpoint, restore_rng_state, save_checkpoint,
)
from .data import DATASETS, ImageData, batches, default_augmentation, load_dataset
from .distributed import (
    DistributedContext, all_gather, all_reduce_sum, average_batchnorm_statistics, check_same_masks,
    init_process_group, resolve_device, wrap_ddp,
)
from .inference import check_amp, evaluating, mixed_precision, model_device
from .model_zoo import MODELS, MaskRatio, ModelSpec, build_model, check_model_options, parse_mask_ratio

__all__ = [
    "PRESETS",
    "DistributedContext",
    "TrainConfig",
    "evaluate",
    "model_spec",
    "train",
]

CONFIG_FILE, LOG_FILE, LAST_CHECKPOINT, BEST_CHECKPOINT = "config.json", "log.jsonl", "last.pt", "best.pt"

# The paper's recipes by dataset; TrainConfig's own defaults are the CIFAR-10 one. The digits
# take the MNIST recipe.
PRESETS: Dict[str, Dict[str, Any]] = {
    "cifar10": dict(model="resnet18", epochs=350, milestones=(150, 250)),
    "mnist": dict(model="small", epochs=50, milestones=(20, 40)),
    "digits": dict(model="small", epochs=50, milestones=(20, 40)),
}

# What may differ between a run and its resumption: nothing that changes the computation
# of the epochs already done.
RESUME_MAY_CHANGE = ("epochs", "device", "eval_batch_size", "data_path")


@dataclass
class TrainConfig:
    """Everything that defines a training run (saved as config.json and in every checkpoint).
    Defaults: the paper's CIFAR-10 recipe; `TrainConfig.for_data` applies the dataset's."""

    # data
    data: str = "cifar10"
    data_path: Optional[str] = None
    augment: bool = True  # the paper's crop (+ flip on CIFAR-10), see data.default_augmentation
    limit_train: Optional[int] = None  # first N train images only: for smoke tests
    limit_test: Optional[int] = None  # first N test images only: for smoke tests
    # model and masks (see model_zoo.ModelSpec)
    model: str = "resnet18"
    mask_ratio: MaskRatio = 0.0
    mask_layers: str = "shallow"
    mask_mode: str = "neuron"
    group_size: Optional[int] = None
    mask_seed: int = 0
    bn_stats: str = "all"
    backend: str = "auto"
    # the paper's controls (resnet18, resnet50, densenet121, senet18; see model_zoo.ModelSpec)
    width_multiplier: float = 1.0  # channels × this in the stages mask_layers selects
    channels_fraction: float = 1.0  # only this fraction of their channels, and no masks
    deep_dropout: Optional[str] = None  # "dropout2d:P" or "dropblock:P:BLOCK" in stages 3 and 4
    # optimization: SGD with momentum, lr × gamma at each milestone epoch
    epochs: int = 350
    batch_size: int = 128  # global: split evenly across DDP ranks
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    milestones: Tuple[int, ...] = (150, 250)
    gamma: float = 0.1
    label_smoothing: float = 0.0
    amp: Optional[str] = None  # mixed precision: None (float32), "bf16" or "fp16" (with a GradScaler)
    seed: int = 0  # initial weights, data order, augmentation
    eval_batch_size: int = 500
    device: Optional[str] = None  # None: cuda when available, else cpu

    def __post_init__(self):
        if self.data not in DATASETS:
            raise ValueError(f"data must be one of {DATASETS}, got {self.data!r}")
        if self.model not in MODELS:
            raise ValueError(f"model must be one of {MODELS}, got {self.model!r}")
        if self.bn_stats not in BN_STATS:
            raise ValueError(f"bn_stats must be one of {BN_STATS}, got {self.bn_stats!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        check_amp(self.amp)
        self.mask_ratio = parse_mask_ratio(self.mask_ratio)
        self.deep_dropout = check_model_options(self.model, self.mask_ratio, self.mask_layers, self.width_multiplier,
                                                self.channels_fraction, self.deep_dropout)
        self.width_multiplier, self.channels_fraction = float(self.width_multiplier), float(self.channels_fraction)
        self.milestones = tuple(int(m) for m in self.milestones)
        if list(self.milestones) != sorted(self.milestones):
            raise ValueError(f"milestones must be increasing epochs, got {self.milestones}")
        for name in ("epochs", "batch_size", "eval_batch_size", "limit_train", "limit_test"):
            value = getattr(self, name)
            minimum = 0 if name == "epochs" else 1
            if value is None and name.startswith("limit"):
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
        if self.lr <= 0 or self.momentum < 0 or self.weight_decay < 0 or not 0 <= self.label_smoothing < 1:
            raise ValueError(
                f"need lr > 0, momentum >= 0, weight_decay >= 0, 0 <= label_smoothing < 1; got lr={self.lr}, "
                f"momentum={self.momentum}, weight_decay={self.weight_decay}, label_smoothing={self.label_smoothing}"
            )

    @classmethod
    def for_data(cls, data: str, **overrides) -> "TrainConfig":
        """The paper's recipe for ``data`` (`PRESETS`), with ``overrides``."""
        if data not in PRESETS:
            raise ValueError(f"data must be one of {tuple(PRESETS)}, got {data!r}")
        return cls(**{"data": data, **PRESETS[data], **overrides})

    def to_dict(self) -> Dict[str, Any]:
        config = dataclasses.asdict(self)
        config["milestones"] = list(self.milestones)  # JSON has no tuples: keep round trips equal
        return config

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> "TrainConfig":
        return dataclass_from_dict(cls, config, "unknown training config fields {unknown}; known: {known}")


def model_spec(config: TrainConfig, data: ImageData) -> ModelSpec:
    """The ModelSpec that ``config`` trains on ``data``."""
    return ModelSpec.for_data(
        config.model, data, mask_ratio=config.mask_ratio, mask_layers=config.mask_layers,
        mask_mode=config.mask_mode, group_size=config.group_size, mask_seed=config.mask_seed,
        bn_stats=config.bn_stats, backend=config.backend, width_multiplier=config.width_multiplier,
        channels_fraction=config.channels_fraction, deep_dropout=config.deep_dropout,
    )


# ---------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def _evaluation_sums(model: nn.Module, data: ImageData, batch_size: int, device: torch.device,
                     rank: int = 0, world_size: int = 1, amp: Optional[str] = None) -> torch.Tensor:
    """[summed loss, correct, count] over this rank's shard of ``data`` (every image once
    across the ranks), float64 on ``device``; under ``amp``'s autocast as the model trains."""
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    with evaluating(model):
        for images, labels in batches(data, batch_size, rank=rank, world_size=world_size, equal_shards=False):
            images, labels = images.to(device), labels.to(device)
            with mixed_precision(amp, device):
                logits = model(images)
            sums[0] += F.cross_entropy(logits.double(), labels, reduction="sum")
            sums[1] += (logits.argmax(1) == labels).sum()
            sums[2] += len(labels)
    return sums


def evaluate(model: nn.Module, data: ImageData, batch_size: int = 500, *,
             device: Union[str, torch.device, None] = None) -> Tuple[float, float]:
    """(mean cross-entropy, accuracy as a fraction) of ``model`` (taking [0, 1] pixels) on
    ``data``, in eval mode (the model's training flags are restored after), without gradients.
    ``device``: where to run, by default the model's."""
    device = torch.device(device) if device is not None else model_device(model)
    loss, correct, count = _evaluation_sums(model, data, batch_size, device).tolist()
    if count == 0:
        raise ValueError(f"evaluate: {data!r} holds no images")
    return loss / count, correct / count


# ---------------------------------------------------------------------------------------------
# Helpers of the loop


def _derived_seed(seed: int, purpose: str, rank: int = 0) -> int:
    # Distinct streams per purpose and rank from one user seed (ranks must not crop alike).
    return zlib.crc32(f"{seed}/{purpose}/{rank}".encode())


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)  # CPU and every CUDA device
    random.seed(seed)
    np.random.seed(seed % 2**32)


def _limit(data: ImageData, count: Optional[int]) -> ImageData:
    return data if count is None or count >= len(data) else data.subset(slice(0, count))


def _check_resumable(saved: Mapping[str, Any], config: TrainConfig, path: Path) -> None:
    saved = TrainConfig.from_dict(saved).to_dict()
    current = config.to_dict()
    changed = [key for key in current if key not in RESUME_MAY_CHANGE and saved[key] != current[key]]
    if changed:
        differences = ", ".join(f"{key}: {saved[key]!r} -> {current[key]!r}" for key in changed)
        raise ValueError(
            f"cannot resume {path} with a different configuration ({differences}); only "
            f"{', '.join(RESUME_MAY_CHANGE)} may change on resume"
        )


def _write_json(path: Path, value: Any) -> None:
    text = json.dumps(value, indent=2) + "\n"
    atomic_write(path, lambda handle: handle.write(text.encode()))


def _trim_log(path: Path, epochs_done: int) -> None:
    """Keep the log lines of the epochs the checkpoint holds: an interruption between writing
    a line and the checkpoint (or in the middle of a line) must not leave stale records."""
    kept = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and isinstance(record.get("epoch"), int) and record["epoch"] <= epochs_done:
                kept.append(line + "\n")
    text = "".join(kept)
    atomic_write(path, lambda handle: handle.write(text.encode()))


def _append_log(path: Path, record: Mapping[str, Any]) -> None:
    with open(path, "a") as handle:
        handle.write(json.dumps(record) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


class _NoProgress:
    """Stands in for a tqdm bar when bars are off or tqdm is not installed."""

    def __init__(self, iterable):
        self.iterable = iterable

    def __iter__(self):
        return iter(self.iterable)

    def set_postfix(self, *args, **kwargs):
        pass

    def close(self):
        pass


def _progress(iterable, total: int, description: str, enabled: bool):
    if not enabled:
        return _NoProgress(iterable)
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoProgress(iterable)
    return tqdm(iterable, total=total, desc=description, leave=False, dynamic_ncols=True, file=sys.stderr)


def _train_epoch(model: nn.Module, bar, optimizer: torch.optim.Optimizer, device: torch.device,
                 context: DistributedContext, label_smoothing: float, amp: Optional[str],
                 scaler: torch.amp.GradScaler) -> Tuple[torch.Tensor, int]:
    """One pass over ``bar`` (the epoch's batches, maybe in a progress bar), forward under
    ``amp``'s autocast, the loss scaled by ``scaler`` (a no-op unless fp16); returns
    ([summed loss, correct, count] over ALL ranks, steps)."""
    model.train()
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    steps = 0
    refresh = 1 if device.type == "cpu" else 10  # reading the sums syncs a GPU: not every step there
    for images, labels in bar:
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with mixed_precision(amp, device):
            logits = model(images)
            loss = F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)  # skipped if fp16 overflowed; the scale then shrinks
        scaler.update()
        steps += 1
        with torch.no_grad():
            sums[0] += loss.detach().double() * len(labels)
            sums[1] += (logits.argmax(1) == labels).sum()
            sums[2] += len(labels)
        if steps % refresh == 0:
            loss_sum, correct, count = sums.tolist()
            bar.set_postfix(loss=f"{loss_sum / count:.4f}", acc=f"{correct / count:.2%}")
    bar.close()
    return all_reduce_sum(sums, context), steps


# ---------------------------------------------------------------------------------------------
# The run


def train(config: TrainConfig, run_dir: Union[str, os.PathLike], *, resume: bool = False, quiet: bool = False) -> Path:
    """Train as ``config`` says, writing into ``run_dir`` (see the module docstring); returns it.

    ``resume``: continue from ``run_dir/last.pt`` (the saved config must agree with ``config``
    except for `RESUME_MAY_CHANGE`, e.g. more epochs). Without it, a ``run_dir`` that already
    holds a last.pt is refused rather than overwritten. ``quiet``: no progress bars or epoch
    lines (bars are also off when stderr is not a terminal). Under torchrun, runs as one DDP rank.
    """
    context = DistributedContext.from_environment()
    device = resolve_device(config.device, context)
    created_group = init_process_group(context, device)
    try:
        return _run(config, Path(run_dir), context, device, resume, quiet)
    finally:
        if created_group:
            dist.destroy_process_group()


def _run(config: TrainConfig, run_dir: Path, context: DistributedContext, device: torch.device,
         resume: bool, quiet: bool) -> Path:
    last_path, best_path, log_path = run_dir / LAST_CHECKPOINT, run_dir / BEST_CHECKPOINT, run_dir / LOG_FILE
    if config.batch_size % context.world_size:
        raise ValueError(f"batch_size {config.batch_size} does not split evenly across {context.world_size} processes")
    checkpoint = None
    if resume:
        checkpoint = load_checkpoint(last_path)  # every rank reads it: several machines need a shared file system
        _check_resumable(checkpoint["config"], config, last_path)
    elif last_path.exists():
        raise FileExistsError(f"{run_dir} already holds a run ({last_path.name}): resume it or choose another run directory")

    train_data, test_data = load_dataset(config.data, config.data_path)
    train_data, test_data = _limit(train_data, config.limit_train), _limit(test_data, config.limit_test)
    spec = model_spec(config, train_data)
    # Every rank draws the same initial weights and masks from the config's seeds.
    model = build_model(spec, init_seed=config.seed)
    if checkpoint is not None:
        saved_spec = ModelSpec.from_dict(checkpoint["model_spec"])
        if saved_spec != spec:
            raise ValueError(f"{last_path} holds a {saved_spec}, but this data and config give a {spec}")
        model.load_state_dict(checkpoint["model"])  # weights, BN statistics and masks
    model.to(device)
    check_same_masks(model, context)
    train_model = wrap_ddp(model, device) if context.enabled else model

    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, list(config.milestones), gamma=config.gamma)
    scaler = torch.amp.GradScaler(device.type, enabled=config.amp == "fp16")
    augment = default_augmentation(config.data) if config.augment else None
    augment_generator = torch.Generator().manual_seed(_derived_seed(config.seed, "augment", context.rank))
    start_epoch, global_step, best_accuracy = 0, 0, -1.0
    if checkpoint is not None:
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        if checkpoint.get("scaler"):
            scaler.load_state_dict(checkpoint["scaler"])
        restore_rng_state(checkpoint["rng"])
        augment_states = checkpoint["rng"].get("augment") or []
        if len(augment_states) == context.world_size:
            augment_generator.set_state(augment_states[context.rank])
        else:
            warnings.warn(
                f"{last_path} was written by {len(augment_states)} process(es), this run has {context.world_size}: "
                "the augmentation continues from fresh generators, so the run will not match an uninterrupted one"
            )
        start_epoch, global_step, best_accuracy = checkpoint["epoch"], checkpoint["global_step"], checkpoint["best_accuracy"]
    else:
        _seed_everything(config.seed)

    show = context.is_main and not quiet
    if context.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        _write_json(run_dir / CONFIG_FILE, config.to_dict())
        _trim_log(log_path, start_epoch)  # a fresh run: an empty log
        if show:
            where = f"{context.world_size} processes" if context.enabled else str(device)
            print(f"training {spec.name} on {train_data!r} ({where}), epochs {start_epoch + 1}..{config.epochs}, "
                  f"run directory {run_dir}", flush=True)
            if start_epoch >= config.epochs:
                print(f"{last_path} already holds {start_epoch} epochs: nothing to do (raise --epochs to continue)")

    per_rank_batch = config.batch_size // context.world_size
    for epoch in range(start_epoch, config.epochs):
        started = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        loader = batches(
            train_data, per_rank_batch, shuffle=True, seed=config.seed, epoch=epoch, augment=augment,
            generator=augment_generator, rank=context.rank, world_size=context.world_size,
        )
        bar = _progress(loader, len(loader), f"epoch {epoch + 1}/{config.epochs}", show and sys.stderr.isatty())
        train_sums, steps = _train_epoch(train_model, bar, optimizer, device, context, config.label_smoothing,
                                         config.amp, scaler)
        global_step += steps
        scheduler.step()
        average_batchnorm_statistics(model, context)
        test_sums = all_reduce_sum(
            _evaluation_sums(model, test_data, config.eval_batch_size, device, context.rank, context.world_size,
                             config.amp),
            context,
        )
        train_loss, train_correct, train_count = train_sums.tolist()
        test_loss, test_correct, test_count = test_sums.tolist()
        record = {
            "epoch": epoch + 1,
            "lr": lr,
            "train_loss": train_loss / max(train_count, 1),
            "train_accuracy": train_correct / max(train_count, 1),
            "test_loss": test_loss / max(test_count, 1),
            "test_accuracy": test_correct / max(test_count, 1),
            "seconds": time.perf_counter() - started,
            "global_step": global_step,
        }
        improved = record["test_accuracy"] > best_accuracy
        best_accuracy = max(best_accuracy, record["test_accuracy"])
        augment_states = all_gather(augment_generator.get_state(), context)  # every rank's, for exact resume
        if context.is_main:
            state = {
                "version": __version__,
                "torch_version": str(torch.__version__),  # a str subclass weights_only refuses
                "config": config.to_dict(),
                "model_spec": spec.to_dict(),
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),  # empty unless fp16
                "epoch": epoch + 1,
                "global_step": global_step,
                "best_accuracy": best_accuracy,
                "test_accuracy": record["test_accuracy"],
                "world_size": context.world_size,
                "rng": capture_rng_state(augment_states, data_seed=config.seed),
            }
            # best.pt before last.pt: an interruption in between redoes this epoch on resume
            # (identically) and rewrites best.pt, so the two never disagree for long.
            if improved:
                save_checkpoint(best_path, state)
            save_checkpoint(last_path, state)
            _append_log(log_path, record)
            if show:
                print(
                    f"epoch {epoch + 1}/{config.epochs}  lr {lr:.4g}  train loss {record['train_loss']:.4f} "
                    f"acc {record['train_accuracy']:.2%}  test loss {record['test_loss']:.4f} "
                    f"acc {record['test_accuracy']:.2%}  {record['seconds']:.1f} s",
                    flush=True,
                )
    return run_dir
