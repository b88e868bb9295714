// CPU kernels of rmask::masked_conv2d: compute only the kept outputs.
//
// The output channels split into blocks that share one mask pattern and one conv group
// (a pattern's channels intersected with a group's). For each block:
//   gather  the im2col columns of its kept positions only   cols  (Cin/g * kh * kw, N * K)
//   GEMM    weight rows of the block times cols             out   (channels, N * K)
//   scatter out into the zero-filled output
// so the work is proportional to the kept outputs. The backward pass reuses the same
// gathered columns: grad_weight = grad_out_kept @ cols^T, grad_input = col2im(W^T @ grad_out_kept).
// Layout and micro-kernel tuning is the job of the fast-kernel work; this version is
// simple, exact and deterministic (no racy accumulation).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "../masked_conv2d_common.h"

namespace rmask {
namespace {

// Keep one gathered column matrix under about 64 MiB of fp32 by walking the batch in chunks.
constexpr int64_t kMaxColumnElements = int64_t{1} << 24;

// The channels [first, first + count) sharing mask pattern `pattern` and conv group `group`.
struct ChannelBlock {
  int64_t group, first, count;
  const int64_t* positions;  // kept flat output positions of the block's pattern
  int64_t kept;              // how many
};

std::vector<ChannelBlock> channel_blocks(const ConvGeometry& g, const at::Tensor& offsets, const at::Tensor& positions) {
  const int64_t* off = offsets.data_ptr<int64_t>();
  const int64_t* pos = positions.data_ptr<int64_t>();
  std::vector<ChannelBlock> blocks;
  const int64_t cog = g.out_channels_per_group();
  for (int64_t p = 0; p < g.patterns; ++p) {
    const int64_t kept = off[p + 1] - off[p];
    if (kept == 0) continue;  // fully masked pattern: its outputs stay zero, no work
    const int64_t p_first = p * g.channels_per_pattern, p_last = p_first + g.channels_per_pattern;
    for (int64_t grp = p_first / cog; grp * cog < p_last; ++grp) {
      const int64_t first = std::max(p_first, grp * cog);
      const int64_t last = std::min(p_last, (grp + 1) * cog);
      blocks.push_back({grp, first, last - first, pos + off[p], kept});
    }
  }
  return blocks;
}

void check_kept_index(const ConvGeometry& g, const at::Tensor& offsets, const at::Tensor& positions) {
  const int64_t* off = offsets.data_ptr<int64_t>();
  TORCH_CHECK(off[0] == 0 && off[g.patterns] == positions.numel(),
              "masked_conv2d: kept_offsets must start at 0 and end at kept_positions.numel() = ", positions.numel(),
              ", got ", off[0], " and ", off[g.patterns]);
  for (int64_t p = 0; p < g.patterns; ++p) {
    TORCH_CHECK(off[p + 1] >= off[p], "masked_conv2d: kept_offsets must be non-decreasing");
  }
  if (positions.numel() > 0) {
    const auto [lo, hi] = at::aminmax(positions);
    TORCH_CHECK(lo.item<int64_t>() >= 0 && hi.item<int64_t>() < g.out_positions(),
                "masked_conv2d: kept_positions must lie in [0, ", g.out_positions(), "), got values in [",
                lo.item<int64_t>(), ", ", hi.item<int64_t>(), "]");
  }
}

// Per kept position t: the input row/column of kernel tap (0, 0), padding applied.
struct KeptOrigins {
  std::vector<int64_t> h, w;
  KeptOrigins(const ConvGeometry& g, const ChannelBlock& b) : h(b.kept), w(b.kept) {
    for (int64_t t = 0; t < b.kept; ++t) {
      h[t] = (b.positions[t] / g.out_width) * g.stride_h - g.pad_h;
      w[t] = (b.positions[t] % g.out_width) * g.stride_w - g.pad_w;
    }
  }
};

// cols[(c * kh + i) * kw + j][(n - n0) * K + t] = x[n, c_first + c, ih, iw], zero outside the image.
template <typename scalar_t>
void gather_kept_columns(const scalar_t* x, const ConvGeometry& g, const ChannelBlock& b, const KeptOrigins& o,
                         int64_t n0, int64_t nb, scalar_t* cols) {
  const int64_t cig = g.in_channels_per_group(), kk = g.kernel_h * g.kernel_w;
  const int64_t c_first = b.group * cig, ncols = nb * b.kept;
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, ncols));
  at::parallel_for(0, cig * kk, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t c = r / kk, i = (r % kk) / g.kernel_w, j = r % g.kernel_w;
      const int64_t dh = i * g.dilation_h, dw = j * g.dilation_w;
      scalar_t* row = cols + r * ncols;
      for (int64_t n = 0; n < nb; ++n) {
        const scalar_t* plane = x + ((n0 + n) * g.in_channels + c_first + c) * g.height * g.width;
        scalar_t* dst = row + n * b.kept;
        for (int64_t t = 0; t < b.kept; ++t) {
          const int64_t ih = o.h[t] + dh, iw = o.w[t] + dw;
          const bool inside = ih >= 0 && ih < g.height && iw >= 0 && iw < g.width;
          dst[t] = inside ? plane[ih * g.width + iw] : scalar_t(0);
        }
      }
    }
  });
}

