// CUDA kernels of rmask::masked_conv2d, masked_conv2d_stats and masked_conv2d_backward: compute
// only the kept outputs. The kernels' element bodies and the op bodies are in
// masked_conv2d_kernel.cuh (shared with the host-emulation test, tests/cuda/); this file
// runs them on the GPU: device guard, a grid-stride loop on the current stream, a launch check.

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

#include "masked_conv2d_kernel.cuh"

namespace rmask {
namespace cuda {
namespace {

constexpr int kThreads = 256;

template <typename Element>
__global__ void __launch_bounds__(kThreads) grid_stride_kernel(const Element element, int64_t count) {
  const int64_t step = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < count; i += step) element(i);
}

// element(i) for every i in [0, count) on the current stream: enough blocks to fill the GPU a
// few times over (the grid-stride loop covers the rest).
struct CudaLaunch {
  template <typename Element>
  void operator()(int64_t count, const Element& element) const {
    if (count <= 0) return;
    const int64_t max_blocks = int64_t{at::cuda::getCurrentDeviceProperties()->multiProcessorCount} * 32;
    const int64_t blocks = std::min<int64_t>((count + kThreads - 1) / kThreads, max_blocks);
    grid_stride_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(element,
                                                                                                          count);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

void check_cuda(const at::Tensor& input) {
  TORCH_CHECK(input.is_cuda(), "masked_conv2d (CUDA): input must be a CUDA tensor, got ", input.device());
}

at::Tensor masked_conv2d_forward_kernel(const at::Tensor& input, const at::Tensor& weight,
                                        const std::optional<at::Tensor>& bias, const at::Tensor& mask,
                                        const at::Tensor& kept_offsets, const at::Tensor& kept_positions,
                                        const at::Tensor& position_offsets, const at::Tensor& position_channels,
                                        at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                        int64_t groups, const std::optional<at::Tensor>& residual, bool relu) {
  check_cuda(input);
  const c10::cuda::CUDAGuard guard(input.device());
  return masked_conv2d_forward(CudaLaunch{}, input, weight, bias, mask, kept_offsets, kept_positions, position_offsets,
                               position_channels, stride, padding, dilation, groups, residual, relu);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_conv2d_stats_kernel(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias, const at::Tensor& mask,
    const at::Tensor& kept_offsets, const at::Tensor& kept_positions, const at::Tensor& position_offsets,
    const at::Tensor& position_channels, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
    int64_t groups) {
  check_cuda(input);
  const c10::cuda::CUDAGuard guard(input.device());
  return masked_conv2d_stats(CudaLaunch{}, input, weight, bias, mask, kept_offsets, kept_positions, position_offsets,
                             position_channels, stride, padding, dilation, groups);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_conv2d_backward_kernel(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight, const at::Tensor& mask,
    const at::Tensor& kept_offsets, const at::Tensor& kept_positions, const at::Tensor& position_offsets,
    const at::Tensor& position_channels, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
    int64_t groups, std::array<bool, 3> output_mask, const std::optional<at::Tensor>& relu_output) {
  check_cuda(input);
  const c10::cuda::CUDAGuard guard(input.device());
  return masked_conv2d_backward(CudaLaunch{}, grad_output, input, weight, mask, kept_offsets, kept_positions,
                                position_offsets, position_channels, stride, padding, dilation, groups, output_mask,
                                relu_output);
}

}  // namespace

TORCH_LIBRARY_IMPL(rmask, CUDA, m) {
  m.impl("masked_conv2d", &masked_conv2d_forward_kernel);
  m.impl("masked_conv2d_stats", &masked_conv2d_stats_kernel);
  m.impl("masked_conv2d_backward", &masked_conv2d_backward_kernel);
}

}  // namespace cuda
}  // namespace rmask
