// The batch-vector kernels run on ATen tensors (batch_vector_driver.h). Two pairs of kernels:
// the row kernels (forward_rows and its gradients), which serve any mask through the
// position-CSR lists, and the position kernels (forward_positions, backward_positions) for
// spatial masks, which keep every channel at each of their kept positions.

#include "batch_vector_driver.h"

#include <ATen/Parallel.h>
#include <ATen/Version.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "output_cache.h"

namespace rmask {
namespace cpu {
namespace {

BatchVectorGeometry batch_vector_geometry(const ConvGeometry& g) {
  const int64_t padded = (g.batch + kBatchBlock - 1) / kBatchBlock * kBatchBlock;
  return {g.batch,      padded,     g.in_channels, g.height,     g.width,    g.out_channels,
          g.kernel_h,   g.kernel_w, g.out_height,  g.out_width,  g.stride_h, g.stride_w,
          g.pad_h,      g.pad_w,    g.dilation_h,  g.dilation_w};
}

// Per-thread scratch that outlives the call: the panels are hundreds of KiB, and a fresh
// allocation of that size is a fresh mmap whose pages fault in on every call. Aligned to a
// cache line: malloc's large blocks start 16 bytes into one, where every 64-byte vector load
// would straddle two lines.
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

Strides strides_of(const at::Tensor& t) {
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
// one image per visit, so no layout step over the whole batch (the row forward lays out every
// input row of every image: at keep 0.1 about half its time). Partial channel sums per chunk
// of images, added in chunk order.
at::Tensor full_positions_forward(const ConvGeometry& g, const at::Tensor& input, const at::Tensor& weight,
                                  const std::optional<at::Tensor>& bias, const at::Tensor& positions, bool relu,
                                  at::Tensor* channel_sums, const at::Tensor& residual) {
  const auto vector_geometry = batch_vector_geometry(g);
  const auto* kernels = batch_vector_kernels();
  const auto x = addressable(input);
  const auto x_strides = strides_of(x);
  const int64_t cout_pad = kernels->padded_channels(g.out_channels);
  // [kh][kw][Cin][Cout_pad]
  auto packed_weight = at::empty({g.kernel_h, g.kernel_w, g.in_channels, cout_pad}, weight.options());
  const auto w = weight.contiguous();
  const int64_t lanes = kernels->padded_channels(1), k_total = g.in_channels * g.kernel_h * g.kernel_w;
  at::parallel_for(0, (k_total + lanes - 1) / lanes, 1, [&](int64_t begin, int64_t end) {  // serially 20-50 us
    kernels->pack_position_weights(w.data_ptr<float>(), g.out_channels, g.in_channels, g.kernel_h * g.kernel_w,
                                   packed_weight.data_ptr<float>(), cout_pad, begin * lanes,
                                   std::min(k_total, end * lanes));
  });
  const bool has_bias = bias.has_value() && bias->defined();
  std::vector<float> padded_bias(has_bias ? cout_pad : 0, 0.0f);  // ATen's pad is a clone even with no padding: ~15 us
  if (has_bias) {
    const auto b = bias->contiguous();
    std::copy_n(b.data_ptr<float>(), g.out_channels, padded_bias.begin());
  }
  auto y = empty_output({g.batch, g.out_channels, g.out_height, g.out_width}, input.options(),
                        input.suggest_memory_format());
  const auto residual_as_y = residual.defined() ? residual.contiguous(input.suggest_memory_format()) : at::Tensor();
  auto partial = channel_sums ? at::zeros({row_chunks(g.batch), 2, g.out_channels}, input.options().dtype(at::kDouble))
                              : at::Tensor();
  const int64_t scratch_size = (x_strides.c == 1 ? 0 : g.height * g.width * g.in_channels) +
                               positions.numel() * (cout_pad + g.out_channels) + kBatchBlock;
  parallel_row_chunks(g.batch, [&](int64_t chunk, int64_t first, int64_t last) {
    std::vector<const float*> x_taps(8 * g.kernel_h * g.kernel_w);
    const std::vector<float> zeros(g.in_channels, 0.0f);
    kernels->forward_positions(vector_geometry, x.data_ptr<float>(), x_strides, packed_weight.data_ptr<float>(),
                               cout_pad, has_bias ? padded_bias.data() : nullptr, relu,
                               positions.data_ptr<int64_t>(), positions.numel(), first, last,
                               residual_as_y.defined() ? residual_as_y.data_ptr<float>() : nullptr,
                               y.data_ptr<float>(), strides_of(y), x_taps.data(), zeros.data(),
                               thread_scratch(2, scratch_size),
                               channel_sums ? partial[chunk].data_ptr<double>() : nullptr);
  });
  if (channel_sums) *channel_sums = partial.sum(0);
  return y;
}

// Kept output gradients, compacted to rows of padded_batch floats (zero in the padding), in
// position-CSR order, gated by `gate` where defined (0 where it is not > 0): the operand of
// grad-input, grad-weight and grad-bias.
at::Tensor kept_gradient_rows_by_position(const at::Tensor& gy, const at::Tensor& gate,
                                          const BatchVectorGeometry& vector_geometry,
                                          const at::Tensor& position_offsets, const at::Tensor& position_channels) {
  auto rows = empty_output({position_channels.numel(), vector_geometry.padded_batch}, gy.options(),
                           at::MemoryFormat::Contiguous);
  const int64_t panel_size = vector_geometry.out_width * vector_geometry.out_channels * vector_geometry.padded_batch;
  parallel_row_chunks(vector_geometry.out_height, [&](int64_t, int64_t first, int64_t last) {
    float* panel = thread_scratch(2, panel_size);
    batch_vector_kernels()->kept_gradient_rows(
        vector_geometry, gy.data_ptr<float>(), strides_of(gy), gate.defined() ? gate.data_ptr<float>() : nullptr,
        gate.defined() ? strides_of(gate) : Strides{0, 0, 0}, position_offsets.data_ptr<int64_t>(),
        position_channels.data_ptr<int64_t>(), first, last, rows.data_ptr<float>(), panel,
        gate.defined() ? thread_scratch(1, panel_size) : nullptr);
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
    const ConvGeometry& g, const at::Tensor& grad_output, const at::Tensor& relu_gate, const at::Tensor& input,
    const at::Tensor& weight, const at::Tensor& positions, std::array<bool, 3> output_mask) {
  const auto [need_input, need_weight, need_bias] = output_mask;
  const auto vector_geometry = batch_vector_geometry(g);
  const auto* kernels = batch_vector_kernels();
  const int64_t cin_pad = kernels->padded_channels(g.in_channels), cout_pad = kernels->padded_channels(g.out_channels);
  const int64_t taps = g.kernel_h * g.kernel_w, npositions = positions.numel(), chunks = row_chunks(g.batch);
  const auto gy = addressable(grad_output);
  const auto gate = relu_gate.defined() ? addressable(relu_gate) : at::Tensor();
  const auto x = need_weight ? addressable(input) : at::Tensor();
  const auto backward_weight =  // [kh][kw][Cout][Cin_pad]
      need_input ? at::constant_pad_nd(weight.permute({2, 3, 0, 1}), {0, cin_pad - g.in_channels}).contiguous()
                 : at::Tensor();
  auto grad_input = need_input ? empty_output(input.sizes(), input.options(), input.suggest_memory_format())
                               : at::empty({0}, input.options());
  auto partial_w = need_weight ? at::zeros({chunks, g.out_channels, taps, cin_pad}, weight.options()) : at::Tensor();
  auto partial_b = need_bias ? at::zeros({chunks, g.out_channels}, input.options()) : at::Tensor();
  const int64_t scratch_size = npositions * (cout_pad + g.out_channels + cin_pad) + g.height * g.width * cin_pad +
                               cin_pad + (gate.defined() ? npositions * g.out_channels : 0);
  const auto grad_input_strides = need_input ? strides_of(grad_input) : Strides{0, 0, 0};
  parallel_row_chunks(g.batch, [&](int64_t chunk, int64_t first, int64_t last) {
    kernels->backward_positions(vector_geometry, gy.data_ptr<float>(), strides_of(gy),
                                gate.defined() ? gate.data_ptr<float>() : nullptr,
                                gate.defined() ? strides_of(gate) : Strides{0, 0, 0},
                                need_weight ? x.data_ptr<float>() : nullptr,
                                need_weight ? strides_of(x) : Strides{0, 0, 0},
                                need_input ? backward_weight.data_ptr<float>() : nullptr,
                                positions.data_ptr<int64_t>(), npositions, first, last,
                                need_input ? grad_input.data_ptr<float>() : nullptr, grad_input_strides,
                                need_weight ? partial_w[chunk].data_ptr<float>() : nullptr,
                                need_bias ? partial_b[chunk].data_ptr<float>() : nullptr,
                                thread_scratch(0, scratch_size));
  });
  return {grad_input, need_weight ? sum_weight_partials(g, partial_w) : at::empty({0}, weight.options()),
          need_bias ? partial_b.sum(0) : at::empty({0}, input.options())};
}

}  // namespace

const BatchVectorKernels* batch_vector_kernels() {
  static const BatchVectorKernels* kernels = best_batch_vector_kernels(at::get_cpu_capability() == "AVX512");
  return kernels;
}

bool use_batch_vector(at::ScalarType dtype, int64_t groups, int64_t batch, int64_t kernel_h) {
  // Kernel heights above 64 (the kernels' fixed per-row tables) take the portable path.
  return batch_vector_kernels() && dtype == at::kFloat && groups == 1 && batch > 0 && kernel_h <= 64;
}

// The row forward's per-channel sums are accumulated per chunk of rows and added up in chunk
// order (deterministic for a given thread count).
at::Tensor batch_vector_forward(const ConvGeometry& g, const at::Tensor& input, const at::Tensor& weight,
                                const std::optional<at::Tensor>& bias, const at::Tensor& kept_positions,
                                const at::Tensor& position_offsets, const at::Tensor& position_channels, bool relu,
                                at::Tensor* channel_sums, const at::Tensor& residual) {
  if (spatial_mask(g, kept_positions))
    return full_positions_forward(g, input, weight, bias, kept_positions, relu, channel_sums, residual);
  const auto vector_geometry = batch_vector_geometry(g);
  const auto x = addressable(input);
  const auto forward_weight = weight.permute({0, 2, 3, 1}).contiguous();  // [Cout][kh][kw][Cin]
  const auto b = (bias.has_value() && bias->defined()) ? bias->contiguous() : at::Tensor();
  // Every element is written by the kernel (masked ones as zeros).
  auto y = empty_output({g.batch, g.out_channels, g.out_height, g.out_width}, input.options(),
                        input.suggest_memory_format());
  const auto residual_as_y = residual.defined() ? residual.contiguous(input.suggest_memory_format()) : at::Tensor();
  const int64_t slots = panel_ring_rows(vector_geometry);
  auto partial = channel_sums ? at::zeros({row_chunks(g.out_height), 2, g.out_channels},
                                          input.options().dtype(at::kDouble))
                              : at::Tensor();
  parallel_row_chunks(g.out_height, [&](int64_t chunk, int64_t first, int64_t last) {
    std::vector<int64_t> taps(2 * g.kernel_h * g.kernel_w), panel_rows(slots);
    float* panels = thread_scratch(0, slots * g.width * g.in_channels * vector_geometry.padded_batch);
    float* staging = thread_scratch(1, g.batch * (g.out_channels * g.out_width + 16));
    batch_vector_kernels()->forward_rows(vector_geometry, x.data_ptr<float>(), strides_of(x),
                                         forward_weight.data_ptr<float>(),
                                         b.defined() ? b.data_ptr<float>() : nullptr, relu,
                                         position_offsets.data_ptr<int64_t>(), position_channels.data_ptr<int64_t>(),
                                         first, last,
                                         residual_as_y.defined() ? residual_as_y.data_ptr<float>() : nullptr,
                                         y.data_ptr<float>(), strides_of(y), taps.data(), panels,
                                         panel_rows.data(), staging,
                                         channel_sums ? partial[chunk].data_ptr<double>() : nullptr);
  });
  if (channel_sums) *channel_sums = partial.sum(0);
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_vector_backward(
    const ConvGeometry& g, const at::Tensor& grad_output, const at::Tensor& relu_gate, const at::Tensor& input,
    const at::Tensor& weight, const at::Tensor& kept_positions, const at::Tensor& position_offsets,
    const at::Tensor& position_channels, std::array<bool, 3> output_mask) {
  if (spatial_mask(g, kept_positions))
    return full_positions_backward(g, grad_output, relu_gate, input, weight, kept_positions, output_mask);
  const auto [need_input, need_weight, need_bias] = output_mask;
  const auto vector_geometry = batch_vector_geometry(g);
  at::Tensor grad_input = at::empty({0}, input.options()), grad_weight = at::empty({0}, weight.options()),
             grad_bias = at::empty({0}, input.options());
  const auto rows = kept_gradient_rows_by_position(addressable(grad_output),
                                                   relu_gate.defined() ? addressable(relu_gate) : at::Tensor(),
                                                   vector_geometry, position_offsets, position_channels);
  const int64_t* channels = position_channels.data_ptr<int64_t>();
  if (need_bias) {  // summed in a fixed order: deterministic
    grad_bias = at::zeros({g.out_channels}, input.options());
    float* grad_bias_values = grad_bias.data_ptr<float>();
    const float* row_values = rows.data_ptr<float>();
    const int64_t padded_batch = vector_geometry.padded_batch;
    for (int64_t e = 0; e < position_channels.numel(); ++e) {
      float sum = 0.0f;  // the padding images hold zeros
      for (int64_t n = 0; n < padded_batch; ++n) sum += row_values[e * padded_batch + n];
      grad_bias_values[channels[e]] += sum;
    }
  }
  if (need_input) {
    const auto backward_weight = weight.permute({2, 3, 0, 1}).contiguous();  // [kh][kw][Cout][Cin]
    grad_input = empty_output(input.sizes(), input.options(), input.suggest_memory_format());
    const Strides grad_input_strides = strides_of(grad_input);
    at::parallel_for(0, g.height, 1, [&](int64_t begin, int64_t end) {
      std::vector<int64_t> contributions(3 * g.kernel_h * g.kernel_w);
      float* panel = thread_scratch(0, g.width * g.in_channels * vector_geometry.padded_batch);
      batch_vector_kernels()->grad_input_rows(vector_geometry, rows.data_ptr<float>(),
                                              backward_weight.data_ptr<float>(), position_offsets.data_ptr<int64_t>(),
                                              channels, begin, end, grad_input.data_ptr<float>(), grad_input_strides,
                                              contributions.data(), panel);
    });
  }
  if (need_weight) {
    // One partial gradient per chunk of output rows, summed in chunk order afterwards, so
    // the result is bit-identical run to run for a given thread count.
    const auto x = addressable(input);
    const int64_t cin_pad = batch_vector_kernels()->padded_channels(g.in_channels), taps = g.kernel_h * g.kernel_w;
    auto partial = at::zeros({row_chunks(g.out_height), g.out_channels, taps, cin_pad}, weight.options());
    const int64_t slots = panel_ring_rows(vector_geometry);
    parallel_row_chunks(g.out_height, [&](int64_t chunk, int64_t first, int64_t last) {
      float* panels = thread_scratch(0, slots * g.width * g.batch * cin_pad);
      std::vector<int64_t> panel_rows(slots);
      batch_vector_kernels()->grad_weight_rows(vector_geometry, rows.data_ptr<float>(), x.data_ptr<float>(),
                                               strides_of(x), position_offsets.data_ptr<int64_t>(), channels, first,
                                               last, partial[chunk].data_ptr<float>(), panels, panel_rows.data());
    });
    grad_weight = sum_weight_partials(g, partial);
  }
  return {grad_input, grad_weight, grad_bias};
}

}  // namespace cpu
}  // namespace rmask
