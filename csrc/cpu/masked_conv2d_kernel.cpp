// CPU kernels of rmask::masked_conv2d: compute only the kept outputs.
//
// Two paths. float32 with groups == 1 on an AVX2 or AVX-512 CPU takes the batch-vector
// kernels (batch_vector.h: the batch in the SIMD lanes, per-position kept-channel lists, no
// im2col).
// Everything else (float64, reduced precision, groups > 1, other CPUs) takes the portable
// gather-GEMM-scatter path below, which is exact and deterministic but slower:
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
#include <ATen/Version.h>
#include <torch/library.h>

#include <algorithm>
#include <string>
#include <vector>

#include "../masked_conv2d_common.h"
#include "batch_vector.h"
#include "output_cache.h"

// at::parallel_for is a header template over `#pragma omp parallel` in an OpenMP build of
// torch: compiled without OpenMP, every kernel here would silently run on one thread.
#if defined(__linux__) && AT_PARALLEL_OPENMP && !defined(_OPENMP)
#error "rmask CPU kernels must be compiled with OpenMP (-fopenmp) against this torch, or at::parallel_for runs serially"
#endif

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

// Every value of the int64 `index` in [0, end). A plain loop: at::aminmax plus the .item()
// reads cost ~25 us a call, an eighth of a small spatial forward.
void check_range(const at::Tensor& index, int64_t end, const char* name) {
  if (index.numel() == 0) return;
  const int64_t* v = index.data_ptr<int64_t>();
  int64_t lo = v[0], hi = v[0];
  for (int64_t i = 1; i < index.numel(); ++i) {
    lo = std::min(lo, v[i]);
    hi = std::max(hi, v[i]);
  }
  TORCH_CHECK(lo >= 0 && hi < end, "masked_conv2d: ", name, " must lie in [0, ", end, "), got values in [",
              lo, ", ", hi, "]");
}

