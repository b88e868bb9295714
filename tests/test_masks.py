"""random_mask and kept_index: the paper's exact-count fixed masks and their CSR index lists."""

import pytest
import torch

import rmask_kernels as rk

SHAPE = (8, 6, 5)  # (C, H, W), odd spatial size so int() truncation matters
RATIOS = [0.0, 0.3, 0.5, 0.9, 0.999]


def masked_count(mask):
    return int((~mask).sum())


# -- exact counts, shapes and dtype ------------------------------------------------------

@pytest.mark.parametrize("ratio", RATIOS)
def test_neuron_mask_masks_exactly_int_ratio_times_numel(ratio):
    c, h, w = SHAPE
    mask = rk.random_mask(SHAPE, ratio, "neuron", seed=1)
    assert mask.dtype == torch.bool
    assert tuple(mask.shape) == SHAPE
    assert masked_count(mask) == int(ratio * c * h * w)


@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("mode", ["spatial", "same"])
def test_spatial_mask_is_one_pattern_with_exact_count(ratio, mode):
    c, h, w = SHAPE
    mask = rk.random_mask(SHAPE, ratio, mode, seed=2)
    assert mask.dtype == torch.bool
    assert tuple(mask.shape) == (1, h, w)
    assert masked_count(mask) == int(ratio * h * w)


def test_same_is_an_alias_for_spatial():
    assert torch.equal(rk.random_mask(SHAPE, 0.5, "same", seed=3), rk.random_mask(SHAPE, 0.5, "spatial", seed=3))


