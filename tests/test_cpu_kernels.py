"""The C++ CPU kernels' internals (csrc/cpu): which kernels serve float32 on this CPU, the
output cache, the SIMD tile and block shapes, the write-out and layout paths, and the op's
checks of a kept index. Each test builds a shape that reaches one such path and compares with
the reference. On an AVX-512 CPU these run again on the AVX2 kernels
(test_parity.py::test_cpu_backend_again_on_the_avx2_kernels). The op's contract on every
backend is tests/test_parity.py's."""

import os

import pytest
import torch
import torch.nn.functional as F

import rmask_kernels as rk
from rmask_kernels import reference
from rmask_kernels.functional import conv_output_size

from cases import TOLERANCE, check_against_reference, make_case
from helpers import python_subprocess

MEMORY_FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}

pytestmark = pytest.mark.skipif("cpu" not in rk.available_backends(), reason="extension not built")


def cpu(*args, **kwargs):
    return rk.masked_conv2d(*args, backend="cpu", **kwargs)


def check(x, weight, bias, mask, conv_args, grad=True):
    """The cpu backend against the float64 oracle: values, masked zeros and gradients."""
    return check_against_reference(cpu, x, weight, bias, mask, conv_args, grad, TOLERANCE[x.dtype])


def test_cpu_kernels_follow_the_cpu_capability():
    # ATen's capability (which ATEN_CPU_CAPABILITY can lower) picks the batch-vector kernels.
    expected = {"AVX512": "avx512", "AVX2": "avx2"}.get(torch.backends.cpu.get_cpu_capability(), "portable")
    assert rk.backends.cpu_kernels() == expected


CAPABILITY_AND_KERNELS = (
    "import torch, rmask_kernels as rk\n"
    "print(torch.backends.cpu.get_cpu_capability(), rk.backends.cpu_kernels())\n"
)


def capability_and_kernels(aten_cpu_capability):
    """(ATen's CPU capability, the extension's CPU kernels) in a fresh process started with
    ATEN_CPU_CAPABILITY set to `aten_cpu_capability` (None: unset)."""
    result = python_subprocess(["-c", CAPABILITY_AND_KERNELS], env={"ATEN_CPU_CAPABILITY": aten_cpu_capability})
    assert result.returncode == 0, result.stderr[-2000:]
    return tuple(result.stdout.split())


@pytest.mark.parametrize("aten_cpu_capability", ["default", "avx2", "avx512", "unknown-value"])
def test_cpu_kernels_follow_aten_cpu_capability_variable(aten_cpu_capability):
    # The extension restates ATen's rule (the stable ABI has no get_cpu_capability): both read
    # ATEN_CPU_CAPABILITY at start-up, and an unknown value leaves the choice to the CPU.
    hardware, _ = capability_and_kernels(None)
    levels = ["DEFAULT", "AVX2", "AVX512"]
    if hardware not in levels or levels.index(hardware) < levels.index(aten_cpu_capability.upper()
                                                                        if aten_cpu_capability.upper() in levels
                                                                        else "DEFAULT"):
        pytest.skip(f"this CPU runs {hardware}: asking for more is not the rule under test")
    capability, kernels = capability_and_kernels(aten_cpu_capability)
    assert kernels == {"AVX512": "avx512", "AVX2": "avx2"}.get(capability, "portable")
    if aten_cpu_capability == "unknown-value":
        assert capability == hardware


def test_auto_asks_the_extension_which_cpu_kernels_serve():
    # The rule lives in C++ (use_batch_vector); Python's "auto" asks it, so the two cannot drift.
    batch_vector = rk.backends.cpu_kernels() in ("avx2", "avx512")
    ask = rk.backends.batch_vector_kernels
    assert ask(torch.float32, 1, 8, 3) == batch_vector
    assert ask(torch.float32, 1, 8, 64) == batch_vector
    for dtype, groups, batch, kernel_height in [(torch.float64, 1, 8, 3), (torch.bfloat16, 1, 8, 3),
                                                (torch.float32, 2, 8, 3), (torch.float32, 1, 0, 3),
                                                (torch.float32, 1, 8, 65)]:
        assert not ask(dtype, groups, batch, kernel_height), (dtype, groups, batch, kernel_height)
    # A kernel 65 rows high runs the portable kernels: "auto" takes them only where those pay off.
    x, neuron = torch.randn(32, 2, 70, 6), rk.random_mask((6, 6, 6), 0.9, "neuron")
    assert rk.functional.select_backend("auto", x, neuron, kernel_height=65) == "reference"
    if batch_vector:
        assert rk.functional.select_backend("auto", x, neuron, kernel_height=64) == "cpu"


