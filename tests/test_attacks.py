"""Attacks (rmask_kernels.experiments.attacks): invariants, foolbox agreement, specs, storage.

A tiny conv net trained on scikit-learn's 8x8 digits in about a second is the undefended
model; pixels are quantized to 8 bits so the "within eps after rounding" check is exact.
"""

import math
import os
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from rmask_kernels.experiments import attacks
from rmask_kernels.experiments.attacks import (
    PAPER_GRID,
    AdversarialFileError,
    AttackSpec,
    AttackSpecError,
    Ensemble,
    attacks_by_name,
    craft,
    cw_l2,
    fgsm,
    load_adversarial,
    mi_fgsm,
    parse_attack,
    pgd,
    save_adversarial,
)


def tiny_cnn() -> nn.Module:
    # BatchNorm so that running an attack in train mode would visibly change the model.
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 10)
    )


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16
    images = (images * 255).round() / 255  # 8-bit pixels, as the paper's test images are
    labels = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    train, test = order[:1400], order[1400:]
    return images[train], labels[train], images[test], labels[test]


@pytest.fixture(scope="module")
def model(digits):
    train_images, train_labels, test_images, test_labels = digits
    torch.manual_seed(0)
    network = tiny_cnn()
    optimizer = torch.optim.Adam(network.parameters(), lr=1e-2)
    for _ in range(100):  # full batch: about a second on 2 cores
        loss = F.cross_entropy(network(train_images), train_labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    network.eval()
    with torch.no_grad():
        accuracy = (network(test_images).argmax(1) == test_labels).float().mean().item()
    assert accuracy > 0.9, f"the test model should be a decent classifier, got {accuracy:.2f}"
    for parameter in network.parameters():
        parameter.grad = None
    return network


@pytest.fixture
def batch(digits):
    """A fresh random handful of test digits each run."""
    _, _, images, labels = digits
    chosen = torch.randperm(len(labels))[:64]
    return images[chosen], labels[chosen]


def accuracy(model, images, labels):
    with torch.no_grad():
        return (model(images).argmax(1) == labels).float().mean().item()


def l2(a, b):
    return (a - b).flatten(1).norm(dim=1)


# -- invariants -------------------------------------------------------------------------

ATTACKS_IN_BALL = [
    "fgsm-8",
    "fgsm-32",
    "pgd-2-7-8",
    "pgd-1-20-16",
    "pgd:eps=16,step=4,iters=5,random_start=true",
    "mi-fgsm-2-10-16",
    "mi-fgsm:eps=8,step=2,iters=7,mu=0.5",
]


@pytest.mark.parametrize("text", ATTACKS_IN_BALL)
def test_output_within_eps_after_8bit_rounding_and_clipped(model, batch, text):
    images, labels = batch
    spec = parse_attack(text)
    adversarial = spec.run(model, images, labels, generator=torch.Generator().manual_seed(1))
    assert adversarial.shape == images.shape and adversarial.dtype == images.dtype
    assert adversarial.min() >= 0 and adversarial.max() <= 1
    assert (adversarial - images).abs().max() <= spec.eps / 255 + 1e-6
    # What the target sees: 8-bit rounded. Integer levels, so the bound is exact.
    levels = (adversarial * 255).round() - (images * 255).round()
    assert levels.abs().max() <= spec.eps
    assert levels.abs().max() > 0, "the attack should move some pixel"


def test_fgsm_with_eps_zero_returns_the_input(model, batch):
    images, labels = batch
    assert torch.equal(fgsm(model, images, labels, 0.0), images)


def test_white_box_pgd_fools_the_undefended_model(model, digits):
    _, _, images, labels = digits
    clean = accuracy(model, images, labels)
    adversarial = pgd(model, images, labels, eps=0.2, step=0.02, iterations=20)
    attacked = accuracy(model, adversarial, labels)
    assert clean > 0.9 and attacked < 0.2, (clean, attacked)


class ScriptedGradient(torch.autograd.Function):
    """Zero logits whose backward hands out pre-set input gradients, one per call."""

    @staticmethod
    def forward(ctx, images, script):
        ctx.script = script
        return images.new_zeros(images.shape[0], 2)

    @staticmethod
    def backward(ctx, grad_output):
        return ctx.script.pop(0).clone(), None


class ScriptedModel(nn.Module):
    def __init__(self, gradients):
        super().__init__()
        self.script = list(gradients)

    def forward(self, images):
        return ScriptedGradient.apply(images, self.script)


def test_mi_fgsm_momentum_uses_per_example_l1_normalization():
    # Two examples of two pixels; example 1's first gradient is 1000x example 0's.
    first = torch.tensor([[1.0, 0.0], [1000.0, 0.0]]).reshape(2, 1, 1, 2)
    second = torch.tensor([[-3.0, 1.0], [-3.0, 1.0]]).reshape(2, 1, 1, 2)
    images, labels = torch.full((2, 1, 1, 2), 0.5), torch.zeros(2, dtype=torch.long)
    # Per example: g1 = [1, 0]; g2 = g1 + [-3, 1] / 4 = [0.25, 0.25] -> signs (+, +) for
    # both, so x = 0.5 + 0.1 * [1, 0] + 0.1 * [1, 1]. An unnormalized sum would give
    # (-, +) for example 0, and a batch-wide L1 norm would tell the two examples apart.
    result = mi_fgsm(ScriptedModel([first, second]), images, labels, eps=1.0, step=0.1, iterations=2, mu=1.0)
    expected = torch.tensor([0.7, 0.6]).expand(2, 2).reshape(2, 1, 1, 2)
    torch.testing.assert_close(result, expected)
    # mu = 0 forgets the first step: the second moves by sign([-3, 1]).
    result = mi_fgsm(ScriptedModel([first, second]), images, labels, eps=1.0, step=0.1, iterations=2, mu=0.0)
    expected = torch.tensor([0.5, 0.6]).expand(2, 2).reshape(2, 1, 1, 2)
    torch.testing.assert_close(result, expected)


def test_cw_l2_succeeds_with_smaller_l2_than_pgd(model, batch):
    images, labels = batch
    images, labels = images[:32], labels[:32]
    # Shorter than the paper's settings (lr 5e-4, 1000 steps) to keep the test fast.
    adversarial = cw_l2(model, images, labels, kappa=0.0, lr=2e-2, steps=50, binary_steps=5)
    assert adversarial.min() >= 0 and adversarial.max() <= 1
    with torch.no_grad():
        fooled = model(adversarial).argmax(1) != labels
    assert fooled.float().mean() > 0.8
    baseline = pgd(model, images, labels, eps=0.2, step=0.02, iterations=20)
    with torch.no_grad():
        both = fooled & (model(baseline).argmax(1) != labels)
    assert both.sum() >= 10
    assert l2(adversarial, images)[both].median() < l2(baseline, images)[both].median()
    # Failures come back unchanged.
    assert torch.equal(adversarial[~fooled], images[~fooled])


def test_cw_l2_successes_beat_the_true_class_by_kappa(model, batch):
    images, labels = batch
    images, labels = images[:20], labels[:20]
    kappa = 3.0
    adversarial = cw_l2(model, images, labels, kappa=kappa, lr=2e-2, steps=40, binary_steps=4)
    changed = (adversarial != images).flatten(1).any(1)
    assert changed.any()
    with torch.no_grad():
        logits = model(adversarial[changed])
    true = logits.gather(1, labels[changed, None]).squeeze(1)
    others = logits.scatter(1, labels[changed, None], float("-inf")).amax(1)
    assert (others - true >= kappa - 1e-4).all()


def test_random_start_is_reproducible_with_a_generator(model, batch):
    images, labels = batch

    def run(seed):
        return pgd(model, images, labels, 8 / 255, 2 / 255, 2, random_start=True,
                   generator=torch.Generator().manual_seed(seed))

    assert torch.equal(run(3), run(3))
    assert not torch.equal(run(3), run(4))
    # Zero iterations leaves the random start itself: inside the ball and clipped.
    start = pgd(model, images, labels, 8 / 255, 2 / 255, 0, random_start=True,
                generator=torch.Generator().manual_seed(3))
    assert (start - images).abs().max() <= 8 / 255 + 1e-6 and start.min() >= 0 and start.max() <= 1


@pytest.mark.parametrize("text", ["fgsm-8", "pgd-2-7-8", "mi-fgsm-2-7-8", "cw-l2:kappa=0,steps=3,binary_steps=2"])
def test_attack_restores_training_flags_and_touches_no_parameter(model, batch, text):
    images, labels = batch
    model.train()
    model[1].eval()  # a mixed state must come back as it was, not as one flag for all
    flags = [module.training for module in model.modules()]
    state = {name: value.clone() for name, value in model.state_dict().items()}
    try:
        parse_attack(text).run(model, images[:8], labels[:8])
        assert [module.training for module in model.modules()] == flags
        for name, value in model.state_dict().items():
            assert torch.equal(value, state[name]), f"{name} changed (BN statistics updated?)"
        assert all(parameter.grad is None for parameter in model.parameters())
        assert all(parameter.requires_grad for parameter in model.parameters())
    finally:
        model.eval()


def test_bad_arguments_are_rejected(model, batch):
    images, labels = batch
    with pytest.raises(ValueError, match="eps"):
        fgsm(model, images, labels, -0.1)
    with pytest.raises(ValueError, match="iterations"):
        pgd(model, images, labels, 0.1, 0.01, 2.5)
    with pytest.raises(ValueError, match="labels has 3 entries"):
        pgd(model, images, labels[:3], 0.1, 0.01, 2)
    with pytest.raises(TypeError, match="floating-point"):
        fgsm(model, (images * 255).to(torch.uint8), labels, 0.1)


def test_empty_batch(model):
    images, labels = torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.long)
    for text in ["fgsm-8", "pgd-2-7-8", "mi-fgsm-2-7-8", "cw-l2-40"]:
        assert parse_attack(text).run(model, images, labels).shape == (0, 1, 8, 8)