// The adjoint of gather_kept_columns: grad_x[n, c_first + c, ih, iw] += dcols[...].
// Parallel over (image, channel) planes, each written by one thread in a fixed order.
template <typename scalar_t>
void scatter_add_kept_columns(const scalar_t* dcols, const ConvGeometry& g, const ChannelBlock& b,
                              const KeptOrigins& o, int64_t n0, int64_t nb, scalar_t* grad_x) {
  const int64_t cig = g.in_channels_per_group(), kk = g.kernel_h * g.kernel_w;
  const int64_t c_first = b.group * cig, ncols = nb * b.kept;
  at::parallel_for(0, nb * cig, 1, [&](int64_t begin, int64_t end) {
    for (int64_t nc = begin; nc < end; ++nc) {
      const int64_t n = nc / cig, c = nc % cig;
      scalar_t* plane = grad_x + ((n0 + n) * g.in_channels + c_first + c) * g.height * g.width;
      for (int64_t r = c * kk; r < (c + 1) * kk; ++r) {
        const int64_t i = (r % kk) / g.kernel_w, j = r % g.kernel_w;
        const int64_t dh = i * g.dilation_h, dw = j * g.dilation_w;
        const scalar_t* src = dcols + r * ncols + n * b.kept;
        for (int64_t t = 0; t < b.kept; ++t) {
          const int64_t ih = o.h[t] + dh, iw = o.w[t] + dw;
          if (ih >= 0 && ih < g.height && iw >= 0 && iw < g.width) plane[ih * g.width + iw] += src[t];
        }
      }
    }
  });
}

// out (count, nb * K) -> y[n, first + o, position_t] (+ bias).
template <typename scalar_t>
void scatter_kept_outputs(const scalar_t* out, const scalar_t* bias, const ConvGeometry& g, const ChannelBlock& b,
                          int64_t n0, int64_t nb, scalar_t* y) {
  const int64_t hw = g.out_positions(), ncols = nb * b.kept;
  at::parallel_for(0, b.count * nb, 1, [&](int64_t begin, int64_t end) {
    for (int64_t on = begin; on < end; ++on) {
      const int64_t oc = on / nb, n = on % nb;
      const scalar_t shift = bias ? bias[b.first + oc] : scalar_t(0);
      const scalar_t* src = out + oc * ncols + n * b.kept;
      scalar_t* dst = y + ((n0 + n) * g.out_channels + b.first + oc) * hw;
      for (int64_t t = 0; t < b.kept; ++t) dst[b.positions[t]] = src[t] + shift;
    }
  });
}

// grad_y[n, first + o, position_t] -> dst (count, nb * K): the kept part of the output gradient.
template <typename scalar_t>
void gather_kept_outputs(const scalar_t* grad_y, const ConvGeometry& g, const ChannelBlock& b, int64_t n0, int64_t nb,
                         scalar_t* dst) {
  const int64_t hw = g.out_positions(), ncols = nb * b.kept;
  at::parallel_for(0, b.count * nb, 1, [&](int64_t begin, int64_t end) {
    for (int64_t on = begin; on < end; ++on) {
      const int64_t oc = on / nb, n = on % nb;
      const scalar_t* src = grad_y + ((n0 + n) * g.out_channels + b.first + oc) * hw;
      scalar_t* out = dst + oc * ncols + n * b.kept;
      for (int64_t t = 0; t < b.kept; ++t) out[t] = src[b.positions[t]];
    }
  });
}

int64_t batch_chunk(const ConvGeometry& g, const ChannelBlock& b) {
  const int64_t per_image = g.in_channels_per_group() * g.kernel_h * g.kernel_w * b.kept;
  return std::max<int64_t>(1, std::min<int64_t>(g.batch, kMaxColumnElements / std::max<int64_t>(1, per_image)));
}

// Half and bfloat16 run in float: the gathered GEMM and the col2im sums accumulate there.
at::ScalarType compute_type(at::ScalarType t) {
  return (t == at::kHalf || t == at::kBFloat16) ? at::kFloat : t;
}