def test_op_rejects_inconsistent_index():
    x, weight, mask = torch.randn(2, 4, 8, 8), torch.randn(6, 4, 3, 3), rk.random_mask((6, 8, 8), 0.5)
    offsets, positions, by_position, channels = rk.kept_index(mask)

    def call(*index, stride=(1, 1)):
        return torch.ops.rmask.masked_conv2d(x, weight, None, mask, *index, list(stride), [1, 1], [1, 1], 1)

    with pytest.raises(RuntimeError, match=r"kept_positions must lie in \[0, 64\)"):
        call(offsets, positions + 64, by_position, channels)
    with pytest.raises(RuntimeError, match="kept_offsets must start at 0 and end at kept_positions.numel()"):
        call(torch.cat([offsets[:-1], offsets[-1:] - 1]), positions, by_position, channels)
    with pytest.raises(RuntimeError, match="position_offsets/position_channels must list the .* kept"):
        call(offsets, positions, torch.cat([by_position[:-1], by_position[-1:] - 1]), channels)
    with pytest.raises(RuntimeError, match=r"position_channels must lie in \[0, 6\)"):
        call(offsets, positions, by_position, channels + 6)
    with pytest.raises(RuntimeError, match=r"mask must have shape \(6 or 1, 4, 4\) for this convolution.s output, got \[6, 8, 8\]"):
        call(offsets, positions, by_position, channels, stride=(2, 2))


@pytest.mark.skipif("cpu" not in rk.available_backends() or rk.backends.cpu_kernels() == "portable",
                    reason="the output cache serves the batch-vector kernels")
@pytest.mark.parametrize("mode", ["neuron", "spatial"])
def test_large_outputs_reuse_freed_memory(mode):
    # A freed output of >= 1 MiB goes to the cache, and the next output of its size takes it
    # (already mapped: no page faults). The tensor wraps the cached block (from_blob, the stable
    # ABI's only way to hand torch foreign memory): correct, its storage the block's size, and
    # like any from_blob tensor it may shrink but not grow in place.
    x, weight = torch.randn(8, 16, 32, 32), torch.randn(64, 16, 3, 3)
    mask = rk.random_mask((64, 32, 32), 0.5, mode)
    y = rk.masked_conv2d(x, weight, None, mask, padding=1, backend="cpu")
    address, before = y.data_ptr(), rk.backends.cpu_output_cache()
    assert before["limit_bytes"] == int(os.environ.get("RMASK_CPU_CACHE_MB", "256")) << 20
    if before["limit_bytes"] < 8 << 20:
        pytest.skip("RMASK_CPU_CACHE_MB set below this test's output")
    del y
    assert rk.backends.cpu_output_cache()["cached_bytes"] == before["cached_bytes"] + 8 * 64 * 32 * 32 * 4
    y = rk.masked_conv2d(x, weight, None, mask, padding=1, backend="cpu")
    assert y.data_ptr() == address and rk.backends.cpu_output_cache() == before
    torch.testing.assert_close(y, reference.masked_conv2d(x, weight, None, mask, padding=1), rtol=1e-4, atol=1e-4)
    assert y.untyped_storage().nbytes() == 8 * 64 * 32 * 32 * 4
    y.resize_(4, 64, 32, 32)
    assert y.shape == (4, 64, 32, 32)
    with pytest.raises(RuntimeError, match="not resizable"):
        y.resize_(16, 64, 32, 32)


