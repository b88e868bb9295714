// Batch-as-vector kernels for masked convolution on x86 (AVX2 + FMA, or AVX-512).
//
// A Random-Mask mask is the same for every image, so the batch is the one dimension that
// is always dense: forward and grad-input put the batch in the SIMD lanes. Input rows are
// laid out "batch last", [w][c][n] (n padded to a multiple of 16), in small cache-resident
// panels, so the receptive field of any output position is a set of contiguous [C][16]
// blocks. Per output position only the channels the mask keeps there are computed (the
// position-CSR lists), which serves neuron, group and spatial masks alike. grad-weight
// reduces over the images with the input channels in the lanes.
//
// This header is free of ATen so that the kernel files can be compiled for AVX2 or AVX-512
// without any inline ATen code being emitted for those instruction sets (an ODR hazard on
// older CPUs). The caller picks the kernels for its CPU (best_batch_vector_kernels) and
// splits the work across threads.
#pragma once

#include <cstdint>
#include <vector>  // here, not in batch_vector_impl.h: no std code compiled for AVX-512 only

namespace rmask {
namespace cpu {

constexpr int64_t kBatchBlock = 16;  // the batch is padded to a multiple of this: one AVX-512 vector, two AVX2
// Images whose tap-listed pairs the position backward's grad-weight reduces at once.
constexpr int64_t kImageBlock = 16;

// Images whose tap-listed pairs forward_positions computes at once, so that each tap's packed
// weights are read once for all of them: at keep 0.1 a tap lists a few pairs per image (128
// channels at 16x16: 2-3), too few to fill a tile's rows. Enough images for about
// kPositionImageRows pairs per tap, as many as keep their kept rows ([P][cout_pad] floats each)
// within 128 KB of L2, at most kMaxPositionImages; 1 without tap lists (pairs < 0: every tap of
// a kept position at once fills the tiles).
constexpr int64_t kMaxPositionImages = 8, kPositionImageRows = 12, kPositionImageBytes = int64_t(128) << 10;
inline int64_t position_images(int64_t pairs, int64_t taps, int64_t npositions, int64_t cout_pad) {
  if (pairs <= 0) return 1;
  int64_t images = (kPositionImageRows * taps + pairs - 1) / pairs;
  const int64_t per_image = npositions * cout_pad * static_cast<int64_t>(sizeof(float));
  if (per_image > 0 && images * per_image > kPositionImageBytes) images = kPositionImageBytes / per_image;
  return images < 1 ? 1 : (images > kMaxPositionImages ? kMaxPositionImages : images);
}

struct BatchVectorGeometry {
  int64_t batch, padded_batch;  // N and N rounded up to kBatchBlock
  int64_t in_channels, height, width;
  int64_t out_channels, kernel_h, kernel_w, out_height, out_width;
  int64_t stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w;
};

// Where element (n, c, position) of an NCHW or NHWC tensor lives.
struct Strides {
  int64_t n, c, position;
};

// The inputs that count (the op's input_mask, True = kept): every kernel reads an input
// entry outside it as 0 and skips the work it would feed. Kernels take a pointer to it, null
// when every input counts. Built per call by the driver (batch_vector_driver.cpp).
struct InputIndex {
  // Per flat input position q (H * W + 1 offsets): the input channels kept at q, ascending,
  // are channels[offsets[q] .. offsets[q + 1]); a position that keeps every channel lists
  // them all (the kernels then read no list), one that keeps none lists none.
  const int64_t* offsets;
  const int64_t* channels;
  // For the position kernels (an input mask that keeps all channels or none at each
  // position): per tap t, the pairs (k, q) at entries[2 * e], entries[2 * e + 1] for e in
  // [tap_offsets[t], tap_offsets[t + 1]): kept output position k (an index into `positions`)
  // reads kept input position q through tap t. Null for other masks.
  const int64_t* tap_offsets;
  const int64_t* tap_entries;
  // Whether some position keeps some but not all channels (a neuron or group input mask).
  bool partial;
  // With `partial`: per entry e of `channels` (a kept input), one float per image at
  // values[e * padded N .. + padded N): forward_rows reads the kept inputs there
  // (gather_kept), grad_input_rows writes their gradients there (then scatter_kept). Null
  // for the other kernels.
  float* values;
};

// The kept entries of an [N][C][H * W] tensor, as gather_kept and scatter_kept read them: by
// position (H * W + 1 offsets; at position q, channels[offsets[q] .. offsets[q + 1]), entry e
// the e-th listed), the CSR of an InputIndex or of a kept index; and for an NCHW tensor by
// channel (C + 1 channel_offsets; channel_entries pairs (q, e), ascending q). Built by the
// driver (batch_vector_driver.cpp).
struct KeptEntries {
  int64_t batch, padded_batch, channel_count, positions;
  const int64_t* offsets;
  const int64_t* channels;
  const int64_t* channel_offsets;
  const int64_t* channel_entries;
  int64_t most_of_a_channel;  // the most entries one channel has
};

// One instruction set's kernels (batch_vector_impl.h compiled for it). Their contracts:
//
// forward_rows: y[n, c, p] = relu?(bias[c] + sum_{taps, ci} forward_weight[c, tap, ci] *
// x[n, ci, q(p, tap)]) for the kept (p, c) pairs of output rows [row_begin, row_end), and 0 for
// the masked ones (every element of y in those rows is written); with `residual` (not null,
// laid out exactly as y, NHWC then contiguous), y = relu?(that, before its ReLU, + residual)
// everywhere. x and y: NCHW or NHWC. forward_weight: [Cout][kh][kw][Cin]. With `inputs`, each
// tap sums over the channels kept at its input position only (where positions keep some
// channels, it reads them from inputs->values and lays out no input row). Scratch: taps 4 *
// kh * kw int64; panels panel_ring_rows(g) * W * Cin * padded N floats and panel_rows
// panel_ring_rows(g) * (W + 1) + W int64; staging (NHWC y) N * (Cout * Wout + 16) floats.
// channel_sums, if not null: 2 * Cout doubles to which the per-channel sum and sum of squares
// of the outputs of these rows are added (masked outputs are 0: the sums run over kept outputs).
// An NCHW y is not written here: kept_out (not null, and no residual) receives kept output
// e = (p, c) of these rows at kept_out[e * padded N + n] for n < N, and the caller writes y
// from it with the residual and the ReLU (scatter_kept). An NHWC y is written through staging
// (kept_out null).
//
// forward_positions: the forward of forward_rows for a mask that keeps every output channel
// at each of its `npositions` kept positions (flat output positions, ascending), as a spatial
// mask does: images [image_begin, image_end) of y, every element written; x and y NCHW or
// NHWC. With `inputs` (its tap lists), tap by tap over the pairs they list. packed_weight:
// [kh][kw][Cin][cout_pad] and padded_bias (or null): [cout_pad],
// cout_pad = padded_channels(Cout), zero in the padding. Scratch: x_taps kPositionRows (at most 8) * kh *
// kw pointers; zeros: Cin floats, all 0 (what padding taps read); scratch: B * ((NCHW x: H * W *
// Cin) + npositions * cout_pad) + npositions * Cout + kBatchBlock floats, B = position_images(
// the pairs the tap lists hold or -1, kh * kw, npositions, cout_pad). channel_sums as for
// forward_rows.
//
// backward_positions: the gradients of forward_positions (same masks) for images
// [image_begin, image_end), gy read as 0 where `gate` (if not null: a fused ReLU's output,
// NCHW or NHWC) is not > 0: grad_x (if not null; NCHW or NHWC, every element of those images
// written) = sum over taps and kept (p, c) of backward_weight[tap, c, ci] * gy[n, c, p];
// grad_w_part (if not null, [Cout][kh * kw][padded_channels(Cin)]) += sum over the images and
// kept positions of gy[n, c, p] * x[n, ci, q(p, tap)]; grad_b_part (if not null, [Cout]) +=
// sum of gy over the images and kept positions. gy, x: NCHW or NHWC. backward_weight:
// [kh][kw][Cout][padded_channels(Cin)], zero in the padding. With `inputs` (its tap lists),
// grad_x is 0 at masked inputs and grad_w sums over the listed pairs only. Scratch:
// P * (padded_channels(Cout) + 2 * Cout + padded_channels(Cin)) + H * W * padded_channels(Cin) +
// padded_channels(Cin) floats, and P * Cout more with a gate, P = npositions.
//
// pack_position_weights: forward_positions' packed_weight from contiguous weights
// w [Cout][Cin][taps]: dst [taps][Cin][cout_pad], zero past Cout; the rows of
// k = ci * taps + t in [k_begin, k_end) (k_begin a multiple of padded_channels(1)), so that
// threads can share the work.
//
// grad_input_rows: grad_x[n, ci, q] = sum over taps mapping q to a kept output (p, c):
// backward_weight[tap, c, ci] * gy_pos[e(p, c), n] for the input positions q of rows [row_begin, row_end);
// grad_x NCHW or NHWC, every element of those rows written (with `inputs`: 0 at the masked
// inputs, computed at the kept ones only). backward_weight:
// [kh][kw][Cout][Cin]. gy_pos: kept output gradients in position-CSR order, rows of
// padded_batch. Scratch: contributions
// 3 * kh * kw int64, panel W * Cin * padded_batch floats.
//
// grad_weight_rows: grad_w_part[c, tap, ci] += sum over the kept (p, c) of output rows
// [row_begin, row_end) and images n: gy_pos[e(p, c), n] * x[n, ci, q(p, tap)]. grad_w_part:
// [Cout][kh * kw][Cpad], Cpad = padded_channels(Cin); x NCHW or NHWC. With `inputs`, taps
// that read a position keeping no channel are skipped, and where positions keep some channels
// each reduction runs over the channels its input position keeps, read from inputs->values
// (which must hold 16 entries past the last). Scratch: panels panel_ring_rows(g) * W * N *
// Cpad + 16 * Cpad floats, panel_rows panel_ring_rows(g) * (W + 1) + W int64.
// grad_input_rows with inputs->values (a partial input mask): the gradient of each kept input
// entry into values (as InputIndex says), and grad_x untouched: scatter_kept writes it.
//
// gather_kept: for the entries e = (q, c) of `kept` in units [begin, end) (channels of an
// NCHW x, positions of an NHWC one), values[e * padded N + n] = x[n, c, q], and with `gate`
// (not null: a fused ReLU's output, laid out as gate_strides) 0 where gate[n, c, q] is not > 0;
// 0 in the padding images. Scratch (NCHW): 2 * padded N * padded_channels(most_of_a_channel)
// floats. scatter_kept: the inverse, ungated, into every element of x (0 at the other
// entries), for the same units; streaming stores; with `residual` (not null, laid out as x)
// x = relu?(that + residual). Scratch: that of gather_kept + H * W floats.
struct BatchVectorKernels {
  const char* name;  // "avx2", "avx512"
  int64_t (*padded_channels)(int64_t channels);
  void (*forward_rows)(const BatchVectorGeometry& g, const float* x, Strides x_strides,
                       const float* forward_weight, const float* bias, bool relu, const int64_t* position_offsets,
                       const int64_t* position_channels, int64_t row_begin, int64_t row_end, const float* residual,
                       float* y, Strides y_strides, int64_t* taps, float* panels, int64_t* panel_rows, float* staging,
                       double* channel_sums, const InputIndex* inputs, float* kept_out);
  void (*forward_positions)(const BatchVectorGeometry& g, const float* x, Strides x_strides,
                            const float* packed_weight, int64_t cout_pad, const float* padded_bias, bool relu,
                            const int64_t* positions, int64_t npositions, int64_t image_begin, int64_t image_end,
                            const float* residual, float* y, Strides y_strides, const float** x_taps,
                            const float* zeros, float* scratch, double* channel_sums, const InputIndex* inputs);
  void (*backward_positions)(const BatchVectorGeometry& g, const float* gy, Strides gy_strides, const float* gate,
                             Strides gate_strides, const float* x, Strides x_strides, const float* backward_weight,
                             const int64_t* positions, int64_t npositions, int64_t image_begin, int64_t image_end,
                             float* grad_x, Strides grad_x_strides, float* grad_w_part, float* grad_b_part,
                             float* scratch, const InputIndex* inputs);
  void (*grad_input_rows)(const BatchVectorGeometry& g, const float* gy_pos, const float* backward_weight,
                          const int64_t* position_offsets, const int64_t* position_channels, int64_t row_begin,
                          int64_t row_end, float* grad_x, Strides x_strides, int64_t* contributions, float* panel,
                          const InputIndex* inputs);
  void (*grad_weight_rows)(const BatchVectorGeometry& g, const float* gy_pos, const float* x, Strides x_strides,
                           const int64_t* position_offsets, const int64_t* position_channels, int64_t row_begin,
                           int64_t row_end, float* grad_w_part, float* panels, int64_t* panel_rows,
                           const InputIndex* inputs);
  void (*gather_kept)(const KeptEntries& kept, const float* x, Strides s, const float* gate, Strides gate_strides,
                      int64_t begin, int64_t end, float* values, float* scratch);
  void (*scatter_kept)(const KeptEntries& kept, float* x, Strides s, int64_t begin, int64_t end, const float* values,
                       const float* residual, bool relu, float* scratch);
  void (*pack_position_weights)(const float* w, int64_t cout, int64_t cin, int64_t taps, float* dst,
                                int64_t cout_pad, int64_t k_begin, int64_t k_end);
};

// Any two input rows one output row needs lie within this window, so they never share a slot
// of the panel ring.
inline int64_t panel_ring_rows(const BatchVectorGeometry& g) { return (g.kernel_h - 1) * g.dilation_h + 1; }

// The kernels are built for x86-64 with GCC or Clang (their target pragmas), one set per
// instruction set.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define RMASK_BATCH_VECTOR_KERNELS 1
const BatchVectorKernels* avx2_kernels();
const BatchVectorKernels* avx512_kernels();
#endif

// The best kernels this CPU runs, or null (other CPUs and builds: the caller uses the
// portable kernels). `avx512_allowed`: false keeps the AVX2 kernels on an AVX-512 CPU (the
// caller passes what ATen's own CPU capability allows, so ATEN_CPU_CAPABILITY=avx2 selects
// both).
const BatchVectorKernels* best_batch_vector_kernels(bool avx512_allowed);

}  // namespace cpu
}  // namespace rmask
