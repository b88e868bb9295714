"""`rmask reproduce`: plans (parsing, errors), step keys, resuming after an interruption (a
removed completion marker, a real SIGKILL), --jobs, the paper plan end to end on a tiny fake
CIFAR-10 archive, results.csv and the claims of report.md."""

import csv
import json
import math
import os
import pickle
import signal
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest

from helpers import PACKAGE_PARENT
from rmask_kernels.experiments import cli
from rmask_kernels.experiments.plans import PlanError, build_steps, load_plan, parse_plan, shrink
from rmask_kernels.experiments.report import COLUMNS, FAILS, HOLDS, UNMEASURED, claims
from rmask_kernels.experiments import reproduce as reproduce_module
from rmask_kernels.experiments.reproduce import DONE_FILE, STEPS_DIRECTORY, reproduce

pytest.importorskip("sklearn")
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

# A tiny study on the digits: seconds per step.
TINY = {
    "data": "digits",
    "train": {"epochs": 2, "lr": 0.02, "batch_size": 16, "augment": False, "limit_train": 96, "limit_test": 32},
    "limit_test": 32,
    "batch_size": 32,
    "runs": [
        {"model": "small"},
        {"model": "small", "mask_ratio": 0.9},
        {"name": "source", "model": "small", "seed": 7},
    ],
    "sources": ["source"],
    "attacks": ["fgsm-51", "pgd:eps=51,step=13,iters=2"],
    "noise": {"eps": [51]},
    "patch_shuffle": {"s": [2]},
}


def read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def done_files(out):
    return sorted((out / STEPS_DIRECTORY).glob(f"*/{DONE_FILE}"))


# ---------------------------------------------------------------------------------------------
# Plans


@pytest.mark.parametrize("name", ["digits", "paper"])
def test_built_in_plans_load_and_name_their_targets_as_the_tables_do(name):
    plan = load_plan(name)
    for target in ("normal", "shallow-0.9", "shallow-0.9-same", "deep-0.5", "label-smoothing"):
        assert target in plan.targets
    assert plan.sources and plan.attacks and plan.gray_box and plan.white_box and plan.decision
    if name == "paper":
        assert {"wide-2x", "channels-0.1", "dropblock", "dropout2d"} <= set(plan.targets)
        assert {plan.runs[source].config.model for source in plan.sources} == {
            "resnet18", "resnet50", "densenet121", "senet18", "vgg19"}
        assert len(plan.attacks) == 16  # the paper's grid: FGSM 3, PGD 6, MI-FGSM 6, CW-L2 1
        assert plan.runs["normal"].config.epochs == 350
        assert plan.runs["wide-2x"].config.width_multiplier == 2.0


def test_plan_file_and_unknown_built_in_name(tmp_path):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(TINY))
    assert load_plan(path).targets == ("normal", "shallow-0.9")
    with pytest.raises(PlanError, match=r"one of .*digits.*paper.*got 'nope'"):
        load_plan("nope")
    path.write_text("{not json")
    with pytest.raises(PlanError, match="not valid JSON"):
        load_plan(path)


@pytest.mark.parametrize("change, match", [
    ({"runs": [{"model": "small", "mask_ratio": 1.5}]}, r"runs\[0\]\.mask_ratio: expected a number in \[0, 1\), got 1\.5"),
    ({"runs": [{"model": "small", "mode": "diagonal"}]}, r"runs\[0\]\.mode: expected one of neuron, spatial, same, got 'diagonal'"),
    ({"runs": [{"model": "small", "control": "wider"}]}, r"runs\[0\]\.control: expected null or one of .*wide-2x.*got 'wider'"),
    ({"runs": [{"model": "small", "colour": 1}]}, r"runs\[0\]: unknown field\(s\) colour"),
    ({"runs": [{"model": "small"}, {"model": "small"}]}, r"runs\[1\]: a second run named 'normal'"),
    ({"runs": [{"model": "small", "control": "wide-2x"}]}, r"runs\[0\]: width_multiplier is for"),
    ({"runs": [{"model": "small", "train": {"seed": 3}}]}, r"runs\[0\]\.train: seed cannot be set here"),
    ({"sources": ["missing"]}, r"sources: expected names of runs \(normal, shallow-0\.9, source\), got 'missing'"),
    ({"attacks": ["fgsm-x"]}, r"attacks: .*fgsm"),
    ({"data": "imagenet"}, r"data: expected one of digits, cifar10, mnist, got 'imagenet'"),
    ({"noise": {"eps": [300]}}, r"noise\.eps: expected a list of numbers in \[0, 255\]"),
    ({"decision": {"attack": "hsja"}}, r"decision\.attack: expected one of boundary, hop-skip-jump, got 'hsja'"),
    ({"gray_box": [{"source": "source", "targets": ["source"]}]}, r"gray_box targets of source: expected runs among the targets"),
])
def test_bad_plans_name_the_field_expected_and_actual(change, match):
    with pytest.raises(PlanError, match=match):
        parse_plan({**TINY, **change}, "tiny")


