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

#include "torch_stable.h"

#include "masked_conv2d_schemas.h"

namespace {

// Each schema is defined twice, from one string: `name` (served by csrc/cpu and csrc/cuda,
// STABLE_TORCH_LIBRARY_IMPL) and `triton_name` (served by rmask_kernels/triton, registered from
// Python). One dispatch key holds one kernel, so the Triton backend is a second op family
// with the identical signature rather than a second CUDA kernel of the same op.
void define_in_both_families(torch::stable::detail::StableLibrary& m, const std::string& schema) {
  m.def(schema.c_str());
  m.def(("triton_" + schema).c_str());
}

}  // namespace

STABLE_TORCH_LIBRARY(rmask, m) {
  define_in_both_families(m, rmask::kMaskedConv2dSchema);
  define_in_both_families(m, rmask::kMaskedConv2dStatsSchema);
  define_in_both_families(m, rmask::kMaskedConv2dBackwardSchema);
}
