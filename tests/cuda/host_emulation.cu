// Host emulation of the CUDA kernels (csrc/cuda/masked_conv2d_kernel.cuh), for machines without
// a GPU: the same op bodies and element functions, with a launch that is a plain loop on the
// host over every index, on CPU tensors. Registered as rmask_cuda_emulation::* (the rmask
// schemas), CPU only; tests/cuda/test_host_emulation.py compares them with the reference.
//
// What this proves: the kernels' arithmetic (index decoding, which outputs are computed and
// which skipped, taps, padding, stride, dilation, groups, epilogue, the two-stage reductions,
// reduced-precision accumulation). What it does not: launches, grid sizes, streams, device
// memory, races; those need a GPU (tests/cuda/test_cuda_op.py, marked cuda).
//
// Built with nvcc against the CUDA build of torch by tests/cuda/build_host_emulation.py
// (`make cuda-check`), so nvcc parses exactly the code the GPU build compiles.

#include "cuda/masked_conv2d_kernel.cuh"
#include "masked_conv2d_schemas.h"

namespace rmask {
namespace cuda {
namespace {

// element(i) for every i in [0, count), in order, on this thread.
struct HostLaunch {
  template <typename Element>
  void operator()(int64_t count, const Element& element) const {
    for (int64_t i = 0; i < count; ++i) element(i);
  }
};

void check_cpu(const Tensor& input) {
  RMASK_CHECK(input.is_cpu(), "rmask_cuda_emulation: runs on CPU tensors, got ", describe(input.device()));
}

Tensor forward(const Tensor& input, const Tensor& weight, const std::optional<Tensor>& bias, const Tensor& mask,
               const Tensor& kept_offsets, const Tensor& kept_positions, const Tensor& position_offsets,
               const Tensor& position_channels, IntArrayRef stride, IntArrayRef padding, IntArrayRef dilation,
               int64_t groups, const std::optional<Tensor>& residual, const std::optional<Tensor>& input_mask,
               const std::optional<Tensor>& input_offsets, const std::optional<Tensor>& input_channels, bool relu) {
  check_cpu(input);
  return masked_conv2d_forward(HostLaunch{}, input, weight, bias, mask, kept_offsets, kept_positions, position_offsets,
                               position_channels, stride, padding, dilation, groups, residual, relu, input_mask,
                               input_offsets, input_channels);
}

std::tuple<Tensor, Tensor, Tensor> stats(
    const Tensor& input, const Tensor& weight, const std::optional<Tensor>& bias, const Tensor& mask,
    const Tensor& kept_offsets, const Tensor& kept_positions, const Tensor& position_offsets,
    const Tensor& position_channels, IntArrayRef stride, IntArrayRef padding, IntArrayRef dilation,
    int64_t groups, const std::optional<Tensor>& input_mask, const std::optional<Tensor>& input_offsets,
    const std::optional<Tensor>& input_channels) {
  check_cpu(input);
  return masked_conv2d_stats(HostLaunch{}, input, weight, bias, mask, kept_offsets, kept_positions, position_offsets,
                             position_channels, stride, padding, dilation, groups, input_mask, input_offsets,
                             input_channels);
}

std::tuple<Tensor, Tensor, Tensor> backward(
    const Tensor& grad_output, const Tensor& input, const Tensor& weight, const Tensor& mask,
    const Tensor& kept_offsets, const Tensor& kept_positions, const Tensor& position_offsets,
    const Tensor& position_channels, IntArrayRef stride, IntArrayRef padding, IntArrayRef dilation,
    int64_t groups, const std::vector<bool>& output_mask, const std::optional<Tensor>& relu_output,
    const std::optional<Tensor>& input_mask, const std::optional<Tensor>& input_offsets,
    const std::optional<Tensor>& input_channels) {
  check_cpu(input);
  return masked_conv2d_backward(HostLaunch{}, grad_output, input, weight, mask, kept_offsets, kept_positions,
                                position_offsets, position_channels, stride, padding, dilation, groups, output_mask,
                                relu_output, input_mask, input_offsets, input_channels);
}

}  // namespace

// The rmask schemas (csrc/masked_conv2d.cpp), in their own namespace.
STABLE_TORCH_LIBRARY(rmask_cuda_emulation, m) {
  m.def(kMaskedConv2dSchema);
  m.def(kMaskedConv2dStatsSchema);
  m.def(kMaskedConv2dBackwardSchema);
}

STABLE_TORCH_LIBRARY_IMPL(rmask_cuda_emulation, CPU, m) {
  m.impl("masked_conv2d", TORCH_BOX(&forward));
  m.impl("masked_conv2d_stats", TORCH_BOX(&stats));
  m.impl("masked_conv2d_backward", TORCH_BOX(&backward));
}

}  // namespace cuda
}  // namespace rmask