def test_command_reports_bad_options_in_one_line(tmp_path, capsys):
    assert cli.main(["reproduce", "--plan", "nope", "--out", str(tmp_path)]) == 1
    assert "expected a plan file or one of digits, paper, got 'nope'" in capsys.readouterr().err
    assert cli.main(["reproduce", "--plan", "digits", "--out", str(tmp_path), "--epochs", "0"]) == 1
    assert "--epochs must be a positive integer, got 0" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Step keys


def keys(value):
    return {(step.kind, step.name): step.key for step in build_steps(parse_plan(value, "tiny"))}


def test_step_keys_follow_the_config_and_its_dependencies():
    base = keys(TINY)
    assert base == keys(json.loads(json.dumps(TINY)))  # same config, same directories
    assert set(base) == {("train", "normal"), ("train", "shallow-0.9"), ("train", "source"),
                         ("attack", "source"), ("eval", "normal"), ("eval", "shallow-0.9")}
    # A source trained differently: its training, its attacks and every evaluation reading them change.
    runs = [*TINY["runs"][:2], {"name": "source", "model": "small", "seed": 8}]
    changed = keys({**TINY, "runs": runs})
    assert {step for step in base if base[step] != changed[step]} == {
        ("train", "source"), ("attack", "source"), ("eval", "normal"), ("eval", "shallow-0.9")}
    # One target changed: only its own steps.
    runs = [TINY["runs"][0], {"model": "small", "mask_ratio": 0.9, "mode": "neuron", "train": {"lr": 0.03}},
            TINY["runs"][2]]
    changed = keys({**TINY, "runs": runs})
    assert {step for step in base if base[step] != changed[step]} == {("train", "shallow-0.9"), ("eval", "shallow-0.9")}
    # An evaluation added: only the evaluations.
    changed = keys({**TINY, "noise": {"eps": [51, 77]}})
    assert {step for step in base if base[step] != changed[step]} == {("eval", "normal"), ("eval", "shallow-0.9")}
    # Where the data lives is not part of any key; shrinking the plan is.
    plan = parse_plan(TINY, "tiny")
    assert {s.key for s in build_steps(shrink(plan))} == set(base.values())
    assert not {s.key for s in build_steps(shrink(plan, epochs=1))} & {base[("train", "source")]}


# ---------------------------------------------------------------------------------------------
# Running, resuming


