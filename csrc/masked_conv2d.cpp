// Schemas of the rmask ops. Every backend (csrc/cpu, csrc/cuda, rmask_kernels/triton)
// registers an implementation of these; fake kernels and autograd live in
// rmask_kernels/ops.py, so opcheck, autograd and torch.compile see one op.
//
// The fixed mask reaches the kernels twice: `mask` (bool, (Cm, Hout, Wout), Cm = 1 or
// Cout) for validation and the reference, and its kept positions in CSR form, built
// once when the mask is drawn (rmask_kernels/masks.py: kept_index):
//   kept_offsets   int64 (P + 1)   pattern p keeps kept_positions[offsets[p]:offsets[p+1]]
//   kept_positions int64 (total)   flat output positions oh * Wout + ow, ascending
// P patterns cover Cout channels in equal consecutive blocks: P = 1 for a spatial mask,
// Cout / group_size for a group mask, Cout for a neuron mask. And by output position:
//   position_offsets  int64 (Hout * Wout + 1)  position p keeps channels
//   position_channels int64 (kept pairs)       position_channels[position_offsets[p]:...[p+1]], ascending

#include <string>

#include <torch/library.h>

namespace {

// Each schema is defined twice, from one string: `name` (served by csrc/cpu and csrc/cuda,
// TORCH_LIBRARY_IMPL) and `triton_name` (served by rmask_kernels/triton, registered from
// Python). One dispatch key holds one kernel, so the Triton backend is a second op family
// with the identical signature rather than a second CUDA kernel of the same op.
void define_in_both_families(torch::Library& m, const std::string& schema) {
  m.def(schema.c_str());
  m.def(("triton_" + schema).c_str());
}

}  // namespace

TORCH_LIBRARY(rmask, m) {
  // relu?(mask * (conv + bias) + residual): `residual` (the output's shape, e.g. a ResNet
  // shortcut) is added at every position, masked ones included, then the ReLU if asked.
  define_in_both_families(
      m, "masked_conv2d(Tensor input, Tensor weight, Tensor? bias, Tensor mask, "
      "Tensor kept_offsets, Tensor kept_positions, Tensor position_offsets, Tensor position_channels, "
      "int[2] stride, int[2] padding, int[2] dilation, int groups, Tensor? residual=None, *, bool relu=False) "
      "-> Tensor");
  // The forward plus, per output channel, the sum and the sum of squares of its outputs over
  // the batch (masked outputs are 0, so: over the kept ones), float64: the statistics of BN
  // over kept positions (bn_stats="kept") computed in the same pass.
  define_in_both_families(
      m, "masked_conv2d_stats(Tensor input, Tensor weight, Tensor? bias, Tensor mask, "
      "Tensor kept_offsets, Tensor kept_positions, Tensor position_offsets, Tensor position_channels, "
      "int[2] stride, int[2] padding, int[2] dilation, int groups) -> (Tensor, Tensor, Tensor)");
  // relu=True fuses the activation into the epilogue: relu(conv * mask + ...), for inference
  // of the paper's unit (mask after BN, then ReLU; masked outputs stay 0, or relu(residual)).
  // Gradients for (input, weight, bias); an output not asked for in output_mask is an
  // empty tensor (the autograd glue turns it into None). For relu=True the caller passes
  // grad_output already multiplied by (output > 0).
  define_in_both_families(
      m, "masked_conv2d_backward(Tensor grad_output, Tensor input, Tensor weight, "
      "Tensor mask, Tensor kept_offsets, Tensor kept_positions, Tensor position_offsets, "
      "Tensor position_channels, int[2] stride, int[2] padding, int[2] dilation, int groups, "
      "bool[3] output_mask) "
      "-> (Tensor, Tensor, Tensor)");
}
