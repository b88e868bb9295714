// The batch-vector kernels for AVX2 + FMA (16 ymm registers): batch_vector_impl.h compiled
// for that instruction set, run only on CPUs that have it (best_batch_vector_kernels).
#include "batch_vector.h"

#ifdef RMASK_BATCH_VECTOR_KERNELS
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#include <immintrin.h>

namespace rmask {
namespace cpu {
namespace avx2 {
namespace {

constexpr const char* kName = "avx2";

// All ones in lane j where bit j of `lanes` is set, else zero.
inline __m256i lanes_set(uint32_t lanes) {
  const __m256i bits = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  return _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(int(lanes)), bits), bits);
}

struct Simd {
  using V = __m256;
  static constexpr int kLanes = 8;
  static V zero() { return _mm256_setzero_ps(); }
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  // p[j] where bit j of `lanes` is set, else 0; the unset lanes are not read.
  static void stream(float* p, V v) { _mm256_stream_ps(p, v); }  // p aligned to the vector size
  static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static void store_lanes(uint32_t lanes, float* p, V v) { _mm256_maskstore_ps(p, lanes_set(lanes), v); }
  static V broadcast(const float* p) { return _mm256_broadcast_ss(p); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static V max(V a, V b) { return _mm256_max_ps(a, b); }  // b where either is NaN
  // v where gate > 0, else 0 (0 where gate is NaN).
  static V where_positive(V gate, V v) { return _mm256_and_ps(v, _mm256_cmp_ps(gate, zero(), _CMP_GT_OQ)); }
  // Lane j gets the next of p[0], p[1], ... where bit j of `lanes` is set, else 0. AVX2 has
  // no expand instruction: a permutation from a table, then the unset lanes zeroed; reads
  // kLanes floats from p, so the caller leaves kLanes floats of slack after its data.
  static V expand(uint32_t lanes, const float* p);
  // dst row k (stride ds) = column k of the 8x8 block src (rows at stride ss).
  static void transpose(const float* src, int64_t ss, float* dst, int64_t ds);
};

// 16 images per tile: 6 channels x 2 vectors = 12 accumulators + 2 loads + 1 broadcast <= 16.
constexpr int kVectors = 2, kTile = 6;
// grad-weight: 4 channels x 3 vectors of input channels = 12 accumulators + 3 loads + 1 broadcast.
constexpr int kWeightTile = 4, kWeightVectors = 3;
// forward_positions: 6 positions x 2 vectors (16 output channels) = 12 accumulators + 2 weight
// loads + 1 broadcast.
constexpr int kPositionRows = 6, kPositionVectors = 2;

#include "batch_vector_impl.h"

// Per 8-bit lane mask: lane j's source, the rank of bit j among the set bits.
struct ExpandTable {
  alignas(32) int32_t source[256][8];
  constexpr ExpandTable() : source() {
    for (int m = 0; m < 256; ++m)
      for (int j = 0, k = 0; j < 8; ++j) source[m][j] = (m >> j & 1) ? k++ : 0;
  }
};
constexpr ExpandTable kExpandTable{};

Simd::V Simd::expand(uint32_t lanes, const float* p) {
  const __m256i source = _mm256_load_si256(reinterpret_cast<const __m256i*>(kExpandTable.source[lanes]));
  return _mm256_and_ps(_mm256_permutevar8x32_ps(_mm256_loadu_ps(p), source), _mm256_castsi256_ps(lanes_set(lanes)));
}

void Simd::transpose(const float* src, int64_t ss, float* dst, int64_t ds) { transpose8x8(src, ss, dst, ds); }

}  // namespace
}  // namespace avx2

const BatchVectorKernels* avx2_kernels() { return &avx2::kernels; }

}  // namespace cpu
}  // namespace rmask

#pragma GCC pop_options
#endif