def test_ensemble_averages_member_logits(model, batch):
    images, _ = batch
    other = tiny_cnn().eval()
    with torch.no_grad():
        torch.testing.assert_close(Ensemble([model, other])(images), (model(images) + other(images)) / 2)
    with pytest.raises(ValueError, match="at least one"):
        Ensemble([])


# -- foolbox ----------------------------------------------------------------------------


def test_pgd_agrees_with_foolbox_linf_pgd(model, digits):
    fb = pytest.importorskip("foolbox")
    _, _, images, labels = digits
    eps, step, steps = 16 / 255, 2 / 255, 10
    attack = fb.attacks.LinfPGD(abs_stepsize=step, steps=steps, random_start=False)
    _, theirs, their_success = attack(fb.PyTorchModel(model, bounds=(0, 1)), images, labels, epsilons=eps)
    ours = pgd(model, images, labels, eps, step, steps)
    with torch.no_grad():
        our_success = model(ours).argmax(1) != labels
    assert torch.equal(our_success, their_success)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["boundary", "hop_skip_jump"])
def test_decision_attacks_smoke(model, batch, name):
    pytest.importorskip("foolbox")
    images, labels = batch
    images, labels = images[:4], labels[:4]
    if name == "boundary":
        result = attacks.boundary_attack(model, images, labels, steps=20, seed=0)
    else:
        result = attacks.hop_skip_jump(
            model, images, labels, steps=2, seed=0, initial_gradient_eval_steps=10, max_gradient_eval_steps=20
        )
    assert result.adversarial.shape == images.shape
    assert result.adversarial.min() >= 0 and result.adversarial.max() <= 1
    with torch.no_grad():
        fooled = model(result.adversarial).argmax(1) != labels
    assert torch.equal(fooled, result.success) and result.success.any()
    assert (result.squared_distortion[result.success] > 0).all()
    assert torch.isnan(result.squared_distortion[~result.success]).all()
    expected = ((result.adversarial - images) ** 2).flatten(1).mean(1)[result.success].mean().item()
    assert math.isclose(result.mean_squared_distortion, expected, rel_tol=1e-6)