void check_kept_index(const ConvGeometry& g, const at::Tensor& offsets, const at::Tensor& positions,
                      const at::Tensor& position_offsets, const at::Tensor& position_channels) {
  const int64_t* off = offsets.data_ptr<int64_t>();
  TORCH_CHECK(off[0] == 0 && off[g.patterns] == positions.numel(),
              "masked_conv2d: kept_offsets must start at 0 and end at kept_positions.numel() = ", positions.numel(),
              ", got ", off[0], " and ", off[g.patterns]);
  for (int64_t p = 0; p < g.patterns; ++p) {
    TORCH_CHECK(off[p + 1] >= off[p], "masked_conv2d: kept_offsets must be non-decreasing");
  }
  check_range(positions, g.out_positions(), "kept_positions");
  const int64_t* po = position_offsets.data_ptr<int64_t>();
  const int64_t pairs = positions.numel() * g.channels_per_pattern;
  TORCH_CHECK(po[0] == 0 && po[g.out_positions()] == position_channels.numel() && position_channels.numel() == pairs,
              "masked_conv2d: position_offsets/position_channels must list the ", pairs,
              " kept (position, channel) pairs of kept_offsets/kept_positions, got ", position_channels.numel(),
              " channels and offsets from ", po[0], " to ", po[g.out_positions()]);
  for (int64_t p = 0; p < g.out_positions(); ++p) {
    TORCH_CHECK(po[p + 1] >= po[p], "masked_conv2d: position_offsets must be non-decreasing");
  }
  check_range(position_channels, g.out_channels, "position_channels");
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

// ---------------------------------------------------------------------------------
// Batch-vector path (float32, groups == 1, AVX2 or AVX-512)

// The batch-vector kernels for this CPU, chosen once: AVX-512 where ATen's own kernels may
// use it (at::get_cpu_capability honours ATEN_CPU_CAPABILITY, so that variable forces the
// AVX2 kernels on an AVX-512 CPU), else AVX2; null on other CPUs.
const cpu::BatchVectorKernels* batch_vector_kernels() {
  static const cpu::BatchVectorKernels* kernels = cpu::best_batch_vector_kernels(at::get_cpu_capability() == "AVX512");
  return kernels;
}

bool use_batch_vector(const ConvGeometry& g, const at::Tensor& input) {
  // Kernel heights above 64 (the kernels' fixed per-row tables) take the portable path.
  return batch_vector_kernels() && input.scalar_type() == at::kFloat && g.groups == 1 && g.batch > 0 &&
         g.kernel_h <= 64;
}

cpu::BatchVectorGeometry batch_vector_geometry(const ConvGeometry& g) {
  const int64_t padded = (g.batch + cpu::kBatchBlock - 1) / cpu::kBatchBlock * cpu::kBatchBlock;
  return {g.batch,      padded,     g.in_channels, g.height,     g.width,    g.out_channels,
          g.kernel_h,   g.kernel_w, g.out_height,  g.out_width,  g.stride_h, g.stride_w,
          g.pad_h,      g.pad_w,    g.dilation_h,  g.dilation_w};
}

// Per-thread scratch that outlives the call: the panels are hundreds of KiB, and a fresh
// allocation of that size is a fresh mmap whose pages fault in on every call. Aligned to a
// cache line: malloc's large blocks start 16 bytes into one, so every 64-byte vector load
// from them straddled two lines (the neuron tiles ran at ~100 GFLOP/s a core, the spatial
// ones, loading from 64-byte-aligned ATen memory, at ~160).
float* thread_scratch(int slot, size_t floats) {
  constexpr size_t kLineFloats = 64 / sizeof(float);
  static thread_local std::vector<float> buffers[3];
  auto& buffer = buffers[slot];
  if (buffer.size() < floats + kLineFloats) buffer.resize(floats + kLineFloats);
  const auto address = reinterpret_cast<uintptr_t>(buffer.data());
  return buffer.data() + (64 - address % 64) % 64 / sizeof(float);
}

// A 4-D tensor the kernels can address directly: NCHW- or NHWC-contiguous (else a copy).
at::Tensor addressable(const at::Tensor& t) {
  if (t.is_contiguous() || t.is_contiguous(at::MemoryFormat::ChannelsLast)) return t;
  return t.contiguous(t.suggest_memory_format());
}

cpu::Strides strides_of(const at::Tensor& t) {
  // Both supported layouts keep (h, w) as one flat position axis; a size-1 dim's stride is arbitrary.
  const int64_t position = t.size(3) > 1 ? t.stride(3) : (t.size(2) > 1 ? t.stride(2) : 1);
  return {t.stride(0), t.stride(1), position};
}

// Output rows split into one chunk per thread (at most one per row): a fixed split, so partial
// results kept per chunk and summed in chunk order are deterministic for a thread count.
int64_t row_chunks(int64_t rows) { return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), rows)); }

// f(chunk, first_row, last_row) for every non-empty chunk of row_chunks(rows), in parallel.
template <typename F>
void parallel_row_chunks(int64_t rows, const F& f) {
  const int64_t chunks = row_chunks(rows), rows_per_chunk = (rows + chunks - 1) / chunks;
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      const int64_t first = chunk * rows_per_chunk, last = std::min(rows, first + rows_per_chunk);
      if (first < last) f(chunk, first, last);
    }
  });
}

// Whether the per-image kernels for spatial masks serve this call: one mask pattern shared by
// every channel (the kept index's by-pattern form then lists the kept positions, ascending).
bool spatial_mask(const ConvGeometry& g, const at::Tensor& kept_positions) {
  return g.patterns == 1 && kept_positions.numel() > 0;
}

