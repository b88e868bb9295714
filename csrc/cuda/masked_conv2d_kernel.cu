// CUDA kernels of rmask::masked_conv2d, masked_conv2d_stats and masked_conv2d_backward: compute
// only the kept outputs. The kernels' element bodies and the op bodies are in
// masked_conv2d_kernel.cuh (shared with the host-emulation test, tests/cuda/); this file
// runs them on the GPU: device guard, a grid-stride loop on the current stream, a launch check.

// The stable C shim declares its CUDA entry points (the current CUDA stream, CUDA error
// messages) only under USE_CUDA; this file is compiled only into CUDA builds.
#ifndef USE_CUDA
#define USE_CUDA
#endif

#include <cuda_runtime.h>

#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/macros.h>

#include <algorithm>
#include <atomic>

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

// The number of multiprocessors of `device`, asked once per device.
int multiprocessor_count(int32_t device) {
  constexpr int32_t kCachedDevices = 64;
  static std::atomic<int> cached[kCachedDevices] = {};
  if (device >= 0 && device < kCachedDevices) {
    if (const int count = cached[device].load(std::memory_order_relaxed)) return count;
  }
  int count = 0;
  STD_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  if (device >= 0 && device < kCachedDevices) cached[device].store(count, std::memory_order_relaxed);
  return count;
}

// torch's current CUDA stream on `device`.
cudaStream_t current_stream(int32_t device) {
  void* stream = nullptr;
  STABLE_TORCH_ERROR_CODE_CHECK(aoti_torch_get_current_cuda_stream(device, &stream));
  return static_cast<cudaStream_t>(stream);
}

// element(i) for every i in [0, count) on torch's current stream of `device`: enough blocks to
// fill the GPU a few times over (the grid-stride loop covers the rest).
struct CudaLaunch {
  int32_t device;
  cudaStream_t stream;
  int64_t max_blocks;

  explicit CudaLaunch(int32_t device_index)
      : device(device_index),
        stream(current_stream(device_index)),
        max_blocks(int64_t{multiprocessor_count(device_index)} * 32) {}

  template <typename Element>
  void operator()(int64_t count, const Element& element) const {
    if (count <= 0) return;
    const int64_t blocks = std::min<int64_t>((count + kThreads - 1) / kThreads, max_blocks);
    grid_stride_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(element, count);
    STD_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

void check_cuda(const Tensor& input) {
  RMASK_CHECK(input.is_cuda(), "masked_conv2d (CUDA): input must be a CUDA tensor, got ", describe(input.device()));
}

Tensor masked_conv2d_forward_kernel(const Tensor& input, const Tensor& weight, const std::optional<Tensor>& bias,
                                    const Tensor& mask, const Tensor& kept_offsets, const Tensor& kept_positions,
                                    const Tensor& position_offsets, const Tensor& position_channels,
                                    IntArrayRef stride, IntArrayRef padding, IntArrayRef dilation, int64_t groups,
                                    const std::optional<Tensor>& residual,
                                    const std::optional<Tensor>& input_mask,
                                    const std::optional<Tensor>& input_offsets,
                                    const std::optional<Tensor>& input_channels, bool relu) {
  check_cuda(input);
  const int32_t device = input.get_device_index();
  const torch::stable::accelerator::DeviceGuard guard(device);
  return masked_conv2d_forward(CudaLaunch(device), input, weight, bias, mask, kept_offsets, kept_positions,
                               position_offsets, position_channels, stride, padding, dilation, groups, residual, relu,
                               input_mask, input_offsets, input_channels);
}

std::tuple<Tensor, Tensor, Tensor> masked_conv2d_stats_kernel(
    const Tensor& input, const Tensor& weight, const std::optional<Tensor>& bias, const Tensor& mask,
    const Tensor& kept_offsets, const Tensor& kept_positions, const Tensor& position_offsets,
    const Tensor& position_channels, IntArrayRef stride, IntArrayRef padding, IntArrayRef dilation, int64_t groups,
    const std::optional<Tensor>& input_mask, const std::optional<Tensor>& input_offsets,
    const std::optional<Tensor>& input_channels) {
  check_cuda(input);
  const int32_t device = input.get_device_index();
  const torch::stable::accelerator::DeviceGuard guard(device);
  return masked_conv2d_stats(CudaLaunch(device), input, weight, bias, mask, kept_offsets, kept_positions,
                             position_offsets, position_channels, stride, padding, dilation, groups, input_mask,
                             input_offsets, input_channels);
}

std::tuple<Tensor, Tensor, Tensor> masked_conv2d_backward_kernel(
    const Tensor& grad_output, const Tensor& input, const Tensor& weight, const Tensor& mask,
    const Tensor& kept_offsets, const Tensor& kept_positions, const Tensor& position_offsets,
    const Tensor& position_channels, IntArrayRef stride, IntArrayRef padding, IntArrayRef dilation, int64_t groups,
    const std::vector<bool>& output_mask, const std::optional<Tensor>& relu_output,
    const std::optional<Tensor>& input_mask, const std::optional<Tensor>& input_offsets,
    const std::optional<Tensor>& input_channels) {
  check_cuda(input);
  const int32_t device = input.get_device_index();
  const torch::stable::accelerator::DeviceGuard guard(device);
  return masked_conv2d_backward(CudaLaunch(device), grad_output, input, weight, mask, kept_offsets, kept_positions,
                                position_offsets, position_channels, stride, padding, dilation, groups, output_mask,
                                relu_output, input_mask, input_offsets, input_channels);
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(rmask, CUDA, m) {
  m.impl("masked_conv2d", TORCH_BOX(&masked_conv2d_forward_kernel));
  m.impl("masked_conv2d_stats", TORCH_BOX(&masked_conv2d_stats_kernel));
  m.impl("masked_conv2d_backward", TORCH_BOX(&masked_conv2d_backward_kernel));
}

}  // namespace cuda
}  // namespace rmask