def test_decision_attacks_without_foolbox_name_the_extra(model, batch, monkeypatch):
    images, labels = batch
    monkeypatch.setitem(sys.modules, "foolbox", None)  # makes `import foolbox` fail
    with pytest.raises(ImportError, match=r"rmask_kernels\[attacks\].*foolbox==3\.3\.4"):
        attacks.boundary_attack(model, images[:2], labels[:2], steps=1)
    with pytest.raises(ImportError, match=r"pip install"):
        attacks.hop_skip_jump(model, images[:2], labels[:2], steps=1)


# -- crafting and storage ----------------------------------------------------------------


def test_craft_keeps_correct_images_and_stores_rounded_adversarials(model, digits):
    _, _, images, labels = digits
    images, labels = images[:100], labels[:100]
    crafted = craft(model, images, labels, "pgd-2-7-8", batch_size=32)
    with torch.no_grad():
        correct = torch.nonzero(model(images).argmax(1) == labels).flatten()
    assert torch.equal(crafted["index"], correct)
    assert torch.equal(crafted["label"], labels[correct])
    adversarial = crafted["adversarial"]
    assert adversarial.dtype == torch.uint8 and adversarial.shape == (len(correct), 1, 8, 8)
    levels = adversarial.int() - (images[correct] * 255).round().int()
    assert levels.abs().max() <= 8
    with torch.no_grad():
        assert torch.equal(crafted["source_prediction"], model(adversarial.float() / 255).argmax(1))
    assert crafted["attack"] == "pgd:eps=8,step=2,iters=7" and crafted["eps"] == 8.0
    assert crafted["num_images"] == 100
    # Batching does not change the result (no random start).
    assert torch.equal(craft(model, images, labels, "pgd-2-7-8", batch_size=7)["adversarial"], adversarial)


