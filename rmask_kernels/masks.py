"""Random masks as the paper draws them, and the index lists the kernels use.

A mask is a bool tensor, True = kept. Exactly ``int(ratio * numel)`` entries of the drawn
pattern are masked, chosen uniformly without replacement from a seeded CPU
``torch.Generator`` (so the same seed gives the same mask on any machine). No rescaling.
"""

from __future__ import annotations

import zlib
from typing import NamedTuple, Optional, Sequence

import torch

MODES = ("neuron", "spatial", "group")
_MODE_ALIASES = {"same": "spatial"}  # the paper calls the spatial variant "same"


def check_ratio(ratio, name: str = "ratio") -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)):
        raise TypeError(f"{name} must be a float in [0, 1), got {type(ratio).__name__} {ratio!r}")
    if not 0.0 <= float(ratio) < 1.0:
        raise ValueError(f"{name} must be in [0, 1) (the fraction of outputs masked), got {ratio}")
    return float(ratio)


def check_mode(mode: str, group_size: Optional[int] = None, channels: Optional[int] = None, name: str = "mode") -> str:
    mode = _MODE_ALIASES.get(mode, mode)
    if mode not in MODES:
        raise ValueError(f"{name} must be one of {MODES} (or 'same' for 'spatial'), got {mode!r}")
    if mode == "group":
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0:
            raise ValueError(f"group_size must be a positive int with mode='group', got {group_size!r}")
        if channels is not None and channels % group_size != 0:
            raise ValueError(f"group_size must divide the {channels} channels, got group_size={group_size}")
    elif group_size is not None:
        raise ValueError(f"group_size is only used with mode='group', got group_size={group_size} with mode={mode!r}")
    return mode


def draw_seed() -> int:
    """A fresh seed from torch's global generator (so torch.manual_seed makes it reproducible)."""
    return int(torch.randint(0, 2**62, (1,)).item())


def layer_seed(seed: int, name: str) -> int:
    """The mask seed of the layer called ``name`` in a model seeded with ``seed``.

    Layers get distinct masks, and the same (seed, name) gives the same mask wherever the
    layer is built (rk.models or rk.convert_model)."""
    return (int(seed) * 1_000_003 + zlib.crc32(name.encode())) % 2**62


