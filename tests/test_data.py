"""rmask_kernels.experiments.data: loaders on tiny fake archives in the real formats,
augmentation, normalization, the 8-bit round trip and batching/sharding."""

import gzip
import os
import pickle
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from rmask_kernels.experiments import data as D

CIFAR_TRAIN_SIZES = (3, 2, 3, 1, 2)  # per data_batch_i: small, and unequal to catch mix-ups
CIFAR_TEST_SIZE = 4
CIFAR_NAMES = [b"plane", b"car", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]


def _pickle(obj, file: Path, protocol: int = 2):
    # Protocol 2 with bytes keys: the shape of the real (python-2 written) batches.
    file.write_bytes(pickle.dumps(obj, protocol=protocol))


def _random_batch(rng, n):
    return rng.integers(0, 256, (n, 3072), dtype=np.uint8), rng.integers(0, 10, n).tolist()


def _write_cifar_directory(directory: Path, rng, meta: bool = True):
    directory.mkdir(parents=True)
    batches = {}
    for i, n in enumerate(CIFAR_TRAIN_SIZES, start=1):
        batches[f"data_batch_{i}"] = _random_batch(rng, n)
    batches["test_batch"] = _random_batch(rng, CIFAR_TEST_SIZE)
    for name, (pixels, labels) in batches.items():
        batch = {b"batch_label": name.encode(), b"data": pixels, b"labels": labels, b"filenames": [b"x.png"] * len(labels)}
        _pickle(batch, directory / name)
    if meta:
        _pickle({b"label_names": CIFAR_NAMES, b"num_vis": 3072}, directory / "batches.meta")
    return batches


def _write_tar(archive: Path, directory: Path, skip=()):
    archive.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "w:gz") as tar:
        for file in sorted(directory.iterdir()):
            if file.name not in skip:
                tar.add(file, arcname=f"cifar-10-batches-py/{file.name}")


@pytest.fixture
def cifar(tmp_path):
    """tmp/extracted/cifar-10-batches-py/ and tmp/archive/cifar-10-python.tar.gz, same content."""
    rng = np.random.default_rng()
    directory = tmp_path / "extracted" / "cifar-10-batches-py"
    batches = _write_cifar_directory(directory, rng)
    archive = tmp_path / "archive" / "cifar-10-python.tar.gz"
    _write_tar(archive, directory)
    return directory, archive, batches


def _assert_same(a: D.ImageData, b: D.ImageData):
    assert a.name == b.name and a.classes == b.classes and a.mean == b.mean and a.std == b.std
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)


def test_cifar_archive_directory_and_parent_forms_load_identical_data(cifar):
    directory, archive, _ = cifar
    reference = D.load_cifar10(directory)
    for path in (directory.parent, archive, archive.parent, str(archive)):
        train, test = D.load_cifar10(path)
        _assert_same(train, reference[0])
        _assert_same(test, reference[1])