at::Tensor masked_conv2d_forward_kernel(const at::Tensor& input, const at::Tensor& weight,
                                        const std::optional<at::Tensor>& bias, const at::Tensor& mask,
                                        const at::Tensor& kept_offsets, const at::Tensor& kept_positions,
                                        at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                        int64_t groups) {
  const ConvGeometry g =
      check_masked_conv2d_args(input, weight, bias, mask, kept_offsets, kept_positions, stride, padding, dilation, groups);
  const auto offsets = kept_offsets.contiguous(), positions = kept_positions.contiguous();
  check_kept_index(g, offsets, positions);
  const auto ctype = compute_type(input.scalar_type());
  const auto x = input.to(ctype).contiguous();
  const auto w = weight.to(ctype).contiguous().view({g.out_channels, -1});
  const bool has_bias = bias.has_value() && bias->defined();
  const auto b = has_bias ? bias->to(ctype).contiguous() : at::Tensor();
  auto y = at::zeros({g.batch, g.out_channels, g.out_height, g.out_width}, x.options());
  if (y.numel() > 0 && x.numel() > 0) {
    const auto blocks = channel_blocks(g, offsets, positions);
    AT_DISPATCH_FLOATING_TYPES(ctype, "masked_conv2d_forward_cpu", [&] {
      for (const auto& blk : blocks) {
        const KeptOrigins origins(g, blk);
        const int64_t chunk = batch_chunk(g, blk);
        const auto w_block = w.narrow(0, blk.first, blk.count);
        for (int64_t n0 = 0; n0 < g.batch; n0 += chunk) {
          const int64_t nb = std::min(chunk, g.batch - n0);
          auto cols = at::empty({w.size(1), nb * blk.kept}, x.options());
          gather_kept_columns(x.data_ptr<scalar_t>(), g, blk, origins, n0, nb, cols.data_ptr<scalar_t>());
          const auto out = at::mm(w_block, cols);
          scatter_kept_outputs(out.data_ptr<scalar_t>(), has_bias ? b.data_ptr<scalar_t>() : nullptr, g, blk, n0, nb,
                               y.data_ptr<scalar_t>());
        }
      }
    });
  }
  // Output in the input's memory format and dtype, as F.conv2d returns it.
  return y.to(input.scalar_type()).contiguous(input.suggest_memory_format());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_conv2d_backward_kernel(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight, const at::Tensor& mask,
    const at::Tensor& kept_offsets, const at::Tensor& kept_positions, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, int64_t groups, std::array<bool, 3> output_mask) {
  const ConvGeometry g = check_masked_conv2d_args(input, weight, std::nullopt, mask, kept_offsets, kept_positions,
                                                  stride, padding, dilation, groups);
  TORCH_CHECK(grad_output.sizes() == at::IntArrayRef({g.batch, g.out_channels, g.out_height, g.out_width}),
              "masked_conv2d_backward: grad_output must have shape (", g.batch, ", ", g.out_channels, ", ",
              g.out_height, ", ", g.out_width, "), got ", grad_output.sizes());
  TORCH_CHECK(grad_output.scalar_type() == input.scalar_type(), "masked_conv2d_backward: grad_output dtype must be ",
              input.scalar_type(), ", got ", grad_output.scalar_type());
  const auto offsets = kept_offsets.contiguous(), positions = kept_positions.contiguous();
  check_kept_index(g, offsets, positions);
  const auto [need_input, need_weight, need_bias] = output_mask;
  const auto ctype = compute_type(input.scalar_type());
  const auto x = input.to(ctype).contiguous();
  const auto w = weight.to(ctype).contiguous().view({g.out_channels, -1});
  const auto gy = grad_output.to(ctype).contiguous();

  auto grad_input = need_input ? at::zeros(x.sizes(), x.options()) : at::empty({0}, input.options());
  auto grad_weight = need_weight ? at::zeros(w.sizes(), w.options()) : at::empty({0}, weight.options());
  auto grad_bias = need_bias ? at::zeros({g.out_channels}, x.options()) : at::empty({0}, input.options());

  if (gy.numel() > 0 && (need_input || need_weight || need_bias)) {
    const auto blocks = channel_blocks(g, offsets, positions);
    AT_DISPATCH_FLOATING_TYPES(ctype, "masked_conv2d_backward_cpu", [&] {
      for (const auto& blk : blocks) {
        const KeptOrigins origins(g, blk);
        const int64_t chunk = batch_chunk(g, blk);
        const auto w_block = w.narrow(0, blk.first, blk.count);
        for (int64_t n0 = 0; n0 < g.batch; n0 += chunk) {
          const int64_t nb = std::min(chunk, g.batch - n0);
          auto gy_kept = at::empty({blk.count, nb * blk.kept}, x.options());
          gather_kept_outputs(gy.data_ptr<scalar_t>(), g, blk, n0, nb, gy_kept.data_ptr<scalar_t>());
          if (need_bias) grad_bias.narrow(0, blk.first, blk.count).add_(gy_kept.sum(1));
          if (need_weight) {
            auto cols = at::empty({w.size(1), nb * blk.kept}, x.options());
            gather_kept_columns(x.data_ptr<scalar_t>(), g, blk, origins, n0, nb, cols.data_ptr<scalar_t>());
            grad_weight.narrow(0, blk.first, blk.count).addmm_(gy_kept, cols.t());
          }
          if (need_input) {
            const auto dcols = at::mm(w_block.t(), gy_kept);
            scatter_add_kept_columns(dcols.data_ptr<scalar_t>(), g, blk, origins, n0, nb,
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

}  // namespace

TORCH_LIBRARY_IMPL(rmask, CPU, m) {
  m.impl("masked_conv2d", &masked_conv2d_forward_kernel);
  m.impl("masked_conv2d_backward", &masked_conv2d_backward_kernel);
}

}  // namespace rmask
