// The portable CPU kernels (portable_kernels.h): gather, GEMM, scatter, for the kept outputs only.
//
// The output channels split into blocks that share one mask pattern and one conv group
// (a pattern's channels intersected with a group's). For each block:
//   gather  the im2col columns of its kept positions only   columns  (Cin/g * kh * kw, N * K)
//   GEMM    weight rows of the block times columns          out      (channels, N * K)
//   write   the block's output channels, finished: kept outputs relu?(out + bias + residual),
//           masked ones relu?(residual) or 0, straight into the output's memory format and dtype
// so the work is proportional to the kept outputs and each output element is written once.
// The backward pass reuses the same gathered columns: grad_weight = grad_out_kept @ columns^T,
// grad_input = col2im(W^T @ grad_out_kept). Every output element is written by one thread in
// a fixed order (no racy accumulation): exact and deterministic. Half and bfloat16 compute in
// float (at::opmath_type), rounded once when the output is written.

#include "portable_kernels.h"

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <type_traits>
#include <vector>

namespace rmask {
namespace cpu {
namespace {

// Keep one gathered column matrix under about 64 MiB of fp32 by walking the batch in chunks.
constexpr int64_t kMaxColumnElements = int64_t{1} << 24;

// The channels [first, first + count) sharing mask pattern `pattern` and conv group `group`.
struct ChannelBlock {
  int64_t group, first, count;
  const int64_t* positions;  // kept flat output positions of the block's pattern
  int64_t kept;              // how many: 0 for a fully masked pattern (no conv work, outputs 0 or residual)
};

std::vector<ChannelBlock> channel_blocks(const ConvGeometry& g, const at::Tensor& kept_offsets,
                                         const at::Tensor& kept_positions) {
  const int64_t* offsets = kept_offsets.data_ptr<int64_t>();
  const int64_t* positions = kept_positions.data_ptr<int64_t>();
  std::vector<ChannelBlock> blocks;
  const int64_t out_channels_per_group = g.out_channels_per_group();
  for (int64_t pattern = 0; pattern < g.patterns; ++pattern) {
    const int64_t kept = offsets[pattern + 1] - offsets[pattern];
    const int64_t pattern_first = pattern * g.channels_per_pattern;
    const int64_t pattern_last = pattern_first + g.channels_per_pattern;
    for (int64_t group = pattern_first / out_channels_per_group; group * out_channels_per_group < pattern_last;
         ++group) {
      const int64_t first = std::max(pattern_first, group * out_channels_per_group);
      const int64_t last = std::min(pattern_last, (group + 1) * out_channels_per_group);
      blocks.push_back({group, first, last - first, positions + offsets[pattern], kept});
    }
  }
  return blocks;
}

// Per kept position t: the input row/column of kernel tap (0, 0), padding applied.
struct KeptOrigins {
  std::vector<int64_t> h, w;
  KeptOrigins(const ConvGeometry& g, const ChannelBlock& block) : h(block.kept), w(block.kept) {
    for (int64_t t = 0; t < block.kept; ++t) {
      h[t] = (block.positions[t] / g.out_width) * g.stride_h - g.pad_h;
      w[t] = (block.positions[t] % g.out_width) * g.stride_w - g.pad_w;
    }
  }
};

// columns[(c * kh + i) * kw + j][(n - first_image) * K + t] = x[n, c_first + c, ih, iw], zero outside the image.
template <typename scalar_t>
void gather_kept_columns(const scalar_t* x, const ConvGeometry& g, const ChannelBlock& block,
                         const KeptOrigins& origins, int64_t first_image, int64_t images, scalar_t* columns) {
  const int64_t in_channels_per_group = g.in_channels_per_group(), taps = g.kernel_h * g.kernel_w;
  const int64_t c_first = block.group * in_channels_per_group, row_length = images * block.kept;
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, row_length));
  at::parallel_for(0, in_channels_per_group * taps, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t c = r / taps, i = (r % taps) / g.kernel_w, j = r % g.kernel_w;
      const int64_t dh = i * g.dilation_h, dw = j * g.dilation_w;
      scalar_t* row = columns + r * row_length;
      for (int64_t n = 0; n < images; ++n) {
        const scalar_t* plane = x + ((first_image + n) * g.in_channels + c_first + c) * g.height * g.width;
        scalar_t* dst = row + n * block.kept;
        for (int64_t t = 0; t < block.kept; ++t) {
          const int64_t ih = origins.h[t] + dh, iw = origins.w[t] + dw;
          const bool inside = ih >= 0 && ih < g.height && iw >= 0 && iw < g.width;
          dst[t] = inside ? plane[ih * g.width + iw] : scalar_t(0);
        }
      }
    }
  });
}

