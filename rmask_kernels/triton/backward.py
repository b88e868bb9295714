"""The host launcher of the backward (kernels: grad_input_kernels.py, grad_weight_kernels.py):
for each gradient, which kernel runs (grad_input_variant, grad_weight_variant), its grid and
block sizes; the grad bias is a torch reduction. With a fused ReLU's output (relu_output) every
kernel loads it where it loads grad_output (gate pointer and strides, GATED=True) and reads the
gradient as 0 where it is not > 0."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import common, configs
from .geometry import check_args
from .grad_input_kernels import grad_input_by_position_kernel, grad_input_by_tap_kernel, grad_input_gather_kernel
from .grad_weight_kernels import grad_weight_pairs_kernel, grad_weight_partial_kernel, grad_weight_sum_pairs_kernel
from .tiles import channel_segments, pattern_block, row_tiles

# Masks keeping at most this fraction take a sparse grad input (keep × dense FLOPs) instead of
# the gather over every input pixel and output channel (dense FLOPs, grad_output reads
# predicated, one pass), and neuron-like ones (groups == 1) a sparse grad weight (per (position,
# kept channel) pair its batch-reduced row, then per channel the sum of its pairs' rows).
# Untuned on a GPU: the guess is that the extra launches, buffers and narrow tiles pay off once
# two thirds of the work is skipped.
SPARSE_BACKWARD_MAX_KEEP = 0.35

# The grad-weight partials (chunks × Cout × Cin/groups·kh·kw fp32) stay within this: large
# layers get fewer, longer chunks of rows (WEIGHT_CHUNK is the shortest).
PARTIAL_BUDGET_BYTES = 64 << 20

# Rows per grad-weight chunk at least; the interpreter, ~0.5 ms per program, takes long ones.
WEIGHT_CHUNK = 4096 if common.INTERPRET else 1024


def grad_input_variant(geometry, kept_rows):
    """Which grad-input kernel runs, for `kept_rows` kept (pattern, position) pairs (the size of
    kept_positions): "zeros" (nothing kept), "by_position" (sparse neuron-like masks,
    groups == 1: K = the channels kept where each tap lands), "by_tap" (sparse, one pattern: the
    kept rows only, one launch per tap) or "gather" (every input pixel, grad_output read where
    kept)."""
    if kept_rows == 0 or geometry.batch == 0:
        return "zeros"
    positions = geometry.out_height * geometry.out_width
    sparse = kept_rows <= SPARSE_BACKWARD_MAX_KEEP * positions * geometry.patterns
    if sparse and geometry.groups == 1 and geometry.channels_per_pattern < common.MIN_PATTERN_CHANNELS:
        return "by_position"
    if sparse and geometry.patterns == 1:
        return "by_tap"
    return "gather"


def grad_weight_variant(geometry, kept_rows, kept_outputs):
    """Which grad-weight kernels run, for `kept_rows` kept (pattern, position) pairs and
    `kept_outputs` kept (position, channel) pairs (the size of position_channels): "zeros"
    (nothing kept), "pairs" (sparse neuron-like masks, groups == 1, whose pair rows fit
    PARTIAL_BUDGET_BYTES: a row per kept output, summed per channel) or "partials" (chunks of
    rows, each a partial grad weight)."""
    if kept_rows == 0 or geometry.batch == 0:
        return "zeros"
    positions = geometry.out_height * geometry.out_width
    reduce_size = geometry.cin_per_group * geometry.kernel_h * geometry.kernel_w
    if (geometry.groups == 1 and geometry.channels_per_pattern < common.MIN_PATTERN_CHANNELS
            and kept_outputs <= SPARSE_BACKWARD_MAX_KEEP * positions * geometry.out_channels
            and 4 * kept_outputs * reduce_size <= PARTIAL_BUDGET_BYTES):
        return "pairs"
    return "partials"


def masked_conv2d_backward(grad_output, input, weight, mask, kept_offsets, kept_positions, position_offsets,
                           position_channels, stride, padding, dilation, groups, output_mask, relu_output=None):
    """Gradients (input, weight, bias) of mask * conv(input, weight) + bias; grad_output where
    the mask is False is ignored, and where relu_output (if given: the forward's output when it
    fused a ReLU) is not > 0. An output not asked for in output_mask is an empty tensor."""
    index = (kept_offsets.contiguous(), kept_positions.contiguous(), position_offsets.contiguous(),
             position_channels.contiguous())
    geometry = check_args("triton_masked_conv2d_backward", input, weight, None, mask, index, stride, padding,
                          dilation, groups, (("grad_output", grad_output), ("relu_output", relu_output)))
    shape = (geometry.batch, geometry.out_channels, geometry.out_height, geometry.out_width)
    for name, tensor in (("grad_output", grad_output), ("relu_output", relu_output)):
        if tensor is not None and tuple(tensor.shape) != shape:
            raise RuntimeError(f"triton_masked_conv2d_backward: {name} must have the output's shape {shape}, "
                               f"got {tuple(tensor.shape)}")
    conv_params = (stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1])
    launch = _Launch(geometry, grad_output, relu_output, input, weight, mask, index, conv_params)
    empty = input.new_empty(0)
    grad_input = launch.grad_input() if output_mask[0] else empty
    grad_weight = launch.grad_weight() if output_mask[1] else empty
    if output_mask[2]:
        # A plain reduction (deterministic, fp32 accumulation) over the kept (and, with a
        # fused ReLU, open) positions only.
        kept = mask if relu_output is None else mask & (relu_output > 0)
        kept_grad = torch.where(kept, grad_output, torch.zeros((), dtype=grad_output.dtype, device=input.device))
        grad_bias = kept_grad.sum(dim=(0, 2, 3), dtype=torch.float32).to(input.dtype)
    else:
        grad_bias = empty
    return grad_input, grad_weight, grad_bias


class _Launch:
    """One backward call's arguments, and a method per kernel variant that launches it with a
    given block configuration (configs.py)."""

    def __init__(self, geometry, grad_output, relu_output, input, weight, mask, index, conv_params):
        self.geometry, self.grad_output, self.input, self.weight, self.mask = geometry, grad_output, input, weight, mask
        self.kept_offsets, self.kept_positions, self.position_offsets, self.position_channels = index
        # What every kernel takes after grad_output's strides: the gate's pointer and strides
        # (grad_output's own, never read, when there is none), and GATED among the constexprs.
        gate = grad_output if relu_output is None else relu_output
        self.gate_args = (gate, *gate.stride())
        self.conv_params = conv_params
        # INDEX (the offsets' type) from the tensors every kernel reads; the buffers a kernel writes
        # are either shaped as one of them (grad input) or checked at their launch (partials).
        dot = common.dot_options(input.dtype)
        self.operands = configs.operand_class(input.dtype, dot["PRECISION"])
        self.options = dict(dot, GATED=relu_output is not None,
                            INDEX=common.index_type(grad_output, relu_output, input, weight, mask, *index))
        self.positions = geometry.out_height * geometry.out_width
        self.relu_output = relu_output
        # Whether the launches take int64 offsets (their configs: configs.WIDE_CONFIGS).
        self.wide = common.needs_int64(grad_output, relu_output, input, weight, mask, *index)

    def _key(self, variant):
        return configs.launch_key(
            self.grad_output, self.relu_output, self.input, self.weight, self.mask,
            extra=(variant, self.conv_params, self.geometry.groups, self.geometry.patterns,
                   self.kept_positions.numel(), self.position_channels.numel()))

    def _options_writing(self, buffer):
        """The kernel options for a launch that also writes `buffer`."""
        wide = tl.int64 in (self.options["INDEX"], common.index_type(buffer))
        return dict(self.options, INDEX=tl.int64 if wide else tl.int32)

    # -- grad input -------------------------------------------------------------------------

    def grad_input(self):
        variant = grad_input_variant(self.geometry, self.kept_positions.numel())
        memory_format = torch._prims_common.suggest_memory_format(self.input)
        if variant == "zeros":
            return torch.zeros_like(self.input, memory_format=memory_format)
        geometry = self.geometry
        launch, rows = {
            "by_position": (self._grad_input_by_position, geometry.batch),
            "by_tap": (self._grad_input_by_tap, geometry.batch * self.kept_positions.numel()),
            "gather": (self._grad_input_gather, geometry.batch * geometry.height * geometry.width),
        }[variant]
        run = lambda config: launch(memory_format, config)  # noqa: E731
        return run(configs.choose("grad_input", self.operands, self._key(variant), rows, run, self.wide))

    def _grad_input_by_position(self, memory_format, config):
        geometry = self.geometry
        grad_input = torch.empty_like(self.input, memory_format=memory_format)
        block_m = min(config.block_m, max(16, triton.next_power_of_2(geometry.batch)))
        block_k = min(config.block_k,
                      max(16, triton.next_power_of_2(triton.cdiv(self.position_channels.numel(), self.positions))))
        grid = (geometry.height * geometry.width, triton.cdiv(geometry.batch, block_m),
                triton.cdiv(geometry.in_channels, config.block_n))
        grad_input_by_position_kernel[grid](
            self.grad_output, self.weight, self.position_offsets, self.position_channels, grad_input,
            geometry.batch, geometry.in_channels, geometry.height, geometry.width, geometry.out_height,
            geometry.out_width, *self.conv_params, *self.grad_output.stride(), *self.gate_args, *self.weight.stride(),
            *grad_input.stride(), KH=geometry.kernel_h, KW=geometry.kernel_w,
            BLOCK_M=block_m, BLOCK_N=config.block_n, BLOCK_K=block_k, **self.options, **config.launch_options(),
        )
        return grad_input

    def _grad_input_by_tap(self, memory_format, config):
        # The launches add into an fp32 buffer, rounded to the input's dtype once at the end.
        geometry = self.geometry
        grad_input = torch.zeros_like(self.input, dtype=torch.float32, memory_format=memory_format)
        count = self.kept_positions.numel()
        grid = (triton.cdiv(geometry.batch * count, config.block_m),
                triton.cdiv(geometry.cin_per_group, config.block_n), geometry.groups)
        for kh in range(geometry.kernel_h):
            for kw in range(geometry.kernel_w):
                grad_input_by_tap_kernel[grid](
                    self.grad_output, self.weight, self.kept_positions, grad_input,
                    geometry.batch, count, kh, kw, geometry.height, geometry.width, geometry.out_width,
                    geometry.cin_per_group, geometry.cout_per_group, *self.conv_params,
                    *self.grad_output.stride(), *self.gate_args, *self.weight.stride(), *grad_input.stride(),
                    BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k, **self.options,
                    **config.launch_options(),
                )
        return grad_input.to(self.input.dtype)

    def _grad_input_gather(self, memory_format, config):
        geometry = self.geometry
        grad_input = torch.empty_like(self.input, memory_format=memory_format)
        rows = geometry.batch * geometry.height * geometry.width
        grid = (triton.cdiv(rows, config.block_m), triton.cdiv(geometry.cin_per_group, config.block_n),
                geometry.groups)
        grad_input_gather_kernel[grid](
            self.grad_output, self.weight, self.mask.contiguous().view(torch.uint8), grad_input,
            geometry.batch, geometry.height, geometry.width, geometry.out_height, geometry.out_width,
            geometry.cin_per_group, geometry.cout_per_group, *self.conv_params,
            *self.grad_output.stride(), *self.gate_args, *self.weight.stride(), *grad_input.stride(),
            KH=geometry.kernel_h, KW=geometry.kernel_w, MASK_PER_CHANNEL=self.mask.shape[0] > 1,
            BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
            **self.options, **config.launch_options(),
        )
        return grad_input

    # -- grad weight ------------------------------------------------------------------------

    def grad_weight(self):
        variant = grad_weight_variant(self.geometry, self.kept_positions.numel(), self.position_channels.numel())
        if variant == "zeros":
            return torch.zeros_like(self.weight, memory_format=torch.contiguous_format)
        if variant == "pairs":
            family, launch, rows = "grad_weight_pairs", self._grad_weight_pairs, self.geometry.batch
        else:
            family, launch = "grad_weight", self._grad_weight_partials
            rows = self.geometry.batch * self._partial_rows_per_image()[1]
        return launch(configs.choose(family, self.operands, self._key(variant), rows, launch, self.wide))

    def _partial_rows_per_image(self):
        """The partials' rows per image: (all_positions, count). Few channels per pattern: every
        position a row, grad_output read only where kept (a tile of a pattern's channels would
        be mostly empty); else each pattern's kept positions, as in the forward."""
        all_positions = self.geometry.channels_per_pattern < common.MIN_PATTERN_CHANNELS
        return all_positions, self.positions if all_positions else self.kept_positions.numel()

    def _grad_weight_pairs(self, config):
        # Stage 1: a batch-reduced row per kept (position, channel) pair; stage 2: per channel
        # the sum of its pairs' rows in position order.
        geometry = self.geometry
        reduce_size = geometry.cin_per_group * geometry.kernel_h * geometry.kernel_w
        pairs = self.position_channels.numel()
        pair_rows = torch.empty(pairs, reduce_size, dtype=torch.float32, device=self.input.device)
        # The kernel's M = the channels kept at a position (config.block_n at most), its N =
        # images (config.block_m at most).
        block_m = min(config.block_n, max(16, triton.next_power_of_2(triton.cdiv(pairs, self.positions))))
        block_images = min(config.block_m, max(16, triton.next_power_of_2(geometry.batch)))
        grid = (self.positions, triton.cdiv(reduce_size, config.block_k), triton.cdiv(geometry.out_channels, block_m))
        grad_weight_pairs_kernel[grid](
            self.grad_output, self.input, self.position_offsets, self.position_channels, pair_rows,
            geometry.batch, reduce_size, geometry.height, geometry.width, geometry.out_width, *self.conv_params,
            *self.input.stride(), *self.grad_output.stride(), *self.gate_args,
            KH=geometry.kernel_h, KW=geometry.kernel_w,
            BLOCK_M=block_m, BLOCK_N=block_images, BLOCK_K=config.block_k, **self._options_writing(pair_rows),
            **config.launch_options(),
        )
        grad_weight = torch.empty(self.weight.shape, dtype=torch.float32, device=self.input.device)
        grad_weight_sum_pairs_kernel[(geometry.out_channels, triton.cdiv(reduce_size, config.block_k))](
            pair_rows, self.kept_offsets, self.kept_positions, self.position_offsets, self.position_channels,
            grad_weight, geometry.channels_per_pattern, reduce_size,
            CHANNEL_BLOCK=triton.next_power_of_2(geometry.out_channels), BLOCK_K=config.block_k,
            num_warps=config.num_warps,
        )
        return grad_weight.to(self.weight.dtype)

    def _grad_weight_partials(self, config):
        geometry = self.geometry
        reduce_size = geometry.cin_per_group * geometry.kernel_h * geometry.kernel_w
        all_positions, rows_per_image = self._partial_rows_per_image()
        patterns = 1 if all_positions else geometry.patterns
        # Chunks of a multiple of BLOCK_M rows, at least WEIGHT_CHUNK, few enough that the
        # partials fit PARTIAL_BUDGET_BYTES.
        max_chunks = max(1, PARTIAL_BUDGET_BYTES // (4 * geometry.out_channels * reduce_size) - patterns)
        chunk_rows = max(WEIGHT_CHUNK, triton.cdiv(geometry.batch * rows_per_image, max_chunks))
        chunk_rows = triton.cdiv(chunk_rows, config.block_m) * config.block_m
        tile_ends, tiles = row_tiles(self.kept_offsets, geometry.batch, patterns, rows_per_image, chunk_rows)
        segments, num_segments = channel_segments(
            patterns, geometry.out_channels // patterns, geometry.cout_per_group, config.block_n,
            str(self.input.device))
        partial = torch.zeros(tiles, geometry.out_channels, reduce_size, dtype=torch.float32, device=self.input.device)
        grid = (tiles, num_segments, triton.cdiv(reduce_size, config.block_k))
        grad_weight_partial_kernel[grid](
            self.grad_output, self.input, self.mask.contiguous().view(torch.uint8), partial,
            self.kept_offsets, self.kept_positions, tile_ends, segments,
            geometry.batch, rows_per_image, patterns, num_segments, geometry.out_channels, reduce_size,
            chunk_rows, geometry.cin_per_group, geometry.cout_per_group, geometry.height, geometry.width,
            geometry.out_width, *self.conv_params, *self.input.stride(), *self.grad_output.stride(), *self.gate_args,
            self.positions if self.mask.shape[0] > 1 else 0,
            KH=geometry.kernel_h, KW=geometry.kernel_w, PATTERN_BLOCK=pattern_block(patterns),
            ALL_POSITIONS=all_positions,
            BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k, **self._options_writing(partial),
            **config.launch_options(),
        )
        # Second stage: the chunks' fp32 partials summed in a fixed order.
        return partial.sum(0).view(self.weight.shape).to(self.weight.dtype)
