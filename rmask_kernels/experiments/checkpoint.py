"""Training checkpoints: written atomically, loaded with a clear error when damaged.

A checkpoint is a dict saved with torch.save holding only tensors and plain Python values
(it loads with ``weights_only=True``, so loading one runs no code). `train` writes:

    format, format_version   "rmask_kernels.checkpoint", 1
    version, torch_version   library and torch versions that wrote it
    config                   the full TrainConfig as a JSON-able dict
    model_spec               the ModelSpec to rebuild the network (model_zoo.load_model)
    model                    the model's state_dict: weights, BN statistics AND masks
    optimizer, scheduler     their state_dicts
    epoch, global_step       epochs completed, optimizer steps taken
    best_accuracy            best test accuracy so far
    rng                      RNG states (see `capture_rng_state`) and the data-order seed
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable, Dict, List, Mapping, Optional, Union

import numpy as np
import torch

FORMAT = "rmask_kernels.checkpoint"
FORMAT_VERSION = 1
REQUIRED_KEYS = ("config", "model_spec", "model", "epoch")

PathLike = Union[str, os.PathLike]


class CheckpointError(ValueError):
    """A checkpoint file that is truncated, corrupted, or not a checkpoint of this library."""


def save_checkpoint(path: PathLike, state: Mapping[str, Any]) -> Path:
    """Write ``state`` to ``path`` atomically (see `atomic_write`); returns the path."""
    state = {"format": FORMAT, "format_version": FORMAT_VERSION, **state}
    return atomic_write(path, lambda handle: torch.save(state, handle))


def atomic_write(path: PathLike, write: Callable[[BinaryIO], Any]) -> Path:
    """Call ``write(handle)`` on a temporary file in ``path``'s directory, flush and fsync it,
    then rename it over ``path``. A crash or an error at any point leaves either the old file
    or the complete new one, and no temporary file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False)
    try:
        with handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        # The temporary file is private (0600); give the result the usual permissions.
        os.chmod(handle.name, 0o666 & ~_umask())
        os.replace(handle.name, path)  # atomic within one file system (same directory)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(handle.name)
        raise
    _fsync_directory(path.parent)
    return path


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it
    os.umask(mask)
    return mask


def _fsync_directory(directory: Path) -> None:
    # The rename itself lives in the directory: sync it so it survives a power loss.
    # Not possible on every platform (Windows); the file's own data is already synced.
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def load_checkpoint(path: PathLike, map_location: Union[str, torch.device, None] = "cpu") -> Dict[str, Any]:
    """The checkpoint at ``path``. FileNotFoundError when it is not there; CheckpointError
    naming the file when it is truncated, corrupted or not one of this library's checkpoints."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # a damaged zip or pickle fails in many ways; all mean "unreadable"
        raise CheckpointError(
            f"checkpoint {path} is unreadable (truncated or corrupted?): {type(error).__name__}: {error}"
        ) from error
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an rmask_kernels training checkpoint (no {FORMAT!r} format tag)")
    if state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path} has format version {state.get('format_version')!r}; this library reads {FORMAT_VERSION}"
        )
    missing = [key for key in REQUIRED_KEYS if key not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {', '.join(missing)}")
    return state


def dataclass_from_dict(cls, values: Mapping[str, Any], unknown_message: str):
    """``cls(**values)`` for a dataclass a checkpoint stores as a dict (the TrainConfig, the
    ModelSpec), refusing keys that are not its fields with a ValueError: ``unknown_message``
    formatted with ``unknown`` and ``known`` (sorted lists of field names)."""
    known = {field.name for field in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(unknown_message.format(unknown=unknown, known=sorted(known)))
    return cls(**values)


# ---------------------------------------------------------------------------------------------
# RNG states, in a form that loads with weights_only=True (tensors, ints, tuples)


def capture_rng_state(augment_generators: Optional[List[torch.Tensor]] = None, data_seed: Optional[int] = None) -> Dict[str, Any]:
    """torch (CPU and every CUDA device), Python ``random`` and numpy global states, plus the
    augmentation generators' states (one per DDP rank) and the data-order seed."""
    bit_generator, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": {
            "bit_generator": bit_generator,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "augment": list(augment_generators or []),
        "data_seed": data_seed,
    }


def restore_rng_state(rng: Mapping[str, Any]) -> None:
    """Restore the global states saved by `capture_rng_state` (the augmentation generators
    and the data-order seed are the caller's to restore)."""
    torch.set_rng_state(rng["torch"])
    cuda_states = rng.get("cuda") or []
    if cuda_states and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda_states)
    version, internal, gauss_next = rng["python"]
    random.setstate((version, tuple(internal), gauss_next))
    state = rng["numpy"]
    np.random.set_state(
        (state["bit_generator"], state["keys"].numpy().astype(np.uint32), state["position"], state["has_gauss"],
         state["cached_gaussian"])
    )
