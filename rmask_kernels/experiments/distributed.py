"""Training as several processes under ``torchrun`` (DistributedDataParallel), and the device
each process runs on.

`DistributedContext` is this process's rank among them, read from torchrun's RANK /
WORLD_SIZE / LOCAL_RANK (absent: one process, and every helper here does nothing). The rest
is what `train` needs around DDP: joining the process group (gloo on CPU, nccl on GPU),
summing and gathering across ranks, checking that every rank built the same Random Masks,
averaging BatchNorm statistics after each epoch, and wrapping the model.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from .model_zoo import mask_checksum

__all__ = [
    "DistributedContext",
    "all_gather",
    "all_reduce_sum",
    "average_batchnorm_statistics",
    "check_same_masks",
    "init_process_group",
    "resolve_device",
    "wrap_ddp",
]


@dataclass(frozen=True)
class DistributedContext:
    """This process's place among the DDP processes (one process: rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_environment(cls) -> "DistributedContext":
        """From torchrun's RANK / WORLD_SIZE / LOCAL_RANK (absent: one process)."""
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size <= 1:
            return cls()
        return cls(int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", "0")))

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(name: Optional[str], context: DistributedContext = DistributedContext()) -> torch.device:
    """``name`` ("cpu", "cuda", "cuda:1"; None: cuda when available), a DDP rank on CUDA
    taking its LOCAL_RANK's GPU when no index is given."""
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} asked for, but torch sees no CUDA device")
        if device.index is None:
            device = torch.device("cuda", context.local_rank if context.enabled else torch.cuda.current_device())
    return device


def init_process_group(context: DistributedContext, device: torch.device) -> bool:
    """Join torchrun's process group if not already in one; True if this call created it."""
    if not context.enabled or dist.is_initialized():
        return False
    if device.type == "cuda":
        torch.cuda.set_device(device)  # nccl and the *_object collectives use the current device
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return True


def all_reduce_sum(tensor: torch.Tensor, context: DistributedContext) -> torch.Tensor:
    if context.enabled:
        dist.all_reduce(tensor)
    return tensor


def all_gather(value: Any, context: DistributedContext) -> list:
    if not context.enabled:
        return [value]
    gathered = [None] * context.world_size
    dist.all_gather_object(gathered, value)
    return gathered


def check_same_masks(model: nn.Module, context: DistributedContext) -> None:
    # Masks are drawn from the config's seed, so they agree by construction; a rank that
    # built different ones (another library version, a different config) must not train.
    checksums = all_gather(mask_checksum(model), context)
    if len(set(checksums)) > 1:
        raise RuntimeError(f"DDP ranks built different Random Masks (mask checksums by rank: {checksums})")


def average_batchnorm_statistics(model: nn.Module, context: DistributedContext) -> None:
    # Each rank's BN running statistics saw only its shard; average them so that every rank
    # evaluates, and rank 0 saves, the same model.
    if not context.enabled:
        return
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.running_mean is not None:
            for statistic in (module.running_mean, module.running_var):
                dist.all_reduce(statistic)
                statistic.div_(context.world_size)


def wrap_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    # No buffer broadcast before every forward: the masks agree already (checked), and
    # re-broadcasting them would make each masked layer rebuild its index lists every step;
    # BN statistics are averaged after each epoch instead. (torch >= 2.13 renamed the option.)
    parameters = inspect.signature(nn.parallel.DistributedDataParallel).parameters
    no_sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in parameters else {"broadcast_buffers": False}
    device_ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids, **no_sync)
