"""The experiments' models by name, always taking [0, 1] pixels.

A model is ``nn.Sequential(normalize=Normalize(mean, std), net=<network>)``: normalization is
its first layer, so attacks work in pixel space. Masks are buffers of the masked layers, so
they are in the state_dict and travel with every checkpoint.

A `ModelSpec` (JSON-able) holds everything needed to rebuild the same network, masks included;
checkpoints store it, so `load_model(checkpoint)` needs nothing else.
"""

from __future__ import annotations

import dataclasses
import os
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import torch
import torch.nn as nn

from ..models.densenet import densenet121
from ..models.resnet import resnet18, resnet50
from ..models.senet import senet18
from ..models.small import small_cnn
from ..models.stages import parse_deep_dropout, stage_scales
from ..models.vgg import vgg19
from .checkpoint import dataclass_from_dict, load_checkpoint
from .data import ImageData, Normalize

MODELS = ("resnet18", "vgg19", "small", "resnet50", "densenet121", "senet18")
# Models with stages 0 (stem) .. 4: separate ratios per stage group and the paper's controls.
STAGED_MODELS = ("resnet18", "resnet50", "densenet121", "senet18")
BUILDERS = {
    "resnet18": resnet18, "vgg19": vgg19, "small": small_cnn, "resnet50": resnet50, "densenet121": densenet121,
    "senet18": senet18,
}
MaskRatio = Union[float, Dict[str, float]]


def check_model_options(name: str, mask_ratio: MaskRatio, mask_layers: str, width_multiplier: float = 1.0,
                        channels_fraction: float = 1.0, deep_dropout: Optional[str] = None) -> Optional[str]:
    """Check the options model ``name`` (one of `MODELS`) takes beyond its masks (separate ratios
    per stage, the paper's controls) as the model will; returns ``deep_dropout`` in its
    canonical form."""
    if name not in STAGED_MODELS:
        if isinstance(mask_ratio, dict):
            raise ValueError(f"separate ratios per stage ({mask_ratio}) are for {', '.join(STAGED_MODELS)}, not {name}")
        controls = dict(width_multiplier=(width_multiplier, 1.0), channels_fraction=(channels_fraction, 1.0),
                        deep_dropout=(parse_deep_dropout(deep_dropout), None))
        for option, (value, default) in controls.items():
            if value != default:
                raise ValueError(f"{option} is for {', '.join(STAGED_MODELS)}: expected {default!r} for {name}, "
                                 f"got {value!r}")
        return None
    stage_scales(mask_ratio, mask_layers, width_multiplier, channels_fraction)
    return parse_deep_dropout(deep_dropout)


def parse_mask_ratio(value: Union[str, float, Mapping[str, float]]) -> MaskRatio:
    """A ratio (``0.5`` or ``"0.5"``), or separate ratios per ResNet stage group written
    ``"012:0.9,34:0.3"`` (or given as a mapping) -> float or {stages: ratio}."""
    if isinstance(value, Mapping):
        return {str(stages): float(ratio) for stages, ratio in value.items()}
    if isinstance(value, str):
        if ":" not in value:
            try:
                return float(value)
            except ValueError:
                raise ValueError(f"mask ratio must be a number or 'stages:ratio,...' like '012:0.9,34:0.3', got {value!r}") from None
        ratios: Dict[str, float] = {}
        for part in value.split(","):
            stages, _, ratio = part.partition(":")
            try:
                ratios[stages.strip()] = float(ratio)
            except ValueError:
                raise ValueError(f"mask ratio part {part!r} of {value!r} is not 'stages:ratio' (e.g. '012:0.9')") from None
        return ratios
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"mask ratio must be a number, a 'stages:ratio,...' string or a mapping, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class ModelSpec:
    """What `build_model` needs: the network, the data's shape and normalization, the masks."""

    name: str
    num_classes: int
    in_channels: int
    input_size: int
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    mask_ratio: MaskRatio = 0.0
    mask_layers: str = "shallow"
    mask_mode: str = "neuron"
    group_size: Optional[int] = None
    mask_seed: int = 0
    bn_stats: str = "all"
    backend: str = "auto"
    # The paper's controls (staged models only; see rk.models.resnet18). A spec saved before
    # these fields existed loads with these defaults, which build the same network.
    width_multiplier: float = 1.0
    channels_fraction: float = 1.0
    deep_dropout: Optional[str] = None

    def __post_init__(self):
        if self.name not in MODELS:
            raise ValueError(f"unknown model {self.name!r}; known: {', '.join(MODELS)}")
        object.__setattr__(self, "mask_ratio", parse_mask_ratio(self.mask_ratio))
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        deep_dropout = check_model_options(self.name, self.mask_ratio, self.mask_layers, self.width_multiplier,
                                           self.channels_fraction, self.deep_dropout)
        object.__setattr__(self, "width_multiplier", float(self.width_multiplier))
        object.__setattr__(self, "channels_fraction", float(self.channels_fraction))
        object.__setattr__(self, "deep_dropout", deep_dropout)

    @classmethod
    def for_data(cls, name: str, data: ImageData, **mask_options) -> "ModelSpec":
        """The spec of model ``name`` for images like ``data`` (channels, size, classes, mean/std)."""
        height, width = data.image_size
        if height != width:
            raise ValueError(f"the models take square images, {data.name} has {height}×{width}")
        return cls(name, len(data.classes), data.channels, height, data.mean, data.std, **mask_options)

    def to_dict(self) -> Dict[str, Any]:
        spec = dataclasses.asdict(self)
        spec["mean"], spec["std"] = list(self.mean), list(self.std)
        return spec

    @classmethod
    def from_dict(cls, spec: Mapping[str, Any]) -> "ModelSpec":
        return dataclass_from_dict(cls, spec, "model spec has unknown fields {unknown}; known: {known}")