@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("group_size", [1, 2, 4, 8])
def test_group_mask_repeats_one_pattern_per_block(ratio, group_size):
    c, h, w = SHAPE
    mask = rk.random_mask(SHAPE, ratio, "group", group_size=group_size, seed=4)
    assert mask.dtype == torch.bool
    assert tuple(mask.shape) == SHAPE
    blocks = mask.view(c // group_size, group_size, h, w)
    # Every channel of a block carries the block's pattern.
    assert torch.equal(blocks, blocks[:, :1].expand_as(blocks))
    patterns = blocks[:, 0]
    assert masked_count(patterns) == int(ratio * (c // group_size) * h * w)
    assert masked_count(mask) == group_size * int(ratio * (c // group_size) * h * w)


def test_group_size_one_is_neuron_and_full_group_is_one_pattern():
    c, h, w = SHAPE
    assert torch.equal(rk.random_mask(SHAPE, 0.5, "group", group_size=1, seed=5), rk.random_mask(SHAPE, 0.5, seed=5))
    whole = rk.random_mask(SHAPE, 0.5, "group", group_size=c, seed=6)
    assert torch.equal(whole, whole[:1].expand(c, h, w))
    assert masked_count(whole[0]) == int(0.5 * h * w)


def test_no_rescaling_values_are_only_true_false():
    mask = rk.random_mask(SHAPE, 0.5, seed=7)
    assert mask.dtype == torch.bool  # a 0/1 mask, never 1/(1-p)
    assert set(mask.unique().tolist()) == {False, True}


def test_near_one_ratio_keeps_at_least_something_on_a_large_mask():
    mask = rk.random_mask((4, 16, 16), 0.999, seed=8)
    assert masked_count(mask) == int(0.999 * 4 * 16 * 16)
    assert mask.sum() == 4 * 16 * 16 - int(0.999 * 4 * 16 * 16)


def test_neuron_channels_get_different_patterns():
    mask = rk.random_mask((8, 8, 8), 0.5, "neuron", seed=9)
    flat = mask.view(8, -1)
    distinct = {tuple(row.tolist()) for row in flat}
    # 8 independent draws of 64 positions: a repeat is astronomically unlikely.
    assert len(distinct) == 8


# -- seeds ---------------------------------------------------------------------------------

@pytest.mark.parametrize("mode,group_size", [("neuron", None), ("spatial", None), ("group", 2)])
def test_same_seed_same_mask_different_seed_different_mask(mode, group_size):
    shape = (4, 8, 8)
    a = rk.random_mask(shape, 0.5, mode, group_size, seed=123)
    b = rk.random_mask(shape, 0.5, mode, group_size, seed=123)
    c = rk.random_mask(shape, 0.5, mode, group_size, seed=124)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_seed_does_not_depend_on_global_rng_state():
    a = rk.random_mask(SHAPE, 0.5, seed=11)
    torch.randn(100)  # move the global generator
    b = rk.random_mask(SHAPE, 0.5, seed=11)
    assert torch.equal(a, b)


def test_seed_none_is_reproducible_under_manual_seed():
    with torch.random.fork_rng():  # leave the global generator as it was for the other tests
        torch.manual_seed(2024)
        a = rk.random_mask(SHAPE, 0.5)
        b = rk.random_mask(SHAPE, 0.5)
        torch.manual_seed(2024)
        a_again = rk.random_mask(SHAPE, 0.5)
        b_again = rk.random_mask(SHAPE, 0.5)
    assert torch.equal(a, a_again) and torch.equal(b, b_again)
    assert not torch.equal(a, b), "successive unseeded masks must differ"


def test_device_argument():
    mask = rk.random_mask(SHAPE, 0.5, seed=12, device="cpu")
    assert mask.device.type == "cpu" and torch.equal(mask, rk.random_mask(SHAPE, 0.5, seed=12))


# -- rejected inputs -----------------------------------------------------------------------

@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(ratio=1.0), ValueError, r"ratio must be in \[0, 1\).*got 1\.0"),
        (dict(ratio=-0.1), ValueError, r"ratio must be in \[0, 1\).*got -0\.1"),
        (dict(ratio=1.5), ValueError, r"ratio must be in \[0, 1\)"),
        (dict(ratio="0.5"), TypeError, r"ratio must be a float.*str '0\.5'"),
        (dict(ratio=True), TypeError, r"ratio must be a float.*bool"),
        (dict(ratio=None), TypeError, r"ratio must be a float.*NoneType"),
        (dict(mode="channel"), ValueError, r"mode must be one of .*got 'channel'"),
        (dict(mode="group"), ValueError, r"group_size must be a positive int with mode='group', got None"),
        (dict(mode="group", group_size=0), ValueError, r"group_size must be a positive int.*got 0"),
        (dict(mode="group", group_size=2.0), ValueError, r"group_size must be a positive int.*got 2\.0"),
        (dict(mode="group", group_size=3), ValueError, r"group_size must divide the 8 channels, got group_size=3"),
        (dict(mode="neuron", group_size=2), ValueError, r"group_size is only used with mode='group'.*mode='neuron'"),
        (dict(mode="spatial", group_size=2), ValueError, r"group_size is only used with mode='group'.*mode='spatial'"),
        (dict(shape=(8, 6)), ValueError, r"shape must be \(C, H, W\).*got \(8, 6\)"),
        (dict(shape=(1, 8, 6, 5)), ValueError, r"shape must be \(C, H, W\).*got \(1, 8, 6, 5\)"),
        (dict(shape=(8, 0, 5)), ValueError, r"shape must be \(C, H, W\) of positive ints, got \(8, 0, 5\)"),
        (dict(shape=(8, -6, 5)), ValueError, r"shape must be \(C, H, W\) of positive ints"),
        (dict(shape=(8, 6.0, 5)), ValueError, r"shape must be \(C, H, W\) of positive ints"),
    ],
)
def test_rejected_inputs(kwargs, error, match):
    args = dict(shape=SHAPE, ratio=0.5, mode="neuron", group_size=None, seed=0)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        rk.random_mask(args["shape"], args["ratio"], args["mode"], args["group_size"], args["seed"])


# -- kept_index ----------------------------------------------------------------------------

def reconstruct(offsets, positions, channels, height, width):
    """The mask that (offsets, positions) describe: P patterns, each covering C/P channels."""
    patterns = offsets.numel() - 1
    assert patterns >= 1 and channels % patterns == 0
    rebuilt = torch.zeros(patterns, height * width, dtype=torch.bool)
    for p in range(patterns):
        start, end = int(offsets[p]), int(offsets[p + 1])
        rows = positions[start:end]
        assert torch.all(rows[1:] > rows[:-1]), "positions ascending within a pattern"
        assert rows.numel() == 0 or (0 <= int(rows.min()) and int(rows.max()) < height * width)
        rebuilt[p, rows] = True
    return rebuilt.view(patterns, 1, height, width).expand(patterns, channels // patterns, height, width).reshape(
        channels, height, width
    )


@pytest.mark.parametrize("ratio", [0.0, 0.5, 0.9, 0.999])
@pytest.mark.parametrize("mode,group_size", [("neuron", None), ("spatial", None), ("group", 2), ("group", 4)])
def test_kept_index_reconstructs_the_mask(mode, group_size, ratio):
    c, h, w = SHAPE
    mask = rk.random_mask(SHAPE, ratio, mode, group_size, seed=13)
    offsets, positions, *_ = rk.kept_index(mask)
    assert offsets.dtype == torch.int64 and positions.dtype == torch.int64
    channels = mask.shape[0]
    patterns = offsets.numel() - 1
    assert channels % patterns == 0
    # Each pattern covers C/P channels, so the kept count is positions * C/P.
    assert int(offsets[0]) == 0 and int(offsets[-1]) == positions.numel()
    assert positions.numel() * (channels // patterns) == int(mask.sum())
    assert torch.all(offsets[1:] >= offsets[:-1])
    rebuilt = reconstruct(offsets, positions, channels, h, w)
    assert torch.equal(rebuilt, mask)


def test_kept_index_pattern_counts_per_mode():
    c, h, w = SHAPE
    offsets, *_ = rk.kept_index(rk.random_mask(SHAPE, 0.5, "spatial", seed=14))
    assert offsets.numel() - 1 == 1
    offsets, *_ = rk.kept_index(rk.random_mask(SHAPE, 0.5, "neuron", seed=14))
    assert offsets.numel() - 1 == c  # distinct patterns per channel (see the test above)
    offsets, *_ = rk.kept_index(rk.random_mask(SHAPE, 0.5, "group", group_size=4, seed=14))
    # Group masks collapse to at most C/group_size patterns (fewer only if blocks coincide).
    assert (offsets.numel() - 1) <= c // 4 and c % (offsets.numel() - 1) == 0


def test_kept_index_of_hand_written_mask():
    mask = torch.tensor(
        [[[True, False], [False, True]], [[True, False], [False, True]], [[False, False], [True, True]],
         [[False, False], [True, True]]]
    )
    offsets, positions, *_ = rk.kept_index(mask)
    assert offsets.tolist() == [0, 2, 4]
    assert positions.tolist() == [0, 3, 2, 3]


def test_kept_index_of_all_kept_and_all_masked():
    full = torch.ones(3, 2, 2, dtype=torch.bool)
    offsets, positions, *_ = rk.kept_index(full)
    assert torch.equal(reconstruct(offsets, positions, 3, 2, 2), full)
    empty = torch.zeros(3, 2, 2, dtype=torch.bool)
    offsets, positions, *_ = rk.kept_index(empty)
    assert positions.numel() == 0 and torch.equal(reconstruct(offsets, positions, 3, 2, 2), empty)


@pytest.mark.parametrize(
    "mask,match",
    [
        (torch.ones(2, 3, 3), r"mask must be a bool tensor \(C, H, W\), got torch.float32"),
        (torch.ones(3, 3, dtype=torch.bool), r"mask must be a bool tensor \(C, H, W\).*shape \(3, 3\)"),
    ],
)
def test_kept_index_rejects_bad_masks(mask, match):
    with pytest.raises(ValueError, match=match):
        rk.kept_index(mask)


@pytest.mark.parametrize("ratio", [0.0, 0.5, 0.9])
@pytest.mark.parametrize("mode,group_size", [("neuron", None), ("spatial", None), ("group", 4)])
def test_kept_index_by_position_reconstructs_the_mask(mode, group_size, ratio):
    c, h, w = SHAPE
    mask = rk.random_mask(SHAPE, ratio, mode, group_size, seed=15)
    index = rk.kept_index(mask, out_channels=c)
    rebuilt = torch.zeros(h * w, c, dtype=torch.bool)
    for q in range(h * w):
        channels = index.position_channels[index.position_offsets[q] : index.position_offsets[q + 1]]
        assert torch.all(channels[1:] > channels[:-1]), "ascending, no repeats"
        rebuilt[q, channels] = True
    assert torch.equal(rebuilt.t().reshape(c, h, w), mask.expand(c, h, w))


def test_kept_index_of_a_spatial_mask_needs_the_channel_count():
    mask = rk.random_mask(SHAPE, 0.5, "spatial", seed=16)
    index = rk.kept_index(mask, out_channels=SHAPE[0])
    assert index.position_channels.numel() == SHAPE[0] * int(mask.sum())
    with pytest.raises(ValueError, match=r"mask has 1 channels; expected 1 or out_channels=5|mask has 8 channels"):
        rk.kept_index(rk.random_mask(SHAPE, 0.5, seed=16), out_channels=5)


@pytest.mark.parametrize("mode,group_size,channels", [("neuron", None, 6), ("spatial", None, 6), ("group", 3, 6)])
def test_check_kept_index_accepts_the_index_of_its_mask(mode, group_size, channels):
    mask = rk.random_mask((channels, 5, 7), 0.6, mode, group_size, seed=1)
    index = rk.kept_index(mask, channels)
    checked = rk.check_kept_index(tuple(index), mask, channels)
    assert isinstance(checked, rk.masks.KeptIndex) and all(a is b for a, b in zip(checked, index))
    if mode == "group":  # one pattern per channel lists the same kept outputs: also valid
        neuron_form = rk.kept_index(mask.clone().contiguous(), channels)
        per_channel = mask.reshape(channels, -1)
        offsets = torch.zeros(channels + 1, dtype=torch.int64)
        offsets[1:] = per_channel.sum(1).cumsum(0)
        rk.check_kept_index((offsets, per_channel.nonzero()[:, 1], *neuron_form[2:]), mask, channels)


def corrupt(index, mask):
    """(name, index, message) for index lists that are wrong in one way each."""
    offsets, positions, by_position, channels = index
    other = rk.kept_index(rk.random_mask(tuple(mask.shape), 0.6, seed=2))
    swapped = positions.clone()
    swapped[[0, 1]] = swapped[[1, 0]]
    return [
        ("another mask's", other, "list other kept positions than the mask's"),
        ("positions out of range", (offsets, positions + 35, by_position, channels), r"must lie in \[0, 35\)"),
        ("unsorted positions", (offsets, swapped, by_position, channels), "strictly ascending"),
        ("offsets not ending at the count", (offsets, positions[:-1], by_position, channels), "must rise from 0"),
        ("patterns not dividing", (offsets[:5], positions, by_position, channels), "4 patterns, which must divide"),
        ("short position_offsets", (offsets, positions, by_position[:-1], channels), "H \\* W \\+ 1 = 36"),
        ("channels out of range", (offsets, positions, by_position, channels + 1), r"must lie in \[0, 6\)"),
        ("int32", (offsets, positions.int(), by_position, channels), "positions must be a 1-D int64 tensor"),
        ("three tensors", (offsets, positions, by_position), "expected the 4 tensors of a KeptIndex"),
        ("not a tuple", positions, "expected the 4 tensors"),
    ]


def test_check_kept_index_says_what_is_wrong():
    mask = rk.random_mask((6, 5, 7), 0.6, seed=1)
    for name, index, message in corrupt(rk.kept_index(mask), mask):
        with pytest.raises(ValueError, match="kept_index does not match the mask") as error:
            rk.check_kept_index(index, mask)
        assert error.match(message), name
        assert "rk.kept_index(mask, 6)" in str(error.value)
    # Only the by-position form wrong: two masks keeping 3 of 6 channels at every position.
    alternate = (torch.arange(6).view(6, 1, 1) + torch.arange(35).view(1, 5, 7)) % 2 == 0
    mine, theirs = rk.kept_index(alternate), rk.kept_index(~alternate)
    with pytest.raises(ValueError, match="list other kept channels than the mask's"):
        rk.check_kept_index((*mine[:3], theirs[3]), alternate)