// The adjoint of gather_kept_columns: grad_x[n, c_first + c, ih, iw] += grad_columns[...].
// Parallel over (image, channel) planes, each written by one thread in a fixed order.
template <typename scalar_t>
void scatter_add_kept_columns(const scalar_t* grad_columns, const ConvGeometry& g, const ChannelBlock& block,
                              const KeptOrigins& origins, int64_t first_image, int64_t images, scalar_t* grad_x) {
  const int64_t in_channels_per_group = g.in_channels_per_group(), taps = g.kernel_h * g.kernel_w;
  const int64_t c_first = block.group * in_channels_per_group, row_length = images * block.kept;
  at::parallel_for(0, images * in_channels_per_group, 1, [&](int64_t begin, int64_t end) {
    for (int64_t image_channel = begin; image_channel < end; ++image_channel) {
      const int64_t n = image_channel / in_channels_per_group, c = image_channel % in_channels_per_group;
      scalar_t* plane = grad_x + ((first_image + n) * g.in_channels + c_first + c) * g.height * g.width;
      for (int64_t r = c * taps; r < (c + 1) * taps; ++r) {
        const int64_t i = (r % taps) / g.kernel_w, j = r % g.kernel_w;
        const int64_t dh = i * g.dilation_h, dw = j * g.dilation_w;
        const scalar_t* src = grad_columns + r * row_length + n * block.kept;
        for (int64_t t = 0; t < block.kept; ++t) {
          const int64_t ih = origins.h[t] + dh, iw = origins.w[t] + dw;
          if (ih >= 0 && ih < g.height && iw >= 0 && iw < g.width) plane[ih * g.width + iw] += src[t];
        }
      }
    }
  });
}

// Where output element (n, c, position) lies in a tensor of the output's shape in `format`
// (contiguous or channels_last; position = h * W + w): n * image + c * channel + position * step.
struct OutputLayout {
  int64_t image, channel, step;
  OutputLayout(const ConvGeometry& g, at::MemoryFormat format) {
    const int64_t hw = g.out_positions();
    const bool channels_last = format == at::MemoryFormat::ChannelsLast;
    image = g.out_channels * hw;
    channel = channels_last ? 1 : hw;
    step = channels_last ? g.out_channels : 1;
  }
};

// dst[p * step] = relu?(row[p] + residual[p * step]) for p < hw, rounded once to scalar_t.
// Branch-free and, with kUnitStep (a contiguous output), vectorized.
template <bool kUnitStep, bool kResidual, bool kRelu, typename scalar_t, typename acc_t>
void finish_row(const acc_t* row, const scalar_t* residual, int64_t hw, int64_t step, scalar_t* dst) {
  if constexpr (kUnitStep) step = 1;
  for (int64_t p = 0; p < hw; ++p) {
    acc_t value = row[p];
    if constexpr (kResidual) value += static_cast<acc_t>(residual[p * step]);
    if constexpr (kRelu) value = value < acc_t(0) ? acc_t(0) : value;
    dst[p * step] = static_cast<scalar_t>(value);
  }
}