def test_cifar_pixels_channel_order_and_labels_round_trip_exactly(cifar):
    directory, _, batches = cifar
    train, test = D.load_cifar10(directory)
    assert (train.name, test.name) == ("cifar10-train", "cifar10-test")
    assert len(train) == sum(CIFAR_TRAIN_SIZES) and len(test) == CIFAR_TEST_SIZE
    assert train.images.shape[1:] == (3, 32, 32) and train.images.dtype == torch.float32
    assert train.labels.dtype == torch.int64
    assert train.classes == tuple(name.decode() for name in CIFAR_NAMES)
    assert train.mean == D.CIFAR10_MEAN and train.std == D.CIFAR10_STD

    pixels = np.concatenate([batches[f"data_batch_{i}"][0] for i in range(1, 6)])
    labels = sum((batches[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    assert train.labels.tolist() == labels and test.labels.tolist() == batches["test_batch"][1]
    # Row layout: the R plane, then G, then B, each 32x32 row-major. Checked element-wise
    # with the explicit formula, then in full; 8-bit values come back exactly.
    for n, c, y, x in [(0, 0, 0, 0), (1, 1, 5, 7), (len(pixels) - 1, 2, 31, 30), (4, 2, 0, 31)]:
        assert train.images[n, c, y, x].item() == pixels[n, c * 1024 + y * 32 + x] / np.float32(255)
    assert torch.equal(D.to_uint8(train.images).reshape(len(pixels), 3072), torch.from_numpy(pixels))
    assert torch.equal(D.to_uint8(test.images).reshape(CIFAR_TEST_SIZE, 3072), torch.from_numpy(batches["test_batch"][0]))


def test_cifar_without_meta_uses_the_standard_class_names(tmp_path):
    directory = tmp_path / "cifar-10-batches-py"
    _write_cifar_directory(directory, np.random.default_rng(), meta=False)
    train, _ = D.load_cifar10(directory)
    assert train.classes == D.CIFAR10_CLASSES


def test_cifar_numpy1_pickles_load(cifar):
    # The real archive's arrays name numpy.core.multiarray (numpy 1.x); numpy 2 writes numpy._core.
    directory, _, _ = cifar
    reference = D.load_cifar10(directory)
    for file in directory.iterdir():
        file.write_bytes(file.read_bytes().replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    assert b"numpy.core.multiarray" in (directory / "test_batch").read_bytes()
    _assert_same(D.load_cifar10(directory)[1], reference[1])


def test_cifar_missing_files_are_file_not_found_naming_path_and_expected(tmp_path, cifar):
    directory, archive, _ = cifar
    with pytest.raises(FileNotFoundError, match=r"nowhere.*cifar-10-python\.tar\.gz"):
        D.load_cifar10(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty.*cifar-10-python\.tar\.gz.*cifar-10-batches-py"):
        D.load_cifar10(tmp_path / "empty")
    (directory / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match=r"cifar-10-batches-py/data_batch_3 is missing"):
        D.load_cifar10(directory)
    with pytest.raises(FileNotFoundError, match=r"data_batch_3"):
        D.load_cifar10(directory.parent)


@pytest.mark.parametrize(
    "batch, match",
    [
        ({b"data": np.zeros((2, 3000), np.uint8), b"labels": [0, 1]}, r"uint8 array \[N, 3072\].*\(2, 3000\)"),
        ({b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]}, r"uint8 array \[N, 3072\].*float32"),
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1, 2]}, r"3 labels for 2 images"),
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}, r"labels must be in 0\.\.9"),
        ({b"data": np.zeros((2, 3072), np.uint8)}, r"no 'labels' entry"),
        ([1, 2, 3], r"a list, expected a dict"),
    ],
)
def test_cifar_malformed_batch_is_value_error_naming_the_file(cifar, batch, match):
    directory, _, _ = cifar
    _pickle(batch, directory / "data_batch_2")
    with pytest.raises(ValueError, match=r"data_batch_2.*" + match):
        D.load_cifar10(directory)
    # The same inside an archive: the message names the archive and the member.
    archive = directory.parent.parent / "broken" / "cifar-10-python.tar.gz"
    _write_tar(archive, directory)
    with pytest.raises(ValueError, match=r"cifar-10-python\.tar\.gz:cifar-10-batches-py/data_batch_2.*" + match):
        D.load_cifar10(archive)


def test_cifar_truncated_batch_is_value_error(cifar):
    directory, _, _ = cifar
    file = directory / "test_batch"
    file.write_bytes(file.read_bytes()[:500])
    with pytest.raises(ValueError, match=r"test_batch is not a readable CIFAR-10 batch"):
        D.load_cifar10(directory)


