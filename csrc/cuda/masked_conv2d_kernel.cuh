// The CUDA kernels of the rmask ops, written so that their arithmetic can be checked without a GPU.
//
// Every kernel is a functor whose per-element body, `operator()(int64_t index)`, is
// C10_HOST_DEVICE (`__host__ __device__` under nvcc). The op bodies below are templates over a
// `Launch` policy, `launch(count, element)`, that runs `element(i)` for every i in [0, count):
//   masked_conv2d_kernel.cu            a grid-stride __global__ loop on the current CUDA stream
//   tests/cuda/host_emulation.cu       a plain loop on the host, over CPU tensors
// so the same element bodies, index arithmetic, allocations and reduction stages run in both;
// only the launch differs. (The host run proves the arithmetic; it does not exercise
// launches, streams or GPU memory.)
//
// The kernels are direct (no im2col, no tensor cores): simple, exact, deterministic, and they
// SKIP masked outputs, reading the kept index (csrc/masked_conv2d.cpp):
//   forward        one element per kept (image, kept position entry, channel of its pattern):
//                  a dot product over Cin/groups * kh * kw, then bias, residual, ReLU
//   stats          per (channel, image) partial sums over the channel's kept positions
//                  (float64), then a fixed-order sum over the images: deterministic
//   grad input     gather form: one element per input element, summing over the taps whose
//                  output position keeps a channel of its group (by-position index); no atomics
//   grad weight    two stages: per (row chunk, weight element) partial sums over kept
//                  (image, position) rows, then a fixed-order sum over the chunks
//   grad bias      like stats, over grad_output
// The backward reads grad_output through OutputGradient: with a fused ReLU's output as its
// gate, each read of a kept output's gradient also reads the gate there (0 where not > 0).
// Accumulation in opmath_t (float for half/bfloat16/float, double for double).
// Tensors are addressed through their strides (NCHW, channels_last or any view), so the
// input is never copied; outputs are allocated in the input's memory format.
//
// The kept index is not cross-checked against the mask here (that would need its values on
// the host: a device sync per call); an inconsistent index gives wrong values but never an
// out-of-bounds access: every index read from it is range-checked before it is used.

#pragma once

#include <algorithm>
#include <optional>
#include <tuple>
#include <vector>

#include "../masked_conv2d_common.h"

namespace rmask {
namespace cuda {

// Element strides of a 4-D tensor (n, c, h, w).
struct Strides4 {
  int64_t n, c, h, w;
  C10_HOST_DEVICE int64_t at(int64_t in, int64_t ic, int64_t ih, int64_t iw) const {
    return in * n + ic * c + ih * h + iw * w;
  }
};

inline Strides4 strides_of(const Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)}; }

// The convolution's shape as the elements need it (ConvGeometry's helpers are host-only).
struct Shape {
  int64_t batch, in_channels, height, width;
  int64_t out_channels, kernel_h, kernel_w, out_height, out_width;
  int64_t stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w;
  int64_t in_channels_per_group, out_channels_per_group;
  int64_t patterns, channels_per_pattern;
};

inline Shape shape_of(const ConvGeometry& g) {
  return {g.batch,       g.in_channels, g.height,     g.width,      g.out_channels,
          g.kernel_h,    g.kernel_w,    g.out_height, g.out_width,  g.stride_h,
          g.stride_w,    g.pad_h,       g.pad_w,      g.dilation_h, g.dilation_w,
          g.in_channels_per_group(), g.out_channels_per_group(), g.patterns, g.channels_per_pattern};
}

// The kept index as the elements read it: by pattern and by position (csrc/masked_conv2d.cpp).
struct KeptIndex {
  const int64_t* offsets;            // (patterns + 1)
  const int64_t* positions;          // (kept): flat output positions
  int64_t kept;                      // kept_positions.numel()
  const int64_t* position_offsets;   // (Hout * Wout + 1)
  const int64_t* position_channels;  // (kept * channels_per_pattern), ascending per position
  int64_t pairs;                     // position_channels.numel()
};

// v limited to [lo, hi] (std::min/max are not device functions).
C10_HOST_DEVICE inline int64_t clamp_to(int64_t v, int64_t lo, int64_t hi) { return v < lo ? lo : (v > hi ? hi : v); }