// The forward for spatial masks (see spatial_mask): BatchVectorKernels::forward_positions,
// one image per visit, so no layout step over the whole batch (the batch-vector forward lays
// out every input row for all images: at keep 0.1 that fixed part was half its time). Partial
// channel sums per chunk of images, added in chunk order.
at::Tensor full_positions_forward(const ConvGeometry& g, const at::Tensor& input, const at::Tensor& weight,
                                  const std::optional<at::Tensor>& bias, const at::Tensor& positions, bool relu,
                                  at::Tensor* channel_sums, const at::Tensor& residual) {
  const auto bg = batch_vector_geometry(g);
  const auto* kernels = batch_vector_kernels();
  const auto x = addressable(input);
  const auto xs = strides_of(x);
  const int64_t cout_pad = kernels->padded_channels(g.out_channels);
  auto w_p = at::empty({g.kernel_h, g.kernel_w, g.in_channels, cout_pad}, weight.options());  // [kh][kw][Cin][Cout_pad]
  const auto w = weight.contiguous();
  const int64_t lanes = kernels->padded_channels(1), k_total = g.in_channels * g.kernel_h * g.kernel_w;
  at::parallel_for(0, (k_total + lanes - 1) / lanes, 1, [&](int64_t begin, int64_t end) {  // serial: 20-50 us
    kernels->pack_position_weights(w.data_ptr<float>(), g.out_channels, g.in_channels, g.kernel_h * g.kernel_w,
                                   w_p.data_ptr<float>(), cout_pad, begin * lanes, std::min(k_total, end * lanes));
  });
  const bool has_bias = bias.has_value() && bias->defined();
  std::vector<float> b_p(has_bias ? cout_pad : 0, 0.0f);  // ATen's pad is a clone even with no padding: ~15 us
  if (has_bias) {
    const auto b = bias->contiguous();
    std::copy_n(b.data_ptr<float>(), g.out_channels, b_p.begin());
  }
  auto y = cpu::empty_output({g.batch, g.out_channels, g.out_height, g.out_width}, input.options(),
                             input.suggest_memory_format());
  const auto res = residual.defined() ? residual.contiguous(input.suggest_memory_format()) : at::Tensor();
  auto partial = channel_sums ? at::zeros({row_chunks(g.batch), 2, g.out_channels}, input.options().dtype(at::kDouble))
                              : at::Tensor();
  const int64_t scratch_size = (xs.c == 1 ? 0 : g.height * g.width * g.in_channels) +
                               positions.numel() * (cout_pad + g.out_channels) + cpu::kBatchBlock;
  parallel_row_chunks(g.batch, [&](int64_t chunk, int64_t first, int64_t last) {
    std::vector<const float*> x_taps(8 * g.kernel_h * g.kernel_w);
    const std::vector<float> zeros(g.in_channels, 0.0f);
    kernels->forward_positions(bg, x.data_ptr<float>(), xs, w_p.data_ptr<float>(), cout_pad,
                               has_bias ? b_p.data() : nullptr, relu, positions.data_ptr<int64_t>(),
                               positions.numel(), first, last,
                               res.defined() ? res.data_ptr<float>() : nullptr, y.data_ptr<float>(), strides_of(y),
                               x_taps.data(), zeros.data(), thread_scratch(2, scratch_size),
                               channel_sums ? partial[chunk].data_ptr<double>() : nullptr);
  });
  if (channel_sums) *channel_sums = partial.sum(0);
  return y;
}