def test_cifar_corrupted_or_incomplete_archive_is_value_error(cifar, tmp_path):
    directory, archive, _ = cifar
    raw = archive.read_bytes()
    truncated = tmp_path / "truncated.tar.gz"
    truncated.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match=r"truncated\.tar\.gz"):
        D.load_cifar10(truncated)
    garbage = tmp_path / "garbage.tar.gz"
    garbage.write_bytes(b"\x1f\x8b\x08\x00" + bytes(range(256)) * 4)  # a gzip header, then noise
    with pytest.raises(ValueError, match=r"garbage\.tar\.gz is not a readable CIFAR-10 archive"):
        D.load_cifar10(garbage)
    incomplete = tmp_path / "incomplete" / "cifar-10-python.tar.gz"
    _write_tar(incomplete, directory, skip={"test_batch"})
    with pytest.raises(ValueError, match=r"incomplete/cifar-10-python\.tar\.gz lacks test_batch"):
        D.load_cifar10(incomplete.parent)


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_cifar_pickle_with_foreign_globals_is_refused_not_run(cifar, tmp_path):
    directory, _, _ = cifar
    marker = tmp_path / "payload-ran"
    _pickle({b"data": _Payload(str(marker)), b"labels": []}, directory / "data_batch_1")
    with pytest.raises(ValueError, match=r"data_batch_1.*refusing to load global"):
        D.load_cifar10(directory)
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------
# MNIST


def _idx(array: np.ndarray, magic: int) -> bytes:
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def _write_mnist(directory: Path, rng, gz: bool):
    directory.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte": (rng.integers(0, 256, (5, 28, 28)), 0x803),
        "train-labels-idx1-ubyte": (rng.integers(0, 10, 5), 0x801),
        "t10k-images-idx3-ubyte": (rng.integers(0, 256, (3, 28, 28)), 0x803),
        "t10k-labels-idx1-ubyte": (rng.integers(0, 10, 3), 0x801),
    }
    for name, (array, magic) in arrays.items():
        raw = _idx(array, magic)
        if gz:
            (directory / f"{name}.gz").write_bytes(gzip.compress(raw))
        else:
            (directory / name).write_bytes(raw)
    return {name: array for name, (array, _) in arrays.items()}


@pytest.fixture
def mnist(tmp_path):
    rng = np.random.default_rng()
    seed = int(rng.integers(2**31))
    plain = _write_mnist(tmp_path / "plain", np.random.default_rng(seed), gz=False)
    _write_mnist(tmp_path / "gz", np.random.default_rng(seed), gz=True)  # same arrays, gzipped
    return tmp_path, plain


def test_mnist_plain_gz_and_torchvision_layout_load_identical_exact_data(mnist):
    root, arrays = mnist
    train, test = D.load_mnist(root / "plain")
    assert (train.name, test.name) == ("mnist-train", "mnist-test")
    assert train.images.shape == (5, 1, 28, 28) and test.images.shape == (3, 1, 28, 28)
    assert train.images.dtype == torch.float32 and train.labels.dtype == torch.int64
    assert train.mean == D.MNIST_MEAN and train.std == D.MNIST_STD
    assert torch.equal(D.to_uint8(train.images)[:, 0], torch.from_numpy(arrays["train-images-idx3-ubyte"].astype(np.uint8)))
    assert torch.equal(D.to_uint8(test.images)[:, 0], torch.from_numpy(arrays["t10k-images-idx3-ubyte"].astype(np.uint8)))
    assert train.labels.tolist() == arrays["train-labels-idx1-ubyte"].tolist()
    assert test.labels.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()
    (root / "tv" / "MNIST").mkdir(parents=True)
    (root / "gz").rename(root / "tv" / "MNIST" / "raw")
    for path in (root / "tv", root / "tv" / "MNIST" / "raw"):
        other_train, other_test = D.load_mnist(path)
        _assert_same(other_train, train)
        _assert_same(other_test, test)


def test_mnist_resize_on_request(mnist):
    root, _ = mnist
    train, _ = D.load_mnist(root / "plain", size=32)
    assert train.images.shape == (5, 1, 32, 32)
    assert 0 <= train.images.min() and train.images.max() <= 1