// Pattern p keeps positions[begin:end), clamped to the index's bounds.
C10_HOST_DEVICE inline void pattern_range(const KeptIndex& index, int64_t p, int64_t& begin, int64_t& end) {
  begin = clamp_to(index.offsets[p], 0, index.kept);
  end = clamp_to(index.offsets[p + 1], begin, index.kept);
}

// The pattern whose range holds kept entry e: the last p with offsets[p] <= e (binary search).
C10_HOST_DEVICE inline int64_t pattern_of(const KeptIndex& index, int64_t patterns, int64_t e) {
  int64_t lo = 0, hi = patterns;
  while (hi - lo > 1) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (index.offsets[mid] <= e) lo = mid; else hi = mid;
  }
  return lo;
}

// grad_output as the backward elements read it: at (n, c, h, w), 0 where `gate` (if not null:
// the forward's output when it fused a ReLU) is not > 0 there.
template <typename scalar_t>
struct OutputGradient {
  using acc_t = opmath_t<scalar_t>;
  const scalar_t* values;
  Strides4 strides;
  const scalar_t* gate;  // or null
  Strides4 gate_strides;

  C10_HOST_DEVICE acc_t at(int64_t n, int64_t c, int64_t h, int64_t w) const {
    if (gate && !(static_cast<acc_t>(gate[gate_strides.at(n, c, h, w)]) > acc_t(0))) return acc_t(0);
    return static_cast<acc_t>(values[strides.at(n, c, h, w)]);
  }
};

// ---------------------------------------------------------------------------------
// Forward: one element per kept (image n, kept entry e, channel c of e's pattern), c fastest
// (neighbouring threads read the same input taps).

template <typename scalar_t>
struct ForwardElement {
  using acc_t = opmath_t<scalar_t>;
  Shape s;
  KeptIndex index;
  const scalar_t* x;
  Strides4 xs;
  const scalar_t* w;  // contiguous (Cout, Cin/groups, kh, kw)
  const scalar_t* bias;      // or null
  const scalar_t* residual;  // or null
  Strides4 rs;
  bool relu;
  scalar_t* y;
  Strides4 ys;

  C10_HOST_DEVICE void operator()(int64_t i) const {
    const int64_t c = i % s.channels_per_pattern;
    const int64_t rest = i / s.channels_per_pattern;
    const int64_t e = rest % index.kept, n = rest / index.kept;
    const int64_t q = index.positions[e];
    if (q < 0 || q >= s.out_height * s.out_width) return;
    const int64_t oc = pattern_of(index, s.patterns, e) * s.channels_per_pattern + c;
    const int64_t oh = q / s.out_width, ow = q % s.out_width;
    const int64_t c_first = (oc / s.out_channels_per_group) * s.in_channels_per_group;
    const int64_t h0 = oh * s.stride_h - s.pad_h, w0 = ow * s.stride_w - s.pad_w;
    const scalar_t* w_oc = w + oc * s.in_channels_per_group * s.kernel_h * s.kernel_w;
    acc_t acc = 0;
    for (int64_t ci = 0; ci < s.in_channels_per_group; ++ci) {
      for (int64_t ki = 0; ki < s.kernel_h; ++ki) {
        const int64_t ih = h0 + ki * s.dilation_h;
        if (ih < 0 || ih >= s.height) continue;
        for (int64_t kj = 0; kj < s.kernel_w; ++kj) {
          const int64_t iw = w0 + kj * s.dilation_w;
          if (iw < 0 || iw >= s.width) continue;
          acc += static_cast<acc_t>(x[xs.at(n, c_first + ci, ih, iw)]) *
                 static_cast<acc_t>(w_oc[(ci * s.kernel_h + ki) * s.kernel_w + kj]);
        }
      }
    }
    if (bias) acc += static_cast<acc_t>(bias[oc]);
    if (residual) acc += static_cast<acc_t>(residual[rs.at(n, oc, oh, ow)]);
    if (relu && acc < acc_t(0)) acc = acc_t(0);
    y[ys.at(n, oc, oh, ow)] = static_cast<scalar_t>(acc);
  }
};

// ---------------------------------------------------------------------------------
// Per-channel sums over the kept outputs of a (N, Cout, Hout, Wout) tensor (read as an
// OutputGradient: gated, for grad bias, where it has a gate), stage 1: one element per
// (channel oc, image n), summing over oc's kept positions into partial[oc * N + n] (and the
// squares into partial_squares, if given). Stage 2 is OrderedSum over n.