@pytest.mark.parametrize("value,works", [("0", True), ("12", True), ("lots", False)])
def test_output_cache_limit_from_the_environment(value, works):
    code = (
        "import torch, rmask_kernels as rk\n"
        "m = rk.random_mask((64, 32, 32), 0.5, 'neuron')\n"
        "y = rk.masked_conv2d(torch.randn(8, 16, 32, 32), torch.randn(64, 16, 3, 3), None, m, padding=1, backend='cpu')\n"
        "del y\n"
        "print(rk.backends.cpu_output_cache())\n"
    )
    result = python_subprocess(["-c", code], env={"RMASK_CPU_CACHE_MB": value})
    if works:
        assert result.returncode == 0, result.stderr[-2000:]
        limit = int(value) << 20
        cached = 8 * 64 * 32 * 32 * 4 if limit >= 8 * 64 * 32 * 32 * 4 else 0
        assert f"'cached_bytes': {cached}, 'limit_bytes': {limit}" in result.stdout
    else:
        assert result.returncode != 0 and "RMASK_CPU_CACHE_MB must be a number of megabytes >= 0, got 'lots'" in result.stderr


@pytest.mark.skipif("cpu" not in rk.available_backends() or rk.backends.cpu_kernels() == "portable",
                    reason="the output cache serves the batch-vector kernels")