def test_rerun_skips_done_steps_and_redoes_only_the_interrupted_one(tmp_path):
    plan = parse_plan(TINY, "tiny")
    out = tmp_path / "study"
    first = reproduce(plan, out, device="cpu", quiet=True)
    assert len(first) == 6 and len(done_files(out)) == 6
    times = {path: path.stat().st_mtime_ns for path in done_files(out)}
    assert reproduce(plan, out, device="cpu", quiet=True) == []  # nothing left to do

    # An evaluation interrupted (no marker) and a training interrupted after its last epoch.
    evaluation = next(step for step in build_steps(plan) if step.kind == "eval" and step.name == "shallow-0.9")
    training = next(step for step in build_steps(plan) if step.kind == "train" and step.name == "normal")
    (out / STEPS_DIRECTORY / evaluation.key / DONE_FILE).unlink()
    (out / STEPS_DIRECTORY / training.key / DONE_FILE).unlink()
    checkpoint = out / STEPS_DIRECTORY / training.key / "last.pt"
    checkpoint_time = checkpoint.stat().st_mtime_ns
    again = reproduce(plan, out, device="cpu", quiet=True)
    assert sorted(record["key"] for record in again) == sorted([evaluation.key, training.key])
    assert checkpoint.stat().st_mtime_ns == checkpoint_time  # resumed from last.pt: no epoch redone
    for path, mtime in times.items():
        if evaluation.key not in str(path) and training.key not in str(path):
            assert path.stat().st_mtime_ns == mtime

    rows = read_csv(out / "results.csv")
    assert list(rows[0]) == list(COLUMNS)
    settings = {(row["target"], row["setting"]) for row in rows}
    assert {("normal", "black-box"), ("shallow-0.9", "black-box"), ("normal", "noise"),
            ("shallow-0.9", "patch-shuffle"), ("normal", "clean")} <= settings
    black = [row for row in rows if row["setting"] == "black-box"]
    assert {row["source"] for row in black} == {"source"} and {row["attack"] for row in black} == {"fgsm-51", "pgd-13-2-51"}
    report = (out / "report.md").read_text()
    assert "## Claims" in report and "(a) masking shallow layers" in report
    assert "(e) decision-based" in report and UNMEASURED in report  # no decision-based rows in this plan


