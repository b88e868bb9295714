// The batch-vector kernels of batch_vector.h, written once over a SIMD instruction set.
//
// Included by one .cpp file per instruction set (batch_vector_avx2.cpp,
// batch_vector_avx512.cpp), inside that file's own namespace and target pragma, after it
// defines:
//   struct Simd      V (the vector type), kLanes (floats per V), zero, load, store,
//                    broadcast, fma, add, where_positive
//   kVectors         vectors of images per micro-tile row (images per tile: kVectors * kLanes)
//   kTile            most output (forward) or input (grad-input) channels per micro-tile
//   kWeightTile      most output channels per grad-weight tile
//   kWeightVectors   most vectors of input channels per grad-weight tile
//   kPositionRows    most kept positions per forward_positions tile
//   kPositionVectors most vectors of output channels per forward_positions tile
// chosen so that the accumulators, the loaded vectors and one broadcast fit the register file.
// No ATen or standard-library templates here: every function gets the including file's
// target, and nothing inline is shared with code compiled for another CPU (the few types of
// these headers' own, such as InputBlock, stand in for std containers of plain
// types for that reason).
//
// In four parts, each included here, in this order, into the same translation unit:
//   batch_vector_layout.h     transposes, the batch-last and channels-last layouts, and the
//                             output writers (floats_out, image_out, compact_out)
//   batch_vector_entries.h    a tensor's kept entries gathered to and scattered from rows
//                             [entry][padded N] (gather_kept, scatter_kept)
//   batch_vector_rows.h       the row kernels: any mask through the position-CSR lists
//                             (neuron and group masks): forward_rows and its gradients
//   batch_vector_positions.h  the position kernels for spatial masks (every channel kept at
//                             each kept position): forward_positions, backward_positions
// and then the table of kernels (BatchVectorKernels) at the bottom.

inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

// A compile-time count, for calling templates with a run-time tile size (with_count).
template <int N>
struct Count {
  static constexpr int value = N;
};

// f(Count<count>{}) for a run-time count in [1, N].
template <int N, typename F>
inline void with_count(int count, F&& f) {
  if constexpr (N > 1) {
    if (count < N) return with_count<N - 1>(count, f);
  }
  f(Count<N>{});
}

// The next tile height when `remaining` rows are split into as few tiles of at most `most`
// rows as possible, of near-equal heights: a thin tile pays the same loads for fewer FMAs.
inline int even_tile(int64_t remaining, int64_t most) {
  const int64_t tiles = (remaining + most - 1) / most;
  return static_cast<int>((remaining + tiles - 1) / tiles);
}

int64_t padded_channels(int64_t channels) { return (channels + Simd::kLanes - 1) / Simd::kLanes * Simd::kLanes; }

#include "batch_vector_layout.h"
#include "batch_vector_entries.h"
#include "batch_vector_rows.h"
#include "batch_vector_positions.h"

const BatchVectorKernels kernels = {kName,          padded_channels,  forward_rows,    forward_positions,
                                    backward_positions, grad_input_rows,  grad_weight_rows, gather_kept,
                                    scatter_kept,       pack_position_weights};
