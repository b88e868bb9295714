// The portable CPU kernels of rmask::masked_conv2d: any floating dtype, any groups, any CPU.
// Exact and deterministic; float32 with groups == 1 on an AVX2 or AVX-512 CPU takes the faster
// batch-vector kernels instead (batch_vector_driver.h). masked_conv2d_kernel.cpp checks the
// arguments and chooses.
#pragma once

#include <array>
#include <optional>
#include <tuple>

#include "../masked_conv2d_common.h"

namespace rmask {
namespace cpu {

// relu?(mask * (conv + bias) + residual) (residual undefined: none), in the input's memory
// format and dtype. kept_offsets and kept_positions: contiguous, checked (check_kept_index).
Tensor portable_forward(const ConvGeometry& g, const Tensor& input, const Tensor& weight,
                        const std::optional<Tensor>& bias, const Tensor& kept_offsets, const Tensor& kept_positions,
                        const Tensor& residual, bool relu);

// (grad_input, grad_weight, grad_bias) of mask * conv, each an empty tensor where output_mask
// does not ask for it; grad_output read at kept outputs only, and there zeroed where
// relu_gate (defined: the forward's fused-ReLU output; undefined: no gate) is not > 0.
std::tuple<Tensor, Tensor, Tensor> portable_backward(const ConvGeometry& g, const Tensor& grad_output,
                                                     const Tensor& relu_gate, const Tensor& input, const Tensor& weight,
                                                     const Tensor& kept_offsets, const Tensor& kept_positions,
                                                     std::array<bool, 3> output_mask);

}  // namespace cpu
}  // namespace rmask