def _popen(args, cwd):
    environment = dict(os.environ, PYTHONPATH=os.pathsep.join([PACKAGE_PARENT, os.environ.get("PYTHONPATH", "")]))
    return subprocess.Popen([sys.executable, *args], cwd=cwd, env=environment, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def test_sigkill_mid_run_then_rerun_completes_without_redoing_finished_steps(tmp_path):
    plan_file = tmp_path / "tiny.json"
    plan_file.write_text(json.dumps({**TINY, "train": {**TINY["train"], "epochs": 3}}))
    out = tmp_path / "study"
    command = ["-m", "rmask_kernels.experiments.cli", "reproduce", "--plan", str(plan_file), "--out", str(out),
               "--device", "cpu"]
    process = _popen(command, tmp_path)
    deadline = time.monotonic() + 300
    while len(done_files(out)) < 2 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    finished = {path: path.stat().st_mtime_ns for path in done_files(out)}
    assert 2 <= len(finished) < 6, "the kill should land mid-run"
    rerun = _popen(command, tmp_path)
    output, _ = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, output
    assert len(done_files(out)) == 6
    for path, mtime in finished.items():
        assert path.stat().st_mtime_ns == mtime  # not redone
    assert output.count("running ") == 6 - len(finished)
    assert (out / "report.md").is_file()


def test_jobs_run_steps_in_parallel_processes(tmp_path):
    plan = parse_plan(TINY, "tiny")
    records = reproduce(plan, tmp_path / "parallel", device="cpu", jobs=2, quiet=True)
    assert len(records) == 6 and len(done_files(tmp_path / "parallel")) == 6
    order = [record["kind"] for record in records]
    assert order.index("attack") > max(i for i, kind in enumerate(order) if kind == "train" and
                                       records[i]["name"] == "source")
    assert all(order.index("attack") < i for i, kind in enumerate(order) if kind == "eval")
    with pytest.raises(ValueError, match="jobs must be a positive integer, got 0"):
        reproduce(plan, tmp_path / "none", jobs=0)


def test_jobs_get_one_gpu_each_when_several_are_visible(monkeypatch):
    monkeypatch.setattr(reproduce_module.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(reproduce_module.torch.cuda, "device_count", lambda: 2)
    assert reproduce_module._devices(None, 3) == ["cuda:0", "cuda:1", "cuda:0"]
    assert reproduce_module._devices("cuda", 2) == ["cuda:0", "cuda:1"]
    assert reproduce_module._devices("cuda:1", 2) == ["cuda:1", "cuda:1"]  # a device asked for: all there
    assert reproduce_module._devices(None, 1) == [None]


# ---------------------------------------------------------------------------------------------
# The paper plan on a fake CIFAR-10 archive


def _fake_cifar(path, train_per_batch=4, test=8):
    rng = np.random.default_rng(0)
    directory = path / "cifar-10-batches-py"
    directory.mkdir(parents=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        count = test if name == "test_batch" else train_per_batch
        batch = {b"batch_label": name.encode(), b"data": rng.integers(0, 256, (count, 3072), dtype=np.uint8),
                 b"labels": rng.integers(0, 10, count).tolist(), b"filenames": [b"x.png"] * count}
        (directory / name).write_bytes(pickle.dumps(batch, protocol=2))
    archive = path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name in names:
            tar.add(directory / name, arcname=f"cifar-10-batches-py/{name}")
    return archive


@pytest.mark.slow
def test_paper_plan_smoke_on_a_fake_cifar10_archive_exercises_every_step(tmp_path):
    pytest.importorskip("foolbox")
    archive = _fake_cifar(tmp_path / "data")
    out = tmp_path / "paper"
    assert cli.main(["reproduce", "--plan", "paper", "--out", str(out), "--data-path", str(archive), "--smoke",
                     "--device", "cpu", "--quiet"]) == 0
    plan = load_plan("paper")
    assert len(done_files(out)) == len(build_steps(plan))  # 20 trainings, 6 attack sets, 14 evaluations
    rows = read_csv(out / "results.csv")
    assert list(rows[0]) == list(COLUMNS)
    targets = {row["target"] for row in rows}
    assert targets == set(plan.targets)
    settings = {row["setting"] for row in rows}
    assert settings == {"clean", "black-box", "gray-box", "white-box", "noise", "patch-shuffle", "decision"}
    assert {row["source"] for row in rows if row["setting"] == "black-box"} == set(plan.sources)
    assert len({row["attack"] for row in rows if row["setting"] == "black-box"}) == 16
    report = (out / "report.md").read_text()
    for title in ("Clean accuracy", "by source", "Gray-box", "White-box", "Random noise", "Patch shuffling",
                  "Decision-based", "## Claims"):
        assert title in report
    assert len([line for line in report.splitlines() if line.startswith("| (")]) == 5


# ---------------------------------------------------------------------------------------------
# Claims


def _rows(normal, shallow, deep, clean=(0.95, 0.93, 0.94), shuffled=(0.5, 0.3), distortion=(1e-3, 5e-3)):
    labels = {"normal": (0.0, "", ""), "shallow-0.5": (0.5, "shallow", "neuron"),
              "shallow-0.9": (0.9, "shallow", "neuron"), "deep-0.5": (0.5, "deep", "neuron")}
    accuracy = {"normal": clean[0], "shallow-0.5": clean[1], "shallow-0.9": clean[1], "deep-0.5": clean[2]}
    rates = {"normal": normal, "shallow-0.5": shallow[0], "shallow-0.9": shallow[1], "deep-0.5": deep}
    rows = []
    for target, (ratio, placement, mode) in labels.items():
        base = {"target": target, "mask_ratio": ratio, "placement": placement, "mask_mode": mode, "control": "",
                "clean_accuracy": accuracy[target]}
        rows.append({**base, "setting": "clean"})
        rows.append({**base, "setting": "black-box", "defense_success_rate": rates[target]})
    rows.append({**rows[0], "setting": "patch-shuffle", "s": 4, "accuracy": shuffled[0]})
    rows.append({**rows[4], "setting": "patch-shuffle", "s": 4, "accuracy": shuffled[1]})
    for target, value in zip(("normal", "shallow-0.9"), distortion):
        rows.append({"target": target, "setting": "decision", "mean_squared_distortion": value, "succeeded": 5,
                     "attacked": 5})
    return rows


def test_claims_hold_fail_or_are_not_measured_from_the_numbers():
    verdicts = [claim["verdict"] for claim in claims(_rows(0.1, (0.5, 0.8), 0.15))]
    assert verdicts == [HOLDS] * 5
    verdicts = [claim["verdict"] for claim in claims(_rows(0.1, (0.8, 0.5), 0.6, clean=(0.95, 0.80, 0.94),
                                                           shuffled=(0.3, 0.5), distortion=(5e-3, 1e-3)))]
    assert verdicts == [FAILS] * 5
    only_normal = [row for row in _rows(0.1, (0.5, 0.8), 0.15) if row["target"] == "normal"]
    assert [claim["verdict"] for claim in claims(only_normal)] == [UNMEASURED] * 5
    text = claims(_rows(0.1, (0.5, 0.8), math.nan))[0]
    assert text["verdict"] == HOLDS and "normal 0.100" in text["numbers"] and "shallow-0.9 0.800" in text["numbers"]