def build_network(spec: ModelSpec) -> nn.Module:
    """The bare network of ``spec`` (takes normalized inputs)."""
    options = dict(
        mask_ratio=spec.mask_ratio, mask_layers=spec.mask_layers, mask_mode=spec.mask_mode,
        group_size=spec.group_size, seed=spec.mask_seed, input_size=spec.input_size,
        in_channels=spec.in_channels, bn_stats=spec.bn_stats, backend=spec.backend,
    )
    if spec.name in STAGED_MODELS:
        options.update(width_multiplier=spec.width_multiplier, channels_fraction=spec.channels_fraction,
                       deep_dropout=spec.deep_dropout)
    return BUILDERS[spec.name](spec.num_classes, **options)


def build_model(spec: ModelSpec, init_seed: Optional[int] = None) -> nn.Sequential:
    """``Sequential(normalize, net)`` for ``spec``, taking [0, 1] pixels. With ``init_seed`` the
    weights are drawn from that seed without touching torch's global generator (so every DDP
    rank, and a test rebuilding the model, gets the same initial weights). Masks come from
    ``spec.mask_seed`` either way."""
    if init_seed is None:
        network = build_network(spec)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)
            network = build_network(spec)
    return nn.Sequential(OrderedDict(normalize=Normalize(spec.mean, spec.std), net=network))


def masks_of(model: nn.Module) -> Dict[str, torch.Tensor]:
    """Every Random-Mask buffer of ``model`` by state_dict name."""
    return {name: buffer for name, buffer in model.named_buffers() if name == "mask" or name.endswith(".mask")}


def mask_checksum(model: nn.Module) -> int:
    """A CRC-32 of every mask (names, shapes and bits): equal on two models iff their masks
    agree (up to hash collisions), cheap to compare across DDP ranks."""
    checksum = 0
    for name, mask in masks_of(model).items():
        checksum = zlib.crc32(f"{name}{tuple(mask.shape)}".encode(), checksum)
        checksum = zlib.crc32(mask.detach().cpu().contiguous().numpy().tobytes(), checksum)
    return checksum


def load_model(path: Union[str, os.PathLike], device: Union[str, torch.device] = "cpu",
               backend: Optional[str] = None) -> nn.Sequential:
    """The trained model in ``path`` (a checkpoint, or a run directory: its best.pt), in eval
    mode on ``device``; ``backend`` overrides the one it was trained with (e.g. "reference")."""
    path = Path(path)
    if path.is_dir():
        path = path / "best.pt"
    checkpoint = load_checkpoint(path)
    spec = ModelSpec.from_dict(checkpoint["model_spec"])
    if backend is not None:
        spec = dataclasses.replace(spec, backend=backend)
    model = build_model(spec)
    model.load_state_dict(checkpoint["model"])
    return model.to(device).eval()
