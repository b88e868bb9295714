"""Training harness: `rmask train` end to end, exact resume, checkpoints, the models, DDP.

Everything runs on tiny slices of the embedded digits (scikit-learn) with the small CNN, one
torch thread (the machine is shared), so the whole file takes seconds.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import rmask_kernels as rk
from rmask_kernels.convert import conv_output_shapes
from rmask_kernels.experiments import cli
from rmask_kernels.experiments.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from rmask_kernels.experiments.data import CIFAR10_MEAN, CIFAR10_STD, Normalize, load_digits, shard_indices
from rmask_kernels.experiments.model_zoo import ModelSpec, build_model, load_model, mask_checksum, masks_of
from rmask_kernels.experiments.train import TrainConfig, evaluate
from rmask_kernels.masks import layer_seed
from rmask_kernels.models.vgg import vgg19

pytest.importorskip("sklearn")

REPO = Path(__file__).resolve().parents[1]
# A few steps per epoch: 96 images in batches of 32; masks on the small CNN's shallow convs.
TINY = ["--data", "digits", "--model", "small", "--mask-ratio", "0.5", "--limit-train", "96", "--limit-test", "48",
        "--batch-size", "32", "--quiet"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def run_train(run_dir, *extra):
    return cli.main(["train", *TINY, "--run-dir", str(run_dir), *extra])


def read_log(run_dir):
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """One 2-epoch run shared by the read-only tests."""
    run_dir = tmp_path_factory.mktemp("runs") / "tiny"
    assert run_train(run_dir, "--epochs", "2") == 0
    return run_dir


# ---------------------------------------------------------------------------------------------
# rmask train end to end


def test_run_directory_and_log(trained_run):
    assert sorted(p.name for p in trained_run.iterdir()) == ["best.pt", "config.json", "last.pt", "log.jsonl"]
    config = TrainConfig.from_dict(json.loads((trained_run / "config.json").read_text()))
    # Given flags override the digits preset (the paper's MNIST recipe); the rest is the preset.
    assert (config.epochs, config.batch_size, config.mask_ratio, config.model) == (2, 32, 0.5, "small")
    assert (config.milestones, config.lr, config.momentum, config.weight_decay) == ((20, 40), 0.1, 0.9, 5e-4)

    log = read_log(trained_run)
    assert [record["epoch"] for record in log] == [1, 2]
    expected_keys = {"epoch", "lr", "train_loss", "train_accuracy", "test_loss", "test_accuracy", "seconds", "global_step"}
    for record in log:
        assert set(record) == expected_keys
        assert record["lr"] == 0.1 and record["seconds"] > 0
        assert 0 <= record["train_accuracy"] <= 1 and 0 <= record["test_accuracy"] <= 1
        assert record["train_loss"] > 0 and record["test_loss"] > 0
    assert [record["global_step"] for record in log] == [3, 6]  # 96 images / 32

    last = load_checkpoint(trained_run / "last.pt")
    assert (last["epoch"], last["global_step"], last["version"]) == (2, 6, rk.__version__)
    assert last["config"] == config.to_dict()
    assert {"optimizer", "scheduler", "rng", "best_accuracy", "model_spec"} <= set(last)
    assert set(last["rng"]) >= {"torch", "python", "numpy", "augment", "data_seed"}
    # Masks are in the weights: the small CNN's shallow convs, 50% masked.
    masks = {name: t for name, t in last["model"].items() if name.endswith(".mask")}
    assert sorted(masks) == ["net.conv1.conv.mask", "net.conv2.conv.mask"]
    assert all(m.shape == (32, 32, 32) and int((~m).sum()) == int(0.5 * m.numel()) for m in masks.values())

    best = load_checkpoint(trained_run / "best.pt")
    assert best["best_accuracy"] == max(record["test_accuracy"] for record in log) == last["best_accuracy"]
    assert best["test_accuracy"] == best["best_accuracy"]


def test_load_model_and_evaluate_reproduce_the_log(trained_run):
    model = load_model(trained_run)  # best.pt
    assert isinstance(model[0], Normalize) and not model.training
    best = load_checkpoint(trained_run / "best.pt")
    _, test = load_digits()
    loss, accuracy = evaluate(model, test.subset(slice(0, 48)))
    record = read_log(trained_run)[best["epoch"] - 1]
    assert accuracy == pytest.approx(record["test_accuracy"])
    assert loss == pytest.approx(record["test_loss"], rel=1e-5)


def test_evaluate_restores_training_flags():
    _, test = load_digits()
    model = build_model(ModelSpec.for_data("small", test, mask_ratio=0.5), init_seed=0).train()
    model.net.bn3.eval()  # a mixed state must survive
    before = {name: m.training for name, m in model.named_modules()}
    loss, accuracy = evaluate(model, test.subset(slice(0, 20)), batch_size=7)
    assert {name: m.training for name, m in model.named_modules()} == before
    assert loss > 0 and 0 <= accuracy <= 1


def test_resume_gives_the_weights_of_an_uninterrupted_run(tmp_path):
    # Augmentation on (generator state restored), lr decay at epoch 2 (scheduler restored).
    schedule = ["--milestones", "2", "--mask-seed", "3"]
    assert run_train(tmp_path / "straight", "--epochs", "3", *schedule) == 0
    assert run_train(tmp_path / "resumed", "--epochs", "2", *schedule) == 0
    assert cli.main(["train", "--run-dir", str(tmp_path / "resumed"), "--resume", "--epochs", "3", "--quiet"]) == 0

    straight, resumed = load_checkpoint(tmp_path / "straight" / "last.pt"), load_checkpoint(tmp_path / "resumed" / "last.pt")
    assert straight["model"].keys() == resumed["model"].keys()
    for name, tensor in straight["model"].items():
        assert torch.equal(tensor, resumed["model"][name]), name
    for index, state in straight["optimizer"]["state"].items():
        assert torch.equal(state["momentum_buffer"], resumed["optimizer"]["state"][index]["momentum_buffer"])
    assert (resumed["epoch"], resumed["global_step"]) == (3, 9)
    without_time = lambda log: [{k: v for k, v in r.items() if k != "seconds"} for r in log]
    assert without_time(read_log(tmp_path / "straight")) == without_time(read_log(tmp_path / "resumed"))
    assert [r["lr"] for r in read_log(tmp_path / "resumed")] == pytest.approx([0.1, 0.1, 0.01])


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_trains_records_and_resumes_exactly(tmp_path, amp, monkeypatch):
    # --amp: the forward and the loss under autocast (every masked conv sees the autocast dtype),
    # fp16's loss scaled; the checkpoint records it (config and scaler) and resume continues the
    # run bit for bit, as it does in float32.
    dtypes = set()
    masked_conv2d = rk.functional.masked_conv2d

    def spy(input, *args, **kwargs):
        output = masked_conv2d(input, *args, **kwargs)
        dtypes.add(output[0].dtype if kwargs.get("channel_stats") else output.dtype)
        return output

    monkeypatch.setattr(rk.nn, "masked_conv2d", spy)
    assert run_train(tmp_path / "straight", "--epochs", "2", "--amp", amp) == 0
    assert dtypes == {rk.experiments.inference.AMP_DTYPES[amp]}
    assert run_train(tmp_path / "resumed", "--epochs", "1", "--amp", amp) == 0
    assert cli.main(["train", "--run-dir", str(tmp_path / "resumed"), "--resume", "--epochs", "2", "--quiet"]) == 0
    straight, resumed = (load_checkpoint(tmp_path / run / "last.pt") for run in ("straight", "resumed"))
    assert straight["config"]["amp"] == amp == json.loads((tmp_path / "straight" / "config.json").read_text())["amp"]
    assert bool(straight["scaler"]) == (amp == "fp16")
    for name, tensor in straight["model"].items():
        assert torch.equal(tensor, resumed["model"][name]), name
    # The same run in float32: the losses follow it within the low precision's rounding.
    assert run_train(tmp_path / "float32", "--epochs", "2") == 0
    for ours, theirs in zip(read_log(tmp_path / "straight"), read_log(tmp_path / "float32")):
        assert abs(ours["train_loss"] - theirs["train_loss"]) < 0.01
        assert abs(ours["test_loss"] - theirs["test_loss"]) < 0.01
    assert cli.main(["train", "--run-dir", str(tmp_path / "resumed"), "--resume", "--amp", "bf16" if amp == "fp16"
                     else "fp16", "--epochs", "3", "--quiet"]) == 1


def test_resume_refuses_a_changed_config(tmp_path, capsys):
    assert run_train(tmp_path, "--epochs", "1") == 0
    before = (tmp_path / "last.pt").read_bytes()
    assert cli.main(["train", "--run-dir", str(tmp_path), "--resume", "--lr", "0.2", "--quiet"]) == 1
    assert "lr: 0.1 -> 0.2" in capsys.readouterr().err
    assert (tmp_path / "last.pt").read_bytes() == before


def test_a_fresh_run_does_not_overwrite_an_existing_one(tmp_path, capsys):
    assert run_train(tmp_path, "--epochs", "1") == 0
    before = (tmp_path / "last.pt").read_bytes()
    assert run_train(tmp_path, "--epochs", "1", "--seed", "5") == 1
    assert "already holds a run" in capsys.readouterr().err
    assert (tmp_path / "last.pt").read_bytes() == before


# ---------------------------------------------------------------------------------------------
# Checkpoint files


def small_state(seed=0):
    model = nn.Linear(3, 2)
    return {"config": {}, "model_spec": {}, "model": model.state_dict(), "epoch": seed}


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "not a checkpoint"])
def test_damaged_checkpoint_is_a_clear_error(tmp_path, damage):
    path = tmp_path / "last.pt"
    save_checkpoint(path, small_state())
    data = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        path.write_bytes(bytes(range(256)) * 8)
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        torch.save({"weights": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError, match=str(path)):
        load_checkpoint(path)


def test_missing_checkpoint_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.pt"):
        load_checkpoint(tmp_path / "nothing.pt")


def test_resume_from_a_truncated_checkpoint_fails_without_touching_it(tmp_path, capsys):
    assert run_train(tmp_path, "--epochs", "1") == 0
    last = tmp_path / "last.pt"
    last.write_bytes(last.read_bytes()[:1000])
    files_before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert cli.main(["train", "--run-dir", str(tmp_path), "--resume", "--epochs", "2", "--quiet"]) == 1
    error = capsys.readouterr().err
    assert str(last) in error and "truncated or corrupted" in error
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == files_before


def test_save_is_atomic_when_the_write_fails(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(path, small_state(seed=1))
    real_save = torch.save

    def failing_save(obj, handle, *args, **kwargs):
        handle.write(b"PK\x03\x04 half a checkpoint")  # the new file gets partly written...
        raise RuntimeError("disk full")  # ...and then the write fails

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint(path, small_state(seed=2))
    monkeypatch.setattr(torch, "save", real_save)
    assert load_checkpoint(path)["epoch"] == 1  # the old checkpoint survives, whole
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary file left
    save_checkpoint(path, small_state(seed=3))
    assert load_checkpoint(path)["epoch"] == 3 and [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_masks_come_from_the_checkpoint_not_the_seed(tmp_path, trained_run):
    saved = load_checkpoint(trained_run / "last.pt")
    spec = ModelSpec.from_dict({**saved["model_spec"], "mask_seed": 12345})
    other = build_model(spec)
    saved_masks = {name: t for name, t in saved["model"].items() if name.endswith(".mask")}
    assert any(not torch.equal(m, saved_masks[name]) for name, m in masks_of(other).items())
    other.load_state_dict(saved["model"])
    assert masks_of(other).keys() == saved_masks.keys()
    for name, mask in masks_of(other).items():
        assert torch.equal(mask, saved_masks[name]), name
    # The kernels' index lists follow the loaded masks: the eval forward is the trained model's.
    images = torch.rand(3, 1, 32, 32)
    trained = load_model(trained_run / "last.pt")
    with torch.no_grad():
        torch.testing.assert_close(other.eval()(images), trained(images))


# ---------------------------------------------------------------------------------------------
# Models


def masked_units(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, rk.MaskedConvBN2d)}


def cifar_spec(name, **options):
    return ModelSpec(name, 10, 3, 32, CIFAR10_MEAN, CIFAR10_STD, **options)


@pytest.mark.parametrize(
    "options, expected",
    [
        (dict(mask_ratio=0.5), {0: 0.5, 1: 0.5, 2: 0.5}),  # shallow: the paper's '012'
        (dict(mask_ratio=0.3, mask_layers="deep"), {3: 0.3, 4: 0.3}),
        (dict(mask_ratio="012:0.9,34:0.3"), {0: 0.9, 1: 0.9, 2: 0.9, 3: 0.3, 4: 0.3}),
    ],
)
def test_resnet18_masks_and_forward(options, expected):
    model = build_model(cifar_spec("resnet18", **options), init_seed=0)
    units = masked_units(model)
    stage_of = lambda name: 0 if name == "net.conv1" else int(name.split(".")[1][len("layer"):])
    assert {stage_of(name) for name in units} == set(expected)
    # 5 convs per stage (4 + the projection shortcut of stages 2..4), 1 for the stem.
    assert len(units) == sum(1 if s == 0 else 4 if s == 1 else 5 for s in expected)
    sizes = {0: (64, 32), 1: (64, 32), 2: (128, 16), 3: (256, 8), 4: (512, 4)}
    for name, unit in units.items():
        channels, size = sizes[stage_of(name)]
        assert unit.mask.shape == (channels, size, size)
        assert int((~unit.mask).sum()) == int(expected[stage_of(name)] * unit.mask.numel())
    for mode in ("train", "eval"):
        getattr(model, mode)()
        assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)


def test_resnet18_spatial_and_group_masks():
    spatial = build_model(cifar_spec("resnet18", mask_ratio=0.5, mask_mode="same"))
    assert all(u.mask.shape[0] == 1 for u in masked_units(spatial).values())
    group = build_model(cifar_spec("resnet18", mask_ratio=0.5, mask_mode="group", group_size=16))
    mask = group.net.conv1.mask
    assert torch.equal(mask[0], mask[15]) and not torch.equal(mask[0], mask[16])


def test_vgg19_masks_the_first_four_convs():
    model = build_model(cifar_spec("vgg19", mask_ratio=0.5, mask_seed=7), init_seed=0)
    units = masked_units(model)
    assert sorted(units, key=lambda n: int(n.split(".")[-1])) == [f"net.features.{i}" for i in (0, 3, 7, 10)]
    assert [tuple(units[f"net.features.{i}"].mask.shape) for i in (0, 3, 7, 10)] == [(64, 32, 32)] * 2 + [(128, 16, 16)] * 2
    features = model.net.features
    for i in (0, 3, 7, 10):  # mask after BN, before ReLU: the unit does both; BN and ReLU slots are empty
        assert units[f"net.features.{i}"].activation == "relu"
        assert isinstance(features[i + 1], nn.Identity) and isinstance(features[i + 2], nn.Identity)
    assert sum(isinstance(m, nn.Conv2d) and not isinstance(m, rk.MaskedConv2d) for m in features) == 12
    # The same masks as rk.convert_model on the unmasked network with the same seed.
    converted = rk.convert_model(vgg19(), 0.5, layers="shallow", seed=7, example_input=torch.zeros(1, 3, 32, 32))
    assert {f"net.{n}" for n in masked_units(converted)} == set(units)
    for name, unit in masked_units(converted).items():
        assert torch.equal(unit.mask, units[f"net.{name}"].mask)
        assert torch.equal(unit.mask, rk.random_mask(tuple(unit.mask.shape), 0.5, seed=layer_seed(7, name)))
    for mode in ("train", "eval"):
        getattr(model, mode)()
        assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("size", [28, 32])
def test_small_cnn_masks_follow_the_data(size):
    spec = ModelSpec("small", 10, 1, size, (0.13,), (0.31,), mask_ratio=0.9, mask_layers="all")
    model = build_model(spec)
    half = (size + 1) // 2
    shapes = {name: tuple(u.mask.shape) for name, u in masked_units(model).items()}
    assert shapes == {"net.conv1": (32, size, size), "net.conv2": (32, size, size),
                      "net.conv3": (64, half, half), "net.conv4": (64, half, half)}
    # Each mask has the shape of its conv's output in the unmasked network.
    dense = build_model(ModelSpec("small", 10, 1, size, (0.13,), (0.31,))).net
    assert shapes == {f"net.{n}": s for n, s in conv_output_shapes(dense, torch.zeros(1, 1, size, size)).items()}
    assert model(torch.rand(2, 1, size, size)).shape == (2, 10)
    # Shallow (the default) masks the full-resolution convs only, as rk.convert_model selects.
    assert set(masked_units(build_model(ModelSpec("small", 10, 1, size, (0.1,), (0.3,), mask_ratio=0.5)))) == {
        "net.conv1", "net.conv2"
    }


def test_model_spec_rejects_bad_options():
    with pytest.raises(ValueError, match="unknown model"):
        cifar_spec("resnet99")
    with pytest.raises(ValueError, match="are for resnet18, resnet50, densenet121, senet18, not vgg19"):
        cifar_spec("vgg19", mask_ratio="012:0.9")
    with pytest.raises(ValueError, match="mask ratio"):
        cifar_spec("resnet18", mask_ratio="0.5x")
    with pytest.raises(ValueError, match="mask_layers"):
        build_model(cifar_spec("vgg19", mask_ratio=0.5, mask_layers="012"))
    with pytest.raises(ValueError, match="milestones"):
        TrainConfig(milestones=(250, 150))


# ---------------------------------------------------------------------------------------------
# DistributedDataParallel: two gloo processes on this machine


def test_ddp_two_processes_match_a_single_process_step(tmp_path):
    """One DDP step, a batch of 32 split over 2 ranks, against one process computing the same
    step. BN takes batch statistics per rank (DDP without SyncBatchNorm), so the single-process
    reference normalizes each half separately and averages the two halves' losses: the loss
    whose gradient DDP's averaged gradients are. Compared: the weights after the step
    (float32, the all-reduce sums in another order: 1e-6) and the logged, all-reduced loss."""
    run_dir = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "rmask_kernels.experiments.cli", "train", "--data", "digits", "--model", "small", "--mask-ratio", "0.5",
        "--limit-train", "32", "--limit-test", "20", "--batch-size", "32", "--epochs", "1", "--no-augment",
        "--device", "cpu", "--quiet", "--run-dir", str(run_dir),
    ]
    result = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    saved = load_checkpoint(run_dir / "last.pt")
    assert saved["world_size"] == 2 and saved["global_step"] == 1 and len(saved["rng"]["augment"]) == 2

    train_data, test_data = load_digits()
    train_data = train_data.subset(slice(0, 32))
    model = build_model(ModelSpec.from_dict(saved["model_spec"]), init_seed=0).train()
    initial = {name: p.detach().clone() for name, p in model.named_parameters()}
    halves = [shard_indices(32, shuffle=True, seed=0, epoch=0, rank=rank, world_size=2) for rank in range(2)]
    losses = [F.cross_entropy(model(train_data.images[h]), train_data.labels[h]) for h in halves]
    loss = sum(losses) / 2
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()

    for name, parameter in model.named_parameters():
        assert not torch.equal(parameter, initial[name]), f"{name} did not train"
        torch.testing.assert_close(saved["model"][name], parameter.detach(), rtol=1e-5, atol=1e-6, msg=name)
    assert masks_of(model).keys() == {k for k in saved["model"] if k.endswith(".mask")}
    assert mask_checksum(model) == mask_checksum(load_model(run_dir / "last.pt"))
    (record,) = read_log(run_dir)
    assert record["train_loss"] == pytest.approx(loss.item(), rel=1e-5)
    # The test set is split across the ranks and the counts all-reduced: every image once.
    trained = load_model(run_dir / "last.pt")
    assert record["test_accuracy"] == pytest.approx(evaluate(trained, test_data.subset(slice(0, 20)))[1])


def test_backend_bn_stats_and_mask_mode_reach_the_layers(tmp_path):
    options = ["--backend", "reference", "--bn-stats", "kept", "--mask-mode", "same", "--mask-layers", "all"]
    assert run_train(tmp_path, "--epochs", "1", *options) == 0
    model = load_model(tmp_path / "last.pt")
    units = masked_units(model)
    assert set(units) == {f"net.conv{i}" for i in range(1, 5)}
    for unit in units.values():
        assert (unit.bn_stats, unit.conv.backend, unit.conv.mask_mode) == ("kept", "reference", "spatial")
        assert unit.mask.shape[0] == 1
    assert load_model(tmp_path / "last.pt", backend="cpu").net.conv1.conv.backend == "cpu"
