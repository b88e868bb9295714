"""Datasets, augmentation, normalization and batching for the paper's experiments.

Images are float32 tensors [N, C, H, W] with pixels in [0, 1]; labels are int64. The
data is never normalized here: normalization is the model's first layer (`Normalize`), so
attacks work in [0, 1] pixel space (eps in /255 of that range) and an 8-bit round trip is
``round(x * 255)`` (`to_uint8`).

Sources (no torchvision): CIFAR-10's python archive and MNIST's IDX files at a path the
user gives, and scikit-learn's embedded handwritten digits (the demo's and tests' data).
"""

from __future__ import annotations

import functools
import gzip
import math
import pickle
import posixpath
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

PathLike = Union[str, Path]
Augmentation = Callable[..., torch.Tensor]  # augment(images, generator=None) -> images

DATASETS = ("digits", "cifar10", "mnist")

# The paper's normalization constants (those of its released code).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2023, 0.1994, 0.2010)
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
MNIST_MEAN = (0.1307,)
MNIST_STD = (0.3081,)
DIGIT_CLASSES = tuple(str(digit) for digit in range(10))


@dataclass(frozen=True, eq=False)  # eq=False: comparing tensors with == is not a bool
class ImageData:
    """A labelled image set plus the per-channel mean/std of the model's `Normalize` layer."""

    images: torch.Tensor  # float32 [N, C, H, W] in [0, 1]
    labels: torch.Tensor  # int64 [N]
    name: str  # e.g. "cifar10-train"
    classes: Tuple[str, ...]
    mean: Tuple[float, ...]
    std: Tuple[float, ...]

    def __post_init__(self):
        if self.images.dim() != 4 or not self.images.is_floating_point():
            raise ValueError(f"images must be a float tensor [N, C, H, W], got {self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.dim() != 1 or self.labels.dtype != torch.int64:
            raise ValueError(f"labels must be an int64 tensor [N], got {self.labels.dtype} {tuple(self.labels.shape)}")
        if len(self.labels) != len(self.images):
            raise ValueError(f"{len(self.labels)} labels for {len(self.images)} images")
        # Frozen: coerce through object.__setattr__ so lists and numpy floats are accepted.
        for field in ("classes", "mean", "std"):
            object.__setattr__(self, field, tuple(getattr(self, field)))
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        if not len(self.mean) == len(self.std) == self.channels:
            raise ValueError(f"mean {self.mean} and std {self.std} need one entry per channel ({self.channels})")

    def __len__(self) -> int:
        return len(self.labels)

    def __repr__(self) -> str:
        c, h, w = self.images.shape[1:]
        return f"ImageData(name={self.name!r}, {len(self)} images {c}x{h}x{w}, {len(self.classes)} classes)"

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    @property
    def image_size(self) -> Tuple[int, int]:
        return tuple(self.images.shape[2:])

    def subset(self, indices) -> "ImageData":
        """The images at ``indices`` (a tensor, list or slice), same name, classes and mean/std."""
        if not isinstance(indices, slice):
            indices = torch.as_tensor(indices, dtype=torch.long)
        return ImageData(self.images[indices], self.labels[indices], self.name, self.classes, self.mean, self.std)

    def normalization(self) -> "Normalize":
        """The `Normalize` layer a model trained on this data starts with."""
        return Normalize(self.mean, self.std)


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel: the model's first layer, so attacks see [0, 1] pixels.

    mean/std are buffers of shape [1, C, 1, 1]: saved in the state_dict and moved by ``.to()``.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        mean = torch.as_tensor(mean, dtype=torch.float32).flatten()
        std = torch.as_tensor(std, dtype=torch.float32).flatten()
        if mean.numel() == 0 or mean.shape != std.shape:
            raise ValueError(f"mean and std need the same non-zero number of channels, got {mean.tolist()} and {std.tolist()}")
        if not bool((std > 0).all()):
            raise ValueError(f"std must be positive, got {std.tolist()}")
        self.register_buffer("mean", mean.view(1, -1, 1, 1))
        self.register_buffer("std", std.view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        mean = ", ".join(f"{m:.4f}" for m in self.mean.flatten().tolist())
        std = ", ".join(f"{s:.4f}" for s in self.std.flatten().tolist())
        return f"mean=({mean}), std=({std})"


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] floats to 8-bit pixels, ROUNDING to the nearest level (the paper's saved images)."""
    return (images.clamp(0, 1) * 255).round().to(torch.uint8)


def from_uint8(images: torch.Tensor) -> torch.Tensor:
    """8-bit pixels back to float32 in [0, 1]."""
    if images.dtype != torch.uint8:
        raise TypeError(f"images must be uint8, got {images.dtype}")
    return images.to(torch.float32) / 255


def _resize(images: torch.Tensor, size: int) -> torch.Tensor:
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        raise ValueError(f"size must be a positive int, got {size!r}")
    if tuple(images.shape[2:]) == (size, size):
        return images
    # Bilinear mixes neighbours, so values stay in [0, 1] up to rounding: clamp that away.
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False).clamp_(0, 1)


# ---------------------------------------------------------------------------------------------
# CIFAR-10: the python archive (cifar-10-python.tar.gz / cifar-10-batches-py/)

_CIFAR_ARCHIVE = "cifar-10-python.tar.gz"
_CIFAR_DIRECTORY = "cifar-10-batches-py"
_CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR_TEST = "test_batch"
_CIFAR_META = "batches.meta"  # optional: the class names
_CIFAR_EXPECTED = f"{_CIFAR_ARCHIVE}, or {_CIFAR_DIRECTORY}/ holding data_batch_1..5 and test_batch"


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles only what CIFAR's batches hold: dicts, lists, bytes and numpy arrays.

    Unpickling an arbitrary file can run arbitrary code (torchvision loads CIFAR with plain
    pickle all the same). The user supplies the path; refusing every other global closes
    that hole anyway at no cost for the real archive.
    """

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),  # written by numpy 1.x (the real archive)
        ("numpy._core.multiarray", "_reconstruct"),  # written by numpy 2.x
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # how protocol 2 stores bytes written by Python 3
    }

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name} (not part of a CIFAR-10 batch)")
        if module.startswith("numpy.") and module.endswith(".multiarray"):
            # Whichever of numpy._core (2.x) / numpy.core (1.x) this numpy has.
            multiarray = getattr(np, "_core", None) or np.core
            return getattr(multiarray.multiarray, name)
        return super().find_class(module, name)


def _unpickle(stream, where: str) -> dict:
    try:
        batch = _NumpyOnlyUnpickler(stream, encoding="bytes").load()
    except Exception as error:  # a truncated or foreign file fails in many ways; all mean "malformed"
        raise ValueError(f"{where} is not a readable CIFAR-10 batch (truncated or corrupted?): {error!r}") from error
    if not isinstance(batch, dict):
        raise ValueError(f"{where} is not a readable CIFAR-10 batch: a {type(batch).__name__}, expected a dict")
    return batch


def _entry(batch: dict, key: str, where: str):
    for candidate in (key.encode(), key):  # bytes keys (python-2 pickle); str keys if re-saved
        if candidate in batch:
            return batch[candidate]
    raise ValueError(f"{where} has no {key!r} entry (keys: {sorted(map(repr, batch))})")


def _cifar_batch(batch: dict, where: str) -> Tuple[np.ndarray, np.ndarray]:
    data = np.asarray(_entry(batch, "data", where))
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{where}: 'data' must be a uint8 array [N, 3072], got {data.dtype} {data.shape}")
    try:
        labels = np.asarray(_entry(batch, "labels", where), dtype=np.int64)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{where}: 'labels' is not a list of integers ({error})") from error
    if labels.ndim != 1 or len(labels) != len(data):
        raise ValueError(f"{where}: {labels.size} labels for {len(data)} images")
    if labels.size and not (0 <= labels.min() and labels.max() < 10):
        raise ValueError(f"{where}: labels must be in 0..9, got {labels.min()}..{labels.max()}")
    return data, labels


def _cifar_classes(meta: dict, where: str) -> Tuple[str, ...]:
    names = _entry(meta, "label_names", where)
    if not isinstance(names, (list, tuple)) or len(names) != 10:
        raise ValueError(f"{where}: 'label_names' must list 10 class names, got {names!r:.200}")
    return tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)


def _locate_cifar(path: Path) -> Path:
    """The archive file or the batch directory that ``path`` names or contains."""
    if path.is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"CIFAR-10 path {path} does not exist (expected {_CIFAR_EXPECTED})")
    if any((path / name).exists() for name in (*_CIFAR_TRAIN, _CIFAR_TEST)):
        return path
    if (path / _CIFAR_DIRECTORY).is_dir():  # prefer the extracted batches: no decompression
        return path / _CIFAR_DIRECTORY
    if (path / _CIFAR_ARCHIVE).is_file():
        return path / _CIFAR_ARCHIVE
    raise FileNotFoundError(f"no CIFAR-10 data in {path}: expected {_CIFAR_EXPECTED}")


def _read_cifar_directory(directory: Path) -> Dict[str, Tuple[dict, str]]:
    batches = {}  # name -> (unpickled batch, where it came from for error messages)
    for name in (*_CIFAR_TRAIN, _CIFAR_TEST, _CIFAR_META):
        file = directory / name
        if not file.is_file():
            if name == _CIFAR_META:
                continue
            raise FileNotFoundError(f"{file} is missing: a CIFAR-10 directory holds data_batch_1..5 and test_batch")
        with open(file, "rb") as stream:
            batches[name] = (_unpickle(stream, str(file)), str(file))
    return batches


def _read_cifar_archive(archive: Path) -> Dict[str, Tuple[dict, str]]:
    wanted = {*_CIFAR_TRAIN, _CIFAR_TEST, _CIFAR_META}
    batches = {}
    try:
        # Stream mode ("r|*"): one sequential pass over the gzip, members read as they pass and
        # nothing extracted to disk (random access would re-decompress from the start per member).
        with open(archive, "rb") as raw, tarfile.open(fileobj=raw, mode="r|*") as tar:
            for member in tar:
                name = posixpath.basename(member.name)
                if member.isfile() and name in wanted and name not in batches:
                    where = f"{archive}:{member.name}"
                    batches[name] = (_unpickle(tar.extractfile(member), where), where)
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as error:
        raise ValueError(f"{archive} is not a readable CIFAR-10 archive (corrupted or truncated?): {error}") from error
    missing = [name for name in (*_CIFAR_TRAIN, _CIFAR_TEST) if name not in batches]
    if missing:  # the archive exists but is incomplete: malformed, not missing
        raise ValueError(f"{archive} lacks {', '.join(missing)}: expected {_CIFAR_DIRECTORY}/data_batch_1..5 and test_batch")
    return batches


def load_cifar10(path: PathLike) -> Tuple[ImageData, ImageData]:
    """CIFAR-10 (train 50000, test 10000 images 3x32x32) from the standard python archive.

    ``path`` is ``cifar-10-python.tar.gz``, the extracted ``cifar-10-batches-py/`` directory,
    or a directory containing either. The tarball is read in place, not extracted. Raises
    FileNotFoundError when the data is not there, ValueError when it is malformed.
    """
    source = _locate_cifar(Path(path).expanduser())
    batches = _read_cifar_directory(source) if source.is_dir() else _read_cifar_archive(source)
    classes = _cifar_classes(*batches[_CIFAR_META]) if _CIFAR_META in batches else CIFAR10_CLASSES

    def split(names, split_name):
        parts = [_cifar_batch(*batches[name]) for name in names]
        data = np.concatenate([data for data, _ in parts])  # a fresh, writable array
        labels = np.concatenate([labels for _, labels in parts])
        # Each row is the R plane, then G, then B, each 32x32 row-major: exactly [3, 32, 32].
        images = torch.from_numpy(data).view(-1, 3, 32, 32).to(torch.float32).div_(255)
        return ImageData(images, torch.from_numpy(labels), f"cifar10-{split_name}", classes, CIFAR10_MEAN, CIFAR10_STD)

    return split(_CIFAR_TRAIN, "train"), split((_CIFAR_TEST,), "test")


# ---------------------------------------------------------------------------------------------
# MNIST: IDX files (optionally gzipped)

_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
_IDX_IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dimensions
_IDX_LABELS_MAGIC = 0x00000801  # unsigned bytes, 1 dimension


def _locate_mnist(path: Path) -> Path:
    if not path.is_dir():
        what = "does not exist" if not path.exists() else "is not a directory"
        expected = ", ".join(_MNIST_FILES.values())
        raise FileNotFoundError(f"MNIST path {path} {what}: expected a directory holding {expected} (each optionally .gz)")
    for directory in (path, path / "MNIST" / "raw", path / "raw"):  # plain, and torchvision's layout
        if any((directory / name).is_file() or (directory / f"{name}.gz").is_file() for name in _MNIST_FILES.values()):
            return directory
    return path  # nothing found: the per-file error below names what is expected


def _idx_file(directory: Path, name: str) -> Path:
    for candidate in (directory / name, directory / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    expected = ", ".join(_MNIST_FILES.values())
    raise FileNotFoundError(f"{directory / name} (or .gz) is missing: MNIST needs {expected} in {directory}")


def _read_idx(file: Path, magic: int, item_shape: Tuple[int, ...]) -> np.ndarray:
    try:
        raw = gzip.decompress(file.read_bytes()) if file.suffix == ".gz" else file.read_bytes()
    except (gzip.BadGzipFile, EOFError, zlib.error) as error:
        raise ValueError(f"{file} is not a readable gzip file (corrupted or truncated?): {error}") from error
    if len(raw) < 4 or int.from_bytes(raw[:4], "big") != magic:
        found = f"{int.from_bytes(raw[:4], 'big'):#010x}" if len(raw) >= 4 else f"only {len(raw)} bytes"
        raise ValueError(f"{file} is not an IDX file of the expected kind: magic {found}, expected {magic:#010x}")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{file} is truncated: {len(raw)} bytes, the IDX header alone takes {header}")
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))  # big-endian
    if dims[1:] != item_shape:
        raise ValueError(f"{file}: IDX dimensions {dims}, expected [N, {', '.join(map(str, item_shape))}]")
    expected = header + math.prod(dims)
    if len(raw) != expected:
        raise ValueError(f"{file}: {len(raw)} bytes, expected {expected} for IDX dimensions {dims} (truncated or padded?)")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def load_mnist(path: PathLike, size: Optional[int] = None) -> Tuple[ImageData, ImageData]:
    """MNIST (train 60000, test 10000 images 1x28x28) from its four IDX files in ``path``.

    Files ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``,
    ``t10k-labels-idx1-ubyte``, each optionally ``.gz``, directly in ``path`` or in
    ``path/MNIST/raw`` (torchvision's layout). ``size`` resizes bilinearly (28x28 kept by default).
    Raises FileNotFoundError when a file is not there, ValueError when one is malformed.
    """
    directory = _locate_mnist(Path(path).expanduser())

    def split(kind):
        images_file = _idx_file(directory, _MNIST_FILES[f"{kind}_images"])
        labels_file = _idx_file(directory, _MNIST_FILES[f"{kind}_labels"])
        pixels = _read_idx(images_file, _IDX_IMAGES_MAGIC, (28, 28))
        labels = _read_idx(labels_file, _IDX_LABELS_MAGIC, ())
        if len(labels) != len(pixels):
            raise ValueError(f"{labels_file} holds {len(labels)} labels for the {len(pixels)} images of {images_file}")
        if labels.size and labels.max() > 9:
            raise ValueError(f"{labels_file}: labels must be in 0..9, got up to {labels.max()}")
        images = torch.from_numpy(pixels.astype(np.float32)).unsqueeze(1).div_(255)  # astype copies: writable
        if size is not None:
            images = _resize(images, size)
        labels = torch.from_numpy(labels.astype(np.int64))
        return ImageData(images, labels, f"mnist-{kind}", DIGIT_CLASSES, MNIST_MEAN, MNIST_STD)

    return split("train"), split("test")


# ---------------------------------------------------------------------------------------------
# scikit-learn's handwritten digits: embedded, the demo's and the fast tests' data


def load_digits(size: int = 32, test_fraction: float = 0.25, seed: int = 0) -> Tuple[ImageData, ImageData]:
    """scikit-learn's 1797 handwritten digits (8x8, values 0..16) as 1 x size x size images in [0, 1].

    The split is stratified: within each class a permutation drawn from ``seed`` puts
    ``round(test_fraction * class count)`` images in the test set, so both splits keep the
    class balance; each split keeps the original order. mean/std come from the train split.
    """
    try:
        from sklearn.datasets import load_digits as sklearn_load_digits
    except ImportError as error:
        raise ImportError("load_digits needs scikit-learn (pip install scikit-learn)") from error
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    digits = sklearn_load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = _resize(images, size)
    labels = torch.tensor(digits.target, dtype=torch.int64)

    generator = torch.Generator().manual_seed(seed)
    is_test = torch.zeros(len(labels), dtype=torch.bool)
    for label in range(10):
        members = (labels == label).nonzero().flatten()
        count = round(test_fraction * len(members))
        is_test[members[torch.randperm(len(members), generator=generator)[:count]]] = True
    train_images = images[~is_test]
    # Population statistics of the train pixels: what the model's Normalize layer should use.
    mean, std = (train_images.mean().item(),), (train_images.std(correction=0).item(),)
    return (
        ImageData(train_images, labels[~is_test], "digits-train", DIGIT_CLASSES, mean, std),
        ImageData(images[is_test], labels[is_test], "digits-test", DIGIT_CLASSES, mean, std),
    )


def load_dataset(name: str, path: Optional[PathLike] = None, **kwargs) -> Tuple[ImageData, ImageData]:
    """``(train, test)`` of dataset ``name`` (one of `DATASETS`); ``path`` for cifar10 and mnist."""
    loaders = {"digits": load_digits, "cifar10": load_cifar10, "mnist": load_mnist}
    if name not in loaders:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    if name == "digits":
        if path is not None:
            raise ValueError(f"the digits are embedded (scikit-learn) and take no path, got path={str(path)!r}")
        return load_digits(**kwargs)
    if path is None:
        expected = _CIFAR_EXPECTED if name == "cifar10" else f"a directory of {', '.join(_MNIST_FILES.values())}"
        raise ValueError(f"dataset {name!r} needs a path to its files ({expected})")
    return loaders[name](path, **kwargs)


# ---------------------------------------------------------------------------------------------
# Augmentation


def random_crop_flip(
    images: torch.Tensor, padding: int = 4, flip: bool = True, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """The paper's augmentation on a batch: zero-pad by ``padding``, crop a random window of
    the original size per image, and (with ``flip``) mirror each image left-right with
    probability 1/2. Reproducible given ``generator``; its random numbers are drawn on the
    generator's device (CPU by default), so a CPU generator gives the same crops on any device.
    """
    if images.dim() != 4:
        raise ValueError(f"images must be [N, C, H, W], got shape {tuple(images.shape)}")
    if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
        raise ValueError(f"padding must be a non-negative int, got {padding!r}")
    n, c, h, w = images.shape
    draw_device = generator.device if generator is not None else torch.device("cpu")
    top = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device=draw_device).to(images.device)
    left = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device=draw_device).to(images.device)
    rows = top[:, None] + torch.arange(h, device=images.device)  # [N, H]: source row of each output row
    cols = left[:, None] + torch.arange(w, device=images.device)  # [N, W]
    if flip:
        mirrored = torch.rand(n, generator=generator, device=draw_device).to(images.device) < 0.5
        cols = torch.where(mirrored[:, None], cols.flip(1), cols)  # a flip reads the window right to left
    padded = F.pad(images, (padding, padding, padding, padding))  # zeros
    # Two gathers (rows, then columns) crop and flip every image at once, no loop over the batch.
    out = padded.gather(2, rows[:, None, :, None].expand(n, c, h, w + 2 * padding))
    return out.gather(3, cols[:, None, None, :].expand(n, c, h, w))


_FLIP_SYMMETRIC = {"cifar10": True, "mnist": False, "digits": False}  # digits are not mirror images


def default_augmentation(name: str) -> Optional[Augmentation]:
    """The paper's training augmentation for dataset ``name``: crop with padding 4 for all,
    plus the horizontal flip for cifar10. Call it as ``augment(images, generator=...)``."""
    if name not in _FLIP_SYMMETRIC:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    return functools.partial(random_crop_flip, padding=4, flip=_FLIP_SYMMETRIC[name])


# ---------------------------------------------------------------------------------------------
# Batching (single process and DistributedDataParallel)


def shard_indices(
    n: int, *, shuffle: bool = False, seed: int = 0, epoch: int = 0, rank: int = 0, world_size: int = 1,
    equal_shards: bool = True,
) -> torch.Tensor:
    """The indices of ``n`` items that ``rank`` of ``world_size`` processes handles, like
    torch's DistributedSampler: every rank draws the same permutation from ``seed + epoch``
    (no state: a resumed run gets the same order for the same epoch) and takes every
    ``world_size``-th entry from its ``rank``.

    ``equal_shards`` (training) first drops the last ``n % world_size`` entries of the order,
    so all ranks take the same number of steps (DDP hangs otherwise); with shuffling a
    different few are left out each epoch. ``equal_shards=False`` (evaluation) covers every
    item exactly once, shard sizes differing by at most one.
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an int in [0, {world_size}), got {rank!r}")
    if shuffle:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
    else:
        order = torch.arange(n)
    if equal_shards:
        order = order[: n - n % world_size]
    return order[rank::world_size]


class Batches:
    """Iterable of ``(images, labels)`` batches over ``data.images[indices]``, with ``len()``
    (the number of batches, for progress bars). Built by `batches`."""

    def __init__(self, data: ImageData, indices: torch.Tensor, batch_size: int, augment: Optional[Augmentation],
                 generator: Optional[torch.Generator], drop_last: bool):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        self.data, self.indices, self.batch_size = data, indices, batch_size
        self.augment, self.generator, self.drop_last = augment, generator, drop_last

    def __len__(self) -> int:
        if self.drop_last:
            return len(self.indices) // self.batch_size
        return -(-len(self.indices) // self.batch_size)

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            index = self.indices[start : start + self.batch_size]
            images = self.data.images[index]
            if self.augment is not None:
                images = self.augment(images, generator=self.generator)
            yield images, self.data.labels[index]


def batches(
    data: ImageData, batch_size: int, *, shuffle: bool = False, seed: int = 0, epoch: int = 0,
    augment: Optional[Augmentation] = None, generator: Optional[torch.Generator] = None,
    drop_last: bool = False, rank: int = 0, world_size: int = 1, equal_shards: bool = True,
) -> Batches:
    """Batches of ``data`` for one epoch: this rank's shard (`shard_indices`: the order from
    ``seed + epoch`` when shuffling, identical on every rank), cut into ``batch_size`` pieces,
    each passed through ``augment(images, generator=generator)`` if given.

    The order and the augmentation draw from different sources on purpose: the order must
    agree across ranks, while each rank should seed its own ``generator`` (e.g. ``seed + rank``)
    so that ranks do not crop their images alike.
    """
    indices = shard_indices(
        len(data), shuffle=shuffle, seed=seed, epoch=epoch, rank=rank, world_size=world_size, equal_shards=equal_shards
    )
    return Batches(data, indices, batch_size, augment, generator, drop_last)
