// The batch-vector kernels (batch_vector.h) run on torch tensors: float32, groups == 1, on an
// AVX2 or AVX-512 CPU. Lays out the weights, allocates the outputs, splits the work across
// threads and sums the per-thread partial results in a fixed order (deterministic for a given
// thread count). masked_conv2d_kernel.cpp checks the arguments and chooses these or the
// portable kernels (portable_kernels.h).
#pragma once

#include <array>
#include <optional>
#include <tuple>

#include "../masked_conv2d_common.h"
#include "batch_vector.h"

namespace rmask {
namespace cpu {

// The batch-vector kernels for this CPU, chosen once by ATen's CPU capability (which
// ATEN_CPU_CAPABILITY lowers): AVX-512 where ATen's own kernels use it, else AVX2 (so
// ATEN_CPU_CAPABILITY=avx2 forces the AVX2 kernels on an AVX-512 CPU); null where the
// capability is "default" and on other CPUs.
const BatchVectorKernels* batch_vector_kernels();

// Whether the batch-vector kernels serve a call with this input dtype, groups, batch and kernel
// height: the one statement of the rule (Python's "auto" asks it through rmask::cpu_uses_batch_vector).
bool use_batch_vector(ScalarType dtype, int64_t groups, int64_t batch, int64_t kernel_h);

// relu?(mask * (conv + bias) + residual) (residual undefined: none), in the input's memory
// format; with `channel_sums` (set to a (2, Cout) float64 tensor) also the per-channel sums and
// sums of squares of the output. The kept index: contiguous, checked (check_kept_index).
// input_mask (checked, with its lists; or undefined): the input counts as 0 where the mask is
// False, and the kernels skip what those inputs would feed.
Tensor batch_vector_forward(const ConvGeometry& g, const Tensor& input, const Tensor& weight,
                            const std::optional<Tensor>& bias, const Tensor& kept_positions,
                            const Tensor& position_offsets, const Tensor& position_channels, bool relu,
                            Tensor* channel_sums = nullptr, const Tensor& residual = Tensor(),
                            const InputMask& input_mask = InputMask());

// (grad_input, grad_weight, grad_bias) of mask * conv, each an empty tensor where output_mask
// does not ask for it; grad_output read at kept outputs only, and there zeroed where
// relu_gate (defined: the forward's fused-ReLU output; undefined: no gate) is not > 0.
// input_mask as for the forward: grad_input is 0 where it is False.
std::tuple<Tensor, Tensor, Tensor> batch_vector_backward(const ConvGeometry& g, const Tensor& grad_output,
                                                         const Tensor& relu_gate, const Tensor& input,
                                                         const Tensor& weight, const Tensor& kept_positions,
                                                         const Tensor& position_offsets,
                                                         const Tensor& position_channels,
                                                         std::array<bool, 3> output_mask,
                                                         const InputMask& input_mask = InputMask());

}  // namespace cpu
}  // namespace rmask
