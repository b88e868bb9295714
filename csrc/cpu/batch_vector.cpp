// Which batch-vector kernels this CPU runs. Compiled for the baseline instruction set: it
// runs on every CPU, before any AVX code may.
#include "batch_vector.h"

namespace rmask {
namespace cpu {

const BatchVectorKernels* best_batch_vector_kernels(bool avx512_allowed) {
#ifdef RMASK_BATCH_VECTOR_KERNELS
  __builtin_cpu_init();
  if (avx512_allowed && __builtin_cpu_supports("avx512f")) return avx512_kernels();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return avx2_kernels();
#else
  (void)avx512_allowed;
#endif
  return nullptr;
}

}  // namespace cpu
}  // namespace rmask
