// The schemas of the rmask ops, as strings: defined by csrc/masked_conv2d.cpp (under both op
// families) and by the host emulation of the CUDA kernels (tests/cuda/host_emulation.cu, in its
// own namespace), so each signature is written once.
#pragma once

namespace rmask {

// relu?(mask * (conv + bias) + residual): `residual` (the output's shape, e.g. a ResNet
// shortcut) is added at every position, masked ones included, then the ReLU if asked.
// relu=True fuses the activation into the epilogue: relu(conv * mask + ...), for inference
// of the paper's unit (mask after BN, then ReLU; masked outputs stay 0, or relu(residual)).
// input_mask (bool, (Cin or 1, H, W)): the op computes that of input * input_mask; with it
// come its lists, input_offsets and input_channels: the by-position part of
// rk.kept_index(input_mask, Cin), built once with the mask (the CPU kernels read them to skip
// masked inputs; the other backends multiply the mask out).
constexpr const char* kMaskedConv2dSchema =
    "masked_conv2d(Tensor input, Tensor weight, Tensor? bias, Tensor mask, "
    "Tensor kept_offsets, Tensor kept_positions, Tensor position_offsets, Tensor position_channels, "
    "int[2] stride, int[2] padding, int[2] dilation, int groups, Tensor? residual=None, Tensor? input_mask=None, "
    "Tensor? input_offsets=None, Tensor? input_channels=None, "
    "*, bool relu=False) -> Tensor";

// The forward plus, per output channel, the sum and the sum of squares of its outputs over
// the batch (masked outputs are 0, so: over the kept ones), float64: the statistics of BN
// over kept positions (bn_stats="kept") computed in the same pass.
constexpr const char* kMaskedConv2dStatsSchema =
    "masked_conv2d_stats(Tensor input, Tensor weight, Tensor? bias, Tensor mask, "
    "Tensor kept_offsets, Tensor kept_positions, Tensor position_offsets, Tensor position_channels, "
    "int[2] stride, int[2] padding, int[2] dilation, int groups, Tensor? input_mask=None, "
    "Tensor? input_offsets=None, Tensor? input_channels=None) "
    "-> (Tensor, Tensor, Tensor)";

// Gradients for (input, weight, bias); an output not asked for in output_mask is an
// empty tensor (the autograd glue turns it into None). relu_output: the forward's output
// when it fused a ReLU (relu=True): grad_output counts only where relu_output > 0, read at
// kept outputs only (no pass over the whole gradient).
constexpr const char* kMaskedConv2dBackwardSchema =
    "masked_conv2d_backward(Tensor grad_output, Tensor input, Tensor weight, "
    "Tensor mask, Tensor kept_offsets, Tensor kept_positions, Tensor position_offsets, "
    "Tensor position_channels, int[2] stride, int[2] padding, int[2] dilation, int groups, "
    "bool[3] output_mask, Tensor? relu_output=None, Tensor? input_mask=None, "
    "Tensor? input_offsets=None, Tensor? input_channels=None) "
    "-> (Tensor, Tensor, Tensor)";

}  // namespace rmask