template <typename scalar_t, typename acc_t>
struct KeptRowSumsElement {
  Shape s;
  KeptIndex index;
  OutputGradient<scalar_t> t;
  acc_t* partial;
  acc_t* partial_squares;  // or null

  C10_HOST_DEVICE void operator()(int64_t i) const {
    const int64_t oc = i / s.batch, n = i % s.batch;
    int64_t begin, end;
    pattern_range(index, oc / s.channels_per_pattern, begin, end);
    acc_t sum = 0, squares = 0;
    for (int64_t e = begin; e < end; ++e) {
      const int64_t q = index.positions[e];
      if (q < 0 || q >= s.out_height * s.out_width) continue;
      const acc_t v = static_cast<acc_t>(t.at(n, oc, q / s.out_width, q % s.out_width));
      sum += v;
      squares += v * v;
    }
    partial[i] = sum;
    if (partial_squares) partial_squares[i] = squares;
  }
};

// out[k] = sum over j < count of partial[k * stride_k + j * stride_j], j ascending: the
// fixed-order second stage of every reduction here.
template <typename acc_t, typename out_t>
struct OrderedSumElement {
  const acc_t* partial;
  int64_t count, stride_k, stride_j;
  out_t* out;

  C10_HOST_DEVICE void operator()(int64_t k) const {
    acc_t sum = 0;
    for (int64_t j = 0; j < count; ++j) sum += partial[k * stride_k + j * stride_j];
    out[k] = static_cast<out_t>(sum);
  }
};

// ---------------------------------------------------------------------------------
// Grad input, gather form: one element per input element (n, ci, ih, iw), iw fastest. It sums
// grad_output * weight over the taps (ki, kj) whose output (oh, ow) exists and over the channels
// of ci's group kept at that output (by-position index): masked grad_output is never read.

template <typename scalar_t>
struct GradInputElement {
  using acc_t = opmath_t<scalar_t>;
  Shape s;
  KeptIndex index;
  OutputGradient<scalar_t> grad_output;
  const scalar_t* w;  // contiguous (Cout, Cin/groups, kh, kw)
  scalar_t* grad_input;
  Strides4 gxs;

  C10_HOST_DEVICE void operator()(int64_t i) const {
    const int64_t iw = i % s.width;
    int64_t rest = i / s.width;
    const int64_t ih = rest % s.height;
    rest /= s.height;
    const int64_t ci = rest % s.in_channels, n = rest / s.in_channels;
    const int64_t group = ci / s.in_channels_per_group, c_local = ci % s.in_channels_per_group;
    const int64_t oc_first = group * s.out_channels_per_group, oc_last = oc_first + s.out_channels_per_group;
    acc_t acc = 0;
    for (int64_t ki = 0; ki < s.kernel_h; ++ki) {
      const int64_t th = ih + s.pad_h - ki * s.dilation_h;  // = oh * stride_h
      if (th < 0 || th % s.stride_h != 0) continue;
      const int64_t oh = th / s.stride_h;
      if (oh >= s.out_height) continue;
      for (int64_t kj = 0; kj < s.kernel_w; ++kj) {
        const int64_t tw = iw + s.pad_w - kj * s.dilation_w;
        if (tw < 0 || tw % s.stride_w != 0) continue;
        const int64_t ow = tw / s.stride_w;
        if (ow >= s.out_width) continue;
        const int64_t q = oh * s.out_width + ow;
        const int64_t begin = clamp_to(index.position_offsets[q], 0, index.pairs);
        const int64_t end = clamp_to(index.position_offsets[q + 1], begin, index.pairs);
        // The kept channels are ascending: start at the group's first one (binary search).
        int64_t lo = begin, hi = end;
        while (lo < hi) {
          const int64_t mid = lo + (hi - lo) / 2;
          if (index.position_channels[mid] < oc_first) lo = mid + 1; else hi = mid;
        }
        for (int64_t k = lo; k < end; ++k) {
          const int64_t oc = index.position_channels[k];
          if (oc >= oc_last) break;
          if (oc < oc_first) continue;  // only for an index that is not ascending
          acc += grad_output.at(n, oc, oh, ow) *
                 static_cast<acc_t>(w[((oc * s.in_channels_per_group + c_local) * s.kernel_h + ki) * s.kernel_w + kj]);
        }
      }
    }
    grad_input[gxs.at(n, ci, ih, iw)] = static_cast<scalar_t>(acc);
  }
};