def test_save_load_round_trip_and_index_csv(model, digits, tmp_path):
    _, _, images, labels = digits
    crafted = craft(model, images[:50], labels[:50], parse_attack("fgsm-16"))
    path = save_adversarial(tmp_path / "fgsm-16.pt", crafted, {"source": "tiny_cnn seed 0"})
    assert sorted(os.listdir(tmp_path)) == ["fgsm-16.csv", "fgsm-16.pt"]  # no temp files left
    loaded = load_adversarial(path)
    for key in ("adversarial", "index", "label", "source_prediction"):
        assert torch.equal(loaded[key], crafted[key]), key
    assert loaded["meta"] == {"attack": "fgsm:eps=16", "eps": 16.0, "num_images": 50, "source": "tiny_cnn seed 0"}
    rows = (tmp_path / "fgsm-16.csv").read_text().splitlines()
    assert rows[0] == "index,label,source_prediction" and len(rows) == len(crafted["index"]) + 1
    first = ",".join(str(int(crafted[key][0])) for key in ("index", "label", "source_prediction"))
    assert rows[1] == first


def test_failed_save_keeps_the_old_file_and_leaves_no_temp_file(model, digits, tmp_path, monkeypatch):
    _, _, images, labels = digits
    crafted = craft(model, images[:20], labels[:20], "fgsm-8")
    path = save_adversarial(tmp_path / "a.pt", crafted)
    before = path.read_bytes()

    def broken_save(obj, handle):
        handle.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_adversarial(path, crafted)
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["a.csv", "a.pt"]


def test_truncated_or_malformed_files_are_clear_errors(model, digits, tmp_path):
    _, _, images, labels = digits
    crafted = craft(model, images[:20], labels[:20], "fgsm-8")
    path = save_adversarial(tmp_path / "a.pt", crafted)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(AdversarialFileError, match=r"a\.pt.*not a readable"):
        load_adversarial(path)
    # Lengths that disagree.
    bad = dict(crafted, label=crafted["label"][:-1], format="rmask_kernels.adversarial", version=1)
    torch.save(bad, tmp_path / "bad.pt")
    with pytest.raises(AdversarialFileError, match=r"bad\.pt.*'label' has"):
        load_adversarial(tmp_path / "bad.pt")
    # Some other torch file.
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(AdversarialFileError, match=r"other\.pt.*format"):
        load_adversarial(tmp_path / "other.pt")
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_adversarial(tmp_path / "missing.pt")
    # Saving refuses float images: the point of the file is the 8-bit round trip.
    with pytest.raises(AdversarialFileError, match="uint8"):
        save_adversarial(tmp_path / "c.pt", dict(crafted, adversarial=crafted["adversarial"].float()))


# -- specs -------------------------------------------------------------------------------


def test_paper_grid_matches_the_paper():
    def triples(family):
        return [(spec.step, spec.iterations, spec.eps) for spec in PAPER_GRID[family]]

    paper_iterative = [(1, 20, 16), (2, 10, 16), (1, 40, 32), (1, 10, 8), (2, 20, 32), (2, 7, 8)]
    assert [spec.eps for spec in PAPER_GRID["fgsm"]] == [8, 16, 32]
    assert triples("pgd") == paper_iterative
    assert triples("mi-fgsm") == paper_iterative
    assert all(spec.mu == 1.0 for spec in PAPER_GRID["mi-fgsm"])
    assert not any(spec.random_start for spec in PAPER_GRID["pgd"])
    (cw,) = PAPER_GRID["cw-l2"]
    assert (cw.kappa, cw.lr, cw.steps) == (40.0, 5e-4, 1000)
    assert [spec.short_name for spec in PAPER_GRID["pgd"]][:2] == ["pgd-1-20-16", "pgd-2-10-16"]
    assert cw.short_name == "cw-l2-40"


