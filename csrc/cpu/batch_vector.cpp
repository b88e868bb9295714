// Which batch-vector kernels this CPU runs. Compiled for the baseline instruction set: it
// runs on every CPU, before any AVX code may.
#include "batch_vector.h"

namespace rmask {
namespace cpu {

const BatchVectorKernels* best_batch_vector_kernels(bool avx512_allowed) {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  if (avx512_allowed && __builtin_cpu_supports("avx512f") && avx512_kernels()) return avx512_kernels();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && avx2_kernels()) return avx2_kernels();
#else
  (void)avx512_allowed;
#endif
  return nullptr;
}

}  // namespace cpu
}  // namespace rmask
