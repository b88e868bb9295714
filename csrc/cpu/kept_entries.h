// A tensor's kept entries on the batch-vector kernels: the kept values of an input mask, or the
// kept output gradients, moved between a tensor and rows of padded N floats per entry
// (gather_kept and scatter_kept, batch_vector.h), on all threads.
#pragma once

#include "../masked_conv2d_common.h"
#include "batch_vector.h"

namespace rmask {
namespace cpu {

// InputIndex::values for a call, in the calling thread's scratch slot 3: padded N floats per
// kept input entry, and for a vector (at most 16) of entries past the last, zeros, which grad
// weight's layout reads (entries_image_major).
float* entry_values(const BatchVectorGeometry& g, const InputIndex& inputs);

// entry_values holding the kept values of x (NCHW or NHWC) under a partial input mask.
float* gather_kept_values(const BatchVectorGeometry& g, const InputIndex& inputs, const float* x, Strides s);

// Every element of x (NCHW or NHWC): the values of inputs.values at the kept inputs, 0 elsewhere.
void scatter_kept_values(const BatchVectorGeometry& g, const InputIndex& inputs, float* x, Strides s);

// Every element of y (NCHW or NHWC): the kept outputs' values (rows of padded N floats in
// position-CSR order) at the kept outputs, 0 elsewhere; plus `residual` (laid out as y, or
// null) and then the ReLU if `relu`.
void scatter_kept_outputs(const BatchVectorGeometry& g, const Tensor& position_offsets,
                          const Tensor& position_channels, const float* values, float* y, Strides s,
                          const float* residual, bool relu);

// Kept output gradients, compacted to rows of padded_batch floats (zero in the padding), in
// position-CSR order, gated by `gate` where not null (0 where it is not > 0): the operand of
// grad-input, grad-weight and grad-bias. gy and gate: NCHW or NHWC, as their strides say.
Tensor kept_gradient_rows(const BatchVectorGeometry& g, const float* gy, Strides gy_strides, const float* gate,
                          Strides gate_strides, const Tensor& position_offsets, const Tensor& position_channels);

}  // namespace cpu
}  // namespace rmask
