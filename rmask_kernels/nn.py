"""Drop-in layers: MaskedConv2d (an nn.Conv2d), RandomMask, and the paper's unit MaskedConvBN2d."""

from __future__ import annotations

import weakref
from typing import NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import reference
from .autocast import cast_for_autocast
from .backends import check_backend
from .functional import check_input_mask, masked_conv2d
from .geometry import conv_output_size, pair
from .kept_batch_norm import kept_batch_norm
from .masks import KeptIndex, check_mode, check_ratio, draw_seed, kept_index, random_mask

ACTIVATIONS = (None, "relu")
BN_STATS = ("all", "kept")


class _FoldedCache(NamedTuple):
    """MaskedConvBN2d's folded weight and bias, with what they were folded from: weak
    references to the source tensors and their state (see MaskedConvBN2d._folded_sources)."""

    sources: tuple
    state: tuple
    weight: torch.Tensor
    bias: torch.Tensor


def _no_tensor():
    """Stands for an absent source tensor (None) where a weak reference would be."""
    return None


class MaskedConv2d(nn.Conv2d):
    """``nn.Conv2d`` whose output is multiplied by a fixed random mask (True = kept).

    The mask (buffer ``mask``, bool, (C_out, H_out, W_out), or (1, H_out, W_out) for
    mode "spatial") is drawn at construction when ``output_size`` is given, else at the
    first forward, and never changes; it is saved in ``state_dict``. ``mask_ratio`` is the
    fraction of outputs masked; ``mask_ratio=0`` is exactly ``nn.Conv2d``. ``seed=None``
    takes a seed from torch's global generator at construction.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device=None,
        dtype=None,
        *,
        mask_ratio: float = 0.5,
        mask_mode: str = "neuron",
        group_size: Optional[int] = None,
        seed: Optional[int] = None,
        output_size: Optional[Sequence[int]] = None,
        backend: str = "auto",
    ):
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode, device, dtype
        )
        self.mask_ratio = check_ratio(mask_ratio, "mask_ratio")
        self.mask_mode = check_mode(mask_mode, group_size, out_channels, "mask_mode")
        self.group_size = group_size
        self.seed = draw_seed() if seed is None else int(seed)
        self.backend = check_backend(backend)
        self.register_buffer("mask", None)
        # The mask of this layer's input (set_input_mask): moved with the module, not saved.
        self.register_buffer("input_mask", None, persistent=False)
        # Derived from the masks once, moved with the module, not saved (rebuilt on load).
        for name in KeptIndex._fields:
            self.register_buffer(f"kept_{name}", None, persistent=False)
            self.register_buffer(f"input_kept_{name}", None, persistent=False)
        if output_size is not None:
            self.build_mask(pair(output_size, "output_size"))

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, **mask_kwargs) -> "MaskedConv2d":
        """A MaskedConv2d with ``conv``'s configuration and a copy of its parameters."""
        layer = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
            conv.groups, conv.bias is not None, conv.padding_mode, conv.weight.device, conv.weight.dtype, **mask_kwargs,
        )
        with torch.no_grad():
            layer.weight.copy_(conv.weight)
            if conv.bias is not None:
                layer.bias.copy_(conv.bias)
        layer.train(conv.training)
        return layer

    # -- the mask ---------------------------------------------------------------------
    def build_mask(self, output_size: Tuple[int, int]) -> None:
        mask = random_mask(
            (self.out_channels, *output_size), self.mask_ratio, self.mask_mode, self.group_size, self.seed
        )
        self.mask = mask.to(self.weight.device)
        self._refresh_kept_index()

    def _refresh_kept_index(self) -> None:
        for name, tensor in zip(KeptIndex._fields, kept_index(self.mask, self.out_channels)):
            setattr(self, f"kept_{name}", tensor)
        self._mask_version = self.mask._version

    def kept_index(self) -> KeptIndex:
        """The index lists of this layer's mask (built with the mask, moved with the module)."""
        return KeptIndex(*(getattr(self, f"kept_{name}") for name in KeptIndex._fields))

    def set_input_mask(self, input_mask: Optional[torch.Tensor]) -> None:
        """Declare which input entries are zero (None: none): bool (C_in, H_in, W_in) or
        (1, H_in, W_in), True = kept. The layer then computes ``conv(input * input_mask)``:
        what it computed before for an input that is zero where the mask is False, as the
        output of a masked unit is (``act(mask * ...)`` with ``act(0) == 0``). Not saved in
        ``state_dict``: whoever sets it sets it again after loading (the mask it comes from is
        saved with its own layer)."""
        if input_mask is not None:
            if not isinstance(input_mask, torch.Tensor) or input_mask.dtype != torch.bool or input_mask.dim() != 3 \
                    or input_mask.shape[0] not in (1, self.in_channels):
                shape = tuple(input_mask.shape) if isinstance(input_mask, torch.Tensor) else type(input_mask).__name__
                dtype = input_mask.dtype if isinstance(input_mask, torch.Tensor) else None
                raise ValueError(f"input_mask must be a bool tensor of shape ({self.in_channels} or 1, H_in, W_in), "
                                 f"got {dtype} of shape {shape}")
            input_mask = input_mask.to(self.weight.device)
        self.input_mask = input_mask
        self._refresh_input_index()

    def _refresh_input_index(self) -> None:
        index = (None,) * 4 if self.input_mask is None else kept_index(self.input_mask, self.in_channels)
        for name, tensor in zip(KeptIndex._fields, index):
            setattr(self, f"input_kept_{name}", tensor)
        self._input_mask_version = None if self.input_mask is None else self.input_mask._version

    def input_index(self) -> Optional[KeptIndex]:
        """The index lists of this layer's input mask (built with it, moved with the module), or None."""
        if self.input_mask is None:
            return None
        if not torch.compiler.is_compiling() and self.input_mask._version != self._input_mask_version:
            self._refresh_input_index()  # the input mask was edited in place: re-derive the index
        return KeptIndex(*(getattr(self, f"input_kept_{name}") for name in KeptIndex._fields))

    def _masked_input(self, input: torch.Tensor) -> torch.Tensor:
        """``input * input_mask`` where the layer has an input mask (checked against the input)."""
        if self.input_mask is None:
            return input
        check_input_mask(self.input_mask, self.in_channels, input.shape[-2:], input.device)
        return input * self.input_mask

    def output_size_for(self, input: torch.Tensor) -> Tuple[int, int]:
        left, right, top, bottom = self._reversed_padding_repeated_twice
        return conv_output_size(input.shape[-2:], self.kernel_size, self.stride, (top, bottom, left, right), self.dilation)

    def mask_for(self, input: torch.Tensor) -> torch.Tensor:
        """The layer's mask, drawn now if this is the first forward; checks the size."""
        if input.dim() not in (3, 4):
            raise ValueError(f"{type(self).__name__}: input must be (N, C, H, W) or (C, H, W), got {tuple(input.shape)}")
        size = self.output_size_for(input)
        if self.mask is None:
            self.build_mask(size)
        if not torch.compiler.is_compiling() and self.mask._version != self._mask_version:
            self._refresh_kept_index()  # the mask was edited in place: re-derive the index
        if tuple(self.mask.shape[1:]) != size and self.mask_ratio > 0:
            raise ValueError(
                f"{type(self).__name__}: the mask was built for output size {tuple(self.mask.shape[1:])}, "
                f"but input of spatial size {tuple(input.shape[-2:])} gives output size {size}; "
                "masks are fixed: build the layer for this size (output_size=...)"
            )
        return self.mask

    # -- forward ----------------------------------------------------------------------
    def masked_forward(
        self,
        input: torch.Tensor,
        weight: torch.Tensor,
        bias: Optional[torch.Tensor],
        relu: bool = False,
        channel_stats: bool = False,
        residual: Optional[torch.Tensor] = None,
    ):
        """The masked convolution with this layer's mask and geometry, for any weight/bias
        (MaskedConvBN2d passes BN-folded ones), optionally with a fused residual and ReLU or
        with the per-channel output statistics (see rk.masked_conv2d)."""
        mask = self.mask_for(input)
        if self.mask_ratio == 0.0:
            # Under autocast the residual is cast as the fused op casts it (rk.masked_conv2d).
            (residual,) = cast_for_autocast(input.device.type, residual)
            output = self._conv_forward(self._masked_input(input), weight, bias)
            output = output + residual if residual is not None else output
            output = F.relu(output) if relu else output
            return (output, *reference.channel_stats(output)) if channel_stats else output
        padding, input_mask, input_index = self.padding, self.input_mask, self.input_index()
        if self.padding_mode != "zeros":  # the padding copies input entries: mask them first
            input = F.pad(self._masked_input(input), self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding, input_mask, input_index = 0, None, None
        return masked_conv2d(
            input, weight, bias, mask, self.stride, padding, self.dilation, self.groups,
            backend=self.backend, kept_index=self.kept_index(), relu=relu, channel_stats=channel_stats,
            residual=residual, input_mask=input_mask, input_index=input_index,
        )

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self.masked_forward(input, self.weight, self.bias)

    def unmasked_forward(self, input: torch.Tensor) -> torch.Tensor:
        """The dense convolution (the mask is still drawn/checked for this input)."""
        self.mask_for(input)
        return self._conv_forward(self._masked_input(input), self.weight, self.bias)

    # -- persistence ------------------------------------------------------------------
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        loaded = state_dict.get(prefix + "mask")
        if isinstance(loaded, torch.Tensor):
            if loaded.dtype != torch.bool or loaded.dim() != 3 or loaded.shape[0] not in (1, self.out_channels):
                error_msgs.append(
                    f"{prefix}mask: expected a bool mask of shape ({self.out_channels} or 1, H, W), "
                    f"got {loaded.dtype} of shape {tuple(loaded.shape)}"
                )
                return
            if self.mask is None:  # not drawn yet: adopt the saved one
                self.mask = torch.empty(loaded.shape, dtype=torch.bool, device=self.weight.device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        if self.mask is not None:
            self._refresh_kept_index()

    def extra_repr(self) -> str:
        extra = f", mask_ratio={self.mask_ratio}, mask_mode={self.mask_mode}"
        if self.group_size is not None:
            extra += f", group_size={self.group_size}"
        if self.input_mask is not None:
            extra += f", input_mask={tuple(self.input_mask.shape)}"
        return super().extra_repr() + extra


class RandomMask(nn.Module):
    """``y = x * mask`` with a fixed random mask over (C, H, W) (broadcast over the batch)."""

    def __init__(self, shape, ratio: float, mode: str = "neuron", group_size: Optional[int] = None, seed=None):
        super().__init__()
        self.ratio = check_ratio(ratio)
        self.mode = check_mode(mode, group_size, tuple(shape)[0] if len(tuple(shape)) == 3 else None)
        self.group_size = group_size
        self.seed = draw_seed() if seed is None else int(seed)
        self.shape = tuple(shape)
        self.register_buffer("mask", random_mask(self.shape, self.ratio, self.mode, group_size, self.seed))

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if input.dim() < 3 or tuple(input.shape[-3:]) != self.shape:
            raise ValueError(f"RandomMask: input must end in shape {self.shape} (C, H, W), got {tuple(input.shape)}")
        return input * self.mask

    def extra_repr(self) -> str:
        return f"shape={self.shape}, ratio={self.ratio}, mode={self.mode}"


class MaskedConvBN2d(nn.Module):
    """The paper's unit: ``act(mask * BN(conv(x)))`` (mask after BN, before the activation).

    ``bn_stats="all"`` (the paper): training-mode BN statistics over all positions, so the
    convolution runs dense. ``bn_stats="kept"``: statistics over the kept positions only,
    so training also computes only kept outputs. In eval mode BN is folded into the conv (once,
    while the parameters and statistics stay unchanged) and the unit is one masked convolution.
    Children ``conv`` (a MaskedConv2d holding the mask) and ``bn`` (a BatchNorm2d).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        bias: bool = False,
        padding_mode: str = "zeros",
        device=None,
        dtype=None,
        *,
        mask_ratio: float = 0.5,
        mask_mode: str = "neuron",
        group_size: Optional[int] = None,
        seed: Optional[int] = None,
        output_size: Optional[Sequence[int]] = None,
        backend: str = "auto",
        activation: Optional[str] = None,
        bn_stats: str = "all",
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
    ):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        if bn_stats not in BN_STATS:
            raise ValueError(f"bn_stats must be one of {BN_STATS}, got {bn_stats!r}")
        self.activation = activation
        self.bn_stats = bn_stats
        self.conv = MaskedConv2d(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode, device, dtype,
            mask_ratio=mask_ratio, mask_mode=mask_mode, group_size=group_size, seed=seed, output_size=output_size,
            backend=backend,
        )
        self.bn = nn.BatchNorm2d(out_channels, eps, momentum, device=device, dtype=dtype)
        self._folded = None

    @classmethod
    def from_modules(cls, conv: nn.Conv2d, bn: nn.BatchNorm2d, *, activation=None, bn_stats="all", **mask_kwargs):
        """The unit for an existing conv and the BN that follows it (parameters and running stats copied)."""
        if bn.num_features != conv.out_channels:
            raise ValueError(f"bn has {bn.num_features} features but conv has {conv.out_channels} output channels")
        unit = cls.__new__(cls)
        nn.Module.__init__(unit)
        unit.activation, unit.bn_stats = activation, bn_stats
        if activation not in ACTIVATIONS or bn_stats not in BN_STATS:
            raise ValueError(f"activation must be in {ACTIVATIONS} and bn_stats in {BN_STATS}")
        unit.conv = MaskedConv2d.from_conv(conv, **mask_kwargs)
        unit.bn = nn.BatchNorm2d(
            bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats,
            device=conv.weight.device, dtype=conv.weight.dtype,
        )
        unit.bn.load_state_dict(bn.state_dict())
        unit.train(bn.training)
        return unit

    def __getstate__(self):
        # The folded weight is derived and refers to this instance's tensors: copies and
        # pickles leave it behind and fold again on first use.
        state = super().__getstate__()
        state["_folded"] = None
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self.__dict__.setdefault("_folded", None)

    def train(self, mode: bool = True):
        if mode:  # training changes what the fold reads: free the cached one until eval again
            self._folded = None
        return super().train(mode)

    @property
    def mask(self) -> Optional[torch.Tensor]:
        return self.conv.mask

    @property
    def input_mask(self) -> Optional[torch.Tensor]:
        return self.conv.input_mask

    def set_input_mask(self, input_mask: Optional[torch.Tensor]) -> None:
        """The conv's input mask (MaskedConv2d.set_input_mask)."""
        self.conv.set_input_mask(input_mask)

    def _uses_batch_stats(self) -> bool:
        return self.training or self.bn.running_mean is None

    def forward(self, input: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``act(mask * BN(conv(input)) + residual)``; ``residual`` (optional, the output's shape,
        e.g. a ResNet block's shortcut) is added before the activation."""
        unbatched = input.dim() == 3
        if unbatched:
            input = input.unsqueeze(0)
            residual = residual.unsqueeze(0) if residual is not None else None
        relu = self.activation == "relu"
        # Under autocast the residual is cast as the fused op casts it, in training as in eval.
        (residual,) = cast_for_autocast(input.device.type, residual)
        if not self._uses_batch_stats():  # one masked conv: BN folded in, residual and ReLU in the epilogue
            weight, bias = self._inference_weight_and_bias()
            y = self.conv.masked_forward(input, weight, bias, relu=relu, residual=residual)
            return y.squeeze(0) if unbatched else y
        if self.bn_stats == "kept" and self.conv.mask_ratio > 0:
            y = self._kept_stats_forward(input, relu, residual)
            return y.squeeze(0) if unbatched else y
        y = self.bn(self.conv.unmasked_forward(input))
        if self.conv.mask_ratio > 0:
            y = y * self.conv.mask
        y = F.relu(y) if relu and residual is None else y
        if residual is not None:
            # In place where the result is y's dtype and shape: y is this call's own tensor,
            # and no backward reads it (BN saves its input, the mask's product the mask): two
            # fewer fresh block-sized tensors a call, each of whose pages faults in on first
            # write (docs/design.md, section 6).
            if y.dtype == residual.dtype and y.shape == residual.shape:
                y = F.relu_(y.add_(residual)) if relu else y.add_(residual)
            else:
                y = y + residual
                y = F.relu(y) if relu else y
        return y.squeeze(0) if unbatched else y

    def folded_weight_and_bias(self):
        """Eval-mode BN folded into the conv: BN(conv(x; w, b)) = conv(x; w * s, (b - mean) * s + beta)."""
        bn = self.bn
        scale = torch.rsqrt(bn.running_var + bn.eps)
        if bn.weight is not None:
            scale = scale * bn.weight
        weight = self.conv.weight * scale.view(-1, 1, 1, 1)
        conv_bias = self.conv.bias if self.conv.bias is not None else torch.zeros_like(bn.running_mean)
        bias = (conv_bias - bn.running_mean) * scale
        if bn.bias is not None:
            bias = bias + bn.bias
        return weight, bias

    def _folded_sources(self) -> tuple:
        """The tensors the fold reads, then BN's batch counter: a training-mode BatchNorm2d
        updates its running statistics without bumping their version, but counts the batch
        in place (which bumps the counter's)."""
        conv, bn = self.conv, self.bn
        return (conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.num_batches_tracked)

    def _inference_weight_and_bias(self):
        """``folded_weight_and_bias()``, folded once and reused while nothing it is folded from
        changes: the same source tensors (by identity), each at the same version (an in-place
        update: an optimizer step, load_state_dict, a training-mode forward) and storage
        (``.to()`` keeps a parameter's identity and version but moves its data), the same eps,
        dtype, device and inference mode. In-place edits through ``tensor.data`` bypass the
        version counter and are not seen (as autograd does not see them either).

        The cache is detached, so it serves only calls whose gradient cannot reach the
        parameters: grad mode off, or no source requiring grad (a frozen model; gradients
        w.r.t. the input still flow). Otherwise the fold runs in the autograd graph, as does
        every call under torch.compile (which traces the fold).
        """
        sources = self._folded_sources()
        if torch.compiler.is_compiling() or (
            torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in sources)
        ):
            return self.folded_weight_and_bias()
        try:
            weight = sources[0]
            state = (self.bn.eps, weight.dtype, weight.device, torch.is_inference_mode_enabled()) + tuple(
                None if t is None else (t._version, t.data_ptr()) for t in sources
            )
        except RuntimeError:  # a tensor without a version or storage (inference or wrapper tensors)
            return self.folded_weight_and_bias()
        cached = self._folded
        if cached is not None and cached.state == state and all(
            reference() is t for reference, t in zip(cached.sources, sources)
        ):
            return cached.weight, cached.bias
        with torch.no_grad():
            weight, bias = self.folded_weight_and_bias()
        references = tuple(_no_tensor if t is None else weakref.ref(t) for t in sources)
        self._folded = _FoldedCache(references, state, weight, bias)
        return weight, bias

    def _kept_stats_forward(self, input: torch.Tensor, relu: bool, residual: Optional[torch.Tensor]) -> torch.Tensor:
        # Only kept outputs are computed; BN statistics over them (count differs per channel
        # for neuron masks). Masked outputs are zero before and after normalization. The
        # residual and the ReLU in BN's own pass where the residual has its output's dtype and
        # shape.
        # The sums come out of the conv's own pass (float64, so E[y^2] - E[y]^2 keeps its digits).
        bn = self.bn
        y, total, total_of_squares = self.conv.masked_forward(
            input, self.conv.weight, self.conv.bias, channel_stats=True
        )
        mask = self.conv.mask
        kept_per_channel = mask.sum(dim=(1, 2)).expand(y.shape[1]).to(torch.float64)
        count = (kept_per_channel * y.shape[0]).clamp(min=1)
        # The statistics' dependence on y is in kept_batch_norm's backward, not in autograd.
        # Normalized in float32 where y is float16/bfloat16 (autocast), as BatchNorm2d does.
        stats_dtype = torch.float32 if y.dtype in (torch.float16, torch.bfloat16) else y.dtype
        mean64 = total.detach() / count
        var = ((total_of_squares.detach() / count) - mean64.square()).clamp(min=0).to(stats_dtype)
        mean = mean64.to(stats_dtype)
        count = count.to(stats_dtype)
        if self.training and bn.track_running_stats:
            with torch.no_grad():
                bn.num_batches_tracked.add_(1)
                momentum = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
                unbiased = var * count / (count - 1).clamp(min=1)
                # A fully masked channel has no statistics: keep its running values.
                seen = kept_per_channel > 0
                new_mean = torch.where(seen, mean, bn.running_mean).to(bn.running_mean.dtype)
                new_var = torch.where(seen, unbiased, bn.running_var).to(bn.running_var.dtype)
                bn.running_mean.lerp_(new_mean, momentum)
                bn.running_var.lerp_(new_var, momentum)
        rstd = torch.rsqrt(var + bn.eps)
        if residual is None or (residual.dtype == y.dtype and residual.shape == y.shape):
            return kept_batch_norm(y, mask, count, mean, rstd, bn.weight, bn.bias, relu, residual)
        out = kept_batch_norm(y, mask, count, mean, rstd, bn.weight, bn.bias, False) + residual
        return F.relu(out) if relu else out

    def extra_repr(self) -> str:
        return f"activation={self.activation}, bn_stats={self.bn_stats}"
