// Argument checks and geometry shared by every backend of the rmask ops.
#pragma once

#include "torch_stable.h"

#include <optional>
#include <utility>
#include <vector>

namespace rmask {

// Shapes of one masked convolution, resolved and validated once per call.
struct ConvGeometry {
  int64_t batch, in_channels, height, width;
  int64_t out_channels, kernel_h, kernel_w;
  int64_t out_height, out_width;
  int64_t stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w;
  int64_t groups;
  int64_t patterns;              // P: distinct mask patterns (1, Cout / group_size or Cout)
  int64_t channels_per_pattern;  // Cout / P consecutive channels share one pattern

  int64_t in_channels_per_group() const { return in_channels / groups; }
  int64_t out_channels_per_group() const { return out_channels / groups; }
  int64_t out_positions() const { return out_height * out_width; }
};

inline ConvGeometry check_masked_conv2d_args(
    const Tensor& input,
    const Tensor& weight,
    const std::optional<Tensor>& bias,
    const Tensor& mask,
    const Tensor& kept_offsets,
    const Tensor& kept_positions,
    const Tensor& position_offsets,
    const Tensor& position_channels,
    IntArrayRef stride,
    IntArrayRef padding,
    IntArrayRef dilation,
    int64_t groups) {
  RMASK_CHECK(input.dim() == 4, "masked_conv2d: input must be 4-D (N, C, H, W), got shape ",
              describe(input.sizes()));
  RMASK_CHECK(weight.dim() == 4, "masked_conv2d: weight must be 4-D (Cout, Cin/groups, kh, kw), got shape ",
              describe(weight.sizes()));
  RMASK_CHECK(is_floating(input.scalar_type()),
              "masked_conv2d: input must be a floating point tensor, got ", input.scalar_type());
  RMASK_CHECK(weight.scalar_type() == input.scalar_type(), "masked_conv2d: weight dtype must match input dtype ",
              input.scalar_type(), ", got ", weight.scalar_type());
  RMASK_CHECK(weight.device() == input.device(), "masked_conv2d: weight must be on the input's device ",
              describe(input.device()), ", got ", describe(weight.device()));
  RMASK_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2,
              "masked_conv2d: stride, padding and dilation must have 2 elements each");
  RMASK_CHECK(stride[0] > 0 && stride[1] > 0, "masked_conv2d: stride must be positive, got ", describe(stride));
  RMASK_CHECK(dilation[0] > 0 && dilation[1] > 0, "masked_conv2d: dilation must be positive, got ", describe(dilation));
  RMASK_CHECK(padding[0] >= 0 && padding[1] >= 0, "masked_conv2d: padding must be non-negative, got ", describe(padding));
  RMASK_CHECK(groups > 0, "masked_conv2d: groups must be positive, got ", groups);

  ConvGeometry g;
  g.batch = input.size(0);
  g.in_channels = input.size(1);
  g.height = input.size(2);
  g.width = input.size(3);
  g.out_channels = weight.size(0);
  g.kernel_h = weight.size(2);
  g.kernel_w = weight.size(3);
  g.stride_h = stride[0];
  g.stride_w = stride[1];
  g.pad_h = padding[0];
  g.pad_w = padding[1];
  g.dilation_h = dilation[0];
  g.dilation_w = dilation[1];
  g.groups = groups;
  RMASK_CHECK(g.in_channels == weight.size(1) * groups, "masked_conv2d: input channels must be weight.size(1) * groups = ",
              weight.size(1) * groups, ", got ", g.in_channels);
  RMASK_CHECK(g.out_channels % groups == 0, "masked_conv2d: out channels ", g.out_channels,
              " must be divisible by groups ", groups);
  g.out_height = (g.height + 2 * g.pad_h - g.dilation_h * (g.kernel_h - 1) - 1) / g.stride_h + 1;
  g.out_width = (g.width + 2 * g.pad_w - g.dilation_w * (g.kernel_w - 1) - 1) / g.stride_w + 1;
  RMASK_CHECK(g.out_height > 0 && g.out_width > 0, "masked_conv2d: output size would be ", g.out_height, "x",
              g.out_width, " for input ", g.height, "x", g.width, ": input too small for the kernel");

  if (bias.has_value() && bias->defined()) {
    RMASK_CHECK(bias->dim() == 1 && bias->size(0) == g.out_channels, "masked_conv2d: bias must have shape (",
                g.out_channels, "), got ", describe(bias->sizes()));
    RMASK_CHECK(bias->scalar_type() == input.scalar_type(), "masked_conv2d: bias dtype must match input dtype ",
                input.scalar_type(), ", got ", bias->scalar_type());
    RMASK_CHECK(bias->device() == input.device(), "masked_conv2d: bias must be on the input's device");
  }

