"""`rmask attack` and `rmask eval` end to end on tiny slices of the embedded digits.

Three small CNNs trained for two epochs on 384 images (seconds each, one torch thread): a
normal one, and two Random-Mask ones with different mask seeds and weights. Attacks from the
normal model and from the first Random-Mask model, evaluated on the normal model and the
second Random-Mask model, give white-box, black-box and gray-box rows.
"""

import csv
import math
import re
import sys

import pytest
import torch

from rmask_kernels.experiments import cli
from rmask_kernels.experiments.attacks import load_adversarial

pytest.importorskip("sklearn")

# The paper's MNIST recipe at lr 0.1 barely moves in two tiny epochs; 0.02 without
# augmentation reaches 30-50% test accuracy, enough for non-empty counts.
TRAIN = ["train", "--data", "digits", "--model", "small", "--epochs", "2", "--limit-train", "384", "--limit-test", "64",
         "--batch-size", "16", "--lr", "0.02", "--no-augment", "--quiet"]
LIMIT = ["--limit", "64"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    options = {
        "normal": ["--seed", "1"],
        "rm-a": ["--seed", "2", "--mask-ratio", "0.5", "--mask-seed", "1"],
        "rm-b": ["--seed", "3", "--mask-ratio", "0.5", "--mask-seed", "2"],
    }
    for name, extra in options.items():
        assert cli.main([*TRAIN, *extra, "--run-dir", str(root / name)]) == 0
    return root


@pytest.fixture(scope="module")
def attacked(runs, tmp_path_factory):
    """Adversarial directories: two attacks from the normal model, one from rm-a."""
    out = tmp_path_factory.mktemp("adversarial")
    assert cli.main(["attack", "--source", str(runs / "normal"), "--data", "digits", "--attack", "fgsm-16",
                     "--attack", "pgd-4-5-32", "--out", str(out / "normal"), *LIMIT]) == 0
    assert cli.main(["attack", "--source", str(runs / "rm-a" / "best.pt"), "--data", "digits",
                     "--attack", "pgd-4-5-32", "--out", str(out / "rm-a"), *LIMIT]) == 0
    return out


def read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_attack_writes_examples_index_and_metadata(runs, tmp_path, capsys):
    out = tmp_path / "adv"
    assert cli.main(["attack", "--source", str(runs / "normal"), str(runs / "rm-a"), "--data", "digits",
                     "--attack", "fgsm-8", "pgd:eps=8,step=4,iters=2,random_start=true", "--out", str(out),
                     "--limit", "32", "--seed", "5"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 2 and printed[0].startswith("fgsm-8: ") and "/32 test images crafted" in printed[0]
    # The spec off its defaults (random start) keeps its canonical form, made file-safe.
    names = sorted(path.name for path in out.iterdir())
    assert names == ["fgsm-8.csv", "fgsm-8.pt", "pgd_eps=8_step=4_iters=2_random_start=true.csv",
                     "pgd_eps=8_step=4_iters=2_random_start=true.pt"]
    crafted = load_adversarial(out / "fgsm-8.pt")
    meta = crafted["meta"]
    assert (meta["data"], meta["limit"], meta["seed"], meta["eps"], meta["num_images"]) == ("digits", 32, 5, 8.0, 32)
    assert meta["attack"] == "fgsm:eps=8" and meta["short_name"] == "fgsm-8"
    # An ensemble source: both members recorded, with their masks' presence.
    assert [(s["name"], s["masked"]) for s in meta["sources"]] == [("normal", False), ("rm-a", True)]
    assert meta["sources"][0]["path"] == str((runs / "normal" / "best.pt").resolve())
    assert len(crafted["index"]) and int(crafted["index"].max()) < 32
    assert f"{len(crafted['index'])}/32 test images crafted" in printed[0]
    assert len(read_csv(out / "fgsm-8.csv")) == len(crafted["index"])


def test_attack_and_eval_under_mixed_precision(runs, tmp_path, monkeypatch):
    # --amp: every masked conv of the source and the target runs in bf16; the results are
    # written as in float32, and the source's accuracy on its examples is the float32 run's.
    import rmask_kernels as rk

    dtypes = set()
    masked_conv2d = rk.functional.masked_conv2d

    def spy(input, *args, **kwargs):
        output = masked_conv2d(input, *args, **kwargs)
        dtypes.add(output.dtype)
        return output

    monkeypatch.setattr(rk.nn, "masked_conv2d", spy)
    for amp in ([], ["--amp", "bf16"]):
        dtypes.clear()
        out = tmp_path / ("amp" if amp else "float32")
        assert cli.main(["attack", "--source", str(runs / "rm-a"), "--data", "digits", "--attack", "fgsm-16",
                         "--out", str(out / "attack"), *LIMIT, *amp]) == 0
        assert cli.main(["eval", "--target", str(runs / "rm-b"), "--adversarial", str(out / "attack"),
                         "--data", "digits", "--out", str(out / "eval"), *LIMIT, *amp]) == 0
        assert dtypes == {torch.bfloat16 if amp else torch.float32}
    ours = load_adversarial(tmp_path / "amp" / "attack" / "fgsm-16.pt")
    theirs = load_adversarial(tmp_path / "float32" / "attack" / "fgsm-16.pt")
    assert abs(len(ours["index"]) - len(theirs["index"])) <= 2  # the same clean accuracy, but for a rounding
    assert read_csv(tmp_path / "amp" / "eval" / "results.csv")[0].keys() == \
        read_csv(tmp_path / "float32" / "eval" / "results.csv")[0].keys()


def test_eval_end_to_end(runs, attacked, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "results"
    code = cli.main(["eval", "--target", str(runs / "normal"), str(runs / "rm-b"),
                     "--adversarial", str(attacked / "normal"), str(attacked / "rm-a" / "pgd-4-5-32.pt"),
                     "--white-box", "pgd-4-5-32", "--noise", "16", "--patch-shuffle", "1", "4",
                     "--data", "digits", "--out", str(out), *LIMIT])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| target | attack | source | setting | clean_accuracy | defense_success_rate | transfer_rate | counted |" in printed
    assert (out / "results.md").read_text() in printed
    assert sorted(path.name for path in out.iterdir()) == [
        "accuracy_vs_eps.png", "examples.png", "noise.csv", "patch_shuffle.csv", "results.csv", "results.md"]
    for png in ("accuracy_vs_eps.png", "examples.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"

    rows = read_csv(out / "results.csv")
    # Targets in the order given; per target the files (natural order), then white-box.
    assert [(row["target"], row["attack"], row["source"], row["setting"]) for row in rows] == [
        ("normal", "fgsm-16", "normal", "white-box"),
        ("normal", "pgd-4-5-32", "normal", "white-box"),
        ("normal", "pgd-4-5-32", "rm-a", "black-box"),
        ("normal", "pgd-4-5-32", "normal", "white-box"),
        ("rm-b", "fgsm-16", "normal", "black-box"),
        ("rm-b", "pgd-4-5-32", "normal", "black-box"),
        ("rm-b", "pgd-4-5-32", "rm-a", "gray-box"),
        ("rm-b", "pgd-4-5-32", "rm-b", "white-box"),
    ]
    # The normal model attacked with its own examples from the file, and directly: same attack,
    # same images, same white-box numbers.
    from_file, direct = rows[1], rows[3]
    assert {key: value for key, value in from_file.items() if key != "source"} == \
        {key: value for key, value in direct.items() if key != "source"}
    assert float(direct["defense_success_rate"]) < 0.5
    for row in rows:
        for column in ("clean_accuracy", "defense_success_rate", "transfer_rate"):
            value = float(row[column])
            assert math.isnan(value) or 0 <= value <= 1
        counted, defended = int(row["counted"]), int(row["defended"])
        assert 0 <= defended <= counted <= int(row["examples"])
        if counted:
            assert float(row["defense_success_rate"]) == pytest.approx(defended / counted)
    assert sum(int(row["counted"]) for row in rows) > 0

    noise = read_csv(out / "noise.csv")
    assert [(row["target"], row["eps"]) for row in noise] == [("normal", "16"), ("rm-b", "16")]
    shuffled = read_csv(out / "patch_shuffle.csv")
    assert [(row["target"], row["s"]) for row in shuffled] == [("normal", "1"), ("normal", "4"), ("rm-b", "1"), ("rm-b", "4")]
    for row in noise + shuffled:
        assert 0 <= float(row["accuracy"]) <= 1
    # s = 1 leaves the images as they are.
    assert shuffled[0]["accuracy"] == shuffled[0]["clean_accuracy"]


def test_eval_decision_based(runs, tmp_path, capsys, monkeypatch):
    pytest.importorskip("foolbox")
    arguments = ["eval", "--target", str(runs / "normal"), "--boundary", "2", "--decision-steps", "5", "--data", "digits",
                 "--limit", "32"]
    assert cli.main([*arguments, "--out", str(tmp_path / "with")]) == 0
    assert "| target | attack | attacked | succeeded | mean_squared_distortion |" in capsys.readouterr().out
    (row,) = read_csv(tmp_path / "with" / "decision.csv")
    assert (row["target"], row["attack"], row["attacked"]) == ("normal", "boundary", "2")
    assert int(row["succeeded"]) == 0 or float(row["mean_squared_distortion"]) > 0
    # Without foolbox: a note naming the extra, not a failure.
    monkeypatch.setitem(sys.modules, "foolbox", None)
    assert cli.main([*arguments, "--out", str(tmp_path / "without")]) == 0
    assert "rmask eval: note: --boundary skipped: " in capsys.readouterr().err
    assert not (tmp_path / "without" / "decision.csv").exists()


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--adversarial", "{tmp}/missing.pt"], r"--adversarial \S*missing\.pt: no such file or directory"),
        (["--adversarial", "{tmp}"], r"--adversarial \S+: no adversarial-example files \(\*\.pt\)"),
        ([], "nothing to evaluate"),
        (["--white-box", "pgd-1-20"], r"--white-box: .*pgd-1-20"),
        (["--patch-shuffle", "3"], r"--patch-shuffle 3: must be a positive divisor of the image size 32×32"),
    ],
)
def test_eval_errors_are_one_line(runs, tmp_path, capsys, arguments, message):
    arguments = [argument.replace("{tmp}", str(tmp_path)) for argument in arguments]
    code = cli.main(["eval", "--target", str(runs / "normal"), "--data", "digits", "--out", str(tmp_path / "out"),
                     *arguments])
    error = capsys.readouterr().err
    assert code == 1
    assert error.startswith("rmask eval: error: ") and error.count("\n") == 1
    assert re.search(message, error), error
    assert not (tmp_path / "out").exists()


def test_attack_and_eval_name_a_missing_model(tmp_path, capsys):
    assert cli.main(["attack", "--source", str(tmp_path / "nope"), "--data", "digits", "--attack", "fgsm-8",
                     "--out", str(tmp_path / "adv")]) == 1
    assert capsys.readouterr().err == f"rmask attack: error: --source {tmp_path / 'nope'}: no such file or directory\n"
    assert cli.main(["attack", "--source", str(tmp_path), "--data", "digits", "--attack", "fgsm-x",
                     "--out", str(tmp_path / "adv")]) == 1
    assert capsys.readouterr().err.startswith("rmask attack: error: --attack: ")
    assert cli.main(["eval", "--target", str(tmp_path / "nope"), "--noise", "8", "--data", "digits",
                     "--out", str(tmp_path / "out")]) == 1
    assert capsys.readouterr().err == f"rmask eval: error: --target {tmp_path / 'nope'}: no such file or directory\n"


def test_eval_rejects_examples_from_other_data(runs, attacked, tmp_path, capsys):
    # Crafted on the first 64 test images; evaluated against only 16 of them.
    code = cli.main(["eval", "--target", str(runs / "normal"), "--adversarial", str(attacked / "normal"),
                     "--data", "digits", "--limit", "16", "--out", str(tmp_path)])
    assert code == 1
    assert "out of range for digits-test (16 images)" in capsys.readouterr().err