// ---------------------------------------------------------------------------------
// Grad weight, stage 1: one element per (chunk j, weight element (oc, c_local, ki, kj)), weight
// element fastest. Channel oc's rows are its kept (image, position) pairs, N * K_p of them,
// split into `chunks` equal runs; chunk j sums grad_output * input over its run into
// partial[j * weight_numel + weight element]. Stage 2 is OrderedSum over j.

template <typename scalar_t>
struct GradWeightPartialElement {
  using acc_t = opmath_t<scalar_t>;
  Shape s;
  KeptIndex index;
  OutputGradient<scalar_t> grad_output;
  const scalar_t* x;
  Strides4 xs;
  int64_t chunks;
  acc_t* partial;

  C10_HOST_DEVICE void operator()(int64_t i) const {
    const int64_t taps = s.kernel_h * s.kernel_w;
    const int64_t weight_numel = s.out_channels * s.in_channels_per_group * taps;
    const int64_t element = i % weight_numel, j = i / weight_numel;
    const int64_t oc = element / (s.in_channels_per_group * taps);
    const int64_t c_local = (element / taps) % s.in_channels_per_group;
    const int64_t ki = (element % taps) / s.kernel_w, kj = element % s.kernel_w;
    const int64_t ci = (oc / s.out_channels_per_group) * s.in_channels_per_group + c_local;
    int64_t begin, end;
    pattern_range(index, oc / s.channels_per_pattern, begin, end);
    const int64_t kept = end - begin, rows = s.batch * kept;
    const int64_t per_chunk = (rows + chunks - 1) / chunks;
    const int64_t first = clamp_to(j * per_chunk, 0, rows), last = clamp_to(first + per_chunk, first, rows);
    acc_t acc = 0;
    for (int64_t r = first; r < last; ++r) {
      const int64_t n = r / kept, q = index.positions[begin + r % kept];
      if (q < 0 || q >= s.out_height * s.out_width) continue;
      const int64_t oh = q / s.out_width, ow = q % s.out_width;
      const int64_t ih = oh * s.stride_h - s.pad_h + ki * s.dilation_h;
      const int64_t iw = ow * s.stride_w - s.pad_w + kj * s.dilation_w;
      if (ih < 0 || ih >= s.height || iw < 0 || iw >= s.width) continue;
      acc += grad_output.at(n, oc, oh, ow) * static_cast<acc_t>(x[xs.at(n, ci, ih, iw)]);
    }
    partial[i] = acc;
  }
};

// ---------------------------------------------------------------------------------
// values[i] = max(values[i], 0) over a dense tensor's elements (NaN stays NaN, as clamp_min).

template <typename scalar_t>
struct ReluInPlaceElement {
  scalar_t* values;

  C10_HOST_DEVICE void operator()(int64_t i) const {
    if (static_cast<opmath_t<scalar_t>>(values[i]) < opmath_t<scalar_t>(0)) values[i] = static_cast<scalar_t>(0);
  }
};

// ---------------------------------------------------------------------------------
// Op bodies, over a Launch policy (see the top of this file). torch_stable.h's tensor helpers
// are called as rmask::name: argument-dependent lookup on a Tensor also finds torch::stable's
// functions of the same names (contiguous, empty), which would make the call ambiguous.

inline KeptIndex kept_index_of(const Tensor& offsets, const Tensor& positions, const Tensor& position_offsets,
                               const Tensor& position_channels) {
  return {data<int64_t>(offsets),          data<int64_t>(positions),         positions.numel(),
          data<int64_t>(position_offsets), data<int64_t>(position_channels), position_channels.numel()};
}

struct IndexTensors {
  Tensor offsets, positions, position_offsets, position_channels;
  KeptIndex view() const { return kept_index_of(offsets, positions, position_offsets, position_channels); }
};