  RMASK_CHECK(mask.scalar_type() == ScalarType::Bool, "masked_conv2d: mask must be bool, got ", mask.scalar_type());
  RMASK_CHECK(mask.dim() == 3 && (mask.size(0) == 1 || mask.size(0) == g.out_channels) &&
                  mask.size(1) == g.out_height && mask.size(2) == g.out_width,
              "masked_conv2d: mask must have shape (", g.out_channels, " or 1, ", g.out_height, ", ", g.out_width,
              ") for this convolution's output, got ", describe(mask.sizes()));
  RMASK_CHECK(mask.device() == input.device(), "masked_conv2d: mask must be on the input's device ",
              describe(input.device()), ", got ", describe(mask.device()));

  RMASK_CHECK(kept_offsets.scalar_type() == ScalarType::Long && kept_offsets.dim() == 1 && kept_offsets.numel() >= 2,
              "masked_conv2d: kept_offsets must be a 1-D int64 tensor of P + 1 >= 2 entries, got ",
              kept_offsets.scalar_type(), " of shape ", describe(kept_offsets.sizes()));
  RMASK_CHECK(kept_positions.scalar_type() == ScalarType::Long && kept_positions.dim() == 1,
              "masked_conv2d: kept_positions must be a 1-D int64 tensor, got ", kept_positions.scalar_type(),
              " of shape ", describe(kept_positions.sizes()));
  g.patterns = kept_offsets.numel() - 1;
  RMASK_CHECK(g.out_channels % g.patterns == 0 && (mask.size(0) == 1 ? g.patterns == 1 : true),
              "masked_conv2d: kept_offsets describes ", g.patterns, " mask patterns, which must divide the ",
              g.out_channels, " output channels (1 for a (1, H, W) mask)");
  g.channels_per_pattern = g.out_channels / g.patterns;
  RMASK_CHECK(position_offsets.scalar_type() == ScalarType::Long && position_offsets.dim() == 1 &&
                  position_offsets.numel() == g.out_positions() + 1,
              "masked_conv2d: position_offsets must be a 1-D int64 tensor of Hout * Wout + 1 = ", g.out_positions() + 1,
              " entries, got ", position_offsets.scalar_type(), " of shape ", describe(position_offsets.sizes()));
  RMASK_CHECK(position_channels.scalar_type() == ScalarType::Long && position_channels.dim() == 1,
              "masked_conv2d: position_channels must be a 1-D int64 tensor, got ", position_channels.scalar_type(),
              " of shape ", describe(position_channels.sizes()));
  for (const auto* t : {&kept_offsets, &kept_positions, &position_offsets, &position_channels}) {
    RMASK_CHECK(t->device() == input.device(), "masked_conv2d: the kept index must be on the input's device ",
                describe(input.device()), ", got ", describe(t->device()));
  }
  return g;
}

// The two forms of the kept index list the same number of kept (position, channel) pairs. Reads
// only sizes: on CUDA the index values would cost a device sync (their values are checked once,
// in Python: rk.check_kept_index). rmask_kernels/triton/geometry.py makes the same checks.
inline void check_kept_index_sizes(const ConvGeometry& g, const Tensor& positions,
                                              const Tensor& position_channels) {
  RMASK_CHECK(positions.numel() <= g.patterns * g.out_positions(), "masked_conv2d: kept_positions lists ",
              positions.numel(), " positions, more than the ", g.patterns, " patterns of Hout * Wout = ",
              g.out_positions(), " outputs hold");
  RMASK_CHECK(position_channels.numel() == positions.numel() * g.channels_per_pattern,
              "masked_conv2d: position_channels must list the ", positions.numel() * g.channels_per_pattern,
              " kept (position, channel) pairs of kept_offsets/kept_positions, got ", position_channels.numel());
}

// The fused residual: the output's shape, dtype and device.
inline void check_residual(const ConvGeometry& g, const Tensor& input, const Tensor& residual) {
  const std::vector<int64_t> shape{g.batch, g.out_channels, g.out_height, g.out_width};
  RMASK_CHECK(residual.sizes().equals(IntArrayRef(shape)), "masked_conv2d: residual must have the output's shape ",
              describe(IntArrayRef(shape)), ", got ", describe(residual.sizes()));
  RMASK_CHECK(residual.scalar_type() == input.scalar_type(), "masked_conv2d: residual dtype must match input dtype ",
              input.scalar_type(), ", got ", residual.scalar_type());
  RMASK_CHECK(residual.device() == input.device(), "masked_conv2d: residual must be on the input's device ",
              describe(input.device()), ", got ", describe(residual.device()));
}

