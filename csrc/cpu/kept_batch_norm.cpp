// CPU kernels of training-mode BN over a masked conv's kept outputs (bn_stats="kept"), float32
// NCHW, given the batch statistics: the normalization with its affine and optional ReLU in one
// pass, and its backward channel by channel (a channel's planes over the batch are read twice,
// the second time from L2). rmask_kernels.nn._KeptBatchNorm calls them and states the formula;
// its Python form serves every other case and is these kernels' test oracle.
//
// cpu_kept_batch_norm(y, mask, scale, shift, relu, residual): relu?(y * scale + shift * mask
//   + residual), per channel c: scale[c], shift[c]; y is 0 where the mask is False, so masked
//   outputs stay 0 (or the residual's value); residual optional, y's shape.
// cpu_kept_batch_norm_backward(grad_out, y, mask, out, mean, rstd, scale, count,
//   gated_gradient) -> (grad_y, sum_g, sum_g_xhat, g): g = grad_out where out > 0 (out: the
//   forward's output with a ReLU; undefined without), sum_g = sum of g over kept positions,
//   sum_g_xhat = rstd * (sum of g * y - mean * sum_g), and grad_y = scale * g - k * y + (k *
//   mean - scale * sum_g / count) with k = scale * rstd * sum_g_xhat / count, at every
//   position (masked ones carry no meaning: every masked conv backward ignores its gradient
//   there); g itself (the residual's gradient) where gated_gradient, else an empty tensor.

#include <algorithm>
#include <cstdint>
#include <tuple>

