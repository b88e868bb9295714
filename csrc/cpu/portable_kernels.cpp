// The portable CPU kernels (portable_kernels.h): gather, GEMM, scatter, for the kept outputs only.
//
// The output channels split into blocks that share one mask pattern and one conv group
// (a pattern's channels intersected with a group's). For each block:
//   gather  the im2col columns of its kept positions only   columns  (Cin/g * kh * kw, N * K)
//   GEMM    weight rows of the block times columns          out      (channels, N * K)
//   scatter out into the zero-filled output
// so the work is proportional to the kept outputs. The backward pass reuses the same
// gathered columns: grad_weight = grad_out_kept @ columns^T,
// grad_input = col2im(W^T @ grad_out_kept). Every output element is written by one thread in
// a fixed order (no racy accumulation): exact and deterministic. Half and bfloat16 compute in
// float.

#include "portable_kernels.h"

#include <ATen/Parallel.h>

#include <algorithm>
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
  int64_t kept;              // how many
};

std::vector<ChannelBlock> channel_blocks(const ConvGeometry& g, const at::Tensor& kept_offsets,
                                         const at::Tensor& kept_positions) {
  const int64_t* offsets = kept_offsets.data_ptr<int64_t>();
  const int64_t* positions = kept_positions.data_ptr<int64_t>();
  std::vector<ChannelBlock> blocks;
  const int64_t out_channels_per_group = g.out_channels_per_group();
  for (int64_t pattern = 0; pattern < g.patterns; ++pattern) {
    const int64_t kept = offsets[pattern + 1] - offsets[pattern];
    if (kept == 0) continue;  // fully masked pattern: its outputs stay zero, no work
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

// out (count, images * K) -> y[n, first + oc, position_t] (+ bias).
template <typename scalar_t>
void scatter_kept_outputs(const scalar_t* out, const scalar_t* bias, const ConvGeometry& g, const ChannelBlock& block,
                          int64_t first_image, int64_t images, scalar_t* y) {
  const int64_t hw = g.out_positions(), row_length = images * block.kept;
  at::parallel_for(0, block.count * images, 1, [&](int64_t begin, int64_t end) {
    for (int64_t channel_image = begin; channel_image < end; ++channel_image) {
      const int64_t oc = channel_image / images, n = channel_image % images;
      const scalar_t shift = bias ? bias[block.first + oc] : scalar_t(0);
      const scalar_t* src = out + oc * row_length + n * block.kept;
      scalar_t* dst = y + ((first_image + n) * g.out_channels + block.first + oc) * hw;
      for (int64_t t = 0; t < block.kept; ++t) dst[block.positions[t]] = src[t] + shift;
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

}  // namespace

at::Tensor portable_forward(const ConvGeometry& g, const at::Tensor& input, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, const at::Tensor& kept_offsets,
                            const at::Tensor& kept_positions, const at::Tensor& residual, bool relu) {
  const auto ctype = compute_type(input.scalar_type());
  const auto x = input.to(ctype).contiguous();
  const auto w = weight.to(ctype).contiguous().view({g.out_channels, -1});
  const bool has_bias = bias.has_value() && bias->defined();
  const auto b = has_bias ? bias->to(ctype).contiguous() : at::Tensor();
  auto y = at::zeros({g.batch, g.out_channels, g.out_height, g.out_width}, x.options());
  if (y.numel() > 0 && x.numel() > 0) {
    const auto blocks = channel_blocks(g, kept_offsets, kept_positions);
    AT_DISPATCH_FLOATING_TYPES(ctype, "masked_conv2d_forward_cpu", [&] {
      for (const auto& block : blocks) {
        const KeptOrigins origins(g, block);
        const int64_t chunk = batch_chunk(g, block);
        const auto w_block = w.narrow(0, block.first, block.count);
        for (int64_t first_image = 0; first_image < g.batch; first_image += chunk) {
          const int64_t images = std::min(chunk, g.batch - first_image);
          auto columns = at::empty({w.size(1), images * block.kept}, x.options());
          gather_kept_columns(x.data_ptr<scalar_t>(), g, block, origins, first_image, images,
                              columns.data_ptr<scalar_t>());
          const auto out = at::mm(w_block, columns);
          scatter_kept_outputs(out.data_ptr<scalar_t>(), has_bias ? b.data_ptr<scalar_t>() : nullptr, g, block,
                               first_image, images, y.data_ptr<scalar_t>());
        }
      }
    });
  }
  if (residual.defined()) y.add_(residual.to(ctype));
  if (relu) y.clamp_min_(0);
  // Output in the input's memory format and dtype, as F.conv2d returns it.
  return y.to(input.scalar_type()).contiguous(input.suggest_memory_format());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> portable_backward(const ConvGeometry& g, const at::Tensor& grad_output,
                                                                 const at::Tensor& relu_gate, const at::Tensor& input,
                                                                 const at::Tensor& weight,
                                                                 const at::Tensor& kept_offsets,
                                                                 const at::Tensor& kept_positions,
                                                                 std::array<bool, 3> output_mask) {
  const auto [need_input, need_weight, need_bias] = output_mask;
  const auto ctype = compute_type(input.scalar_type());
  const auto x = input.to(ctype).contiguous();
  const auto w = weight.to(ctype).contiguous().view({g.out_channels, -1});
  const auto gy = grad_output.to(ctype).contiguous();
  const auto gate = relu_gate.defined() ? relu_gate.to(ctype).contiguous() : at::Tensor();

  auto grad_input = need_input ? at::zeros(x.sizes(), x.options()) : at::empty({0}, input.options());
  auto grad_weight = need_weight ? at::zeros(w.sizes(), w.options()) : at::empty({0}, weight.options());
  auto grad_bias = need_bias ? at::zeros({g.out_channels}, x.options()) : at::empty({0}, input.options());

  if (gy.numel() > 0 && (need_input || need_weight || need_bias)) {
    const auto blocks = channel_blocks(g, kept_offsets, kept_positions);
    AT_DISPATCH_FLOATING_TYPES(ctype, "masked_conv2d_backward_cpu", [&] {
      for (const auto& block : blocks) {
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
  if (need_input) grad_input = grad_input.to(input.scalar_type()).contiguous(input.suggest_memory_format());
  if (need_weight) grad_weight = grad_weight.view(weight.sizes()).to(weight.scalar_type());
  if (need_bias) grad_bias = grad_bias.to(input.scalar_type());
  return {grad_input, grad_weight, grad_bias};
}

}  // namespace cpu
}  // namespace rmask