// The forward; with `channel_sums` (a (2, Cout) float64 tensor) also the per-channel sums
// and sums of squares, accumulated per chunk of rows and added up in chunk order
// (deterministic for a given thread count).
at::Tensor batch_vector_forward(const ConvGeometry& g, const at::Tensor& input, const at::Tensor& weight,
                                const std::optional<at::Tensor>& bias, const at::Tensor& kept_positions,
                                const at::Tensor& position_offsets, const at::Tensor& position_channels, bool relu,
                                at::Tensor* channel_sums = nullptr, const at::Tensor& residual = at::Tensor()) {
  if (spatial_mask(g, kept_positions))
    return full_positions_forward(g, input, weight, bias, kept_positions, relu, channel_sums, residual);
  const auto bg = batch_vector_geometry(g);
  const auto x = addressable(input);
  const auto w_f = weight.permute({0, 2, 3, 1}).contiguous();  // [Cout][kh][kw][Cin]
  const auto b = (bias.has_value() && bias->defined()) ? bias->contiguous() : at::Tensor();
  // Every element is written by the kernel (masked ones as zeros).
  auto y = cpu::empty_output({g.batch, g.out_channels, g.out_height, g.out_width}, input.options(),
                             input.suggest_memory_format());
  const auto res = residual.defined() ? residual.contiguous(input.suggest_memory_format()) : at::Tensor();  // y's layout
  const int64_t slots = cpu::panel_ring_rows(bg);
  auto partial = channel_sums ? at::zeros({row_chunks(g.out_height), 2, g.out_channels},
                                          input.options().dtype(at::kDouble))
                              : at::Tensor();
  parallel_row_chunks(g.out_height, [&](int64_t chunk, int64_t first, int64_t last) {
    std::vector<int64_t> taps(2 * g.kernel_h * g.kernel_w), panel_rows(slots);
    float* panels = thread_scratch(0, slots * g.width * g.in_channels * bg.padded_batch);
    float* staging = thread_scratch(1, g.batch * (g.out_channels * g.out_width + 16));
    batch_vector_kernels()->forward_rows(bg, x.data_ptr<float>(), strides_of(x), w_f.data_ptr<float>(),
                                         b.defined() ? b.data_ptr<float>() : nullptr, relu,
                                         position_offsets.data_ptr<int64_t>(), position_channels.data_ptr<int64_t>(),
                                         first, last, res.defined() ? res.data_ptr<float>() : nullptr,
                                         y.data_ptr<float>(), strides_of(y), taps.data(), panels,
                                         panel_rows.data(), staging,
                                         channel_sums ? partial[chunk].data_ptr<double>() : nullptr);
  });
  if (channel_sums) *channel_sums = partial.sum(0);
  return y;
}

// Kept output gradients, compacted to rows of padded_batch floats (zero in the padding), in
// position-CSR order: the operand of grad-input, grad-weight and grad-bias.
at::Tensor kept_gradient_rows_by_position(const at::Tensor& gy, const cpu::BatchVectorGeometry& bg,
                                          const at::Tensor& position_offsets, const at::Tensor& position_channels) {
  auto rows = cpu::empty_output({position_channels.numel(), bg.padded_batch}, gy.options(), at::MemoryFormat::Contiguous);
  parallel_row_chunks(bg.out_height, [&](int64_t, int64_t first, int64_t last) {
    float* panel = thread_scratch(2, bg.out_width * bg.out_channels * bg.padded_batch);
    batch_vector_kernels()->kept_gradient_rows(bg, gy.data_ptr<float>(), strides_of(gy),
                                               position_offsets.data_ptr<int64_t>(),
                                               position_channels.data_ptr<int64_t>(), first, last,
                                               rows.data_ptr<float>(), panel);
  });
  return rows;
}

// [chunks][Cout][kh * kw][Cpad] partial weight gradients -> [Cout][Cin][kh][kw], summed in
// chunk order (deterministic for a thread count).
at::Tensor sum_weight_partials(const ConvGeometry& g, const at::Tensor& partial) {
  return partial.sum(0)
      .narrow(2, 0, g.in_channels)
      .reshape({g.out_channels, g.kernel_h, g.kernel_w, g.in_channels})
      .permute({0, 3, 1, 2})
      .contiguous();
}