#include "../torch_stable.h"
#include "output_cache.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace rmask {
namespace {

// The plane loops, compiled for AVX-512, AVX2 and baseline x86-64 and picked by the CPU when
// the library loads (GCC's target_clones): elementwise passes the compiler vectorizes.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(__APPLE__)
#define RMASK_PLANE_LOOP __attribute__((target_clones("arch=skylake-avx512", "arch=haswell", "default")))
#else
#define RMASK_PLANE_LOOP
#endif

constexpr int64_t kLanes = 16;  // independent float partial sums: the compiler keeps them in vectors

// o = relu?(x * s + b * m + r) over one plane (r: null for none). Branch-free (the mask and
// the signs are random), `v < 0 ? 0 : v` keeps NaN as clamp_min does.
RMASK_PLANE_LOOP void normalize_plane(const float* __restrict x, const uint8_t* __restrict m, float s, float b,
                                      const float* __restrict r, float* __restrict o, int64_t hw, bool relu) {
  if (r && relu)
    for (int64_t p = 0; p < hw; ++p) {
      const float v = x[p] * s + b * static_cast<float>(m[p]) + r[p];
      o[p] = v < 0.0f ? 0.0f : v;
    }
  else if (r)
    for (int64_t p = 0; p < hw; ++p) o[p] = x[p] * s + b * static_cast<float>(m[p]) + r[p];
  else if (relu)
    for (int64_t p = 0; p < hw; ++p) {
      const float v = x[p] * s + b * static_cast<float>(m[p]);
      o[p] = v < 0.0f ? 0.0f : v;
    }
  else
    for (int64_t p = 0; p < hw; ++p) o[p] = x[p] * s + b * static_cast<float>(m[p]);
}

// g = grad_out, or 0 where the ReLU's output (gate; null: no ReLU) is not positive: a select.
inline float gated(const float* __restrict go, const float* __restrict gate, int64_t p) {
  const float g = go[p];
  return !gate || gate[p] > 0.0f ? g : 0.0f;
}

// Adds a plane's sums of g * m and of g * y to *sum_g and *sum_gy, fetching a line of each of
// the next planes (next_go, next_gate if not null, next_y) per 16 floats: a channel's planes lie
// C * H * W apart, each on pages of its own, where the hardware prefetcher starts cold.
RMASK_PLANE_LOOP void plane_sums(const float* __restrict go, const float* __restrict gate, const float* __restrict y,
                                 const uint8_t* __restrict m, int64_t hw, const float* next_go,
                                 const float* next_gate, const float* next_y, double* sum_g, double* sum_gy) {
  float lanes_g[kLanes] = {}, lanes_gy[kLanes] = {};
  int64_t p = 0;
  for (; p + kLanes <= hw; p += kLanes) {
    __builtin_prefetch(next_go + p);
    if (next_gate) __builtin_prefetch(next_gate + p);
    __builtin_prefetch(next_y + p);
    for (int64_t j = 0; j < kLanes; ++j) {
      const float g = gated(go, gate, p + j);
      lanes_g[j] += g * static_cast<float>(m[p + j]);  // as the formula's g * mask
      lanes_gy[j] += g * y[p + j];
    }
  }
  for (; p < hw; ++p) {
    const float g = gated(go, gate, p);
    lanes_g[0] += g * static_cast<float>(m[p]);
    lanes_gy[0] += g * y[p];
  }
  for (int64_t j = 0; j < kLanes; ++j) {
    *sum_g += lanes_g[j];
    *sum_gy += lanes_gy[j];
  }
}

// out = s * g - k * y + c over one plane, and g itself to g_out where not null (the gradient of
// a residual added before the ReLU), by streaming stores (SSE, on every x86-64) where both are
// 16-byte aligned: the stores skip reading each line before overwriting it (which took a third
// of the backward), and the next reader is the conv's backward, not this core's caches. The
// caller fences (_mm_sfence) before anyone reads them.
RMASK_PLANE_LOOP void grad_plane(const float* __restrict go, const float* __restrict gate, const float* __restrict y,
                                 float* __restrict out, int64_t hw, float s, float k, float c,
                                 float* __restrict g_out) {
  int64_t p = 0;
#if defined(__x86_64__)
  constexpr int64_t kChunk = 64;
  if (reinterpret_cast<uintptr_t>(out) % 16 == 0 && reinterpret_cast<uintptr_t>(g_out) % 16 == 0) {
    alignas(64) float g[kChunk], chunk[kChunk];
    for (; p + kChunk <= hw; p += kChunk) {
      for (int64_t j = 0; j < kChunk; ++j) g[j] = gated(go, gate, p + j);
      for (int64_t j = 0; j < kChunk; ++j) chunk[j] = s * g[j] - k * y[p + j] + c;
      for (int64_t j = 0; j < kChunk; j += 4) _mm_stream_ps(out + p + j, _mm_load_ps(chunk + j));
      if (g_out)
        for (int64_t j = 0; j < kChunk; j += 4) _mm_stream_ps(g_out + p + j, _mm_load_ps(g + j));
    }
  }
#endif
  for (; p < hw; ++p) {
    const float g = gated(go, gate, p);
    out[p] = s * g - k * y[p] + c;
    if (g_out) g_out[p] = g;
  }
}

// Makes this thread's streaming stores visible before anyone reads what they wrote.
inline void store_fence() {
#if defined(__x86_64__)
  _mm_sfence();
#endif
}

// y (and grad_out, out) float32, 4-D, contiguous NCHW on the CPU; mask bool (C or 1, H, W),
// contiguous; every per-channel vector float32 with C values.
void check_arguments(const char* op, const Tensor& y, const Tensor& mask,
                     std::initializer_list<std::pair<const char*, const Tensor*>> vectors) {
  RMASK_CHECK(y.dim() == 4 && y.scalar_type() == ScalarType::Float && y.device().is_cpu() && y.is_contiguous(), op,
              ": y must be a contiguous 4-D float32 CPU tensor, got shape ", describe(y.sizes()));
  const int64_t channels = y.size(1);
  RMASK_CHECK(mask.dim() == 3 && mask.scalar_type() == ScalarType::Bool && mask.is_contiguous() &&
                  (mask.size(0) == channels || mask.size(0) == 1) && mask.size(1) == y.size(2) &&
                  mask.size(2) == y.size(3),
              op, ": mask must be a contiguous bool tensor of shape (", channels, " or 1, ", y.size(2), ", ",
              y.size(3), "), got shape ", describe(mask.sizes()));
  for (const auto& [name, vector] : vectors)
    RMASK_CHECK(vector->dim() == 1 && vector->numel() == channels && vector->scalar_type() == ScalarType::Float &&
                    vector->is_contiguous(),
                op, ": ", name, " must be a contiguous float32 vector of ", channels, " values, got shape ",
                describe(vector->sizes()));
}

void check_like_y(const char* op, const char* name, const Tensor& t, const Tensor& y) {
  RMASK_CHECK(t.scalar_type() == ScalarType::Float && t.dim() == 4 && t.size(0) == y.size(0) &&
                  t.size(1) == y.size(1) && t.size(2) == y.size(2) && t.size(3) == y.size(3),
              op, ": ", name, " must be float32 of y's shape ", describe(y.sizes()), ", got shape ",
              describe(t.sizes()));
}

Tensor kept_batch_norm(const Tensor& y, const Tensor& mask, const Tensor& scale, const Tensor& shift, bool relu,
                       const std::optional<Tensor>& residual) {
  check_arguments("cpu_kept_batch_norm", y, mask, {{"scale", &scale}, {"shift", &shift}});
  const bool has_residual = residual.has_value() && residual->defined();
  if (has_residual) check_like_y("cpu_kept_batch_norm", "residual", *residual, y);
  const auto r = has_residual ? rmask::contiguous(*residual) : Tensor();
  const float* r_data = has_residual ? data<float>(r) : nullptr;
  const int64_t channels = y.size(1), hw = y.size(2) * y.size(3), planes = y.size(0) * channels;
  const int64_t mask_step = mask.size(0) == 1 ? 0 : hw;
  auto out = cpu::empty_output(y.sizes(), ScalarType::Float, MemoryFormat::Contiguous);
  const float* src = data<float>(y);
  const auto* kept = static_cast<const uint8_t*>(mask.data_ptr());  // bool: one byte, 0 or 1
  const float* scales = data<float>(scale);
  const float* shifts = data<float>(shift);
  float* dst = data<float>(out);
  torch::stable::parallel_for(0, planes, 1, [&](int64_t begin, int64_t end) {
    for (int64_t plane = begin; plane < end; ++plane) {
      const int64_t c = plane % channels;
      normalize_plane(src + plane * hw, kept + c * mask_step, scales[c], shifts[c],
                      r_data ? r_data + plane * hw : nullptr, dst + plane * hw, hw, relu);
    }
  });
  return out;
}

std::tuple<Tensor, Tensor, Tensor, Tensor> kept_batch_norm_backward(const Tensor& grad_out, const Tensor& y,
                                                                    const Tensor& mask,
                                                                    const std::optional<Tensor>& out,
                                                                    const Tensor& mean, const Tensor& rstd,
                                                                    const Tensor& scale, const Tensor& count,
                                                                    bool gated_gradient) {
  const char* op = "cpu_kept_batch_norm_backward";
  check_arguments(op, y, mask, {{"mean", &mean}, {"rstd", &rstd}, {"scale", &scale}, {"count", &count}});
  check_like_y(op, "grad_out", grad_out, y);
  const bool relu = out.has_value() && out->defined();
  if (relu) check_like_y(op, "out", *out, y);
  const auto go = rmask::contiguous(grad_out);  // e.g. the expanded gradient of a sum()
  const auto gate = relu ? rmask::contiguous(*out) : Tensor();
  const int64_t images = y.size(0), channels = y.size(1), hw = y.size(2) * y.size(3);
  const int64_t mask_step = mask.size(0) == 1 ? 0 : hw;
  auto grad_y = cpu::empty_output(y.sizes(), ScalarType::Float, MemoryFormat::Contiguous);
  auto sum_g = empty({channels}, ScalarType::Float, y.device());
  auto sum_g_xhat = empty({channels}, ScalarType::Float, y.device());
  auto gated_g = gated_gradient ? cpu::empty_output(y.sizes(), ScalarType::Float, MemoryFormat::Contiguous)
                                : empty({0}, ScalarType::Float, y.device());
  float* gated_data = gated_gradient ? data<float>(gated_g) : nullptr;
  const float* g_data = data<float>(go);
  const float* gate_data = relu ? data<float>(gate) : nullptr;
  const float* y_data = data<float>(y);
  const auto* kept = static_cast<const uint8_t*>(mask.data_ptr());
  const float *means = data<float>(mean), *rstds = data<float>(rstd), *scales = data<float>(scale),
              *counts = data<float>(count);
  float* grad_data = data<float>(grad_y);
  float *sum_g_data = data<float>(sum_g), *sum_g_xhat_data = data<float>(sum_g_xhat);
  torch::stable::parallel_for(0, channels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const uint8_t* m = kept + c * mask_step;
      double total_g = 0.0, total_gy = 0.0;
      for (int64_t n = 0; n < images; ++n) {
        const int64_t at = (n * channels + c) * hw;
        const int64_t next = n + 1 < images ? at + channels * hw : (c + 1 < end ? c + 1 : c) * hw;
        plane_sums(g_data + at, relu ? gate_data + at : nullptr, y_data + at, m, hw, g_data + next,
                   relu ? gate_data + next : nullptr, y_data + next, &total_g, &total_gy);
      }
      const double mu = means[c], r = rstds[c], s = scales[c], n_kept = counts[c];
      const double g_xhat = r * (total_gy - mu * total_g);
      const double k = s * r * g_xhat / n_kept;
      sum_g_data[c] = static_cast<float>(total_g);
      sum_g_xhat_data[c] = static_cast<float>(g_xhat);
      for (int64_t n = 0; n < images; ++n) {
        const int64_t at = (n * channels + c) * hw;
        grad_plane(g_data + at, relu ? gate_data + at : nullptr, y_data + at, grad_data + at, hw,
                   static_cast<float>(s), static_cast<float>(k), static_cast<float>(k * mu - s * total_g / n_kept),
                   gated_data ? gated_data + at : nullptr);
      }
    }
    store_fence();
  });
  return {grad_y, sum_g, sum_g_xhat, gated_g};
}

}  // namespace

STABLE_TORCH_LIBRARY_FRAGMENT(rmask, m) {
  m.def(
      "cpu_kept_batch_norm(Tensor y, Tensor mask, Tensor scale, Tensor shift, bool relu, Tensor? residual=None) -> "
      "Tensor");
  m.def(
      "cpu_kept_batch_norm_backward(Tensor grad_out, Tensor y, Tensor mask, Tensor? out, Tensor mean, Tensor rstd, "
      "Tensor scale, Tensor count, bool gated_gradient=False) -> (Tensor, Tensor, Tensor, Tensor)");
}

STABLE_TORCH_LIBRARY_IMPL(rmask, CPU, m) {
  m.impl("cpu_kept_batch_norm", TORCH_BOX(&kept_batch_norm));
  m.impl("cpu_kept_batch_norm_backward", TORCH_BOX(&kept_batch_norm_backward));
}

}  // namespace rmask
