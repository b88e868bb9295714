"""Input masks for the convs that read a masked unit's output (``wire_input_masks``).

A masked unit's output, ``act(mask * ...)`` with ``act(0) == 0``, is exactly zero wherever its
mask is False, at positions fixed for the model's life. A conv that reads it may take that mask
as its input mask (``MaskedConv2d.set_input_mask``): its kernels then skip those inputs. This
holds through ops that keep zeros zero: activations with ``act(0) == 0``, identity, dropout,
and pooling (a max- or average-pool window of zeros gives 0; its output is kept where any
input of its window is kept). It does not hold through anything else: a residual add, a BN,
a bias, a concatenation. The dataflow is read from the model's torch.fx graph, with the
masked layers as leaves; a model that does not trace gets no input masks (it stays correct,
only not faster).
"""

from __future__ import annotations

from typing import List, NamedTuple, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .geometry import pair
from .nn import MaskedConv2d, MaskedConvBN2d

# Modules, functions and tensor methods whose output is 0 wherever their input is 0.
ZERO_KEEPING_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.Hardtanh, nn.Identity,
                        nn.Dropout, nn.Dropout2d)
ZERO_KEEPING_FUNCTIONS = (F.relu, torch.relu, F.relu6, F.leaky_relu, F.gelu, F.silu, torch.tanh, F.hardtanh,
                          F.dropout, F.dropout2d)
ZERO_KEEPING_METHODS = ("relu", "relu_", "tanh", "contiguous", "clone")
POOL_MODULES = (nn.MaxPool2d, nn.AvgPool2d)
POOL_FUNCTIONS = (F.max_pool2d, F.avg_pool2d)


class Pool(NamedTuple):
    """A pooling step between a masked unit and the conv it feeds: where the pooled output is kept."""

    kernel_size: tuple
    stride: tuple
    padding: tuple
    ceil_mode: bool

    def apply(self, mask: torch.Tensor) -> torch.Tensor:
        # Kept where any input of the window is kept (max-pool padding is -inf: never kept).
        return F.max_pool2d(mask.float(), self.kernel_size, self.stride, self.padding, 1, self.ceil_mode) > 0


class Wire(NamedTuple):
    """Conv ``target`` reads the output of masked unit ``source`` through ``pools``."""

    target: str
    source: str
    pools: Tuple[Pool, ...]


class _Tracer(torch.fx.Tracer):
    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return isinstance(module, (MaskedConv2d, MaskedConvBN2d)) or super().is_leaf_module(module, qualified_name)


def _pool(kernel_size, stride=None, padding=0, ceil_mode=False) -> Optional[Pool]:
    """The Pool of these pooling arguments, or None where they are not plain ints (not wired)."""
    try:
        return Pool(pair(kernel_size, "kernel_size"), pair(stride if stride else kernel_size, "stride"),
                    pair(padding, "padding"), bool(ceil_mode))
    except ValueError:
        return None


def _pool_of(node, modules) -> Optional[Pool]:
    """The Pool of a pooling node, or None. Max-pools with dilation are left out."""
    if node.op == "call_module" and isinstance(modules[node.target], POOL_MODULES):
        m = modules[node.target]
        if isinstance(m, nn.MaxPool2d) and m.dilation not in (1, (1, 1)):
            return None
        return _pool(m.kernel_size, m.stride, m.padding, m.ceil_mode)
    if node.op == "call_function" and node.target in POOL_FUNCTIONS:
        names = ("kernel_size", "stride", "padding")
        values = dict(zip(names, node.args[1:4]), **{k: v for k, v in node.kwargs.items() if k in names})
        if node.target is F.max_pool2d and (len(node.args) > 4 or node.kwargs.get("dilation", 1) not in (1, (1, 1))):
            return None
        return _pool(values["kernel_size"], values.get("stride"), values.get("padding", 0),
                     node.kwargs.get("ceil_mode", False))
    return None


def _keeps_zeros(node, modules) -> bool:
    if node.op == "call_module":
        return isinstance(modules[node.target], ZERO_KEEPING_MODULES)
    if node.op == "call_function":
        return node.target in ZERO_KEEPING_FUNCTIONS
    return node.op == "call_method" and node.target in ZERO_KEEPING_METHODS


def _masked_source(node, modules) -> bool:
    """Whether ``node`` calls a masked unit whose output is 0 wherever its mask is False: a
    MaskedConv2d or MaskedConvBN2d with a mask, called on its input alone (a residual would be
    added at masked positions too)."""
    if node.op != "call_module" or not isinstance(modules[node.target], (MaskedConv2d, MaskedConvBN2d)):
        return False
    if modules[node.target].mask is None:
        return False
    return len(node.args) == 1 and all(value is None for value in node.kwargs.values())


def find_wires(model: nn.Module) -> List[Wire]:
    """Each masked layer of ``model`` whose input is a masked unit's output, through ops that keep
    zeros zero (see the module docstring); [] where the model does not trace."""
    try:
        graph = _Tracer().trace(model)
    except Exception:  # data-dependent control flow etc.
        return []
    modules = dict(model.named_modules())
    wires = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), (MaskedConv2d, MaskedConvBN2d)):
            continue
        if not node.args or not isinstance(node.args[0], torch.fx.Node):
            continue
        source, pools = node.args[0], []
        while not _masked_source(source, modules):
            pool = _pool_of(source, modules)
            if pool is None and not _keeps_zeros(source, modules):
                break
            if pool is not None:
                pools.append(pool)
            if not source.args or not isinstance(source.args[0], torch.fx.Node):
                break
            source = source.args[0]
        else:
            wires.append(Wire(node.target, source.target, tuple(reversed(pools))))
    return wires


def _input_mask(model: nn.Module, wire: Wire) -> Optional[torch.Tensor]:
    mask = model.get_submodule(wire.source).mask
    for pool in wire.pools:
        mask = pool.apply(mask)
    target = model.get_submodule(wire.target)
    in_channels = target.conv.in_channels if isinstance(target, MaskedConvBN2d) else target.in_channels
    return mask if mask.shape[0] in (1, in_channels) else None


def _rewire(model: nn.Module, *_) -> None:
    """Sets every recorded wire's input mask from its source's mask as it is now."""
    for wire in getattr(model, "_rmask_wires", ()):
        model.get_submodule(wire.target).set_input_mask(_input_mask(model, wire))


def wire_input_masks(model: nn.Module) -> List[Wire]:
    """Gives each masked layer of ``model`` that reads a masked unit's output (through ops that
    keep zeros zero) that unit's mask as its input mask, and keeps them so: after
    ``load_state_dict`` (which may bring other masks) they are set again. Returns the wires.
    The input masks are non-persistent buffers: ``state_dict`` keys do not change."""
    masked = any(isinstance(m, (MaskedConv2d, MaskedConvBN2d)) and m.mask is not None for m in model.modules())
    wires = find_wires(model) if masked else []  # (tracing costs ~50 ms for a ResNet-18)
    model._rmask_wires = wires
    _rewire(model)
    if not getattr(model, "_rmask_rewire_hook", False):
        model.register_load_state_dict_post_hook(_rewire)
        model._rmask_rewire_hook = True
    return wires