// The backward for spatial masks (see spatial_mask): BatchVectorKernels::backward_positions,
// one image per visit; partial weight and bias gradients per chunk of images.
std::tuple<at::Tensor, at::Tensor, at::Tensor> full_positions_backward(
    const ConvGeometry& g, const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    const at::Tensor& positions, std::array<bool, 3> output_mask) {
  const auto [need_input, need_weight, need_bias] = output_mask;
  const auto bg = batch_vector_geometry(g);
  const auto* kernels = batch_vector_kernels();
  const int64_t cin_pad = kernels->padded_channels(g.in_channels), cout_pad = kernels->padded_channels(g.out_channels);
  const int64_t kk = g.kernel_h * g.kernel_w, np = positions.numel(), chunks = row_chunks(g.batch);
  const auto gy = addressable(grad_output);
  const auto x = need_weight ? addressable(input) : at::Tensor();
  const auto w_b = need_input ? at::constant_pad_nd(weight.permute({2, 3, 0, 1}), {0, cin_pad - g.in_channels})
                                    .contiguous()  // [kh][kw][Cout][Cin_pad]
                              : at::Tensor();
  auto grad_input = need_input ? cpu::empty_output(input.sizes(), input.options(), input.suggest_memory_format())
                               : at::empty({0}, input.options());
  auto partial_w = need_weight ? at::zeros({chunks, g.out_channels, kk, cin_pad}, weight.options()) : at::Tensor();
  auto partial_b = need_bias ? at::zeros({chunks, g.out_channels}, input.options()) : at::Tensor();
  const int64_t scratch_size = np * (cout_pad + g.out_channels + cin_pad) + g.height * g.width * cin_pad + cin_pad;
  const auto gx_strides = need_input ? strides_of(grad_input) : cpu::Strides{0, 0, 0};
  parallel_row_chunks(g.batch, [&](int64_t chunk, int64_t first, int64_t last) {
    kernels->backward_positions(bg, gy.data_ptr<float>(), strides_of(gy), need_weight ? x.data_ptr<float>() : nullptr,
                                need_weight ? strides_of(x) : cpu::Strides{0, 0, 0},
                                need_input ? w_b.data_ptr<float>() : nullptr, positions.data_ptr<int64_t>(), np,
                                first, last,
                                need_input ? grad_input.data_ptr<float>() : nullptr, gx_strides,
                                need_weight ? partial_w[chunk].data_ptr<float>() : nullptr,
                                need_bias ? partial_b[chunk].data_ptr<float>() : nullptr,
                                thread_scratch(0, scratch_size));
  });
  return {grad_input, need_weight ? sum_weight_partials(g, partial_w) : at::empty({0}, weight.options()),
          need_bias ? partial_b.sum(0) : at::empty({0}, input.options())};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_vector_backward(
    const ConvGeometry& g, const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    const at::Tensor& kept_positions, const at::Tensor& position_offsets, const at::Tensor& position_channels,
    std::array<bool, 3> output_mask) {
  if (spatial_mask(g, kept_positions))
    return full_positions_backward(g, grad_output, input, weight, kept_positions, output_mask);
  const auto [need_input, need_weight, need_bias] = output_mask;
  const auto bg = batch_vector_geometry(g);
  at::Tensor grad_input = at::empty({0}, input.options()), grad_weight = at::empty({0}, weight.options()),
             grad_bias = at::empty({0}, input.options());
  const auto rows = kept_gradient_rows_by_position(addressable(grad_output), bg, position_offsets, position_channels);
  const int64_t* pc = position_channels.data_ptr<int64_t>();
  if (need_bias) {  // summed in a fixed order: deterministic
    grad_bias = at::zeros({g.out_channels}, input.options());
    float* gb = grad_bias.data_ptr<float>();
    const float* r = rows.data_ptr<float>();
    for (int64_t e = 0; e < position_channels.numel(); ++e) {
      float sum = 0.0f;  // the padding images hold zeros
      for (int64_t n = 0; n < bg.padded_batch; ++n) sum += r[e * bg.padded_batch + n];
      gb[pc[e]] += sum;
    }
  }
  if (need_input) {
    const auto w_b = weight.permute({2, 3, 0, 1}).contiguous();  // [kh][kw][Cout][Cin]
    grad_input = cpu::empty_output(input.sizes(), input.options(), input.suggest_memory_format());
    const cpu::Strides xs = strides_of(grad_input);
    at::parallel_for(0, g.height, 1, [&](int64_t begin, int64_t end) {
      std::vector<int64_t> contributions(3 * g.kernel_h * g.kernel_w);
      float* panel = thread_scratch(0, g.width * g.in_channels * bg.padded_batch);
      batch_vector_kernels()->grad_input_rows(bg, rows.data_ptr<float>(), w_b.data_ptr<float>(), position_offsets.data_ptr<int64_t>(),
                           pc, begin, end, grad_input.data_ptr<float>(), xs, contributions.data(), panel);
    });
  }
  if (need_weight) {
    // One partial gradient per chunk of output rows, summed in chunk order afterwards, so
    // the result is bit-identical run to run for a given thread count.
    const auto x = addressable(input);
    const int64_t cpad = batch_vector_kernels()->padded_channels(g.in_channels), kk = g.kernel_h * g.kernel_w;
    auto partial = at::zeros({row_chunks(g.out_height), g.out_channels, kk, cpad}, weight.options());
    const int64_t slots = cpu::panel_ring_rows(bg);
    parallel_row_chunks(g.out_height, [&](int64_t chunk, int64_t first, int64_t last) {
      float* panels = thread_scratch(0, slots * g.width * g.batch * cpad);
      std::vector<int64_t> panel_rows(slots);
      batch_vector_kernels()->grad_weight_rows(bg, rows.data_ptr<float>(), x.data_ptr<float>(), strides_of(x),
                                               position_offsets.data_ptr<int64_t>(), pc, first, last,
                                               partial[chunk].data_ptr<float>(), panels, panel_rows.data());
    });
    grad_weight = sum_weight_partials(g, partial);
  }
  return {grad_input, grad_weight, grad_bias};
}

// ---------------------------------------------------------------------------------
// Op entry points

at::Tensor masked_conv2d_forward_kernel(const at::Tensor& input, const at::Tensor& weight,
                                        const std::optional<at::Tensor>& bias, const at::Tensor& mask,
                                        const at::Tensor& kept_offsets, const at::Tensor& kept_positions,
                                        const at::Tensor& position_offsets, const at::Tensor& position_channels,
                                        at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                        int64_t groups, const std::optional<at::Tensor>& residual, bool relu) {
  const ConvGeometry g = check_masked_conv2d_args(input, weight, bias, mask, kept_offsets, kept_positions,
                                                  position_offsets, position_channels, stride, padding, dilation, groups);
  const auto offsets = kept_offsets.contiguous(), positions = kept_positions.contiguous();
  const auto by_position = position_offsets.contiguous(), channels = position_channels.contiguous();
  check_kept_index(g, offsets, positions, by_position, channels);
  const bool has_residual = residual.has_value() && residual->defined();
  if (has_residual) {
    const std::vector<int64_t> shape{g.batch, g.out_channels, g.out_height, g.out_width};
    TORCH_CHECK(residual->sizes() == at::IntArrayRef(shape), "masked_conv2d: residual must have the output's shape ",
                at::IntArrayRef(shape), ", got ", residual->sizes());
    TORCH_CHECK(residual->scalar_type() == input.scalar_type(), "masked_conv2d: residual dtype must match input dtype ",
                input.scalar_type(), ", got ", residual->scalar_type());
    TORCH_CHECK(residual->device() == input.device(), "masked_conv2d: residual must be on the input's device ",
                input.device(), ", got ", residual->device());
  }
  if (use_batch_vector(g, input)) {
    return batch_vector_forward(g, input, weight, bias, positions, by_position, channels, relu, nullptr,
                                has_residual ? *residual : at::Tensor());
  }

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
  if (has_residual) y.add_(residual->to(ctype));
  if (relu) y.clamp_min_(0);
  // Output in the input's memory format and dtype, as F.conv2d returns it.
  return y.to(input.scalar_type()).contiguous(input.suggest_memory_format());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_conv2d_backward_kernel(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight, const at::Tensor& mask,
    const at::Tensor& kept_offsets, const at::Tensor& kept_positions, const at::Tensor& position_offsets,
    const at::Tensor& position_channels, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
    int64_t groups, std::array<bool, 3> output_mask) {
  const ConvGeometry g = check_masked_conv2d_args(input, weight, std::nullopt, mask, kept_offsets, kept_positions,
                                                  position_offsets, position_channels, stride, padding, dilation, groups);
  TORCH_CHECK(grad_output.sizes() == at::IntArrayRef({g.batch, g.out_channels, g.out_height, g.out_width}),
              "masked_conv2d_backward: grad_output must have shape (", g.batch, ", ", g.out_channels, ", ",
              g.out_height, ", ", g.out_width, "), got ", grad_output.sizes());
  TORCH_CHECK(grad_output.scalar_type() == input.scalar_type(), "masked_conv2d_backward: grad_output dtype must be ",
              input.scalar_type(), ", got ", grad_output.scalar_type());
  const auto offsets = kept_offsets.contiguous(), positions = kept_positions.contiguous();
  const auto by_position = position_offsets.contiguous(), channels = position_channels.contiguous();
  check_kept_index(g, offsets, positions, by_position, channels);
  if (use_batch_vector(g, input)) {
    return batch_vector_backward(g, grad_output, input, weight, positions, by_position, channels, output_mask);
  }
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

std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_conv2d_stats_kernel(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias, const at::Tensor& mask,
    const at::Tensor& kept_offsets, const at::Tensor& kept_positions, const at::Tensor& position_offsets,
    const at::Tensor& position_channels, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
    int64_t groups) {
  const ConvGeometry g = check_masked_conv2d_args(input, weight, bias, mask, kept_offsets, kept_positions,
                                                  position_offsets, position_channels, stride, padding, dilation, groups);
  if (use_batch_vector(g, input)) {
    const auto offsets = kept_offsets.contiguous(), positions = kept_positions.contiguous();
    const auto by_position = position_offsets.contiguous(), channels = position_channels.contiguous();
    check_kept_index(g, offsets, positions, by_position, channels);
    at::Tensor sums;
    auto y = batch_vector_forward(g, input, weight, bias, positions, by_position, channels, /*relu=*/false, &sums);
    return {y, sums[0].clone(), sums[1].clone()};  // distinct outputs, not views of one
  }
  auto y = masked_conv2d_forward_kernel(input, weight, bias, mask, kept_offsets, kept_positions, position_offsets,
                                        position_channels, stride, padding, dilation, groups, std::nullopt,
                                        /*relu=*/false);
  const auto y64 = y.to(at::kDouble);
  return {y, y64.sum({0, 2, 3}), y64.square().sum({0, 2, 3})};
}

// Which CPU kernels serve float32: "avx512", "avx2" (batch-vector) or "portable".
std::string cpu_kernels() {
  return batch_vector_kernels() ? batch_vector_kernels()->name : "portable";
}

}  // namespace

// Not ops on tensors: tell Python (the "auto" crossover, benchmarks, bug reports) which
// kernels this process runs and what the output cache holds.
// cpu_output_cache: the bytes the output cache (output_cache.h) holds free now, and its limit.
TORCH_LIBRARY_FRAGMENT(rmask, m) {
  m.def("cpu_kernels() -> str", &cpu_kernels);
  m.def("cpu_output_cache() -> int[]",
        []() -> std::vector<int64_t> { return {cpu::output_cache_bytes(), cpu::output_cache_limit()}; });
}

TORCH_LIBRARY_IMPL(rmask, CPU, m) {
  m.impl("masked_conv2d_stats", &masked_conv2d_stats_kernel);
  m.impl("masked_conv2d", &masked_conv2d_forward_kernel);
  m.impl("masked_conv2d_backward", &masked_conv2d_backward_kernel);
}

}  // namespace rmask
