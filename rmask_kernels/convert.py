"""convert_model: add Random Mask to an existing CNN, placed as the paper places it."""

from __future__ import annotations

import copy
from typing import Dict, List, Optional, Sequence, Union

import torch
import torch.nn as nn

from .masks import check_mode, check_ratio, layer_seed
from .nn import MaskedConv2d, MaskedConvBN2d
from .wiring import wire_input_masks

LAYER_SELECTIONS = ("shallow", "deep", "all")


def conv_output_shapes(model: nn.Module, example_input) -> Dict[str, tuple]:
    """Output (C, H, W) of every nn.Conv2d, in the order the forward runs them.

    Runs the model in eval mode without gradients, so BN running statistics are untouched."""
    shapes: Dict[str, tuple] = {}

    def record(name):
        def hook(module, args, output):
            shapes.setdefault(name, tuple(output.shape[-3:]))

        return hook

    hooks = [
        module.register_forward_hook(record(name))
        for name, module in model.named_modules()
        if isinstance(module, nn.Conv2d)
    ]
    was_training = {name: module.training for name, module in model.named_modules()}
    try:
        model.eval()
        with torch.no_grad():
            model(example_input)
    finally:
        for hook in hooks:
            hook.remove()
        for name, module in model.named_modules():
            module.training = was_training[name]
    return shapes


def select_layers(shapes: Dict[str, tuple], layers) -> List[str]:
    """Conv names to mask. "shallow": the stem (first conv run) and every conv whose output
    resolution is in the first half of the network's resolution stages (for the CIFAR
    ResNet-18: stem, layer1, layer2 and its shortcut, the paper's '012'; for VGG-19 the
    first 4 convs). "deep": all the others. "all": every conv. Or a list of conv names."""
    names = list(shapes)
    if not names:
        raise ValueError("convert_model: the model ran no nn.Conv2d on example_input")
    if isinstance(layers, str):
        if layers not in LAYER_SELECTIONS:
            raise ValueError(f"layers must be one of {LAYER_SELECTIONS} or a list of conv names, got {layers!r}")
        if layers == "all":
            return names
        stem, rest = names[0], names[1:]
        resolutions = sorted({shapes[n][1] * shapes[n][2] for n in rest}, reverse=True)
        shallow_res = set(resolutions[: max(1, len(resolutions) // 2)])
        shallow = [stem] + [n for n in rest if shapes[n][1] * shapes[n][2] in shallow_res]
        return shallow if layers == "shallow" else [n for n in names if n not in shallow]
    chosen = list(layers)
    unknown = [n for n in chosen if n not in shapes]
    if unknown:
        raise ValueError(f"layers names {unknown} are not nn.Conv2d modules run by the model; convs: {names}")
    return chosen


def following_batchnorms(model: nn.Module, conv_names: Sequence[str]) -> Dict[str, str]:
    """For each conv whose only consumer is a BatchNorm2d (used once, fed only by it): that BN's name.

    Found on the torch.fx graph where the model traces; otherwise the BN registered right
    after the conv with matching features is taken, as in every torchvision-style CNN."""
    modules = dict(model.named_modules())
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception:  # data-dependent control flow etc.: fall back to registration order
        graph = None
    pairs: Dict[str, str] = {}
    if graph is not None:
        calls: Dict[str, int] = {}
        for node in graph.nodes:
            if node.op == "call_module":
                calls[node.target] = calls.get(node.target, 0) + 1
        for node in graph.nodes:
            if node.op != "call_module" or node.target not in conv_names:
                continue
            users = list(node.users)
            if len(users) == 1 and users[0].op == "call_module":
                target = users[0].target
                if isinstance(modules.get(target), nn.BatchNorm2d) and calls[target] == 1 and users[0].args[0] is node:
                    pairs[node.target] = target
        return pairs
    order = list(modules)
    for name in conv_names:
        index = order.index(name)
        if index + 1 < len(order):
            after = order[index + 1]
            if isinstance(modules[after], nn.BatchNorm2d) and modules[after].num_features == modules[name].out_channels:
                pairs[name] = after
    return pairs


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def convert_model(
    model: nn.Module,
    ratio: float,
    *,
    layers: Union[str, Sequence[str]] = "shallow",
    mode: str = "neuron",
    group_size: Optional[int] = None,
    seed: int = 0,
    example_input: torch.Tensor,
    inplace: bool = False,
    bn_stats: str = "all",
    backend: str = "auto",
) -> nn.Module:
    """Add Random Mask to ``model``: each selected conv and the BN after it become one
    MaskedConvBN2d (mask after BN, before the activation) in the conv's place, the BN's place
    holding nn.Identity; a conv with no BN after it becomes a MaskedConv2d. Masks are sized
    from ``example_input`` and drawn from ``layer_seed(seed, conv name)``, as rk.models does,
    so a converted model equals the hand-written one with the same seed."""
    ratio = check_ratio(ratio)
    mode = check_mode(mode, group_size)
    if not isinstance(example_input, torch.Tensor):
        raise TypeError("example_input must be a tensor batch the model accepts, e.g. torch.zeros(1, 3, 32, 32)")
    if not inplace:
        model = copy.deepcopy(model)
    already = [n for n, m in model.named_modules() if isinstance(m, (MaskedConv2d, MaskedConvBN2d))]
    if already:
        raise ValueError(f"convert_model: the model already has Random-Mask layers: {already}")
    shapes = conv_output_shapes(model, example_input)
    selected = select_layers(shapes, layers)
    batchnorms = following_batchnorms(model, selected)
    modules = dict(model.named_modules())
    # Build every replacement before swapping any in, so a rejected layer leaves the model as it was.
    replacements = []
    for name in selected:
        conv = modules[name]
        mask_kwargs = dict(
            mask_ratio=ratio, mask_mode=mode, group_size=group_size, seed=layer_seed(seed, name),
            output_size=shapes[name][1:], backend=backend,
        )
        if name in batchnorms:
            bn = modules[batchnorms[name]]
            unit = MaskedConvBN2d.from_modules(conv, bn, bn_stats=bn_stats, **mask_kwargs)
            replacements += [(name, unit), (batchnorms[name], nn.Identity().train(bn.training))]
        else:
            replacements.append((name, MaskedConv2d.from_conv(conv, **mask_kwargs)))
    for name, module in replacements:
        _set_submodule(model, name, module)
    wire_input_masks(model)  # a masked conv reading a masked unit's output skips its zero inputs
    return model