def random_mask(
    shape: Sequence[int],
    ratio: float,
    mode: str = "neuron",
    group_size: Optional[int] = None,
    seed: Optional[int] = None,
    device=None,
) -> torch.Tensor:
    """A fixed random mask over a conv layer's output (C, H, W); bool, True = kept.

    mode "neuron": every channel its own pattern, ``int(ratio*C*H*W)`` masked in all; shape (C, H, W).
    mode "spatial": one H×W pattern shared by all channels, ``int(ratio*H*W)`` masked; shape (1, H, W).
    mode "group": one pattern per block of ``group_size`` consecutive channels,
    ``int(ratio*(C/group_size)*H*W)`` masked; shape (C, H, W), blocks repeated.
    """
    shape = tuple(shape)
    if len(shape) != 3 or not all(isinstance(s, int) and s > 0 for s in shape):
        raise ValueError(f"shape must be (C, H, W) of positive ints, got {shape}")
    ratio = check_ratio(ratio)
    channels, height, width = shape
    mode = check_mode(mode, group_size, channels)
    patterns = {"neuron": channels, "spatial": 1, "group": channels // (group_size or 1)}[mode]
    numel = patterns * height * width
    masked = int(ratio * numel)
    generator = torch.Generator().manual_seed(draw_seed() if seed is None else int(seed))
    keep = torch.ones(numel, dtype=torch.bool)
    keep[torch.randperm(numel, generator=generator)[:masked]] = False
    keep = keep.view(patterns, height, width)
    if mode == "group":
        keep = keep.repeat_interleave(group_size, dim=0)
    return keep.to(device) if device is not None else keep


class KeptIndex(NamedTuple):
    """The kept outputs of a mask in the two CSR forms the kernels take (int64 tensors)."""

    offsets: torch.Tensor  # (P + 1): pattern p keeps positions[offsets[p]:offsets[p+1]]
    positions: torch.Tensor  # flat output positions h * W + w, ascending per pattern
    position_offsets: torch.Tensor  # (H * W + 1): position q keeps channels[position_offsets[q]:...[q+1]]
    position_channels: torch.Tensor  # output channels, ascending per position


def kept_index(mask: torch.Tensor, out_channels: Optional[int] = None) -> KeptIndex:
    """The kept outputs of ``mask`` (Cm, H, W) for a conv with ``out_channels`` outputs
    (default Cm; give it for a (1, H, W) spatial mask), built once per mask, never in an op.

    By pattern: consecutive channels with identical patterns (group and spatial masks)
    share one entry, so P patterns cover the channels in equal blocks. By position: the
    channels kept at each output position, for the kernels that put the batch in the lanes."""
    if mask.dtype != torch.bool or mask.dim() != 3:
        raise ValueError(f"mask must be a bool tensor (C, H, W), got {mask.dtype} of shape {tuple(mask.shape)}")
    out_channels = mask.shape[0] if out_channels is None else int(out_channels)
    if mask.shape[0] not in (1, out_channels):
        raise ValueError(f"mask has {mask.shape[0]} channels; expected 1 or out_channels={out_channels}")
    flat = mask.reshape(mask.shape[0], -1)
    block = _pattern_block(flat)
    patterns = flat[::block]
    offsets = torch.zeros(patterns.shape[0] + 1, dtype=torch.int64, device=mask.device)
    offsets[1:] = patterns.sum(dim=1).cumsum(0)
    positions = patterns.nonzero()[:, 1].contiguous()
    by_position = flat.expand(out_channels, -1).t()  # (H*W, C)
    position_offsets = torch.zeros(by_position.shape[0] + 1, dtype=torch.int64, device=mask.device)
    position_offsets[1:] = by_position.sum(dim=1).cumsum(0)
    position_channels = by_position.nonzero()[:, 1].contiguous()
    return KeptIndex(offsets, positions, position_offsets, position_channels)


def _pattern_block(flat: torch.Tensor) -> int:
    """The largest block of consecutive channels that share one pattern, dividing C."""
    channels = flat.shape[0]
    for block in sorted((d for d in range(1, channels + 1) if channels % d == 0), reverse=True):
        if block == 1:
            return 1
        blocks = flat.view(channels // block, block, -1)
        if bool((blocks == blocks[:, :1]).all()):
            return block
    return 1


def check_kept_index(
    index, mask: torch.Tensor, out_channels: Optional[int] = None, name: str = "kept_index"
) -> KeptIndex:
    """``index`` as a KeptIndex, if it lists exactly the kept outputs of ``mask`` (Cm, H, W) for a
    conv with ``out_channels`` outputs (default Cm) in the form the kernels read (KeptIndex:
    pattern offsets dividing the channels, positions ascending per pattern, channels ascending
    per position); else ValueError saying what differs (and naming the index ``name``).

    The one check of an index's values, for every backend: an index from ``kept_index`` is
    right by construction; ``masked_conv2d`` runs this once on any other index it is given.
    The ops themselves check only the index's sizes (reading values on a GPU costs a sync)."""
    out_channels = mask.shape[0] if out_channels is None else int(out_channels)

    def fail(what: str):
        raise ValueError(
            f"{name} does not match the mask {tuple(mask.shape)} of a conv with {out_channels} output channels: "
            f"{what} (build it with rk.kept_index(mask, {out_channels}))"
        )

    if not isinstance(index, (tuple, list)) or len(index) != len(KeptIndex._fields):
        fail(f"expected the 4 tensors of a KeptIndex {KeptIndex._fields}, got {type(index).__name__}")
    for field, tensor in zip(KeptIndex._fields, index):
        if not isinstance(tensor, torch.Tensor) or tensor.dtype != torch.int64 or tensor.dim() != 1:
            got = f"{tensor.dtype} of shape {tuple(tensor.shape)}" if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            fail(f"{field} must be a 1-D int64 tensor, got {got}")
        if tensor.device != mask.device:
            fail(f"{field} must be on the mask's device {mask.device}, got {tensor.device}")
    index = KeptIndex(*index)
    channels, positions = out_channels, mask.shape[1] * mask.shape[2]
    patterns = index.offsets.numel() - 1
    if patterns < 1 or channels % patterns or (mask.shape[0] == 1 and patterns != 1):
        fail(f"offsets describes {patterns} patterns, which must divide the {channels} channels (1 for a (1, H, W) mask)")
    if index.position_offsets.numel() != positions + 1:
        fail(f"position_offsets must have H * W + 1 = {positions + 1} entries, got {index.position_offsets.numel()}")
    expected = mask.reshape(mask.shape[0], positions).expand(channels, positions)
    by_pattern = _decode_csr(index.offsets, index.positions, positions, "offsets", "positions", fail)
    if not torch.equal(by_pattern.repeat_interleave(channels // patterns, dim=0), expected):
        fail("offsets/positions list other kept positions than the mask's")
    by_position = _decode_csr(index.position_offsets, index.position_channels, channels, "position_offsets",
                              "position_channels", fail)
    if not torch.equal(by_position, expected.t()):
        fail("position_offsets/position_channels list other kept channels than the mask's")
    return index


def _decode_csr(offsets: torch.Tensor, values: torch.Tensor, width: int, offsets_name: str, values_name: str, fail):
    """The dense bool (rows, width) that a CSR (offsets, ascending values per row) lists."""
    rows = offsets.numel() - 1
    counts = offsets.diff()
    if int(offsets[0]) != 0 or int(offsets[-1]) != values.numel() or bool((counts < 0).any()):
        fail(f"{offsets_name} must rise from 0 to {values_name}.numel() = {values.numel()}, "
             f"got {int(offsets[0])} ... {int(offsets[-1])}")
    if values.numel() and (int(values.min()) < 0 or int(values.max()) >= width):
        fail(f"{values_name} must lie in [0, {width}), got values in [{int(values.min())}, {int(values.max())}]")
    row = torch.repeat_interleave(torch.arange(rows, device=values.device), counts)
    if bool(((values[1:] <= values[:-1]) & (row[1:] == row[:-1])).any()):
        fail(f"{values_name} must be strictly ascending within each entry of {offsets_name}")
    dense = torch.zeros(rows, width, dtype=torch.bool, device=values.device)
    dense[row, values] = True
    return dense