inline IndexTensors contiguous_index(const Tensor& kept_offsets, const Tensor& kept_positions,
                                     const Tensor& position_offsets, const Tensor& position_channels) {
  return {rmask::contiguous(kept_offsets), rmask::contiguous(kept_positions),
          rmask::contiguous(position_offsets), rmask::contiguous(position_channels)};
}

// An empty tensor of `sizes` and `dtype` on t's device, in t's memory format.
inline Tensor empty_in_format_of(const Tensor& t, IntArrayRef sizes, ScalarType dtype) {
  return rmask::empty(sizes, dtype, t.device(), suggest_memory_format(t));
}

// relu?(mask * (conv + bias) + residual), in the input's memory format. Masked outputs are
// never computed: they are 0, or relu?(residual), written before the kernel (a copy, then a
// ReLU element pass over the output).
// The forward for arguments already checked (geometry `g`).
template <typename Launch>
Tensor forward_of_checked(const Launch& launch, const ConvGeometry& g, const Tensor& input, const Tensor& weight,
                          const std::optional<Tensor>& bias, const IndexTensors& index,
                          const std::optional<Tensor>& residual, bool relu) {
  const bool has_residual = residual.has_value() && residual->defined();
  if (has_residual) check_residual(g, input, *residual);
  const std::vector<int64_t> out_sizes{g.batch, g.out_channels, g.out_height, g.out_width};
  Tensor y = empty_in_format_of(input, out_sizes, input.scalar_type());
  if (has_residual) {
    torch::stable::copy_(y, *residual);
    if (relu && y.numel() > 0) {
      RMASK_DISPATCH_FLOATING_TYPES(y.scalar_type(), "masked_conv2d_forward_cuda", [&] {
        launch(y.numel(), ReluInPlaceElement<scalar_t>{data<scalar_t>(y)});
      });
    }
  } else {
    torch::stable::zero_(y);
  }
  const int64_t count = g.batch * index.positions.numel() * g.channels_per_pattern;
  if (y.numel() == 0 || count == 0) return y;
  const Tensor w = rmask::contiguous(weight);
  const bool has_bias = bias.has_value() && bias->defined();
  const Tensor b = has_bias ? rmask::contiguous(*bias) : Tensor();
  RMASK_DISPATCH_FLOATING_TYPES(input.scalar_type(), "masked_conv2d_forward_cuda", [&] {
    ForwardElement<scalar_t> element{shape_of(g),
                                     index.view(),
                                     data<scalar_t>(input),
                                     strides_of(input),
                                     data<scalar_t>(w),
                                     has_bias ? data<scalar_t>(b) : nullptr,
                                     has_residual ? data<scalar_t>(*residual) : nullptr,
                                     has_residual ? strides_of(*residual) : Strides4{0, 0, 0, 0},
                                     relu,
                                     data<scalar_t>(y),
                                     strides_of(y)};
    launch(count, element);
  });
  return y;
}

template <typename Launch>
Tensor masked_conv2d_forward(const Launch& launch, const Tensor& input, const Tensor& weight,
                             const std::optional<Tensor>& bias, const Tensor& mask, const Tensor& kept_offsets,
                             const Tensor& kept_positions, const Tensor& position_offsets,
                             const Tensor& position_channels, IntArrayRef stride, IntArrayRef padding,
                             IntArrayRef dilation, int64_t groups, const std::optional<Tensor>& residual, bool relu,
                             const std::optional<Tensor>& input_mask, const std::optional<Tensor>& input_offsets,
                             const std::optional<Tensor>& input_channels) {
  const ConvGeometry g = check_masked_conv2d_args(input, weight, bias, mask, kept_offsets, kept_positions,
                                                  position_offsets, position_channels, stride, padding, dilation, groups);
  check_kept_index_sizes(g, kept_positions, position_channels);
  // Masked inputs are multiplied out, not skipped.
  const Tensor x = masked_input(input, checked_input_mask(g, input, input_mask, input_offsets, input_channels));
  return forward_of_checked(launch, g, x, weight, bias,
                            contiguous_index(kept_offsets, kept_positions, position_offsets, position_channels),
                            residual, relu);
}