template <typename scalar_t, typename acc_t>
void finish_row(const acc_t* row, const scalar_t* residual, bool relu, int64_t hw, int64_t step, scalar_t* dst) {
  const auto with = [&](auto unit_step, auto has_residual) {
    if (relu) {
      finish_row<decltype(unit_step)::value, decltype(has_residual)::value, true>(row, residual, hw, step, dst);
    } else {
      finish_row<decltype(unit_step)::value, decltype(has_residual)::value, false>(row, residual, hw, step, dst);
    }
  };
  using yes = std::true_type;
  using no = std::false_type;
  if (step == 1) {
    residual ? with(yes{}, yes{}) : with(yes{}, no{});
  } else {
    residual ? with(no{}, yes{}) : with(no{}, no{});
  }
}

// The block's output channels for images [first_image, first_image + images), finished:
// y = relu?(out + bias + residual) at kept positions, relu?(residual) or 0 at masked ones, in
// acc_t, rounded once to scalar_t. out (count, images * K), the GEMM's; null when K == 0.
// residual (null: none) and y in `layout`. Each plane is laid out densely in a row of scratch
// (L1-resident: out + bias at kept positions, 0 at masked ones), then finished into y in one
// pass, so every output element is written once.
template <typename scalar_t, typename acc_t>
void write_block_outputs(const acc_t* out, const acc_t* bias, const scalar_t* residual, bool relu,
                         const ConvGeometry& g, const OutputLayout& layout, const ChannelBlock& block,
                         int64_t first_image, int64_t images, scalar_t* y) {
  const int64_t hw = g.out_positions(), row_length = images * block.kept;
  // Image-major, so that threads writing channels_last planes share few cache lines.
  at::parallel_for(0, images * block.count, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> row(hw);
    for (int64_t image_channel = begin; image_channel < end; ++image_channel) {
      const int64_t n = image_channel / block.count, oc = image_channel % block.count;
      std::fill(row.begin(), row.end(), acc_t(0));
      if (out) {
        const acc_t shift = bias ? bias[block.first + oc] : acc_t(0);
        const acc_t* src = out + oc * row_length + n * block.kept;
        for (int64_t t = 0; t < block.kept; ++t) row[block.positions[t]] = src[t] + shift;
      }
      const int64_t plane = (first_image + n) * layout.image + (block.first + oc) * layout.channel;
      finish_row(row.data(), residual ? residual + plane : nullptr, relu, hw, layout.step, y + plane);
    }
  });
}

// grad_y[n, first + oc, position_t] -> dst (count, images * K): the kept part of the output gradient.
template <typename scalar_t>
void gather_kept_outputs(const scalar_t* grad_y, const ConvGeometry& g, const ChannelBlock& block,
                         int64_t first_image, int64_t images, scalar_t* dst) {
  const int64_t hw = g.out_positions(), row_length = images * block.kept;
  at::parallel_for(0, block.count * images, 1, [&](int64_t begin, int64_t end) {
    for (int64_t channel_image = begin; channel_image < end; ++channel_image) {
      const int64_t oc = channel_image / images, n = channel_image % images;
      const scalar_t* src = grad_y + ((first_image + n) * g.out_channels + block.first + oc) * hw;
      scalar_t* out = dst + oc * row_length + n * block.kept;
      for (int64_t t = 0; t < block.kept; ++t) out[t] = src[block.positions[t]];
    }
  });
}

// Images per gathered column matrix (see kMaxColumnElements).
int64_t batch_chunk(const ConvGeometry& g, const ChannelBlock& block) {
  const int64_t per_image = g.in_channels_per_group() * g.kernel_h * g.kernel_w * block.kept;
  return std::max<int64_t>(1, std::min<int64_t>(g.batch, kMaxColumnElements / std::max<int64_t>(1, per_image)));
}

