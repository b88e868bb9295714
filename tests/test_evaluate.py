"""Evaluation (rmask_kernels.experiments.evaluate, .plots): the paper's transfer metric on a
hand-counted case, transfer_eval's alignment, settings, white-box, noise, patch shuffling,
decision-based attacks, tables and figures.

Models are a fake one (fixed predictions keyed by a pixel value) and a tiny conv net trained
on scikit-learn's 8x8 digits in about a second; one torch thread (the machine is shared).
"""

import csv
import math
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from rmask_kernels.experiments.attacks import load_adversarial, save_adversarial
from rmask_kernels.experiments.data import ImageData, to_uint8
from rmask_kernels.experiments.evaluate import (
    TransferResult,
    clean_accuracy,
    decision_based_eval,
    defense_success_rate,
    gaussian_noise,
    noise_robustness,
    patch_shuffle,
    patch_shuffle_accuracy,
    to_markdown,
    transfer_eval,
    transfer_predictions,
    transfer_setting,
    white_box_eval,
    write_csv,
)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def image_data(images, labels, name="test"):
    return ImageData(images, labels, name, tuple(str(k) for k in range(10)), (0.5,) * images.shape[1], (0.25,) * images.shape[1])


@pytest.fixture(scope="module")
def digits():
    """scikit-learn's 8x8 digits as 8-bit pixels (so an 8-bit round trip is exact): train, test."""
    sklearn_datasets = pytest.importorskip("sklearn.datasets")
    data = sklearn_datasets.load_digits()
    images = (torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16 * 255).round() / 255
    labels = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    return image_data(images[order[:1400]], labels[order[:1400]]), image_data(images[order[1400:1600]], labels[order[1400:1600]])


@pytest.fixture(scope="module")
def model(digits):
    train, test = digits
    torch.manual_seed(0)
    network = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(512, 10))
    optimizer = torch.optim.Adam(network.parameters(), lr=1e-2)
    for _ in range(60):  # full batch: under a second
        loss = F.cross_entropy(network(train.images), train.labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    network.eval()
    assert clean_accuracy(network, test) > 0.85
    return network


class KeyedModel(nn.Module):
    """Predicts ``table[key]`` for an image whose pixels all equal key/255 (fixed logits per image)."""

    def __init__(self, table):
        super().__init__()
        self.table = dict(table)

    def forward(self, images):
        keys = (images[:, 0, 0, 0] * 255).round().long().tolist()
        return F.one_hot(torch.tensor([self.table[key] for key in keys]), 10).float()


# ---------------------------------------------------------------------------------------------
# The metric


def test_defense_success_rate_on_a_hand_counted_case():
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8, 9])
    # 6, 7 did not fool the source; the target gets 4, 5 wrong when clean: all four left out.
    source_fooled = torch.tensor([1, 1, 1, 1, 1, 1, 0, 0, 1, 1], dtype=torch.bool)
    clean = torch.tensor([0, 1, 2, 3, 9, 9, 6, 7, 8, 9])
    # Counted: 0, 1, 2, 3, 8, 9. Still right on the adversarial: 0, 2, 8, 9 (4 of 6).
    # 4 and 6 are right on the adversarial and 7 is wrong, none of which may count.
    adversarial = torch.tensor([0, 5, 2, 0, 4, 0, 6, 1, 8, 9])
    result = defense_success_rate(adversarial, clean, labels, source_fooled)
    assert result == TransferResult(
        accuracy=4 / 6, transfer_rate=1 - 4 / 6, counted=6, defended=4, fooled_source=8, clean_correct=8, examples=10
    )
    row = result.as_row()
    assert row["defense_success_rate"] == 4 / 6 and "accuracy" not in row and row["counted"] == 6


def test_defense_success_rate_with_nothing_counted_is_nan():
    labels = torch.tensor([3, 4])
    result = defense_success_rate(labels, labels, labels, torch.tensor([False, False]))
    assert result.counted == 0 and math.isnan(result.accuracy) and math.isnan(result.transfer_rate)
    empty = torch.zeros(0, dtype=torch.long)
    assert defense_success_rate(empty, empty, empty, torch.zeros(0, dtype=torch.bool)).examples == 0


