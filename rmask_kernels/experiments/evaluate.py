"""Evaluation of the paper's experiments: the transfer metric, white-box, random noise, patch
shuffling, decision-based attacks, and result tables.

Conventions (shared with the rest of rmask_kernels.experiments): models take [0, 1] pixels
[N, C, H, W] and return logits; data is an `ImageData`; adversarial examples are what
`attacks.craft` returns or `attacks.load_adversarial` reads (uint8 images plus the index of
each one's test image, its true label and the source model's prediction).

The paper's metric, "defense success rate" (`defense_success_rate`): among the adversarial
examples that fooled the SOURCE and whose clean image the TARGET classifies correctly, the
fraction the target still classifies correctly. The transfer rate is its complement over
the same examples. Settings (`transfer_setting`): black-box (an independent source),
gray-box (the source is another Random-Mask model: a different mask and weights) and
white-box (the target attacked directly, `white_box_eval`).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Sequence, Union

import torch
import torch.nn as nn

from .attacks import AttackSpec, boundary_attack, craft, hop_skip_jump, load_adversarial, parse_attack
from .checkpoint import atomic_write
from .data import ImageData, from_uint8
from .inference import check_batch_size, model_device, predict

__all__ = [
    "DECISION_ATTACKS",
    "SETTINGS",
    "DecisionResult",
    "TransferPredictions",
    "TransferResult",
    "clean_accuracy",
    "decision_based_eval",
    "defense_success_rate",
    "gaussian_noise",
    "noise_robustness",
    "patch_shuffle",
    "patch_shuffle_accuracy",
    "to_markdown",
    "transfer_eval",
    "transfer_predictions",
    "transfer_setting",
    "white_box_eval",
    "white_box_result",
    "write_csv",
]

SETTINGS = ("black-box", "gray-box", "white-box")
DECISION_ATTACKS = ("boundary", "hop-skip-jump")

Crafted = Mapping[str, Any]  # craft()'s or load_adversarial()'s dict


# ---------------------------------------------------------------------------------------------
# Clean accuracy


def clean_accuracy(model: nn.Module, data: ImageData, batch_size: int = 256,
                   device: Union[str, torch.device, None] = None) -> float:
    """Accuracy (a fraction) of ``model`` on ``data`` as it is."""
    if len(data) == 0:
        raise ValueError(f"clean_accuracy: {data!r} holds no images")
    return float((predict(model, data.images, batch_size, device) == data.labels).double().mean())


# ---------------------------------------------------------------------------------------------
# The transfer metric


@dataclasses.dataclass(frozen=True)
class TransferResult:
    """The paper's transfer metric with its counts.

    ``accuracy`` is the defense success rate ``defended / counted`` and ``transfer_rate``
    ``1 - accuracy`` (both NaN when nothing is counted). ``counted``: examples that fooled
    the source and whose clean image the target classifies correctly; ``defended``: of
    those, the ones the target still classifies correctly. ``fooled_source`` and
    ``clean_correct`` are over all ``examples``.
    """

    accuracy: float
    transfer_rate: float
    counted: int
    defended: int
    fooled_source: int
    clean_correct: int
    examples: int

    def as_row(self) -> Dict[str, Any]:
        """The fields under table column names (``accuracy`` -> ``defense_success_rate``)."""
        fields = dataclasses.asdict(self)
        return {"defense_success_rate": fields.pop("accuracy"), **fields}


def _check_vector(name: str, value: Any, length: Optional[int] = None, boolean: bool = False) -> torch.Tensor:
    kind = "bool" if boolean else "integer"
    ok = isinstance(value, torch.Tensor) and value.dim() == 1 and (
        value.dtype == torch.bool if boolean else (not value.is_floating_point() and value.dtype != torch.bool)
    )
    if not ok:
        shown = f"{value.dtype} tensor of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__
        raise TypeError(f"{name} must be a 1-D {kind} tensor, got {shown}")
    if length is not None and value.shape[0] != length:
        raise ValueError(f"{name} has {value.shape[0]} entries, labels has {length}")
    return value.cpu()


def defense_success_rate(target_pred_adv: torch.Tensor, target_pred_clean: torch.Tensor,
                         labels: torch.Tensor, source_fooled: torch.Tensor) -> TransferResult:
    """The paper's metric over one set of adversarial examples (one entry per example).

    ``target_pred_adv``/``target_pred_clean``: the target's predicted classes on the
    adversarial and on the clean image; ``labels``: the true classes; ``source_fooled``
    (bool): whether the example fooled the source. Examples that did not fool the source,
    or whose clean image the target gets wrong, are left out of the rate.
    """
    labels = _check_vector("labels", labels)
    count = labels.shape[0]
    adversarial = _check_vector("target_pred_adv", target_pred_adv, count)
    clean = _check_vector("target_pred_clean", target_pred_clean, count)
    fooled = _check_vector("source_fooled", source_fooled, count, boolean=True)
    clean_correct = clean == labels
    counted = fooled & clean_correct
    defended = counted & (adversarial == labels)
    counted_total, defended_total = int(counted.sum()), int(defended.sum())
    rate = defended_total / counted_total if counted_total else math.nan
    return TransferResult(
        accuracy=rate, transfer_rate=1 - rate, counted=counted_total, defended=defended_total,
        fooled_source=int(fooled.sum()), clean_correct=int(clean_correct.sum()), examples=count,
    )


class TransferPredictions(NamedTuple):
    """The target's predicted classes on each example's clean test image and on the example."""

    clean: torch.Tensor
    adversarial: torch.Tensor

    def transferred(self, crafted: Crafted) -> torch.Tensor:
        """Per example of ``crafted`` (bool): it fooled the source and fools the target, whose
        clean image the target classifies correctly (the transfers the paper's metric counts)."""
        labels = crafted["label"]
        return (crafted["source_prediction"] != labels) & (self.clean == labels) & (self.adversarial != labels)


def _describe_crafted(crafted: Crafted) -> str:
    meta = crafted.get("meta") or {}
    return str(meta.get("attack") or crafted.get("attack") or "adversarial examples")


def _check_alignment(crafted: Crafted, test_data: ImageData) -> torch.Tensor:
    """``crafted``'s index, checked against ``test_data`` (in range, same labels)."""
    where = _describe_crafted(crafted)
    index = crafted["index"].long().cpu()
    if len(index) and (int(index.min()) < 0 or int(index.max()) >= len(test_data)):
        raise ValueError(
            f"{where}: test-image index {int(index.max())} is out of range for {test_data.name} "
            f"({len(test_data)} images); crafted on other data or with a larger --limit?"
        )
    if not torch.equal(crafted["label"].long().cpu(), test_data.labels[index]):
        raise ValueError(f"{where}: labels disagree with {test_data.name} at the stored indices; crafted on other data?")
    return index


def transfer_predictions(target: nn.Module, crafted: Crafted, test_data: ImageData, batch_size: int = 256,
                         device: Union[str, torch.device, None] = None) -> TransferPredictions:
    """The target's predictions on the crafted (8-bit, reloaded) examples and on the test
    images they were made from (aligned by ``index``; checked against ``test_data``)."""
    index = _check_alignment(crafted, test_data)
    clean = predict(target, test_data.images[index], batch_size, device)
    adversarial = predict(target, from_uint8(crafted["adversarial"]), batch_size, device)
    return TransferPredictions(clean, adversarial)


def transfer_eval(target: nn.Module, crafted: Union[Crafted, str, os.PathLike], test_data: ImageData,
                  batch_size: int = 256, device: Union[str, torch.device, None] = None) -> TransferResult:
    """The defense success rate of ``target`` on examples crafted on a source model:
    ``crafted`` is `craft`'s dict, `load_adversarial`'s, or the path of a saved file."""
    if isinstance(crafted, (str, os.PathLike)):
        crafted = load_adversarial(crafted)
    predictions = transfer_predictions(target, crafted, test_data, batch_size, device)
    source_fooled = crafted["source_prediction"].cpu() != crafted["label"].cpu()
    return defense_success_rate(predictions.adversarial, predictions.clean, crafted["label"], source_fooled)


def transfer_setting(sources: Sequence[Mapping[str, Any]], target_path: Union[str, os.PathLike, None],
                     target_masked: bool) -> str:
    """The setting of a transfer evaluation, from the saved sources' metadata (each with
    ``path`` and ``masked``, as ``rmask attack`` stores them):

    - ``white-box``: the target is one of the sources (same checkpoint file);
    - ``gray-box``: a Random-Mask target attacked from a Random-Mask source (another model:
      the paper's "same ratio, different mask and weights");
    - ``black-box``: otherwise (independent sources), and when nothing is known of them.
    """
    if target_path is not None:
        target = Path(target_path).resolve()
        if any(source.get("path") and Path(source["path"]).resolve() == target for source in sources):
            return "white-box"
    if target_masked and any(source.get("masked") for source in sources):
        return "gray-box"
    return "black-box"


def white_box_result(crafted: Crafted) -> TransferResult:
    """The white-box result of examples crafted on the model itself (`craft`'s dict): the
    source IS the target, so the paper's filter would count only examples that fool it and
    the rate would be 0 by construction. Here ``counted`` is every example (all of them
    clean-correct, as `craft` keeps only those) and ``accuracy`` the fraction the model still
    classifies correctly on the 8-bit adversarial (its robust accuracy); ``fooled_source``
    the examples that fool it."""
    labels = crafted["label"].cpu()
    still_correct = crafted["source_prediction"].cpu() == labels
    count, defended = labels.shape[0], int(still_correct.sum())
    rate = defended / count if count else math.nan
    return TransferResult(
        accuracy=rate, transfer_rate=1 - rate, counted=count, defended=defended,
        fooled_source=count - defended, clean_correct=count, examples=count,
    )


def white_box_eval(model: nn.Module, data: ImageData, spec: Union[AttackSpec, str], batch_size: int = 128,
                   generator: Optional[torch.Generator] = None) -> TransferResult:
    """Attack ``model`` directly with ``spec`` on the images of ``data`` it classifies
    correctly; see `white_box_result` for what the numbers mean."""
    if isinstance(spec, str):
        spec = parse_attack(spec)
    return white_box_result(craft(model, data.images, data.labels, spec, batch_size=batch_size, generator=generator))


# ---------------------------------------------------------------------------------------------
# Random noise and patch shuffling


def _check_eps(eps: float) -> None:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be a finite number >= 0 (in [0, 1] pixel units), got {eps!r}")


def gaussian_noise(images: torch.Tensor, eps: float, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """``images`` plus Gaussian noise of sigma ``eps / 2``, each value truncated (clipped) to
    ``[-eps, eps]``, the result clipped to [0, 1]. ``eps`` in [0, 1] pixel units. The noise
    is drawn on the CPU (so a seed gives the same noise on any device)."""
    _check_eps(eps)
    noise = torch.randn(images.shape, generator=generator, dtype=torch.float32) * (eps / 2)
    noise = noise.clamp_(-eps, eps).to(device=images.device, dtype=images.dtype)
    return (images + noise).clamp(0.0, 1.0)


def noise_robustness(model: nn.Module, data: ImageData, eps: float, batch_size: int = 256, seed: int = 0,
                     device: Union[str, torch.device, None] = None) -> float:
    """Accuracy of ``model`` on ``data`` under `gaussian_noise` of ``eps`` ([0, 1] units; the
    paper's sigma = eps/2 truncated to ±eps). Reproducible for a given seed and batch size."""
    _check_eps(eps)
    return _accuracy_under(model, data, lambda images, generator: gaussian_noise(images, eps, generator),
                           batch_size, seed, device)


def _accuracy_under(model: nn.Module, data: ImageData, transform, batch_size: int, seed: int, device) -> float:
    """Accuracy on ``transform(images, generator)`` batch by batch, one seeded generator
    drawn in order (reproducible for a given seed and batch size)."""
    check_batch_size(batch_size)
    generator = torch.Generator().manual_seed(seed)
    correct = 0
    for start in range(0, len(data), batch_size):
        images = transform(data.images[start:start + batch_size], generator)
        correct += int((predict(model, images, batch_size, device) == data.labels[start:start + batch_size]).sum())
    return correct / len(data) if len(data) else math.nan


def patch_shuffle(images: torch.Tensor, s: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Cut each image into an ``s``×``s`` grid of patches (each H/s × W/s pixels, all
    channels) and put the patches back in a random order, one permutation per image.

    This is our reading of the paper's "random patch shuffling (s×s patches, s = 2, 4, 8)":
    ``s`` counts patches per side, so s = 8 on 32×32 images leaves 4×4 patches (local
    texture kept, global shape destroyed); s = 1 returns the images unchanged.
    """
    if isinstance(s, bool) or not isinstance(s, int) or s < 1:
        raise ValueError(f"patch grid s must be a positive integer, got {s!r}")
    if images.dim() != 4:
        raise ValueError(f"images must be [N, C, H, W], got shape {tuple(images.shape)}")
    count, channels, height, width = images.shape
    if height % s or width % s:
        raise ValueError(f"patch grid s={s} does not divide the {height}×{width} images")
    patch_h, patch_w = height // s, width // s
    # [N, C, s, h, s, w] -> [N, s*s, C, h, w]: one row per patch.
    patches = images.reshape(count, channels, s, patch_h, s, patch_w).permute(0, 2, 4, 1, 3, 5)
    patches = patches.reshape(count, s * s, channels, patch_h, patch_w)
    # argsort of uniform draws: an independent uniform permutation per image.
    order = torch.rand(count, s * s, generator=generator).argsort(1).to(images.device)
    shuffled = patches[torch.arange(count, device=images.device)[:, None], order]
    shuffled = shuffled.reshape(count, s, s, channels, patch_h, patch_w).permute(0, 3, 1, 4, 2, 5)
    return shuffled.reshape(count, channels, height, width)


def patch_shuffle_accuracy(model: nn.Module, data: ImageData, s: int, batch_size: int = 256, seed: int = 0,
                           device: Union[str, torch.device, None] = None) -> float:
    """Accuracy of ``model`` on ``data`` with each image's `patch_shuffle` of an s×s grid
    (seeded: the same permutations for every model evaluated with the same seed)."""
    return _accuracy_under(model, data, lambda images, generator: patch_shuffle(images, s, generator),
                           batch_size, seed, device)


# ---------------------------------------------------------------------------------------------
# Decision-based attacks


@dataclasses.dataclass(frozen=True)
class DecisionResult:
    """A decision-based evaluation: ``mean_squared_distortion`` (mean over pixels of
    (x' - x)^2 in [0, 1] units, averaged over the ``succeeded`` examples; NaN when none; larger
    = more robust) of ``attack`` on ``attacked`` correctly classified images."""

    attack: str
    attacked: int
    succeeded: int
    mean_squared_distortion: float

    def as_row(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


def decision_based_eval(model: nn.Module, data: ImageData, attack: str = "boundary", n: int = 500,
                        steps: Optional[int] = None, seed: int = 0, batch_size: int = 100,
                        device: Union[str, torch.device, None] = None, **options: Any) -> DecisionResult:
    """The paper's decision-based evaluation: ``attack`` (``boundary`` or ``hop-skip-jump``,
    through foolbox) on the first ``n`` images of ``data`` that ``model`` classifies
    correctly, in chunks of ``batch_size``. ``steps`` defaults to foolbox's (Boundary 25000,
    HopSkipJump 64); ``options`` go to the foolbox attack. Needs the optional extra
    ``pip install 'rmask_kernels[attacks]'`` (ImportError naming it otherwise)."""
    runners = {"boundary": boundary_attack, "hop-skip-jump": hop_skip_jump}
    if attack not in runners:
        raise ValueError(f"unknown decision-based attack {attack!r}; known: {', '.join(DECISION_ATTACKS)}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    check_batch_size(batch_size)
    device = torch.device(device) if device is not None else model_device(model)
    correct = torch.nonzero(predict(model, data.images, batch_size, device) == data.labels).flatten()[:n]
    if steps is not None:
        options["steps"] = steps
    successes, distortions = [], []
    for chunk, index in enumerate(correct.split(batch_size)):
        result = runners[attack](model, data.images[index].to(device), data.labels[index].to(device),
                                 seed=seed + chunk, **options)
        successes.append(result.success.cpu())
        distortions.append(result.squared_distortion.cpu())
    success = torch.cat(successes) if successes else torch.zeros(0, dtype=torch.bool)
    distortion = torch.cat(distortions) if distortions else torch.zeros(0)
    mean = float(distortion[success].mean()) if bool(success.any()) else math.nan
    return DecisionResult(attack, int(len(correct)), int(success.sum()), mean)


# ---------------------------------------------------------------------------------------------
# Tables: rows are dicts (column -> value)


def _columns(rows: Sequence[Mapping[str, Any]], columns: Optional[Sequence[str]]) -> List[str]:
    if columns is not None:
        return list(columns)
    return list(dict.fromkeys(key for row in rows for key in row))  # first-seen order


def _cell(value: Any, digits: int) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.{digits}f}"
    return str(value).replace("|", "\\|")  # a bare | would split the markdown cell


def to_markdown(rows: Sequence[Mapping[str, Any]], columns: Optional[Sequence[str]] = None, digits: int = 3) -> str:
    """A GitHub markdown table of ``rows`` (``columns`` in order; default: every key, in
    first-seen order). Floats get ``digits`` decimals, NaN reads ``n/a``, missing cells stay
    empty."""
    columns = _columns(rows, columns)
    numeric = {column for column in columns
               if any(isinstance(row.get(column), (int, float)) and not isinstance(row.get(column), bool)
                      for row in rows)}
    lines = [
        "| " + " | ".join(columns) + " |",
        "|" + "|".join("---:" if column in numeric else "---" for column in columns) + "|",
    ]
    lines += ["| " + " | ".join(_cell(row.get(column), digits) for column in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_csv(path: Union[str, os.PathLike], rows: Sequence[Mapping[str, Any]],
              columns: Optional[Sequence[str]] = None) -> Path:
    """Write ``rows`` as CSV (full precision; missing cells empty), atomically. Returns the path."""
    columns = _columns(rows, columns)
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns, restval="", extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return atomic_write(path, lambda handle: handle.write(text.getvalue().encode()))