// Per-channel float64 sum and sum of squares of `t` (N, Cout, Hout, Wout) over the kept
// outputs, in two fixed-order stages (no atomics: bit-identical run to run).
template <typename Launch>
std::tuple<Tensor, Tensor> kept_channel_sums(const Launch& launch, const ConvGeometry& g, const IndexTensors& index,
                                             const Tensor& t) {
  const Tensor partial = rmask::empty({2, g.out_channels, g.batch}, ScalarType::Double, t.device());
  const Tensor sums = rmask::empty({2, g.out_channels}, ScalarType::Double, t.device());
  double* const partial_data = data<double>(partial);
  RMASK_DISPATCH_FLOATING_TYPES(t.scalar_type(), "masked_conv2d_stats_cuda", [&] {
    const OutputGradient<scalar_t> values{data<scalar_t>(t), strides_of(t), nullptr, Strides4{0, 0, 0, 0}};
    KeptRowSumsElement<scalar_t, double> rows{shape_of(g), index.view(), values, partial_data,
                                              partial_data + g.out_channels * g.batch};
    launch(g.out_channels * g.batch, rows);
  });
  OrderedSumElement<double, double> total{partial_data, g.batch, g.batch, 1, data<double>(sums)};
  launch(2 * g.out_channels, total);  // the two rows of partial are consecutive: k over (2, Cout)
  // Distinct outputs, not views of one.
  return {torch::stable::clone(torch::stable::select(sums, 0, 0)),
          torch::stable::clone(torch::stable::select(sums, 0, 1))};
}

template <typename Launch>
std::tuple<Tensor, Tensor, Tensor> masked_conv2d_stats(
    const Launch& launch, const Tensor& input, const Tensor& weight, const std::optional<Tensor>& bias,
    const Tensor& mask, const Tensor& kept_offsets, const Tensor& kept_positions, const Tensor& position_offsets,
    const Tensor& position_channels, IntArrayRef stride, IntArrayRef padding, IntArrayRef dilation, int64_t groups,
    const std::optional<Tensor>& input_mask,
    const std::optional<Tensor>& input_offsets, const std::optional<Tensor>& input_channels) {
  const ConvGeometry g = check_masked_conv2d_args(input, weight, bias, mask, kept_offsets, kept_positions,
                                                  position_offsets, position_channels, stride, padding, dilation, groups);
  check_kept_index_sizes(g, kept_positions, position_channels);
  const auto index = contiguous_index(kept_offsets, kept_positions, position_offsets, position_channels);
  const Tensor x = masked_input(input, checked_input_mask(g, input, input_mask, input_offsets, input_channels));
  Tensor y = forward_of_checked(launch, g, x, weight, bias, index, std::nullopt, /*relu=*/false);
  if (g.batch == 0 || kept_positions.numel() == 0) {
    return {y, rmask::zeros({g.out_channels}, ScalarType::Double, input.device()),
            rmask::zeros({g.out_channels}, ScalarType::Double, input.device())};
  }
  auto [sum, sum_of_squares] = kept_channel_sums(launch, g, index, y);
  return {y, sum, sum_of_squares};
}

// How many row chunks the grad-weight reduction uses: about 64 kept (image, position) rows per
// chunk for an average pattern, and the partial sums held under 2^26 elements.
inline int64_t grad_weight_chunks(const ConvGeometry& g, int64_t kept, int64_t weight_numel) {
  const int64_t rows = g.batch * kept / std::max<int64_t>(1, g.patterns);
  const int64_t by_rows = (rows + 63) / 64;
  const int64_t by_memory = std::max<int64_t>(1, (int64_t{1} << 26) / std::max<int64_t>(1, weight_numel));
  return std::max<int64_t>(1, std::min(by_rows, by_memory));
}

