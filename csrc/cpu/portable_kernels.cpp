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
// float (opmath_t), rounded once when the output is written.

#include "portable_kernels.h"

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

std::vector<ChannelBlock> channel_blocks(const ConvGeometry& g, const Tensor& kept_offsets,
                                         const Tensor& kept_positions) {
  const int64_t* offsets = data<int64_t>(kept_offsets);
  const int64_t* positions = data<int64_t>(kept_positions);
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
  torch::stable::parallel_for(0, in_channels_per_group * taps, grain, [&](int64_t begin, int64_t end) {
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
  torch::stable::parallel_for(0, images * in_channels_per_group, 1, [&](int64_t begin, int64_t end) {
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
  OutputLayout(const ConvGeometry& g, MemoryFormat format) {
    const int64_t hw = g.out_positions();
    const bool channels_last = format == MemoryFormat::ChannelsLast;
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
  torch::stable::parallel_for(0, images * block.count, 1, [&](int64_t begin, int64_t end) {
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
  torch::stable::parallel_for(0, block.count * images, 1, [&](int64_t begin, int64_t end) {
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
ScalarType compute_type(ScalarType t) {
  return (t == ScalarType::Half || t == ScalarType::BFloat16) ? ScalarType::Float : t;
}

// f(scalar_t{}) with scalar_t the C++ type of a compute type (float or double).
template <typename F>
void dispatch_compute_type(ScalarType t, const F& f) {
  if (t == ScalarType::Double) {
    f(double{});
  } else {
    f(float{});
  }
}

// `t` in `type`, contiguous (N, C, H, W): at most one copy, converting and relaying out together.
// (Tensor::to with a memory format leaves a same-dtype tensor alone when its suggested format
// matches, strided or not: hence the contiguous(), then a no-op unless no copy was made.)
Tensor contiguous_as(const Tensor& t, ScalarType type) {
  return rmask::contiguous(rmask::to(t, type, MemoryFormat::Contiguous));
}

std::vector<int64_t> as_vector(IntArrayRef values) { return std::vector<int64_t>(values.begin(), values.end()); }

}  // namespace

Tensor portable_forward(const ConvGeometry& g, const Tensor& input, const Tensor& weight,
                        const std::optional<Tensor>& bias, const Tensor& kept_offsets, const Tensor& kept_positions,
                        const Tensor& residual, bool relu) {
  // Output in the input's memory format and dtype, as F.conv2d returns it.
  const auto format = suggest_memory_format(input);
  auto y = empty({g.batch, g.out_channels, g.out_height, g.out_width}, input.scalar_type(), input.device(), format);
  if (y.numel() == 0) return y;
  const auto ctype = compute_type(input.scalar_type());
  // The gather reads (N, C, H, W) rows in the compute type: one conversion, none if the input is so already.
  const auto x = contiguous_as(input, ctype);
  const auto w = rmask::view(contiguous_as(weight, ctype), {g.out_channels, -1});
  const bool has_bias = bias.has_value() && bias->defined();
  const auto b = has_bias ? contiguous_as(*bias, ctype) : Tensor();
  // Read in place where it already has the output's layout (the usual shortcut), else copied once.
  const auto r = residual.defined() ? rmask::contiguous(residual, format) : Tensor();
  const OutputLayout layout(g, format);
  const auto blocks = channel_blocks(g, kept_offsets, kept_positions);
  const int64_t columns_per_image = w.size(1);
  // One column buffer and one GEMM result buffer, sized for the largest block and reused.
  int64_t column_elements = 0, out_elements = 0;
  for (const auto& block : blocks) {
    const int64_t images = block.kept > 0 ? batch_chunk(g, block) : 0;
    column_elements = std::max(column_elements, columns_per_image * images * block.kept);
    out_elements = std::max(out_elements, block.count * images * block.kept);
  }
  auto column_buffer = empty({column_elements}, ctype, input.device());
  auto out_buffer = empty({out_elements}, ctype, input.device());
  RMASK_DISPATCH_FLOATING_TYPES(input.scalar_type(), "masked_conv2d_forward_cpu", [&] {
    using acc_t = opmath_t<scalar_t>;
    const acc_t* bias_data = has_bias ? data<acc_t>(b) : nullptr;
    const scalar_t* residual_data = r.defined() ? data<scalar_t>(r) : nullptr;
    scalar_t* y_data = data<scalar_t>(y);
    for (const auto& block : blocks) {
      if (block.kept == 0) {  // fully masked: no conv, the outputs are relu?(residual) or 0
        write_block_outputs<scalar_t, acc_t>(nullptr, bias_data, residual_data, relu, g, layout, block, 0, g.batch,
                                             y_data);
        continue;
      }
      const KeptOrigins origins(g, block);
      const int64_t chunk = batch_chunk(g, block);
      const auto w_block = rmask::narrow(w, 0, block.first, block.count);
      for (int64_t first_image = 0; first_image < g.batch; first_image += chunk) {
        const int64_t images = std::min(chunk, g.batch - first_image);
        const int64_t row_length = images * block.kept;
        auto columns = rmask::view(rmask::narrow(column_buffer, 0, 0, columns_per_image * row_length),
                                   {columns_per_image, row_length});
        gather_kept_columns(data<acc_t>(x), g, block, origins, first_image, images, data<acc_t>(columns));
        auto out = rmask::view(rmask::narrow(out_buffer, 0, 0, block.count * row_length), {block.count, row_length});
        rmask::mm_out(out, w_block, columns);
        write_block_outputs<scalar_t, acc_t>(data<acc_t>(out), bias_data, residual_data, relu, g, layout, block,
                                             first_image, images, y_data);
      }
    }
  });
  return y;
}

std::tuple<Tensor, Tensor, Tensor> portable_backward(const ConvGeometry& g, const Tensor& grad_output,
                                                     const Tensor& relu_gate, const Tensor& input, const Tensor& weight,
                                                     const Tensor& kept_offsets, const Tensor& kept_positions,
                                                     std::array<bool, 3> output_mask) {
  const auto [need_input, need_weight, need_bias] = output_mask;
  const auto ctype = compute_type(input.scalar_type());
  const auto device = input.device();
  const auto x = contiguous_as(input, ctype);
  const auto w = rmask::view(contiguous_as(weight, ctype), {g.out_channels, -1});
  const auto gy = contiguous_as(grad_output, ctype);
  const auto gate = relu_gate.defined() ? contiguous_as(relu_gate, ctype) : Tensor();
  const int64_t columns_per_image = w.size(1);

  auto grad_input = need_input ? zeros(x.sizes(), ctype, device) : empty({0}, input.scalar_type(), device);
  auto grad_weight = need_weight ? zeros(w.sizes(), ctype, device) : empty({0}, weight.scalar_type(), device);
  auto grad_bias = need_bias ? zeros({g.out_channels}, ctype, device) : empty({0}, input.scalar_type(), device);

  if (gy.numel() > 0 && (need_input || need_weight || need_bias)) {
    const auto blocks = channel_blocks(g, kept_offsets, kept_positions);
    dispatch_compute_type(ctype, [&](auto zero) {
      using scalar_t = decltype(zero);
      for (const auto& block : blocks) {
        if (block.kept == 0) continue;  // fully masked: no gradient flows through
        const KeptOrigins origins(g, block);
        const int64_t chunk = batch_chunk(g, block);
        const auto w_block = rmask::narrow(w, 0, block.first, block.count);
        for (int64_t first_image = 0; first_image < g.batch; first_image += chunk) {
          const int64_t images = std::min(chunk, g.batch - first_image);
          const int64_t row_length = images * block.kept, kept_elements = block.count * row_length;
          auto gy_kept = empty({block.count, row_length}, ctype, device);
          scalar_t* gy_kept_data = data<scalar_t>(gy_kept);
          gather_kept_outputs(data<scalar_t>(gy), g, block, first_image, images, gy_kept_data);
          if (gate.defined()) {  // a fused ReLU's gate, gathered at the same kept outputs, then applied
            std::vector<scalar_t> gate_kept(kept_elements);
            gather_kept_outputs(data<scalar_t>(gate), g, block, first_image, images, gate_kept.data());
            for (int64_t i = 0; i < kept_elements; ++i) {
              if (!(gate_kept[i] > scalar_t(0))) gy_kept_data[i] = scalar_t(0);
            }
          }
          if (need_bias) {
            const auto sums = rmask::sum(gy_kept, {1});
            const scalar_t* sum_data = data<scalar_t>(sums);
            scalar_t* grad_bias_data = data<scalar_t>(grad_bias) + block.first;
            for (int64_t oc = 0; oc < block.count; ++oc) grad_bias_data[oc] += sum_data[oc];
          }
          if (need_weight) {
            auto columns = empty({columns_per_image, row_length}, ctype, device);
            gather_kept_columns(data<scalar_t>(x), g, block, origins, first_image, images, data<scalar_t>(columns));
            const auto columns_t = torch::stable::transpose(columns, 0, 1);
            auto grad_weight_rows = rmask::narrow(grad_weight, 0, block.first, block.count);
            // The block's own rows (blocks partition the channels): the first chunk's product
            // written, the others' added.
            if (first_image == 0) {
              rmask::mm_out(grad_weight_rows, gy_kept, columns_t);
            } else {
              const auto product = rmask::mm(gy_kept, columns_t);
              const scalar_t* product_data = data<scalar_t>(product);
              scalar_t* rows_data = data<scalar_t>(grad_weight_rows);
              for (int64_t i = 0; i < block.count * columns_per_image; ++i) rows_data[i] += product_data[i];
            }
          }
          if (need_input) {
            const auto grad_columns = rmask::mm(torch::stable::transpose(w_block, 0, 1), gy_kept);
            scatter_add_kept_columns(data<scalar_t>(grad_columns), g, block, origins, first_image, images,
                                     data<scalar_t>(grad_input));
          }
        }
      }
    });
  }
  if (need_input) grad_input = rmask::to(grad_input, input.scalar_type(), suggest_memory_format(input));
  if (need_weight) grad_weight = rmask::to(rmask::view(grad_weight, as_vector(weight.sizes())), weight.scalar_type());
  if (need_bias) grad_bias = rmask::to(grad_bias, input.scalar_type());
  return {grad_input, grad_weight, grad_bias};
}

}  // namespace cpu
}  // namespace rmask