// Half and bfloat16 run in float: the gathered GEMM and the col2im sums accumulate there.
at::ScalarType compute_type(at::ScalarType t) {
  return (t == at::kHalf || t == at::kBFloat16) ? at::kFloat : t;
}

// `t` in `type`, contiguous (N, C, H, W): at most one copy, converting and relaying out together.
// (Tensor::to with a memory format leaves a same-dtype tensor alone when its suggested format
// matches, strided or not: hence the .contiguous(), then a no-op unless no copy was made.)
at::Tensor contiguous_as(const at::Tensor& t, at::ScalarType type) {
  return t.to(type, /*non_blocking=*/false, /*copy=*/false, at::MemoryFormat::Contiguous).contiguous();
}

}  // namespace

at::Tensor portable_forward(const ConvGeometry& g, const at::Tensor& input, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, const at::Tensor& kept_offsets,
                            const at::Tensor& kept_positions, const at::Tensor& residual, bool relu) {
  // Output in the input's memory format and dtype, as F.conv2d returns it.
  const auto format = input.suggest_memory_format() == at::MemoryFormat::ChannelsLast ? at::MemoryFormat::ChannelsLast
                                                                                        : at::MemoryFormat::Contiguous;
  auto y = at::empty({g.batch, g.out_channels, g.out_height, g.out_width}, input.options().memory_format(format));
  if (y.numel() == 0) return y;
  const auto ctype = compute_type(input.scalar_type());
  // The gather reads (N, C, H, W) rows in the compute type: one conversion, none if the input is so already.
  const auto x = contiguous_as(input, ctype);
  const auto w = contiguous_as(weight, ctype).view({g.out_channels, -1});
  const bool has_bias = bias.has_value() && bias->defined();
  const auto b = has_bias ? contiguous_as(*bias, ctype) : at::Tensor();
  // Read in place where it already has the output's layout (the usual shortcut), else copied once.
  const auto r = residual.defined() ? residual.contiguous(format) : at::Tensor();
  const OutputLayout layout(g, format);
  const auto blocks = channel_blocks(g, kept_offsets, kept_positions);
  // One column buffer and one GEMM result buffer, sized for the largest block and reused.
  int64_t column_elements = 0, out_elements = 0;
  for (const auto& block : blocks) {
    const int64_t images = block.kept > 0 ? batch_chunk(g, block) : 0;
    column_elements = std::max(column_elements, w.size(1) * images * block.kept);
    out_elements = std::max(out_elements, block.count * images * block.kept);
  }
  auto column_buffer = at::empty({column_elements}, x.options());
  auto out_buffer = at::empty({out_elements}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "masked_conv2d_forward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* bias_data = has_bias ? b.data_ptr<acc_t>() : nullptr;
    const scalar_t* residual_data = r.defined() ? r.data_ptr<scalar_t>() : nullptr;
    for (const auto& block : blocks) {
      if (block.kept == 0) {  // fully masked: no conv, the outputs are relu?(residual) or 0
        write_block_outputs<scalar_t, acc_t>(nullptr, bias_data, residual_data, relu, g, layout, block, 0, g.batch,
                                             y.data_ptr<scalar_t>());
        continue;
      }
      const KeptOrigins origins(g, block);
      const int64_t chunk = batch_chunk(g, block);
      const auto w_block = w.narrow(0, block.first, block.count);
      for (int64_t first_image = 0; first_image < g.batch; first_image += chunk) {
        const int64_t images = std::min(chunk, g.batch - first_image);
        auto columns = column_buffer.narrow(0, 0, w.size(1) * images * block.kept).view({w.size(1), images * block.kept});
        gather_kept_columns(x.data_ptr<acc_t>(), g, block, origins, first_image, images, columns.data_ptr<acc_t>());
        auto out = out_buffer.narrow(0, 0, block.count * images * block.kept).view({block.count, images * block.kept});
        at::mm_out(out, w_block, columns);
        write_block_outputs<scalar_t, acc_t>(out.data_ptr<acc_t>(), bias_data, residual_data, relu, g, layout, block,
                                             first_image, images, y.data_ptr<scalar_t>());
      }
    }
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> portable_backward(const ConvGeometry& g, const at::Tensor& grad_output,
                                                                 const at::Tensor& relu_gate, const at::Tensor& input,
                                                                 const at::Tensor& weight,
                                                                 const at::Tensor& kept_offsets,
                                                                 const at::Tensor& kept_positions,
                                                                 std::array<bool, 3> output_mask) {
  const auto [need_input, need_weight, need_bias] = output_mask;
  const auto ctype = compute_type(input.scalar_type());
  const auto x = contiguous_as(input, ctype);
  const auto w = contiguous_as(weight, ctype).view({g.out_channels, -1});
  const auto gy = contiguous_as(grad_output, ctype);
  const auto gate = relu_gate.defined() ? contiguous_as(relu_gate, ctype) : at::Tensor();

  auto grad_input = need_input ? at::zeros(x.sizes(), x.options()) : at::empty({0}, input.options());
  auto grad_weight = need_weight ? at::zeros(w.sizes(), w.options()) : at::empty({0}, weight.options());
  auto grad_bias = need_bias ? at::zeros({g.out_channels}, x.options()) : at::empty({0}, input.options());

  if (gy.numel() > 0 && (need_input || need_weight || need_bias)) {
    const auto blocks = channel_blocks(g, kept_offsets, kept_positions);
    AT_DISPATCH_FLOATING_TYPES(ctype, "masked_conv2d_backward_cpu", [&] {
      for (const auto& block : blocks) {
        if (block.kept == 0) continue;  // fully masked: no gradient flows through
        const KeptOrigins origins(g, block);
        const int64_t chunk = batch_chunk(g, block);
        const auto w_block = w.narrow(0, block.first, block.count);
        for (int64_t first_image = 0; first_image < g.batch; first_image += chunk) {
          const int64_t images = std::min(chunk, g.batch - first_image);
          auto gy_kept = at::empty({block.count, images * block.kept}, x.options());
          gather_kept_outputs(gy.data_ptr<scalar_t>(), g, block, first_image, images, gy_kept.data_ptr<scalar_t>());
          if (gate.defined()) {  // a fused ReLU's gate, gathered at the same kept outputs, then applied
            auto gate_kept = at::empty_like(gy_kept);
            gather_kept_outputs(gate.data_ptr<scalar_t>(), g, block, first_image, images,
                                gate_kept.data_ptr<scalar_t>());
            gy_kept.masked_fill_(gate_kept.gt(0).logical_not_(), 0);
          }
          if (need_bias) grad_bias.narrow(0, block.first, block.count).add_(gy_kept.sum(1));
          if (need_weight) {
            auto columns = at::empty({w.size(1), images * block.kept}, x.options());
            gather_kept_columns(x.data_ptr<scalar_t>(), g, block, origins, first_image, images,
                                columns.data_ptr<scalar_t>());
            grad_weight.narrow(0, block.first, block.count).addmm_(gy_kept, columns.t());
          }
          if (need_input) {
            const auto grad_columns = at::mm(w_block.t(), gy_kept);
            scatter_add_kept_columns(grad_columns.data_ptr<scalar_t>(), g, block, origins, first_image, images,
                                     grad_input.data_ptr<scalar_t>());
          }
        }
      }
    });
  }
  if (need_input) {
    grad_input = grad_input.to(input.scalar_type(), /*non_blocking=*/false, /*copy=*/false, input.suggest_memory_format());
  }
  if (need_weight) grad_weight = grad_weight.view(weight.sizes()).to(weight.scalar_type());
  if (need_bias) grad_bias = grad_bias.to(input.scalar_type());
  return {grad_input, grad_weight, grad_bias};
}

}  // namespace cpu
}  // namespace rmask
