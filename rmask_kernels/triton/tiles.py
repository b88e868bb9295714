"""How the by-pattern kernels (the forward's and the grad weight's partials) cut their work into
programs: row tiles of every mask pattern, numbered contiguously across the patterns, and each
pattern's channels cut into segments inside one conv group. The host builds the tables
(row_tiles, channel_segments); the kernels find their program's place in them (locate_tile,
tile_channels).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl


@functools.lru_cache(maxsize=256)
def channel_segments(patterns, channels_per_pattern, cout_per_group, block, device):
    """Per pattern, its channels cut at conv-group boundaries and into blocks of `block`:
    (P, J, 2) int64 (first channel, count), padded with count 0; and J."""
    table = []
    for pattern in range(patterns):
        pieces, channel, end = [], pattern * channels_per_pattern, (pattern + 1) * channels_per_pattern
        while channel < end:
            stop = min(end, (channel // cout_per_group + 1) * cout_per_group, channel + block)
            pieces.append((channel, stop - channel))
            channel = stop
        table.append(pieces)
    width = max(len(pieces) for pieces in table)
    flat = [value for pieces in table for piece in pieces + [(0, 0)] * (width - len(pieces)) for value in piece]
    return torch.tensor(flat, dtype=torch.int64, device=device), width


def row_tiles(kept_offsets, batch, patterns, rows_per_image, rows_per_tile):
    """Row tiles of every pattern numbered contiguously: (tile_ends, number of programs).
    With P > 1 the count comes from the index on the device, so the grid takes a bound that
    needs no synchronisation: the tiles of all kept rows plus one partial tile per pattern."""
    if patterns == 1:
        return kept_offsets, triton.cdiv(batch * rows_per_image, rows_per_tile)
    counts = kept_offsets[1:] - kept_offsets[:-1]
    ends = torch.cumsum(torch.div(counts * batch + rows_per_tile - 1, rows_per_tile, rounding_mode="floor"), 0)
    return ends, triton.cdiv(batch * rows_per_image, rows_per_tile) + patterns


def pattern_block(patterns):
    """The constexpr PATTERN_BLOCK: how many tile ends locate_tile searches at once."""
    return 1 if patterns == 1 else triton.next_power_of_2(patterns)


@triton.jit
def locate_tile(tile, tile_ends_ptr, kept_offsets_ptr, num_patterns, rows_per_image,
                PATTERN_BLOCK: tl.constexpr):
    """The pattern of global row tile `tile` (tiles of pattern p are numbered contiguously;
    tile_ends[p] is one past its last), the tile's number within the pattern, where its kept
    positions start in kept_positions and how many it keeps. pattern = -1: no such tile."""
    pattern = tile * 0
    local_tile = tile
    position_start = tile * 0
    count = tile * 0 + rows_per_image
    if PATTERN_BLOCK > 1:
        index = tl.arange(0, PATTERN_BLOCK)
        ends = tl.load(tile_ends_ptr + index, mask=index < num_patterns, other=4611686018427387904)
        pattern = tl.sum((ends <= tile).to(tl.int64), axis=0)
        valid = pattern < num_patterns
        first = tl.load(tile_ends_ptr + pattern - 1, mask=valid & (pattern > 0), other=0)
        local_tile = tile - first
        position_start = tl.load(kept_offsets_ptr + pattern, mask=valid, other=0)
        count = tl.load(kept_offsets_ptr + pattern + 1, mask=valid, other=0) - position_start
        pattern = tl.where(valid, pattern, -1)
    return pattern, local_tile, position_start, count


@triton.jit
def tile_channels(tile, segment, tile_ends_ptr, kept_offsets_ptr, segments_ptr, num_patterns, num_segments,
                  rows_per_image, cout_per_group, PATTERN_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr):
    """What program (tile, segment) of a by-pattern kernel covers: its tile's place in the
    pattern (locate_tile), and the segment's channels (consecutive channels of the pattern
    inside one conv group, at most BLOCK_N) with their conv group. No channel is valid
    (col_ok all False) when the tile or the segment is past the end: the program has no work."""
    pattern, local_tile, position_start, count = locate_tile(
        tile, tile_ends_ptr, kept_offsets_ptr, num_patterns, rows_per_image, PATTERN_BLOCK)
    entry = segments_ptr + (tl.maximum(pattern, 0) * num_segments + segment) * 2
    channel_start = tl.load(entry)
    channel_count = tl.where(pattern >= 0, tl.load(entry + 1), 0)
    cols = tl.arange(0, BLOCK_N)
    return (local_tile, position_start, count, channel_start // cout_per_group, channel_start + cols,
            cols < channel_count)