def test_defense_success_rate_rejects_bad_inputs():
    labels = torch.tensor([1, 2, 3])
    fooled = torch.ones(3, dtype=torch.bool)
    with pytest.raises(ValueError, match="target_pred_adv has 2 entries"):
        defense_success_rate(labels[:2], labels, labels, fooled)
    with pytest.raises(TypeError, match="source_fooled must be a 1-D bool tensor"):
        defense_success_rate(labels, labels, labels, fooled.long())
    with pytest.raises(TypeError, match="target_pred_clean must be a 1-D integer tensor"):
        defense_success_rate(labels, labels.float(), labels, fooled)


# ---------------------------------------------------------------------------------------------
# transfer_eval


@pytest.fixture
def keyed_case():
    """12 test images (image j: every pixel j/255), 7 adversarials (pixels 100 + index) and a
    target whose predictions on each are fixed, counted by hand below."""
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1])
    images = torch.arange(12, dtype=torch.float32).reshape(12, 1, 1, 1).expand(12, 1, 4, 4) / 255
    test = image_data(images.contiguous(), labels)
    index = torch.tensor([1, 3, 4, 6, 7, 9, 10])
    crafted = {
        "adversarial": (100 + index).to(torch.uint8).reshape(-1, 1, 1, 1).expand(-1, 1, 4, 4).contiguous(),
        "index": index,
        "label": labels[index],
        # The source is fooled on all but index 7.
        "source_prediction": torch.tensor([5, 5, 5, 5, 7, 5, 5]),
        "attack": "fgsm:eps=8",
        "eps": 8.0,
        "num_images": 12,
    }
    clean = {j: int(labels[j]) for j in range(12)}
    clean[4] = 9  # target wrong on clean image 4: left out
    adversarial = {100 + j: int(labels[j]) for j in range(12)}  # survives ...
    adversarial[103] = 0  # ... except these two
    adversarial[110] = 8
    # Counted: 1, 3, 6, 9, 10 (4: clean wrong, 7: source not fooled); survive: 1, 6, 9.
    return KeyedModel({**clean, **adversarial}), crafted, test


def test_transfer_eval_aligns_by_index_and_counts(keyed_case, tmp_path):
    target, crafted, test = keyed_case
    predictions = transfer_predictions(target, crafted, test, batch_size=3)
    assert predictions.clean.tolist() == [1, 3, 9, 6, 7, 9, 0]
    assert predictions.adversarial.tolist() == [1, 0, 4, 6, 7, 9, 8]
    expected = TransferResult(3 / 5, 1 - 3 / 5, counted=5, defended=3, fooled_source=6, clean_correct=6, examples=7)
    assert transfer_eval(target, crafted, test, batch_size=4) == expected
    # The same from the saved file (8-bit round trip), given as a path or loaded.
    path = save_adversarial(tmp_path / "fgsm-8.pt", crafted)
    assert transfer_eval(target, path, test) == expected
    assert transfer_eval(target, load_adversarial(path), test) == expected


def test_transfer_eval_rejects_misaligned_examples(keyed_case):
    target, crafted, test = keyed_case
    with pytest.raises(ValueError, match=r"fgsm:eps=8: test-image index 10 is out of range .*10 images.*--limit"):
        transfer_eval(target, crafted, test.subset(slice(0, 10)))
    shifted = dict(crafted, label=crafted["label"].roll(1))
    with pytest.raises(ValueError, match="labels disagree"):
        transfer_eval(target, shifted, test)


def test_transfer_setting():
    normal = {"path": "runs/normal/best.pt", "masked": False}
    masked = {"path": "runs/rm-a/best.pt", "masked": True}
    assert transfer_setting([normal], "runs/normal/best.pt", target_masked=False) == "white-box"
    assert transfer_setting([normal, masked], "runs/rm-a/best.pt", target_masked=True) == "white-box"
    assert transfer_setting([masked], "runs/rm-b/best.pt", target_masked=True) == "gray-box"
    assert transfer_setting([normal], "runs/rm-b/best.pt", target_masked=True) == "black-box"
    assert transfer_setting([masked], "runs/normal2/best.pt", target_masked=False) == "black-box"
    assert transfer_setting([], None, target_masked=True) == "black-box"


def test_white_box_eval(model, digits):
    _, test = digits
    test = test.subset(slice(0, 64))
    correct = int((model(test.images).argmax(1) == test.labels).sum())
    strong = white_box_eval(model, test, "pgd-4-10-64", batch_size=32)
    assert strong.counted == strong.clean_correct == strong.examples == correct
    assert strong.defended + strong.fooled_source == strong.counted
    assert strong.accuracy < 0.2  # white-box PGD fools an undefended model
    # eps 0 on 8-bit images: the adversarial IS the image, nothing is fooled.
    assert white_box_eval(model, test, "fgsm-0").accuracy == 1.0