// A backward operand shaped like the output (grad_output, relu_output): the output's shape,
// the input's dtype and device.
inline void check_output_shaped(const ConvGeometry& g, const Tensor& input, const Tensor& t,
                                           const char* name) {
  RMASK_CHECK(t.sizes().equals(IntArrayRef({g.batch, g.out_channels, g.out_height, g.out_width})),
              "masked_conv2d_backward: ", name, " must have shape (", g.batch, ", ", g.out_channels, ", ",
              g.out_height, ", ", g.out_width, "), got ", describe(t.sizes()));
  RMASK_CHECK(t.scalar_type() == input.scalar_type(), "masked_conv2d_backward: ", name, " dtype must be ",
              input.scalar_type(), ", got ", t.scalar_type());
  RMASK_CHECK(t.device() == input.device(), "masked_conv2d_backward: ", name, " must be on the input's device ",
              describe(input.device()), ", got ", describe(t.device()));
}

// The backward's ReLU gate: relu_output when given and defined, else an undefined tensor
// (no gate), checked like grad_output.
inline Tensor checked_relu_gate(const ConvGeometry& g, const Tensor& input,
                                               const std::optional<Tensor>& relu_output) {
  if (!relu_output.has_value() || !relu_output->defined()) return Tensor();
  check_output_shaped(g, input, *relu_output, "relu_output");
  return *relu_output;
}

// The input mask (the schemas' input_mask) and its lists (input_offsets, input_channels: the
// by-position part of rk.kept_index(input_mask, Cin)); all undefined when no mask is given.
struct InputMask {
  Tensor mask, offsets, channels;
  bool defined() const { return mask.defined(); }
};

// input_mask checked: bool, (Cin or 1, H, W), on the input's device; its lists given with it,
// 1-D int64 on that device, H * W + 1 offsets (their values are checked where they are read:
// the CPU kernels; in Python by rk.check_kept_index).
inline InputMask checked_input_mask(const ConvGeometry& g, const Tensor& input,
                                    const std::optional<Tensor>& input_mask,
                                    const std::optional<Tensor>& input_offsets,
                                    const std::optional<Tensor>& input_channels) {
  const bool has_offsets = input_offsets.has_value() && input_offsets->defined();
  const bool has_channels = input_channels.has_value() && input_channels->defined();
  if (!input_mask.has_value() || !input_mask->defined()) {
    RMASK_CHECK(!has_offsets && !has_channels,
                "masked_conv2d: input_offsets and input_channels are the lists of an input_mask, got them without one");
    return {};
  }
  const Tensor& m = *input_mask;
  RMASK_CHECK(m.scalar_type() == ScalarType::Bool, "masked_conv2d: input_mask must be a bool tensor, got ",
              m.scalar_type());
  RMASK_CHECK(m.dim() == 3 && (m.size(0) == g.in_channels || m.size(0) == 1) && m.size(1) == g.height &&
                  m.size(2) == g.width,
              "masked_conv2d: input_mask must have shape (", g.in_channels, " or 1, ", g.height, ", ", g.width,
              ") for this input, got ", describe(m.sizes()));
  RMASK_CHECK(m.device() == input.device(), "masked_conv2d: input_mask must be on the input's device ",
              describe(input.device()), ", got ", describe(m.device()));
  RMASK_CHECK(has_offsets && has_channels,
              "masked_conv2d: input_mask comes with its lists input_offsets and input_channels "
              "(rk.kept_index(input_mask, in_channels).position_offsets/.position_channels), got ",
              has_offsets ? "no input_channels" : "no input_offsets");
  for (const auto& [name, t] : {std::pair<const char*, const Tensor*>{"input_offsets", &*input_offsets},
                                std::pair<const char*, const Tensor*>{"input_channels", &*input_channels}}) {
    RMASK_CHECK(t->scalar_type() == ScalarType::Long && t->dim() == 1, "masked_conv2d: ", name,
                " must be a 1-D int64 tensor, got ", t->scalar_type(), " of shape ", describe(t->sizes()));
    RMASK_CHECK(t->device() == input.device(), "masked_conv2d: ", name, " must be on the input's device ",
                describe(input.device()), ", got ", describe(t->device()));
  }
  RMASK_CHECK(input_offsets->numel() == g.height * g.width + 1, "masked_conv2d: input_offsets must have H * W + 1 = ",
              g.height * g.width + 1, " entries for this input, got ", input_offsets->numel());
  return {m, *input_offsets, *input_channels};
}

// `input * input_mask` (checked, or undefined: `input` itself), in the input's memory format.
inline Tensor masked_input(const Tensor& input, const InputMask& input_mask) {
  if (!input_mask.defined()) return input;
  Tensor copy = torch::stable::clone(input);
  rmask::mul_(copy, input_mask.mask);
  return copy;
}

}  // namespace rmask