// Gradients for (input, weight, bias) of mask * conv: grad_output is read at kept outputs only,
// gated there by relu_output (if given: the forward's output when it fused a ReLU).
// Outputs not asked for in output_mask (3 flags: the schema's bool[3]) are empty tensors.
template <typename Launch>
std::tuple<Tensor, Tensor, Tensor> masked_conv2d_backward(
    const Launch& launch, const Tensor& grad_output, const Tensor& input, const Tensor& weight, const Tensor& mask,
    const Tensor& kept_offsets, const Tensor& kept_positions, const Tensor& position_offsets,
    const Tensor& position_channels, IntArrayRef stride, IntArrayRef padding, IntArrayRef dilation, int64_t groups,
    const std::vector<bool>& output_mask, const std::optional<Tensor>& relu_output,
    const std::optional<Tensor>& input_mask,
    const std::optional<Tensor>& input_offsets, const std::optional<Tensor>& input_channels) {
  const ConvGeometry g = check_masked_conv2d_args(input, weight, std::nullopt, mask, kept_offsets, kept_positions,
                                                  position_offsets, position_channels, stride, padding, dilation, groups);
  check_output_shaped(g, input, grad_output, "grad_output");
  const Tensor gate = checked_relu_gate(g, input, relu_output);
  const InputMask in_mask = checked_input_mask(g, input, input_mask, input_offsets, input_channels);
  check_kept_index_sizes(g, kept_positions, position_channels);
  RMASK_CHECK(output_mask.size() == 3, "masked_conv2d_backward: output_mask must have 3 entries, got ",
              output_mask.size());
  const bool need_input = output_mask[0], need_weight = output_mask[1], need_bias = output_mask[2];
  const auto index = contiguous_index(kept_offsets, kept_positions, position_offsets, position_channels);
  const Tensor w = rmask::contiguous(weight);
  const int64_t weight_numel = w.numel();
  const ScalarType dtype = input.scalar_type();

  Tensor grad_input = rmask::empty({0}, dtype, input.device());
  Tensor grad_weight = rmask::empty({0}, dtype, weight.device());
  Tensor grad_bias = rmask::empty({0}, dtype, input.device());
  // Every element of grad_input is written by its gather element (zero where no kept output uses it).
  if (need_input) grad_input = empty_in_format_of(input, input.sizes(), dtype);
  if (need_weight) grad_weight = rmask::zeros(weight.sizes(), dtype, weight.device());
  if (need_bias) grad_bias = rmask::zeros({g.out_channels}, dtype, input.device());
  const bool nothing_kept = g.batch == 0 || kept_positions.numel() == 0;
  if (need_input && nothing_kept) torch::stable::zero_(grad_input);
  if (nothing_kept || !(need_input || need_weight || need_bias)) return {grad_input, grad_weight, grad_bias};

  RMASK_DISPATCH_FLOATING_TYPES(dtype, "masked_conv2d_backward_cuda", [&] {
    using acc_t = opmath_t<scalar_t>;
    const OutputGradient<scalar_t> gradient{data<scalar_t>(grad_output), strides_of(grad_output),
                                            gate.defined() ? data<scalar_t>(gate) : nullptr,
                                            gate.defined() ? strides_of(gate) : Strides4{0, 0, 0, 0}};
    if (need_input && grad_input.numel() > 0) {
      GradInputElement<scalar_t> element{shape_of(g), index.view(), gradient, data<scalar_t>(w),
                                         data<scalar_t>(grad_input), strides_of(grad_input)};
      launch(grad_input.numel(), element);
    }
    if (need_weight && weight_numel > 0) {
      const int64_t chunks = grad_weight_chunks(g, kept_positions.numel(), weight_numel);
      const Tensor partial = rmask::empty({chunks, weight_numel}, scalar_type_of<acc_t>(), input.device());
      const Tensor x = masked_input(input, in_mask);
      GradWeightPartialElement<scalar_t> element{shape_of(g), index.view(), gradient, data<scalar_t>(x),
                                                 strides_of(x), chunks, data<acc_t>(partial)};
      launch(chunks * weight_numel, element);
      OrderedSumElement<acc_t, scalar_t> total{data<acc_t>(partial), chunks, 1, weight_numel,
                                               data<scalar_t>(grad_weight)};
      launch(weight_numel, total);
    }
    if (need_bias) {
      const Tensor partial = rmask::empty({g.out_channels, g.batch}, scalar_type_of<acc_t>(), input.device());
      KeptRowSumsElement<scalar_t, acc_t> rows{shape_of(g), index.view(), gradient, data<acc_t>(partial), nullptr};
      launch(g.out_channels * g.batch, rows);
      OrderedSumElement<acc_t, scalar_t> total{data<acc_t>(partial), g.batch, g.batch, 1, data<scalar_t>(grad_bias)};
      launch(g.out_channels, total);
    }
  });
  if (need_input && in_mask.defined()) rmask::mul_(grad_input, in_mask.mask);  // 0 at masked inputs
  return {grad_input, grad_weight, grad_bias};
}

}  // namespace cuda
}  // namespace rmask