# ---------------------------------------------------------------------------------------------
# Noise and patch shuffling


def test_gaussian_noise_is_truncated_seeded_and_has_sigma_eps_over_2():
    images = torch.full((64, 3, 8, 8), 0.5)
    eps = 0.1
    noisy = gaussian_noise(images, eps, torch.Generator().manual_seed(1))
    noise = noisy - images
    assert noise.abs().max() <= eps + 1e-6
    # Values beyond ±2 sigma are clipped to ±eps: P(|z| > 2) = 4.55%, and the standard
    # deviation left is sqrt(E[min(z^2, 4)]) = 0.96 sigma (12288 draws: about ±1% noise).
    clipped = (noise.abs() >= eps - 1e-6).double().mean()
    assert 0.035 < clipped < 0.056
    assert 0.93 * eps / 2 < noise.std() < 0.99 * eps / 2
    assert torch.equal(noisy, gaussian_noise(images, eps, torch.Generator().manual_seed(1)))
    assert not torch.equal(noisy, gaussian_noise(images, eps, torch.Generator().manual_seed(2)))
    edge = gaussian_noise(torch.ones(4, 1, 8, 8), 0.5)
    assert edge.max() <= 1 and edge.min() >= 0
    assert torch.equal(gaussian_noise(images, 0.0), images)
    with pytest.raises(ValueError, match="eps must be a finite number >= 0"):
        gaussian_noise(images, -0.1)


def test_noise_robustness(model, digits):
    _, test = digits
    assert noise_robustness(model, test, 0.0) == clean_accuracy(model, test)
    noisy = noise_robustness(model, test, 64 / 255, batch_size=50, seed=3)
    assert noisy == noise_robustness(model, test, 64 / 255, batch_size=50, seed=3)
    assert 0 <= noisy <= 1