def test_output_cache_releases_the_oldest_blocks_over_its_limit():
    # 3 MB: a 2 MB output freed, then a 1.5 MB one: the 2 MB block (freed first) is released.
    code = (
        "import torch, rmask_kernels as rk\n"
        "def out(n):\n"
        "    m = rk.random_mask((64, 32, 32), 0.5, 'neuron')\n"
        "    return rk.masked_conv2d(torch.randn(n, 16, 32, 32), torch.randn(64, 16, 3, 3), None, m, padding=1, backend='cpu')\n"
        "a, b = out(8), out(6)\n"
        "del a\n"
        "print(rk.backends.cpu_output_cache()['cached_bytes'])\n"
        "del b\n"
        "print(rk.backends.cpu_output_cache()['cached_bytes'])\n"
    )
    result = python_subprocess(["-c", code], env={"RMASK_CPU_CACHE_MB": "3"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == [str(2 << 20), str(3 << 19)]


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("ratio", [0.0, 0.3])
@pytest.mark.parametrize("mode,out_channels", [("neuron", 23), ("spatial", 70)])
def test_every_tile_shape(layout, ratio, mode, out_channels):
    # 40 images: a full tile of 32 and a tail of 16 (AVX-512) or 16 + 16 + 8 (AVX2); 70 input
    # channels: whole vectors of input channels plus remainders in grad-weight; 23 output
    # channels: up to 23 kept at one position, more than any one tile holds. Spatial masks
    # take the per-image kernel: 70 output channels are a full tile of 64 (AVX-512) plus a
    # partial vector, and 30 or 21 kept positions full tiles of 6 plus a tail.
    config = (40, 70, 6, 5, out_channels, 3, 1, 1, 1, 1)
    x, weight, bias, mask, conv_args = make_case(config, mode, None, ratio, torch.float32)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    check(x, weight, bias, mask, conv_args)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("ratio", [0.3, 0.7])
def test_batch_last_rows_in_whole_and_partial_blocks(ratio, layout):
    # NCHW rows go batch-last in 16 x 16 blocks (AVX-512) where 16 images and 16 columns
    # remain, 8 x 8 blocks elsewhere (NHWC rows: 8 x 8 blocks of images x channels): 40 images
    # are two whole blocks and 8 more, a row of 37 two whole blocks and 5 more columns, 37
    # input and 40 output channels whole blocks and a remainder; forward (input rows),
    # grad-input (back out of the panels) and the kept output gradients all go through them.
    config = (40, 37, 3, 37, 40, 3, 1, 1, 1, 1)
    x, weight, bias, mask, conv_args = make_case(config, "neuron", None, ratio, torch.float32)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    check(x, weight, bias, mask, conv_args)


@pytest.mark.parametrize("epilogue", ["none", "residual+relu", "stats"])
def test_neuron_rows_wider_than_64_outputs(epilogue):
    # The neuron forward copies each output row out of its staging row loading only the kept
    # values, from a bit per (channel, column) in 64-bit words (the staging row is never
    # zeroed): rows of 150 outputs are three words and a tail past the last whole vector.
    x, weight, bias, mask, conv_args = make_case((3, 4, 4, 150, 6, 3, 1, 1, 1, 1), "neuron", None, 0.5, torch.float32)
    residual = torch.randn(3, 6, 4, 150) if epilogue == "residual+relu" else None
    expected = reference.masked_conv2d(x.double(), weight.double(), bias.double(), mask, **conv_args)
    for _ in range(2):  # the second call finds the first call's values in the staging rows
        result = rk.masked_conv2d(x, weight, bias, mask, backend="cpu", relu=residual is not None,
                                  residual=residual, channel_stats=epilogue == "stats", **conv_args)
    y = result[0] if epilogue == "stats" else result
    if residual is not None:
        expected = F.relu(expected + residual.double())
    torch.testing.assert_close(y.double(), expected, **TOLERANCE[torch.float32])
    at_masked = torch.zeros_like(y) if residual is None else F.relu(residual)
    assert torch.equal(y[(~mask).expand_as(y)], at_masked[(~mask).expand_as(y)])
    if epilogue == "stats":
        torch.testing.assert_close(result[1], expected.sum(dim=(0, 2, 3)), rtol=1e-4, atol=1e-3)
        torch.testing.assert_close(result[2], expected.square().sum(dim=(0, 2, 3)), rtol=1e-4, atol=1e-2)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("ratio", [0.3, 0.95])
@pytest.mark.parametrize("epilogue", ["none", "residual", "residual+relu"])
def test_spatial_write_out(layout, ratio, epilogue):
    # The spatial kernel keeps only the kept outputs and writes each output vector expanded
    # from them: 19x23 = 437 positions per plane are 27 whole vectors of 16 (or 54 of 8) plus
    # a tail of 5, planes of 437 floats leave most vectors unaligned, and at ratio 0.95 most
    # vectors have nothing kept while at 0.3 some have everything. 70 channels: 4 whole
    # 16-channel blocks of the input transpose and the weight packing plus a remainder.
    config = (5, 70, 19, 23, 70, 3, 1, 1, 1, 1)
    x, weight, bias, mask, conv_args = make_case(config, "spatial", None, ratio, torch.float32)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    residual = torch.randn(5, 70, 19, 23) if epilogue != "none" else None
    relu = epilogue == "residual+relu"
    y = rk.masked_conv2d(x, weight, bias, mask, backend="cpu", relu=relu, residual=residual, **conv_args)
    expected = reference.masked_conv2d(x.double(), weight.double(), bias.double(), mask, **conv_args)
    if residual is not None:
        expected = expected + residual.double()
    if relu:
        expected = F.relu(expected)
    torch.testing.assert_close(y.double(), expected, **TOLERANCE[torch.float32])
    if residual is None:
        assert (y[(~mask).expand_as(y)] == 0).all(), "masked outputs must be exactly zero"
    assert y.is_contiguous(memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format)


@pytest.mark.parametrize("stride,dilation", [(2, 1), (1, 2)])
def test_spatial_lays_out_every_input_it_reads(stride, dilation):
    # The spatial kernels lay out only the blocks of input positions that some kept output
    # reads (per-thread scratch keeps the rest from the call before). One kept position at a
    # time, every position of the plane, each call on fresh input after a dense call has
    # filled the scratch with other values: a block read but not laid out gives wrong sums.
    x_shape, weight = (6, 20, 18, 19), torch.randn(24, 20, 3, 3)
    conv_args = dict(stride=stride, padding=1, dilation=dilation)
    out_h, out_w = conv_output_size(x_shape[2:], (3, 3), (stride, stride), (1, 1, 1, 1), (dilation, dilation))
    for p in range(out_h * out_w):
        rk.masked_conv2d(torch.randn(x_shape), weight, None, torch.ones(1, out_h, out_w, dtype=torch.bool),
                         backend="cpu", **conv_args)
        mask = torch.zeros(1, out_h * out_w, dtype=torch.bool)
        mask[0, p] = True
        mask = mask.view(1, out_h, out_w)
        x = torch.randn(x_shape)
        for grad in (False, True):
            check(x, weight, None, mask, conv_args, grad=grad)


@pytest.mark.parametrize("batch", [15, 16, 17, 37])
@pytest.mark.parametrize("input_mode", ["spatial", "neuron"])
def test_spatial_grad_weight_over_blocks_of_images(batch, input_mode):
    # With an input mask the spatial backward gathers each tap's (kept input, kept output)
    # pairs from a block of images and reduces the block at once: batches that fill blocks
    # exactly, leave a partial last block, and split unevenly between the threads.
    x, weight, bias = torch.randn(batch, 12, 11, 13), torch.randn(20, 12, 3, 3), torch.randn(20)
    mask = rk.random_mask((20, 11, 13), 0.7, "spatial")
    input_mask = rk.random_mask((12, 11, 13), 0.6, input_mode)
    check_against_reference(cpu, x * input_mask, weight, bias, mask, dict(padding=1), True,
                            TOLERANCE[torch.float32], input_mask=input_mask)


@pytest.mark.parametrize("masked_input", [False, True])
@pytest.mark.parametrize("mode", ["spatial", "neuron"])
def test_forward_packs_large_weights_once(mode, masked_input):
    # Each thread packs its own copy of a forward's weights (position or row kernels) where the
    # copy fits in L2 (1 MiB); 160 -> 192 channels (3x3) packs 1.1 MB: one copy, packed by all
    # threads.
    x, weight, bias = torch.randn(5, 160, 5, 6), torch.randn(192, 160, 3, 3) / 30, torch.randn(192)
    mask = rk.random_mask((192, 5, 6), 0.6, mode)
    input_mask = rk.random_mask((160, 5, 6), 0.5, mode) if masked_input else None
    if input_mask is not None:
        x = x * input_mask
    check_against_reference(cpu, x, weight, bias, mask, dict(padding=1), True, TOLERANCE[torch.float32],
                            input_mask=input_mask)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("batch", [1, 5, 16, 37])
def test_spatial_forward_over_blocks_of_images(batch, layout):
    # With tap lists that hold a pair or two per tap (keep 0.1 on both sides), the spatial
    # forward computes the pairs of several images in the same tiles: batches shorter than a
    # block, filling blocks, leaving a partial last block and split unevenly between the
    # threads; the residual and the ReLU, or the channel sums, image by image after them.
    x, weight, bias = torch.randn(batch, 12, 11, 13), torch.randn(20, 12, 3, 3), torch.randn(20)
    mask = rk.random_mask((20, 11, 13), 0.9, "spatial", seed=3)
    input_mask = rk.random_mask((12, 11, 13), 0.9, "spatial", seed=4)
    x = (x * input_mask).contiguous(memory_format=MEMORY_FORMATS[layout])
    check_against_reference(cpu, x, weight, bias, mask, dict(padding=1), True, TOLERANCE[torch.float32],
                            input_mask=input_mask)
    plain = reference.masked_conv2d((x * input_mask).double(), weight.double(), bias.double(), mask, padding=1)
    residual = torch.randn(batch, 20, 11, 13)
    y = cpu(x, weight, bias, mask=mask, padding=1, input_mask=input_mask, relu=True, residual=residual)
    torch.testing.assert_close(y.double(), F.relu(plain + residual.double()), **TOLERANCE[torch.float32])
    y, total, squares = cpu(x, weight, bias, mask=mask, padding=1, input_mask=input_mask, channel_stats=True)
    torch.testing.assert_close(y.double(), plain, **TOLERANCE[torch.float32])
    for got, want in zip((total, squares), reference.channel_stats(plain)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("batch", [1, 16, 37])
def test_row_forward_reads_the_gathered_kept_inputs(batch, layout):
    # A neuron input mask: the row forward reads the kept inputs gathered once for the call
    # (gather_kept), per channel in blocks of a vector of entries (here up to ~100 a channel),
    # the batch padded to a multiple of 16 images; one channel keeps nothing, one everything.
    x, weight, bias = torch.randn(batch, 10, 17, 19), torch.randn(12, 10, 3, 3), torch.randn(12)
    input_mask = rk.random_mask((10, 17, 19), 0.7, "neuron")
    input_mask[3] = False
    input_mask[7] = True
    x = (x * input_mask).contiguous(memory_format=MEMORY_FORMATS[layout])
    mask = rk.random_mask((12, 17, 19), 0.6, "neuron")
    for grad in (False, True):
        check_against_reference(cpu, x, weight, bias, mask, dict(padding=1), grad, TOLERANCE[torch.float32],
                                input_mask=input_mask)
