// The batch-vector kernels for AVX-512 (32 zmm registers of 16 floats): batch_vector_impl.h
// compiled for that instruction set, run only on CPUs that have it (best_batch_vector_kernels).
// Twice the lanes and twice the registers of AVX2: a tile covers 32 images and up to 8
// channels, so each loaded input vector and each broadcast weight feed more FMAs.
#include "batch_vector.h"

#ifdef RMASK_BATCH_VECTOR_KERNELS
#pragma GCC push_options
#pragma GCC target("avx512f,avx2,fma")
#include <immintrin.h>

namespace rmask {
namespace cpu {
namespace avx512 {
namespace {

constexpr const char* kName = "avx512";

struct Simd {
  using V = __m512;
  static constexpr int kLanes = 16;
  static V zero() { return _mm512_setzero_ps(); }
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  // p[j] where bit j of `lanes` is set, else 0; the unset lanes are not read.
  static void stream(float* p, V v) { _mm512_stream_ps(p, v); }  // p aligned to the vector size
  static void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  static void store_lanes(uint32_t lanes, float* p, V v) { _mm512_mask_storeu_ps(p, __mmask16(lanes), v); }
  static V broadcast(const float* p) { return _mm512_set1_ps(*p); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
  static V max(V a, V b) { return _mm512_max_ps(a, b); }  // b where either is NaN
  // v where gate > 0, else 0 (0 where gate is NaN).
  static V where_positive(V gate, V v) { return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(gate, zero(), _CMP_GT_OQ), v); }
  // Lane j gets the next of p[0], p[1], ... where bit j of `lanes` is set, else 0 (reads only
  // popcount(lanes) floats here; the AVX2 version reads kLanes).
  static V expand(uint32_t lanes, const float* p) { return _mm512_maskz_expandloadu_ps(__mmask16(lanes), p); }
  // dst row k (stride ds) = column k of the 16x16 block src (rows at stride ss).
  static void transpose(const float* src, int64_t ss, float* dst, int64_t ds) {
    V r[16], t[16];
    for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(src + i * ss);
    for (int i = 0; i < 16; i += 2) {
      t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
      t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {  // each 128-bit lane: one column of 4 rows
      r[i] = _mm512_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
      r[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
      r[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
      r[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
    }
    for (int i = 0; i < 4; ++i) {  // then the 128-bit lanes of 4 row groups into place
      t[i] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0x88);
      t[i + 4] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0xdd);
      t[i + 8] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0x88);
      t[i + 12] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0xdd);
    }
    for (int i = 0; i < 4; ++i) {
      r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
      r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xdd);
      r[i + 4] = _mm512_shuffle_f32x4(t[i + 4], t[i + 12], 0x88);
      r[i + 12] = _mm512_shuffle_f32x4(t[i + 4], t[i + 12], 0xdd);
    }
    for (int i = 0; i < 16; ++i) _mm512_storeu_ps(dst + i * ds, r[i]);
  }
};

// 32 images per tile: 8 channels x 2 vectors = 16 accumulators + 2 loads + 1 broadcast. The
// tile's 8 weight-row pointers, the input pointer, its stride, the index and the bound fit the
// 16 general registers; at 10 or 12 channels GCC spills pointers and an accumulator (whose
// store/reload chain then paces the loop): 8 is 5% faster at keep 1.0.
constexpr int kVectors = 2, kTile = 8;
// grad-weight: 6 channels x 4 vectors (64 input channels) = 24 accumulators + 4 loads + 1 broadcast.
constexpr int kWeightTile = 6, kWeightVectors = 4;
// forward_positions: 6 positions x 4 vectors (64 output channels) = 24 accumulators + 4 weight
// loads + 1 broadcast.
constexpr int kPositionRows = 6, kPositionVectors = 4;

#include "batch_vector_impl.h"

}  // namespace
}  // namespace avx512

const BatchVectorKernels* avx512_kernels() { return &avx512::kernels; }

}  // namespace cpu
}  // namespace rmask

#pragma GCC pop_options
#endif
