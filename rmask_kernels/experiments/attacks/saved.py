"""The saved adversarial-example file: one ``.pt`` holding :func:`craft`'s tensors (uint8
images, index, label, source prediction) and JSON-like metadata, with a human-readable index
CSV beside it, both written atomically. :func:`load_adversarial` checks what it reads and
raises :class:`AdversarialFileError` naming the file."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Union

import torch

from ..checkpoint import atomic_write
from .inputs import describe

__all__ = ["AdversarialFileError", "index_csv_path", "load_adversarial", "save_adversarial"]


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
            f"{where}: 'adversarial' must be a uint8 tensor [N, C, H, W], got {describe(adversarial)}"
        )
    count = adversarial.shape[0]
    arrays = {"adversarial": adversarial}
    for key in _ARRAYS[1:]:
        value = data[key]
        integer = isinstance(value, torch.Tensor) and not value.is_floating_point() and value.dtype != torch.bool
        if not integer or value.dim() != 1:
            raise AdversarialFileError(f"{where}: {key!r} must be a 1-D integer tensor, got {describe(value)}")
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
