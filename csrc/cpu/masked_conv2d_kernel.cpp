// CPU kernels of rmask::masked_conv2d, masked_conv2d_stats and masked_conv2d_backward: compute
// only the kept outputs. The host functions here check the arguments and the kept index, then
// choose the kernels:
//   batch_vector_driver.h  float32 with groups == 1 on an AVX2 or AVX-512 CPU: the batch in the
//                          SIMD lanes, per-position kept-channel lists, no im2col
//   portable_kernels.h     everything else (float64, reduced precision, groups > 1, other
//                          CPUs): gather-GEMM-scatter, exact and deterministic but slower

#include <algorithm>
#include <array>
#include <string>
#include <tuple>
#include <vector>

#include "../masked_conv2d_common.h"
#include "batch_vector_driver.h"
#include "output_cache.h"
#include "portable_kernels.h"

namespace rmask {
namespace {

// Every value of the int64 `index` in [0, end). A plain loop: aminmax plus the .item()
// reads cost ~25 us a call, an eighth of a small spatial forward.
void check_range(const Tensor& index, int64_t end, const char* name) {
  if (index.numel() == 0) return;
  const int64_t* values = data<int64_t>(index);
  int64_t lowest = values[0], highest = values[0];
  for (int64_t i = 1; i < index.numel(); ++i) {
    lowest = std::min(lowest, values[i]);
    highest = std::max(highest, values[i]);
  }
  RMASK_CHECK(lowest >= 0 && highest < end, "masked_conv2d: ", name, " must lie in [0, ", end, "), got values in [",
              lowest, ", ", highest, "]");
}

// The kept index's sizes (as every backend checks them), then its values (contiguous tensors):
// both forms consistent and in range, so the kernels may index with them unchecked. The values
// were checked against the mask once, in Python (rk.check_kept_index); this pass keeps an index
// that bypassed that from reaching outside the tensors.
void check_kept_index(const ConvGeometry& g, const Tensor& kept_offsets, const Tensor& kept_positions,
                      const Tensor& position_offsets, const Tensor& position_channels) {
  check_kept_index_sizes(g, kept_positions, position_channels);
  const int64_t* offsets = data<int64_t>(kept_offsets);
  RMASK_CHECK(offsets[0] == 0 && offsets[g.patterns] == kept_positions.numel(),
              "masked_conv2d: kept_offsets must start at 0 and end at kept_positions.numel() = ",
              kept_positions.numel(), ", got ", offsets[0], " and ", offsets[g.patterns]);
  for (int64_t pattern = 0; pattern < g.patterns; ++pattern) {
    RMASK_CHECK(offsets[pattern + 1] >= offsets[pattern], "masked_conv2d: kept_offsets must be non-decreasing");
  }
  check_range(kept_positions, g.out_positions(), "kept_positions");
  const int64_t* by_position = data<int64_t>(position_offsets);
  const int64_t pairs = kept_positions.numel() * g.channels_per_pattern;
  RMASK_CHECK(by_position[0] == 0 && by_position[g.out_positions()] == position_channels.numel(),
              "masked_conv2d: position_offsets/position_channels must list the ", pairs,
              " kept (position, channel) pairs of kept_offsets/kept_positions, got ", position_channels.numel(),
              " channels and offsets from ", by_position[0], " to ", by_position[g.out_positions()]);
  for (int64_t position = 0; position < g.out_positions(); ++position) {
    RMASK_CHECK(by_position[position + 1] >= by_position[position],
                "masked_conv2d: position_offsets must be non-decreasing");
  }
  check_range(position_channels, g.out_channels, "position_channels");
}

// The kept index, contiguous and checked.
struct CheckedIndex {
  Tensor offsets, positions, position_offsets, position_channels;
};

CheckedIndex checked_index(const ConvGeometry& g, const Tensor& kept_offsets, const Tensor& kept_positions,
                           const Tensor& position_offsets, const Tensor& position_channels) {
  CheckedIndex index{rmask::contiguous(kept_offsets), rmask::contiguous(kept_positions),
                     rmask::contiguous(position_offsets), rmask::contiguous(position_channels)};
  check_kept_index(g, index.offsets, index.positions, index.position_offsets, index.position_channels);
  return index;
}


Tensor masked_conv2d_forward_kernel(const Tensor& input, const Tensor& weight, const std::optional<Tensor>& bias,
                                    const Tensor& mask, const Tensor& kept_offsets, const Tensor& kept_positions,
                                    const Tensor& position_offsets, const Tensor& position_channels,
                                    IntArrayRef stride, IntArrayRef padding, IntArrayRef dilation, int64_t groups,
                                    const std::optional<Tensor>& residual, const std::optional<Tensor>& input_mask,
                                    const std::optional<Tensor>& input_offsets,
                                    const std::optional<Tensor>& input_channels, bool relu) {
  const ConvGeometry g = check_masked_conv2d_args(input, weight, bias, mask, kept_offsets, kept_positions,
                                                  position_offsets, position_channels, stride, padding, dilation, groups);
  const auto index = checked_index(g, kept_offsets, kept_positions, position_offsets, position_channels);
  const InputMask in_mask = checked_input_mask(g, input, input_mask, input_offsets, input_channels);
  const bool has_residual = residual.has_value() && residual->defined();
  if (has_residual) check_residual(g, input, *residual);
  const Tensor fused_residual = has_residual ? *residual : Tensor();
  if (cpu::use_batch_vector(input.scalar_type(), g.groups, g.batch, g.kernel_h)) {
    return cpu::batch_vector_forward(g, input, weight, bias, index.positions, index.position_offsets,
                                     index.position_channels, relu, nullptr, fused_residual, in_mask);
  }
  return cpu::portable_forward(g, masked_input(input, in_mask), weight, bias, index.offsets, index.positions,
                               fused_residual, relu);
}

// output_mask: the schema's bool[3], which reaches a stable-ABI kernel as a list.
std::tuple<Tensor, Tensor, Tensor> masked_conv2d_backward_kernel(
    const Tensor& grad_output, const Tensor& input, const Tensor& weight, const Tensor& mask,
    const Tensor& kept_offsets, const Tensor& kept_positions, const Tensor& position_offsets,
    const Tensor& position_channels, IntArrayRef stride, IntArrayRef padding, IntArrayRef dilation, int64_t groups,
    const std::vector<bool>& output_mask, const std::optional<Tensor>& relu_output,
    const std::optional<Tensor>& input_mask, const std::optional<Tensor>& input_offsets,
    const std::optional<Tensor>& input_channels) {
  RMASK_CHECK(output_mask.size() == 3, "masked_conv2d_backward: output_mask must have 3 elements, got ",
              output_mask.size());
  const std::array<bool, 3> wanted{output_mask[0], output_mask[1], output_mask[2]};
  const ConvGeometry g = check_masked_conv2d_args(input, weight, std::nullopt, mask, kept_offsets, kept_positions,
                                                  position_offsets, position_channels, stride, padding, dilation, groups);
  check_output_shaped(g, input, grad_output, "grad_output");
  const Tensor gate = checked_relu_gate(g, input, relu_output);
  const auto index = checked_index(g, kept_offsets, kept_positions, position_offsets, position_channels);
  const InputMask in_mask = checked_input_mask(g, input, input_mask, input_offsets, input_channels);
  if (cpu::use_batch_vector(input.scalar_type(), g.groups, g.batch, g.kernel_h)) {
    return cpu::batch_vector_backward(g, grad_output, gate, input, weight, index.positions, index.position_offsets,
                                      index.position_channels, wanted, in_mask);
  }
  // The portable kernels multiply masked inputs out: only grad-weight reads the input's values.
  const Tensor x = wanted[1] ? masked_input(input, in_mask) : input;
  auto gradients = cpu::portable_backward(g, grad_output, gate, x, weight, index.offsets, index.positions, wanted);
  if (wanted[0] && in_mask.defined()) rmask::mul_(std::get<0>(gradients), in_mask.mask);  // 0 at masked inputs
  return gradients;
}

std::tuple<Tensor, Tensor, Tensor> masked_conv2d_stats_kernel(
    const Tensor& input, const Tensor& weight, const std::optional<Tensor>& bias, const Tensor& mask,
    const Tensor& kept_offsets, const Tensor& kept_positions, const Tensor& position_offsets,
    const Tensor& position_channels, IntArrayRef stride, IntArrayRef padding, IntArrayRef dilation, int64_t groups,
    const std::optional<Tensor>& input_mask, const std::optional<Tensor>& input_offsets,
    const std::optional<Tensor>& input_channels) {
  const ConvGeometry g = check_masked_conv2d_args(input, weight, bias, mask, kept_offsets, kept_positions,
                                                  position_offsets, position_channels, stride, padding, dilation, groups);
  if (cpu::use_batch_vector(input.scalar_type(), g.groups, g.batch, g.kernel_h)) {
    const auto index = checked_index(g, kept_offsets, kept_positions, position_offsets, position_channels);
    const InputMask in_mask = checked_input_mask(g, input, input_mask, input_offsets, input_channels);
    Tensor sums;
    auto y = cpu::batch_vector_forward(g, input, weight, bias, index.positions, index.position_offsets,
                                       index.position_channels, /*relu=*/false, &sums, Tensor(), in_mask);
    // Distinct outputs, not views of one.
    return {y, torch::stable::clone(torch::stable::select(sums, 0, 0)),
            torch::stable::clone(torch::stable::select(sums, 0, 1))};
  }
  auto y = masked_conv2d_forward_kernel(input, weight, bias, mask, kept_offsets, kept_positions, position_offsets,
                                        position_channels, stride, padding, dilation, groups, std::nullopt,
                                        input_mask, input_offsets, input_channels, /*relu=*/false);
  const auto y64 = rmask::to(y, ScalarType::Double);
  return {y, rmask::sum(y64, {0, 2, 3}), rmask::sum(rmask::mul(y64, y64), {0, 2, 3})};
}

// Which CPU kernels serve float32: "avx512", "avx2" (batch-vector) or "portable".
std::string cpu_kernels() {
  const cpu::BatchVectorKernels* kernels = cpu::batch_vector_kernels();
  return kernels ? kernels->name : "portable";
}

std::vector<int64_t> cpu_output_cache() { return {cpu::output_cache_bytes(), cpu::output_cache_limit()}; }

}  // namespace

// Not ops on tensors: tell Python (the "auto" crossover, benchmarks, bug reports) which
// kernels this process runs and what the output cache holds.
// cpu_uses_batch_vector: whether the CPU op runs the batch-vector kernels for these arguments
// (else the portable ones).
// cpu_output_cache: the bytes the output cache (output_cache.h) holds free now, and its limit.
STABLE_TORCH_LIBRARY_FRAGMENT(rmask, m) {
  m.def("cpu_kernels() -> str");
  m.def("cpu_uses_batch_vector(ScalarType dtype, int groups, int batch, int kernel_height) -> bool");
  m.def("cpu_output_cache() -> int[]");
}

// With no tensor argument there is no backend key to dispatch on: the dispatcher serves such
// a call from the CompositeExplicitAutograd kernel.
STABLE_TORCH_LIBRARY_IMPL(rmask, CompositeExplicitAutograd, m) {
  m.impl("cpu_kernels", TORCH_BOX(&cpu_kernels));
  m.impl("cpu_uses_batch_vector", TORCH_BOX(&cpu::use_batch_vector));
  m.impl("cpu_output_cache", TORCH_BOX(&cpu_output_cache));
}

STABLE_TORCH_LIBRARY_IMPL(rmask, CPU, m) {
  m.impl("masked_conv2d_stats", TORCH_BOX(&masked_conv2d_stats_kernel));
  m.impl("masked_conv2d", TORCH_BOX(&masked_conv2d_forward_kernel));
  m.impl("masked_conv2d_backward", TORCH_BOX(&masked_conv2d_backward_kernel));
}

}  // namespace rmask