def test_mnist_missing_file_is_file_not_found(mnist):
    root, _ = mnist
    with pytest.raises(FileNotFoundError, match=r"nowhere does not exist.*train-images-idx3-ubyte"):
        D.load_mnist(root / "nowhere")
    (root / "plain" / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(FileNotFoundError, match=r"plain/t10k-labels-idx1-ubyte \(or \.gz\) is missing"):
        D.load_mnist(root / "plain")


@pytest.mark.parametrize(
    "corrupt, match",
    [
        (lambda raw: raw[:-7], r"bytes, expected"),  # truncated pixels
        (lambda raw: raw[:6], r"truncated"),  # truncated header
        (lambda raw: (0x801).to_bytes(4, "big") + raw[4:], r"magic 0x00000801, expected 0x00000803"),
        (lambda raw: raw[:8] + (27).to_bytes(4, "big") + raw[12:], r"dimensions \(5, 27, 28\)"),
    ],
)
def test_mnist_malformed_file_is_value_error_naming_it(mnist, corrupt, match):
    root, _ = mnist
    file = root / "plain" / "train-images-idx3-ubyte"
    file.write_bytes(corrupt(file.read_bytes()))
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte.*" + match):
        D.load_mnist(root / "plain")


def test_mnist_label_count_mismatch_and_bad_gzip_are_value_errors(mnist):
    root, _ = mnist
    labels = root / "plain" / "t10k-labels-idx1-ubyte"
    labels.write_bytes(_idx(np.zeros(4), 0x801))
    with pytest.raises(ValueError, match=r"t10k-labels-idx1-ubyte holds 4 labels for the 3 images"):
        D.load_mnist(root / "plain")
    images = root / "gz" / "train-images-idx3-ubyte.gz"
    images.write_bytes(images.read_bytes()[:40])
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte\.gz is not a readable gzip"):
        D.load_mnist(root / "gz")


# ---------------------------------------------------------------------------------------------
# digits and the registry


@pytest.fixture(scope="module")
def digits():
    return D.load_digits()


def test_digits_shapes_range_and_stratified_split(digits):
    train, test = digits
    assert len(train) + len(test) == 1797
    assert train.images.shape[1:] == (1, 32, 32) and test.images.shape[1:] == (1, 32, 32)
    assert train.images.dtype == torch.float32 and train.labels.dtype == torch.int64
    assert 0 <= min(train.images.min(), test.images.min()) and max(train.images.max(), test.images.max()) <= 1
    assert train.classes == tuple("0123456789") and (train.name, test.name) == ("digits-train", "digits-test")
    # Stratified: about a quarter of each class in test.
    totals = torch.bincount(torch.cat([train.labels, test.labels]), minlength=10)
    assert torch.equal(torch.bincount(test.labels, minlength=10), torch.round(totals * 0.25).long())
    # Normalization from the train pixels.
    assert train.mean == test.mean == pytest.approx((train.images.mean().item(),))
    assert train.std == pytest.approx((train.images.std(correction=0).item(),))


def test_digits_train_and_test_partition_the_dataset(digits):
    train, test = digits
    everything = D.load_digits(test_fraction=0.5, seed=1)
    key = lambda data: Counter(  # noqa: E731  (image bytes + label, as a multiset)
        (image.numpy().tobytes(), int(label)) for image, label in zip(data.images, data.labels)
    )
    assert key(train) + key(test) == key(everything[0]) + key(everything[1])


def test_digits_split_is_deterministic_per_seed(digits):
    again = D.load_digits()
    _assert_same(again[0], digits[0])
    _assert_same(again[1], digits[1])
    other = D.load_digits(seed=1)
    assert len(other[1]) == len(digits[1]) and not torch.equal(other[1].labels, digits[1].labels)


def test_digits_size_and_fraction(digits):
    train, test = D.load_digits(size=8, test_fraction=0.1)
    assert train.images.shape[1:] == (1, 8, 8)
    assert torch.equal(train.images * 16, (train.images * 16).round())  # raw 0..16 levels, not resampled
    assert 150 < len(test) < 210
    with pytest.raises(ValueError, match="test_fraction"):
        D.load_digits(test_fraction=1.0)


def test_load_dataset_registry(cifar, digits):
    directory, _, _ = cifar
    train, _ = D.load_dataset("digits")
    _assert_same(train, digits[0])
    assert D.load_dataset("digits", size=16)[0].images.shape[1:] == (1, 16, 16)
    _assert_same(D.load_dataset("cifar10", directory)[1], D.load_cifar10(directory)[1])
    with pytest.raises(ValueError, match=r"unknown dataset 'svhn'; known: digits, cifar10, mnist"):
        D.load_dataset("svhn")
    with pytest.raises(ValueError, match=r"'cifar10' needs a path"):
        D.load_dataset("cifar10")
    with pytest.raises(ValueError, match=r"'mnist' needs a path"):
        D.load_dataset("mnist")
    with pytest.raises(ValueError, match=r"digits are embedded.*no path"):
        D.load_dataset("digits", path=directory)


# ---------------------------------------------------------------------------------------------
# ImageData, Normalize, 8-bit round trip


def test_image_data_validates_and_subsets():
    images, labels = torch.rand(6, 3, 4, 4), torch.arange(6)
    data = D.ImageData(images, labels, "toy", ["a", "b"], [0.5, 0.5, 0.5], np.array([0.2, 0.2, 0.2]))
    assert data.classes == ("a", "b") and data.mean == (0.5, 0.5, 0.5) and data.std == (0.2, 0.2, 0.2)
    assert len(data) == 6 and data.channels == 3 and data.image_size == (4, 4)
    assert repr(data) == "ImageData(name='toy', 6 images 3x4x4, 2 classes)"
    part = data.subset([4, 1])
    assert torch.equal(part.images, images[[4, 1]]) and part.labels.tolist() == [4, 1] and part.mean == data.mean
    assert torch.equal(data.subset(slice(2, 4)).labels, labels[2:4])
    with pytest.raises(ValueError, match="one entry per channel"):
        D.ImageData(images, labels, "toy", (), (0.5,), (0.2,))
    with pytest.raises(ValueError, match="5 labels for 6 images"):
        D.ImageData(images, labels[:5], "toy", (), (0.5,) * 3, (0.2,) * 3)
    with pytest.raises(ValueError, match="int64"):
        D.ImageData(images, labels.int(), "toy", (), (0.5,) * 3, (0.2,) * 3)
    with pytest.raises(ValueError, match=r"float tensor \[N, C, H, W\]"):
        D.ImageData(images[0], labels, "toy", (), (0.5,) * 3, (0.2,) * 3)


def test_normalize_matches_manual_and_lives_in_state_dict():
    x = torch.rand(5, 3, 6, 7)
    layer = D.Normalize(D.CIFAR10_MEAN, D.CIFAR10_STD)
    mean, std = torch.tensor(D.CIFAR10_MEAN), torch.tensor(D.CIFAR10_STD)
    manual = (x - mean[None, :, None, None]) / std[None, :, None, None]
    torch.testing.assert_close(layer(x), manual, rtol=0, atol=0)  # the same float32 ops: bit-equal
    state = layer.state_dict()
    assert set(state) == {"mean", "std"} and state["mean"].shape == (1, 3, 1, 1)
    assert "mean=(0.4914, 0.4822, 0.4465), std=(0.2023, 0.1994, 0.2010)" in repr(layer)
    assert layer.to(torch.float64).mean.dtype == torch.float64
    restored = D.Normalize((0.0,) * 3, (1.0,) * 3)
    restored.load_state_dict(state)
    assert torch.equal(restored(x), manual)
    data = D.ImageData(x, torch.zeros(5, dtype=torch.long), "toy", (), D.CIFAR10_MEAN, D.CIFAR10_STD)
    assert torch.equal(data.normalization()(x), manual)
    with pytest.raises(ValueError, match="std must be positive"):
        D.Normalize((0.5,), (0.0,))
    with pytest.raises(ValueError, match="same non-zero number of channels"):
        D.Normalize((0.5, 0.5), (0.2,))


def test_to_uint8_rounds_to_nearest_and_clamps():
    k = torch.arange(255, dtype=torch.float32)
    assert torch.equal(D.to_uint8(k / 255), k.to(torch.uint8))
    assert torch.equal(D.to_uint8((k + 0.4) / 255), k.to(torch.uint8))
    assert torch.equal(D.to_uint8((k + 0.6) / 255), (k + 1).to(torch.uint8))
    assert D.to_uint8(torch.tensor([-0.3, 1.7])).tolist() == [0, 255]
    x = torch.rand(2, 3, 8, 8)
    pixels = D.to_uint8(x)
    restored = D.from_uint8(pixels)
    assert restored.dtype == torch.float32 and torch.equal(D.to_uint8(restored), pixels)
    assert (restored - x).abs().max() <= 0.5 / 255 + 1e-7  # rounding: at most half a level off
    with pytest.raises(TypeError, match="uint8"):
        D.from_uint8(x)


# ---------------------------------------------------------------------------------------------
# Augmentation


def _crops(image: torch.Tensor, padding: int):
    """Every (top, left, flipped) window of the zero-padded image, by plain slicing."""
    h, w = image.shape[1:]
    padded = torch.nn.functional.pad(image, (padding,) * 4)
    for top in range(2 * padding + 1):
        for left in range(2 * padding + 1):
            window = padded[:, top : top + h, left : left + w]
            yield (top, left, False), window
            yield (top, left, True), window.flip(-1)


def _match(out: torch.Tensor, image: torch.Tensor, padding: int):
    found = [key for key, window in _crops(image, padding) if torch.equal(window, out)]
    assert len(found) == 1, f"output is not exactly one window of the padded image: {found}"
    return found[0]


@pytest.mark.parametrize("flip", [False, True])
def test_random_crop_flip_outputs_are_windows_of_the_padded_images(flip):
    images = torch.rand(48, 2, 9, 11) + 0.1  # no zeros in the content: padding zeros stand out
    out = D.random_crop_flip(images, padding=3, flip=flip, generator=torch.Generator().manual_seed(0))
    assert out.shape == images.shape and out.dtype == images.dtype
    keys = [_match(out[i], images[i], 3) for i in range(len(images))]
    assert len({(top, left) for top, left, _ in keys}) > 10  # the crop really moves the content
    assert {mirrored for _, _, mirrored in keys} == ({False, True} if flip else {False})
    for i, (top, left, mirrored) in enumerate(keys):
        if top < 3:  # shifted down: the top rows come from the zero padding
            assert (out[i, :, : 3 - top] == 0).all()
        if left > 3 and not mirrored:  # shifted left: the right columns are padding
            assert (out[i, :, :, 11 - (left - 3) :] == 0).all()


def test_random_crop_flip_is_reproducible_and_handles_edge_cases():
    images = torch.rand(16, 3, 8, 8)
    first = D.random_crop_flip(images, generator=torch.Generator().manual_seed(7))
    again = D.random_crop_flip(images, generator=torch.Generator().manual_seed(7))
    other = D.random_crop_flip(images, generator=torch.Generator().manual_seed(8))
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert torch.equal(D.random_crop_flip(images, padding=0, flip=False), images)
    flipped = D.random_crop_flip(images, padding=0, flip=True)
    assert all(torch.equal(f, x) or torch.equal(f, x.flip(-1)) for f, x in zip(flipped, images))
    assert D.random_crop_flip(images[:0]).shape == (0, 3, 8, 8)
    with pytest.raises(ValueError, match="padding"):
        D.random_crop_flip(images, padding=-1)
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        D.random_crop_flip(images[0])


def test_default_augmentation_per_dataset():
    assert D.default_augmentation("cifar10").keywords == {"padding": 4, "flip": True}
    assert D.default_augmentation("mnist").keywords == {"padding": 4, "flip": False}
    assert D.default_augmentation("digits").keywords == {"padding": 4, "flip": False}
    images = torch.rand(4, 1, 32, 32)
    augment = D.default_augmentation("digits")
    assert torch.equal(augment(images, generator=torch.Generator().manual_seed(3)),
                       D.random_crop_flip(images, 4, False, torch.Generator().manual_seed(3)))
    with pytest.raises(ValueError, match="unknown dataset 'svhn'"):
        D.default_augmentation("svhn")


# ---------------------------------------------------------------------------------------------
# Batching and sharding


@pytest.mark.parametrize("n, world_size", [(12, 3), (10, 3), (7, 2), (5, 1), (2, 4)])
@pytest.mark.parametrize("shuffle", [False, True])
def test_shards_are_disjoint_and_cover_everything(n, world_size, shuffle):
    equal = [D.shard_indices(n, shuffle=shuffle, seed=5, rank=r, world_size=world_size) for r in range(world_size)]
    assert len({len(s) for s in equal}) == 1 and len(equal[0]) == n // world_size
    flat = torch.cat(equal)
    assert len(set(flat.tolist())) == len(flat) == n - n % world_size
    every = [D.shard_indices(n, shuffle=shuffle, seed=5, rank=r, world_size=world_size, equal_shards=False)
             for r in range(world_size)]
    assert sorted(torch.cat(every).tolist()) == list(range(n))  # each item exactly once
    assert max(map(len, every)) - min(map(len, every)) <= 1


def test_shard_order_depends_on_seed_and_epoch_only():
    a = D.shard_indices(100, shuffle=True, seed=1, epoch=2)
    assert torch.equal(a, D.shard_indices(100, shuffle=True, seed=1, epoch=2))
    assert not torch.equal(a, D.shard_indices(100, shuffle=True, seed=1, epoch=3))
    assert torch.equal(D.shard_indices(100), torch.arange(100))
    with pytest.raises(ValueError, match="rank"):
        D.shard_indices(10, rank=2, world_size=2)
    with pytest.raises(ValueError, match="world_size"):
        D.shard_indices(10, world_size=0)


def test_batches_yield_the_shard_in_order_with_augmentation():
    images = torch.arange(11, dtype=torch.float32).view(11, 1, 1, 1).expand(11, 1, 2, 2).contiguous()
    data = D.ImageData(images, torch.arange(11), "toy", (), (0.0,), (1.0,))
    loader = D.batches(data, 4)
    assert len(loader) == 3
    got = list(loader)
    assert [labels.tolist() for _, labels in got] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10]]
    assert all(torch.equal(x[:, 0, 0, 0], y.float()) for x, y in got)  # images travel with labels
    assert len(D.batches(data, 4, drop_last=True)) == len(list(D.batches(data, 4, drop_last=True))) == 2

    shards = [D.batches(data, 2, shuffle=True, seed=3, epoch=1, rank=r, world_size=2) for r in range(2)]
    seen = [torch.cat([labels for _, labels in shard]).tolist() for shard in shards]
    assert len(seen[0]) == len(seen[1]) == 5 and not set(seen[0]) & set(seen[1])
    assert seen[0] == D.shard_indices(11, shuffle=True, seed=3, epoch=1, rank=0, world_size=2).tolist()

    calls = []

    def augment(x, generator=None):
        calls.append(generator)
        return x + 100

    generator = torch.Generator()
    x, _ = next(iter(D.batches(data, 4, augment=augment, generator=generator)))
    assert calls == [generator] and torch.equal(x, images[:4] + 100)
    with pytest.raises(ValueError, match="batch_size"):
        D.batches(data, 0)