def patches_of(images, s):
    n, c, h, w = images.shape
    return images.reshape(n, c, s, h // s, s, w // s).permute(0, 2, 4, 1, 3, 5).reshape(n, s * s, -1)


@pytest.mark.parametrize("s", [2, 4, 8])
def test_patch_shuffle_permutes_patches(s):
    images = torch.rand(6, 3, 16, 8)
    shuffled = patch_shuffle(images, s, torch.Generator().manual_seed(0))
    assert shuffled.shape == images.shape
    # Each image's pixels are the same multiset, per channel ...
    assert torch.equal(shuffled.flatten(2).sort(-1).values, images.flatten(2).sort(-1).values)
    # ... moved as whole patches: each output patch is exactly one input patch, used once.
    before, after = patches_of(images, s), patches_of(shuffled, s)
    for k in range(len(images)):
        matches = (after[k][:, None, :] == before[k][None, :, :]).all(-1)
        assert torch.equal(matches.sum(1), torch.ones(s * s, dtype=torch.long))
        assert torch.equal(matches.sum(0), torch.ones(s * s, dtype=torch.long))
    assert not torch.equal(shuffled, images)
    assert torch.equal(shuffled, patch_shuffle(images, s, torch.Generator().manual_seed(0)))


def test_patch_shuffle_s1_is_the_identity_and_bad_grids_are_rejected():
    images = torch.rand(3, 1, 8, 8)
    assert torch.equal(patch_shuffle(images, 1), images)
    with pytest.raises(ValueError, match="s=3 does not divide the 8×8 images"):
        patch_shuffle(images, 3)
    with pytest.raises(ValueError, match="positive integer"):
        patch_shuffle(images, 0)


def test_patch_shuffle_accuracy(model, digits):
    _, test = digits
    assert patch_shuffle_accuracy(model, test, 1) == clean_accuracy(model, test)
    shuffled = patch_shuffle_accuracy(model, test, 4, batch_size=64, seed=5)
    assert shuffled == patch_shuffle_accuracy(model, test, 4, batch_size=64, seed=5)
    assert shuffled < clean_accuracy(model, test)


# ---------------------------------------------------------------------------------------------
# Decision-based


def test_decision_based_eval(model, digits):
    pytest.importorskip("foolbox")
    _, test = digits
    result = decision_based_eval(model, test, "boundary", n=3, steps=20, seed=0)
    assert result.attack == "boundary" and result.attacked == 3 and 1 <= result.succeeded <= 3
    assert result.mean_squared_distortion > 0
    assert result.as_row()["mean_squared_distortion"] == result.mean_squared_distortion


def test_decision_based_eval_errors(model, digits, monkeypatch):
    _, test = digits
    with pytest.raises(ValueError, match="unknown decision-based attack 'square'"):
        decision_based_eval(model, test, "square", n=2)
    monkeypatch.setitem(sys.modules, "foolbox", None)  # `import foolbox` fails
    with pytest.raises(ImportError, match=r"rmask_kernels\[attacks\]"):
        decision_based_eval(model, test, "boundary", n=2, steps=1)


# ---------------------------------------------------------------------------------------------
# Tables


ROWS = [
    {"target": "normal", "attack": "fgsm-8", "accuracy": 0.5, "counted": 10},
    {"target": "rm|0.9", "attack": "pgd-1-20-16", "accuracy": math.nan, "counted": 0, "eps": 16.0},
]


def test_to_markdown():
    text = to_markdown(ROWS)
    assert text.splitlines() == [
        "| target | attack | accuracy | counted | eps |",
        "|---|---|---:|---:|---:|",
        "| normal | fgsm-8 | 0.500 | 10 |  |",
        "| rm\\|0.9 | pgd-1-20-16 | n/a | 0 | 16.000 |",
    ]
    assert to_markdown(ROWS, ["counted", "target"], digits=1).splitlines()[2] == "| 10 | normal |"


def test_write_csv(tmp_path):
    path = write_csv(tmp_path / "out" / "results.csv", ROWS)
    with open(path, newline="") as handle:
        read = list(csv.DictReader(handle))
    assert [row["target"] for row in read] == ["normal", "rm|0.9"]
    assert float(read[0]["accuracy"]) == 0.5 and read[0]["eps"] == "" and math.isnan(float(read[1]["accuracy"]))
    assert sorted(p.name for p in path.parent.iterdir()) == ["results.csv"]  # no temporary file left


# ---------------------------------------------------------------------------------------------
# Figures


def is_png(path):
    return path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 1000


def test_plot_accuracy_vs_eps(tmp_path):
    pytest.importorskip("matplotlib")
    from rmask_kernels.experiments.plots import plot_accuracy_vs_eps

    rows = [
        {"target": target, "family": family, "eps": eps, "defense_success_rate": value, "setting": "black-box"}
        for target, base in (("normal", 0.2), ("rm0.9", 0.6))
        for family in ("fgsm", "pgd")
        for eps, value in ((8.0, base + 0.3), (16.0, base + 0.1), (16.0, base), (32.0, math.nan))
    ] + [{"target": "normal", "family": "cw-l2", "eps": None, "defense_success_rate": 0.1}]
    assert is_png(plot_accuracy_vs_eps(rows, tmp_path / "accuracy.png"))
    with pytest.raises(ValueError, match="no rows with an eps"):
        plot_accuracy_vs_eps(rows[-1:], tmp_path / "none.png")


@pytest.mark.parametrize("channels", [1, 3])
def test_example_grid(tmp_path, channels):
    pytest.importorskip("matplotlib")
    from rmask_kernels.experiments.plots import example_grid

    originals = to_uint8(torch.rand(5, channels, 8, 8))
    adversarials = to_uint8(torch.rand(5, channels, 8, 8))
    labels, preds = torch.arange(5), torch.arange(5).flip(0)
    path = example_grid(originals, adversarials, labels, preds, tmp_path / "grid.png", n=4,
                        classes=[f"c{k}" for k in range(10)])
    assert is_png(path)
    with pytest.raises(ValueError, match="one original, adversarial, label and prediction"):
        example_grid(originals, adversarials[:2], labels, preds, tmp_path / "bad.png")


def test_plots_without_matplotlib_name_the_extra(tmp_path, monkeypatch):
    from rmask_kernels.experiments.plots import plot_accuracy_vs_eps

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    rows = [{"target": "t", "family": "fgsm", "eps": 8.0, "defense_success_rate": 0.5}]
    with pytest.raises(ImportError, match=r"pip install 'rmask_kernels\[plot\]'"):
        plot_accuracy_vs_eps(rows, tmp_path / "x.png")