def test_attacks_by_name():
    everything = attacks_by_name("paper")
    assert len(everything) == 3 + 6 + 6 + 1
    assert attacks_by_name("paper:pgd") == list(PAPER_GRID["pgd"])
    assert attacks_by_name(["fgsm-8", "paper:fgsm", "pgd:eps=8,step=2,iters=7"]) == [
        *PAPER_GRID["fgsm"], PAPER_GRID["pgd"][-1]
    ]
    with pytest.raises(AttackSpecError, match="paper:nope"):
        attacks_by_name("paper:nope")


ROUND_TRIP = [
    *[spec for family in PAPER_GRID.values() for spec in family],
    AttackSpec("pgd", eps=16, step=1, iterations=20, random_start=True),
    AttackSpec("mi-fgsm", eps=8, step=2, iterations=7, mu=0.5),
    AttackSpec("cw-l2", kappa=0, lr=1e-2, steps=100, binary_steps=3, initial_c=0.1),
    AttackSpec("fgsm", eps=51.0),
    AttackSpec("fgsm", eps=0.5),
]


@pytest.mark.parametrize("spec", ROUND_TRIP, ids=str)
def test_parse_attack_round_trips(spec):
    assert parse_attack(str(spec)) == spec
    assert parse_attack(spec.short_name) == spec


@pytest.mark.parametrize(
    "text, expected",
    [
        ("pgd:eps=16,step=1,iters=20", AttackSpec("pgd", eps=16, step=1, iterations=20)),
        ("PGD:iterations=20, eps=16, step=1", AttackSpec("pgd", eps=16, step=1, iterations=20)),
        ("pgd:eps=8,step=2,iters=7,random_start=1", AttackSpec("pgd", eps=8, step=2, iterations=7, random_start=True)),
        ("mifgsm-1-20-16", AttackSpec("mi-fgsm", eps=16, step=1, iterations=20, mu=1)),
        ("mi_fgsm:eps=16,step=1,iters=20", AttackSpec("mi-fgsm", eps=16, step=1, iterations=20)),
        ("cw", AttackSpec("cw-l2", kappa=40)),
        ("cw-20", AttackSpec("cw-l2", kappa=20)),
        ("fgsm-0.5", AttackSpec("fgsm", eps=0.5)),
    ],
)
def test_parse_attack_accepts_spellings(text, expected):
    assert parse_attack(text) == expected


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "empty"),
        ("deepfool:eps=8", "unknown attack 'deepfool'"),
        ("pgd:eps=16,step=1", "needs 'iterations'"),
        ("pgd:eps=16,step=1,iters=20,stpe=2", "unknown field 'stpe'"),
        ("fgsm:eps=8,step=1", "unknown field 'step' for fgsm"),
        ("fgsm:eps=eight", "'eps' .* must be a number, got 'eight'"),
        ("fgsm:eps=-8", "'eps' must be >= 0"),
        ("fgsm:eps=nan", "'eps' must be a finite number"),
        ("pgd:eps=16,step=1,iters=2.5", "'iterations' must be a whole number"),
        ("pgd:eps=16,step=1,iters=20,random_start=maybe", "'random_start' .* true or false"),
        ("fgsm:eps", "'eps' in 'fgsm:eps' is not key=value"),
        ("fgsm:eps=8,eps=16", "'eps' given twice"),
        ("pgd-1-20", r"pgd-step-iters-eps \(3 numbers\), got 2"),
    ],
)
def test_parse_attack_rejects_bad_specs(text, message):
    with pytest.raises(AttackSpecError, match=message):
        parse_attack(text)


def test_attack_spec_validates_fields():
    with pytest.raises(AttackSpecError, match="fgsm does not take 'mu'"):
        AttackSpec("fgsm", eps=8, mu=1.0)
    with pytest.raises(AttackSpecError, match="needs 'eps'"):
        AttackSpec("fgsm")
    assert AttackSpec("cw-l2").eps is None and AttackSpec("cw-l2").kappa == 40.0


def test_spec_run_converts_from_255_units(model, batch):
    images, labels = batch
    torch.testing.assert_close(
        parse_attack("pgd-2-7-8").run(model, images, labels), pgd(model, images, labels, 8 / 255, 2 / 255, 7),
        rtol=0, atol=0,
    )
    torch.testing.assert_close(
        parse_attack("fgsm-16").run(model, images, labels), fgsm(model, images, labels, 16 / 255), rtol=0, atol=0
    )
