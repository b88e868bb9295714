"""PNG figures of the evaluation: robust accuracy against eps, and a grid of adversarial
examples beside their originals.

matplotlib is an optional extra (``pip install 'rmask_kernels[plot]'``), imported when a
figure is drawn. Figures are drawn on matplotlib's ``Figure`` directly (Agg canvas), never
through pyplot: no display is needed and no global backend or figure state is touched.
"""

from __future__ import annotations

import io
import math
import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from .checkpoint import atomic_write
from .data import ImageData, to_uint8

__all__ = ["GridExamples", "example_grid", "plot_accuracy_vs_eps", "plot_lines"]


def _figure(**kwargs):
    try:
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError("plots need matplotlib: pip install 'rmask_kernels[plot]'") from error
    return Figure(**kwargs)


def _save(figure, path: Union[str, os.PathLike]) -> Path:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")  # Agg, chosen by the format: no pyplot, no display
    return atomic_write(path, lambda handle: handle.write(buffer.getvalue()))


def plot_accuracy_vs_eps(rows: Sequence[Mapping[str, Any]], path: Union[str, os.PathLike],
                         value: str = "defense_success_rate", title: Optional[str] = None) -> Path:
    """Robust accuracy against eps as a PNG: one line per target model and attack family
    (and setting, when rows have one). ``rows`` are `rmask eval`'s result rows: ``target``,
    ``eps`` (/255; rows without one, such as CW, are left out), ``family`` (else ``attack``),
    optional ``setting``, and ``value`` (the column plotted). Several attacks of one family at
    one eps (PGD's step/iteration variants) are reduced to the lowest value: the accuracy
    the strongest of them leaves."""
    lines: Dict[Tuple[str, ...], Dict[float, float]] = {}
    for row in rows:
        eps, y = row.get("eps"), row.get(value)
        if eps is None or y is None or (isinstance(y, float) and math.isnan(y)):
            continue
        key = (str(row["target"]), str(row.get("family", row.get("attack", ""))), str(row.get("setting") or ""))
        points = lines.setdefault(key, {})
        points[float(eps)] = min(points.get(float(eps), math.inf), float(y))
    if not lines:
        raise ValueError(f"no rows with an eps and a {value!r} to plot")
    figure = _figure(figsize=(6.4, 4.4), dpi=120, layout="constrained")
    axes = figure.subplots()
    for (target, family, setting), points in lines.items():
        xs = sorted(points)
        label = f"{target} · {family}" + (f" ({setting})" if setting else "")
        axes.plot(xs, [points[x] for x in xs], marker="o", label=label)
    axes.set_xlabel("eps (/255)")
    axes.set_ylabel(value.replace("_", " "))
    axes.set_ylim(-0.02, 1.02)
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize="small")
    axes.set_title(title or "Robust accuracy vs eps")
    return _save(figure, path)


def plot_lines(lines: Mapping[str, Mapping[float, float]], path: Union[str, os.PathLike], xlabel: str, ylabel: str,
               title: str) -> Path:
    """A PNG of named lines, each ``{x: y}`` (NaN points left out), y in [0, 1]: e.g. the
    defense success rate against the mask ratio, one line per placement."""
    drawn = {name: {x: y for x, y in points.items() if not math.isnan(y)} for name, points in lines.items()}
    drawn = {name: points for name, points in drawn.items() if points}
    if not drawn:
        raise ValueError(f"no points to plot in {path}")
    figure = _figure(figsize=(6.4, 4.4), dpi=120, layout="constrained")
    axes = figure.subplots()
    for name, points in drawn.items():
        xs = sorted(points)
        axes.plot(xs, [points[x] for x in xs], marker="o", label=name)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.set_ylim(-0.02, 1.02)
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize="small")
    axes.set_title(title)
    return _save(figure, path)


def _as_image(image: torch.Tensor):
    """uint8 [C, H, W] -> what imshow takes: [H, W] (grayscale) or [H, W, C]."""
    if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"images must be uint8 [N, 1 or 3, H, W], got {image.dtype} [?, {', '.join(map(str, image.shape))}]")
    image = image.cpu()
    return image[0].numpy() if image.shape[0] == 1 else image.permute(1, 2, 0).numpy()


def example_grid(originals_uint8: torch.Tensor, adversarials_uint8: torch.Tensor, labels: torch.Tensor,
                 preds: torch.Tensor, path: Union[str, os.PathLike], n: int = 8,
                 classes: Optional[Sequence[str]] = None, title: Optional[str] = None) -> Path:
    """A PNG of the first ``n`` examples: originals on the top row (titled with the true
    class), adversarials below (titled with the model's prediction), so one can judge
    whether the change would fool a person too. Images are uint8 [N, C, H, W], grayscale
    (C = 1) or RGB (C = 3); ``classes`` names the class indices."""
    count = min(int(n), len(originals_uint8))
    if len(adversarials_uint8) != len(originals_uint8) or len(labels) != len(originals_uint8) or len(preds) != len(originals_uint8):
        raise ValueError(
            f"example_grid needs one original, adversarial, label and prediction per example, got "
            f"{len(originals_uint8)}, {len(adversarials_uint8)}, {len(labels)}, {len(preds)}"
        )
    if count < 1:
        raise ValueError("example_grid needs at least one example")

    def name(index: int) -> str:
        return str(classes[index]) if classes is not None else str(index)

    figure = _figure(figsize=(1.3 * count + 0.4, 3.2), dpi=120, layout="constrained")
    axes = figure.subplots(2, count, squeeze=False)
    for column in range(count):
        for row, (images, caption) in enumerate(
            ((originals_uint8, f"true {name(int(labels[column]))}"),
             (adversarials_uint8, f"pred {name(int(preds[column]))}"))
        ):
            ax = axes[row][column]
            ax.imshow(_as_image(images[column]), cmap="gray", vmin=0, vmax=255, interpolation="nearest")
            ax.set_title(caption, fontsize="small")
            ax.set_xticks([])
            ax.set_yticks([])
        if column == 0:
            axes[0][0].set_ylabel("original")
            axes[1][0].set_ylabel("adversarial")
    figure.suptitle(title or "Adversarial examples that fool the model")
    return _save(figure, path)


class GridExamples:
    """What `example_grid` shows, gathered from several sets of crafted examples: up to
    ``limit`` adversarial examples, one per test image (several attacks often fool a model on
    the same ones), with their originals, true labels and the model's predictions."""

    def __init__(self, limit: int):
        self.limit = limit
        self.shown: set = set()  # test-image indices
        self._parts: List[Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []

    @property
    def count(self) -> int:
        return len(self.shown)

    def add(self, test: ImageData, crafted: Mapping[str, Any], predictions: torch.Tensor, chosen: torch.Tensor) -> None:
        """Take, in order, the examples of ``crafted`` (`craft`'s or `load_adversarial`'s dict)
        where ``chosen`` (bool, one per example) holds and whose test image is not shown yet,
        until ``limit``; ``predictions`` are the model's on each example."""
        take = [position for position in torch.nonzero(chosen).flatten().tolist()
                if int(crafted["index"][position]) not in self.shown][: self.limit - self.count]
        if take:
            self.shown.update(int(crafted["index"][position]) for position in take)
            self._parts.append((to_uint8(test.images[crafted["index"][take]]), crafted["adversarial"][take],
                                crafted["label"][take], predictions[take]))

    def tensors(self) -> List[torch.Tensor]:
        """Originals, adversarials, labels and predictions: `example_grid`'s first arguments."""
        return [torch.cat(column) for column in zip(*self._parts)]
