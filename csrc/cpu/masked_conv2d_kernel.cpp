// CPU kernels of rmask::masked_conv2d, masked_conv2d_stats and masked_conv2d_backward: compute
// only the kept outputs. The host functions here check the arguments and the kept index, then
// choose the kernels:
//   batch_vector_driver.h  float32 with groups == 1 on an AVX2 or AVX-512 CPU: the batch in the
//                          SIMD lanes, per-position kept-channel lists, no im2col
//   portable_kernels.h     everything else (float64, reduced precision, groups > 1, other
//                          CPUs): gather-GEMM-scatter, exact and deterministic but slower

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <string>
#include <vector>

#include "../masked_conv2d_common.h"
#include "batch_vector_driver.h"
#include "output_cache.h"
#include "portable_kernels.h"

// The kernels in this folder parallelize with at::parallel_for, a header template over
// `#pragma omp parallel` in an OpenMP build of torch: compiled without OpenMP, every kernel
// would silently run on one thread.
#if defined(__linux__) && AT_PARALLEL_OPENMP && !defined(_OPENMP)
#error "rmask CPU kernels must be compiled with OpenMP (-fopenmp) against this torch, or at::parallel_for runs serially"
#endif

namespace rmask {
namespace {

// Every value of the int64 `index` in [0, end). A plain loop: at::aminmax plus the .item()
// reads cost ~25 us a call, an eighth of a small spatial forward.
void check_range(const at::Tensor& index, int64_t end, const char* name) {
  if (index.numel() == 0) return;
  const int64_t* values = index.data_ptr<int64_t>();
  int64_t lowest = values[0], highest = values[0];
  for (int64_t i = 1; i < index.numel(); ++i) {
    lowest = std::min(lowest, values[i]);
    highest = std::max(highest, values[i]);
  }
  TORCH_CHECK(lowest >= 0 && highest < end, "masked_conv2d: ", name, " must lie in [0, ", end, "), got values in [",
              lowest, ", ", highest, "]");
}

// The kept index's sizes (as every backend checks them), then its values (contiguous tensors):
// both forms consistent and in range, so the kernels may index with them unchecked. The values
// were checked against the mask once, in Python (rk.check_kept_index); this pass keeps an index
// that bypassed that from reaching outside the tensors.
void check_kept_index(const ConvGeometry& g, const at::Tensor& kept_offsets, const at::Tensor& kept_positions,
                      const at::Tensor& position_offsets, const at::Tensor& position_channels) {
  check_kept_index_sizes(g, kept_positions, position_channels);
  const int64_t* offsets = kept_offsets.data_ptr<int64_t>();
  TORCH_CHECK(offsets[0] == 0 && offsets[g.patterns] == kept_positions.numel(),
              "masked_conv2d: kept_offsets must start at 0 and end at kept_positions.numel() = ",
              kept_positions.numel(), ", got ", offsets[0], " and ", offsets[g.patterns]);
  for (int64_t pattern = 0; pattern < g.patterns; ++pattern) {
    TORCH_CHECK(offsets[pattern + 1] >= offsets[pattern], "masked_conv2d: kept_offsets must be non-decreasing");
  }
  check_range(kept_positions, g.out_positions(), "kept_positions");
  const int64_t* by_position = position_offsets.data_ptr<int64_t>();
  const int64_t pairs = kept_positions.numel() * g.channels_per_pattern;
  TORCH_CHECK(by_position[0] == 0 && by_position[g.out_positions()] == position_channels.numel(),
              "masked_conv2d: position_offsets/position_channels must list the ", pairs,
              " kept (position, channel) pairs of kept_offsets/kept_positions, got ", position_channels.numel(),
              " channels and offsets from ", by_position[0], " to ", by_position[g.out_positions()]);
  for (int64_t position = 0; position < g.out_positions(); ++position) {
    TORCH_CHECK(by_position[position + 1] >= by_position[position],
                "masked_conv2d: position_offsets must be non-decreasing");
  }
  check_range(position_channels, g.out_channels, "position_channels");
}

// The kept index, contiguous and checked.
struct CheckedIndex {
  at::Tensor offsets, positions, position_offsets, position_channels;
};

CheckedIndex checked_index(const ConvGeometry& g, const at::Tensor& kept_offsets, const at::Tensor& kept_positions,
                           const at::Tensor& position_offsets, const at::Tensor& position_channels) {
  CheckedIndex index{kept_offsets.contiguous(), kept_positions.contiguous(), position_offsets.contiguous(),
                     position_channels.contiguous()};
  check_kept_index(g, index.offsets, index.positions, index.position_offsets, index.position_channels);
  return index;
}

at::Tensor masked_conv2d_forward_kernel(const at::Tensor& input, const at::Tensor& weight,
                                        const std::optional<at::Tensor>& bias, const at::Tensor& mask,
                                        const at::Tensor& kept_offsets, const at::Tensor& kept_positions,
                                        const at::Tensor& position_offsets, const at::Tensor& position_channels,
                                        at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                        int64_t groups, const std::optional<at::Tensor>& residual, bool relu) {
  const ConvGeometry g = check_masked_conv2d_args(input, weight, bias, mask, kept_offsets, kept_positions,
                                                  position_offsets, position_channels, stride, padding, dilation, groups);
  const auto index = checked_index(g, kept_offsets, kept_positions, position_offsets, position_channels);
  const bool has_residual = residual.has_value() && residual->defined();
  if (has_residual) check_residual(g, input, *residual);
  const at::Tensor fused_residual = has_residual ? *residual : at::Tensor();
  if (cpu::use_batch_vector(input.scalar_type(), g.groups, g.batch, g.kernel_h)) {
    return cpu::batch_vector_forward(g, input, weight, bias, index.positions, index.position_offsets,
                                     index.position_channels, relu, nullptr, fused_residual);
  }
  return cpu::portable_forward(g, input, weight, bias, index.offsets, index.positions, fused_residual, relu);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_conv2d_backward_kernel(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight, const at::Tensor& mask,
    const at::Tensor& kept_offsets, const at::Tensor& kept_positions, const at::Tensor& position_offsets,
    const at::Tensor& position_channels, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
    int64_t groups, std::array<bool, 3> output_mask, const std::optional<at::Tensor>& relu_output) {
  const ConvGeometry g = check_masked_conv2d_args(input, weight, std::nullopt, mask, kept_offsets, kept_positions,
                                                  position_offsets, position_channels, stride, padding, dilation, groups);
  check_output_shaped(g, input, grad_output, "grad_output");
  const at::Tensor gate = checked_relu_gate(g, input, relu_output);
  const auto index = checked_index(g, kept_offsets, kept_positions, position_offsets, position_channels);
  if (cpu::use_batch_vector(input.scalar_type(), g.groups, g.batch, g.kernel_h)) {
    return cpu::batch_vector_backward(g, grad_output, gate, input, weight, index.positions, index.position_offsets,
                                      index.position_channels, output_mask);
  }
  return cpu::portable_backward(g, grad_output, gate, input, weight, index.offsets, index.positions, output_mask);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_conv2d_stats_kernel(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias, const at::Tensor& mask,
    const at::Tensor& kept_offsets, const at::Tensor& kept_positions, const at::Tensor& position_offsets,
    const at::Tensor& position_channels, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
    int64_t groups) {
  const ConvGeometry g = check_masked_conv2d_args(input, weight, bias, mask, kept_offsets, kept_positions,
                                                  position_offsets, position_channels, stride, padding, dilation, groups);
  if (cpu::use_batch_vector(input.scalar_type(), g.groups, g.batch, g.kernel_h)) {
    const auto index = checked_index(g, kept_offsets, kept_positions, position_offsets, position_channels);
    at::Tensor sums;
    auto y = cpu::batch_vector_forward(g, input, weight, bias, index.positions, index.position_offsets,
                                       index.position_channels, /*relu=*/false, &sums);
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
  const cpu::BatchVectorKernels* kernels = cpu::batch_vector_kernels();
  return kernels ? kernels->name : "portable";
}

}  // namespace

// Not ops on tensors: tell Python (the "auto" crossover, benchmarks, bug reports) which
// kernels this process runs and what the output cache holds.
// cpu_uses_batch_vector: whether the CPU op runs the batch-vector kernels for these arguments
// (else the portable ones).
// cpu_output_cache: the bytes the output cache (output_cache.h) holds free now, and its limit.
TORCH_LIBRARY_FRAGMENT(rmask, m) {
  m.def("cpu_kernels() -> str", &cpu_kernels);
  m.def("cpu_uses_batch_vector(ScalarType dtype, int groups, int batch, int kernel_height) -> bool",
        &cpu::use_batch_vector);
  m.def("cpu_output_cache() -> int[]",
        []() -> std::vector<int64_t> { return {cpu::output_cache_bytes(), cpu::output_cache_limit()}; });
}

TORCH_LIBRARY_IMPL(rmask, CPU, m) {
  m.impl("masked_conv2d_stats", &masked_conv2d_stats_kernel);
  m.impl("masked_conv2d", &masked_conv2d_forward_kernel);
  m.impl("masked_conv2d_backward", &masked_conv2d_backward_kernel);
}

}  // namespace rmask
