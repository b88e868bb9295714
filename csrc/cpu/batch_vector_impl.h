// The batch-vector kernels of batch_vector.h, written once over a SIMD instruction set.
//
// Included by one .cpp file per instruction set (batch_vector_avx2.cpp,
// batch_vector_avx512.cpp), inside that file's own namespace and target pragma, after it
// defines:
//   struct Simd      V (the vector type), kLanes (floats per V), zero, load, store,
//                    broadcast, fma, add
//   kVectors         vectors of images per micro-tile row (images per tile: kVectors * kLanes)
//   kTile            most output (forward) or input (grad-input) channels per micro-tile
//   kWeightTile      most output channels per grad-weight tile
//   kWeightVectors   most vectors of input channels per grad-weight tile
//   kPositionRows    most kept positions per forward_positions tile
//   kPositionVectors most vectors of output channels per forward_positions tile
// chosen so that the accumulators, the loaded vectors and one broadcast fit the register file.
// No ATen or standard-library templates here: every function gets the including file's
// target, and nothing inline is shared with code compiled for another CPU.

inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

// A compile-time count, for calling templates with a run-time tile size (with_count).
template <int N>
struct Count {
  static constexpr int value = N;
};

// f(Count<count>{}) for a run-time count in [1, N].
template <int N, typename F>
inline void with_count(int count, F&& f) {
  if constexpr (N > 1) {
    if (count < N) return with_count<N - 1>(count, f);
  }
  f(Count<N>{});
}

// CH output channels at one output position, NV vectors of images from nb: the
// accumulators are locals of this one function so that they live in registers. Not inlined:
// inside the row loop the compiler runs out of general registers and spills accumulators.
template <int CH, int NV>
__attribute__((noinline)) void forward_block(const BatchVectorGeometry& g, const float* x_t, const float* w_f, const float* bias,
                          bool relu, const int64_t* channels, const int64_t* taps, int64_t ntaps, int64_t p,
                          int64_t nb, float* y, Strides s) {
  using V = typename Simd::V;
  const int64_t cin = g.in_channels, np = g.padded_batch, row = g.kernel_h * g.kernel_w * cin;
  V acc[CH][NV];
#pragma GCC unroll 16
  for (int k = 0; k < CH; ++k)
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) acc[k][v] = Simd::zero();
  for (int64_t t = 0; t < ntaps; ++t) {
    const float* xp = x_t + taps[2 * t + 1] + nb;
    const float* wp[CH];
#pragma GCC unroll 16
    for (int k = 0; k < CH; ++k) wp[k] = w_f + channels[k] * row + taps[2 * t];
    for (int64_t ci = 0; ci < cin; ++ci) {
      V x[NV];
#pragma GCC unroll 2
      for (int v = 0; v < NV; ++v) x[v] = Simd::load(xp + ci * np + v * Simd::kLanes);
#pragma GCC unroll 16
      for (int k = 0; k < CH; ++k) {
        const V w = Simd::broadcast(wp[k] + ci);
#pragma GCC unroll 2
        for (int v = 0; v < NV; ++v) acc[k][v] = Simd::fma(w, x[v], acc[k][v]);
      }
    }
  }
  alignas(64) float lanes[NV * Simd::kLanes];
  const int64_t images = min64(NV * Simd::kLanes, g.batch - nb);
#pragma GCC unroll 16
  for (int k = 0; k < CH; ++k) {
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) Simd::store(lanes + v * Simd::kLanes, acc[k][v]);
    const int64_t c = channels[k];
    const float shift = bias ? bias[c] : 0.0f;
    float* out = y + c * s.c + p * s.position + nb * s.n;
    for (int64_t n = 0; n < images; ++n) {
      const float v = lanes[n] + shift;
      out[n * s.n] = (relu && v < 0.0f) ? 0.0f : v;
    }
  }
}

// grad-input: CH input channels (ci0 ...) at one input position, NV vectors of images from nb.
template <int CH, int NV>
__attribute__((noinline)) void grad_input_block(const BatchVectorGeometry& g, const float* gy_pos, const float* w_b,
                             const int64_t* position_channels, const int64_t* contributions, int64_t ncontrib,
                             int64_t ci0, int64_t q, int64_t nb, float* grad_x_t) {
  using V = typename Simd::V;
  const int64_t np = g.padded_batch, cin = g.in_channels, cout = g.out_channels;
  V acc[CH][NV];
#pragma GCC unroll 16
  for (int k = 0; k < CH; ++k)
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) acc[k][v] = Simd::zero();
  for (int64_t t = 0; t < ncontrib; ++t) {
    const int64_t tap = contributions[3 * t], e0 = contributions[3 * t + 1], e1 = contributions[3 * t + 2];
    const float* w_tap = w_b + tap * cout * cin + ci0;
    for (int64_t e = e0; e < e1; ++e) {
      const float* gp = gy_pos + e * np + nb;
      V gy[NV];
#pragma GCC unroll 2
      for (int v = 0; v < NV; ++v) gy[v] = Simd::load(gp + v * Simd::kLanes);
      const float* wp = w_tap + position_channels[e] * cin;
#pragma GCC unroll 16
      for (int k = 0; k < CH; ++k) {
        const V w = Simd::broadcast(wp + k);
#pragma GCC unroll 2
        for (int v = 0; v < NV; ++v) acc[k][v] = Simd::fma(w, gy[v], acc[k][v]);
      }
    }
  }
  float* out = grad_x_t + (q * cin + ci0) * np + nb;
#pragma GCC unroll 16
  for (int k = 0; k < CH; ++k)
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) Simd::store(out + k * np + v * Simd::kLanes, acc[k][v]);
}

// grad-weight: CH output channels kept at one position, one tap, V vectors of input
// channels: sum over the images of gy[channel, n] * x[n, ci], added into the partial gradient.
template <int CH, int NV>
__attribute__((noinline)) void grad_weight_block(const float* const* gy_rows, const float* x_nc, int64_t batch, int64_t cpad,
                              float* const* out) {
  using V = typename Simd::V;
  V acc[CH][NV];
#pragma GCC unroll 8
  for (int k = 0; k < CH; ++k)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[k][v] = Simd::zero();
  for (int64_t n = 0; n < batch; ++n) {
    V x[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) x[v] = Simd::load(x_nc + n * cpad + v * Simd::kLanes);
#pragma GCC unroll 8
    for (int k = 0; k < CH; ++k) {
      const V gk = Simd::broadcast(gy_rows[k] + n);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[k][v] = Simd::fma(gk, x[v], acc[k][v]);
    }
  }
#pragma GCC unroll 8
  for (int k = 0; k < CH; ++k)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      float* o = out[k] + v * Simd::kLanes;
      Simd::store(o, Simd::add(Simd::load(o), acc[k][v]));
    }
}

template <int CH>
inline void grad_weight_channels_tile(const float* const* gy_rows, const float* x_nc, int64_t batch, int64_t cpad,
                                      float* const* out) {
  constexpr int64_t step = kWeightVectors * Simd::kLanes;
  float* shifted[CH];
  int64_t ci = 0;
  for (; ci + step <= cpad; ci += step) {
    for (int k = 0; k < CH; ++k) shifted[k] = out[k] + ci;
    grad_weight_block<CH, kWeightVectors>(gy_rows, x_nc + ci, batch, cpad, shifted);
  }
  const int rest = static_cast<int>((cpad - ci) / Simd::kLanes);
  if (rest == 0) return;
  for (int k = 0; k < CH; ++k) shifted[k] = out[k] + ci;
  with_count<kWeightVectors>(rest, [&](auto nv) {
    grad_weight_block<CH, decltype(nv)::value>(gy_rows, x_nc + ci, batch, cpad, shifted);
  });
}

// dst row k (stride dst_stride) = column k of the 8x8 block src (rows at stride src_stride).
// AVX2 instructions: every instruction set here includes them.
__attribute__((always_inline)) inline void transpose8x8(const float* src, int64_t src_stride, float* dst,
                                                      int64_t dst_stride) {
  __m256 r[8], t[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + i * src_stride);
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    r[i] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    r[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int i = 0; i < 4; ++i) {
    _mm256_storeu_ps(dst + i * dst_stride, _mm256_permute2f128_ps(r[i], r[i + 4], 0x20));
    _mm256_storeu_ps(dst + (i + 4) * dst_stride, _mm256_permute2f128_ps(r[i], r[i + 4], 0x31));
  }
}

// The same for a rows x cols block (edges), element by element.
inline void transpose_block(const float* src, int64_t src_stride, float* dst, int64_t dst_stride, int64_t rows,
                            int64_t cols) {
  if (rows == 8 && cols == 8) return transpose8x8(src, src_stride, dst, dst_stride);
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t k = 0; k < cols; ++k) dst[k * dst_stride + i] = src[i * src_stride + k];
}

// The padding lanes of panel rows, a few floats each, once per row: a memset call each
// (what GCC made of the plain loop) was a quarter of a batch-2 neuron forward.
inline void zero_floats(float* dst, int64_t count) {
  int64_t i = 0;
  for (; i + Simd::kLanes <= count; i += Simd::kLanes) Simd::store(dst + i, Simd::zero());
  if (i < count) Simd::store_lanes((1u << (count - i)) - 1, dst + i, Simd::zero());
}

inline void copy_floats(float* dst, const float* src, int64_t count) {
  int64_t i = 0;
  for (; i + Simd::kLanes <= count; i += Simd::kLanes) Simd::store(dst + i, Simd::load(src + i));
  for (; i < count; ++i) dst[i] = src[i];
}

// 64 output columns' kept bits. A type of this file's own (see InputBlock).
struct KeptWord {
  uint64_t bits;
};

// dst = relu?(src + residual) element by element, the one way outputs are written out. With
// `kept` (bits in 64-bit words; null: all kept), src only where bit i is set and 0 elsewhere,
// where src is not read. residual may be null (then 0). The ReLU keeps NaN, as torch.relu does.
// With `stream`, streaming stores where dst is aligned: outputs come from the output cache
// (output_cache.h), blocks this code last wrote the same way, so no cached copy of them needs
// evicting, and the stores skip reading each line before overwriting it. Measured side by side
// with F.conv2d * mask (make bench's setting, 64->64@32, keep 0.1): spatial 4.8 -> 2.5 ms,
// neuron 3.7-4.1 -> 2.8-3.1 ms; ResNet-18 inference 1.52x -> 1.62x with
// benchmarks/model_times.py. (Before the output cache, outputs were fresh glibc memory the
// previous op had just dirtied, and plain stores measured faster.) The caller fences
// (_mm_sfence) before anyone reads dst.
inline void floats_out(float* dst, const float* src, const KeptWord* kept, const float* residual, int64_t count,
                       bool relu, bool stream) {
  using V = typename Simd::V;
  constexpr int64_t L = Simd::kLanes;
  const V zero = Simd::zero();
  stream = stream && reinterpret_cast<uintptr_t>(dst) % sizeof(V) == 0;
  int64_t i = 0;
  for (; i + L <= count; i += L) {  // L divides 64: a vector's bits never straddle two words
    V v = kept ? Simd::load_lanes(static_cast<uint32_t>(kept[i / 64].bits >> (i % 64)) & ((1u << L) - 1), src + i)
               : Simd::load(src + i);
    if (residual) v = Simd::add(v, Simd::load(residual + i));
    if (relu) v = Simd::max(zero, v);
    if (stream) Simd::stream(dst + i, v);
    else Simd::store(dst + i, v);
  }
  for (; i < count; ++i) {
    float v = (!kept || kept[i / 64].bits >> (i % 64) & 1) ? src[i] : 0.0f;
    if (residual) v += residual[i];
    dst[i] = (relu && v < 0.0f) ? 0.0f : v;
  }
}

// The next tile height when `remaining` rows are split into as few tiles of at most `most`
// rows as possible, of near-equal heights: a thin tile pays the same loads for fewer FMAs.
inline int even_tile(int64_t remaining, int64_t most) {
  const int64_t tiles = (remaining + most - 1) / most;
  return static_cast<int>((remaining + tiles - 1) / tiles);
}

// Vectors of images in the tile starting at image nb: kVectors, or fewer at the end of a
// batch padded to a multiple of kBatchBlock but not of kVectors * kLanes.
inline int tile_vectors(const BatchVectorGeometry& g, int64_t nb) {
  return static_cast<int>(min64(kVectors, (g.padded_batch - nb) / Simd::kLanes));
}

// Row `row` of a tensor t (N, C, H, W), NCHW or NHWC, to (to_panel) or from a batch-last
// panel [W][C][padded N] (padding images zero-filled on the way in).
constexpr int64_t kPrefetchChannels = 2;

inline void row_batch_last(bool to_panel, int64_t batch, int64_t padded, int64_t channels, int64_t width,
                           float* tensor, Strides s, int64_t row, float* panel) {
  const int64_t np = padded;
  if (s.position == 1) {  // NCHW: consecutive positions of one channel per tile row
    // Images outermost within a channel: each tensor page (one image's plane) is visited once per row.
    // Whole 16 x 16 blocks (AVX-512) where the batch and the row allow, 8 x 8 elsewhere.
    constexpr int64_t L = Simd::kLanes;
    const int64_t n_whole = L == 16 ? batch / L * L : 0, w_whole = L == 16 ? width / L * L : 0;
    // Each (image, channel) plane gives this row only Wout floats: too short a run for the
    // hardware prefetcher, so ask for the same run two channels ahead.
    auto prefetch_ahead = [&](const float* t, int64_t c, int64_t images) {
      if (c + kPrefetchChannels < channels)
        for (int64_t n = 0; n < images; ++n)
          _mm_prefetch(reinterpret_cast<const char*>(t + n * s.n + kPrefetchChannels * s.c), _MM_HINT_T0);
    };
    for (int64_t c = 0; c < channels; ++c) {
      for (int64_t n0 = 0; n0 < n_whole; n0 += L)
        for (int64_t w0 = 0; w0 < w_whole; w0 += L) {
          float* t = tensor + c * s.c + (row * width + w0) * s.position + n0 * s.n;
          float* b = panel + (w0 * channels + c) * np + n0;
          if (to_panel) {
            prefetch_ahead(t, c, L);
            Simd::transpose(t, s.n, b, channels * np);
          } else {
            Simd::transpose(b, channels * np, t, s.n);
          }
        }
      for (int64_t n0 = 0; n0 < batch; n0 += 8) {
        for (int64_t w0 = n0 < n_whole ? w_whole : 0; w0 < width; w0 += 8) {
          float* t = tensor + c * s.c + (row * width + w0) * s.position + n0 * s.n;
          float* b = panel + (w0 * channels + c) * np + n0;
          const int64_t images = min64(8, batch - n0), cols = min64(8, width - w0);
          if (to_panel) {
            if (w0 % 16 == 0) prefetch_ahead(t, c, images);  // a 64-byte line covers 16 columns
            transpose_block(t, s.n, b, channels * np, images, cols);
          } else {
            transpose_block(b, channels * np, t, s.n, cols, images);
          }
        }
      }
      if (to_panel && np > batch)
        for (int64_t w = 0; w < width; ++w) zero_floats(panel + (w * channels + c) * np + batch, np - batch);
    }
  } else {  // NHWC: 8 consecutive channels of one position per tile row
    for (int64_t w = 0; w < width; ++w) {
      for (int64_t c0 = 0; c0 < channels; c0 += 8) {
        const int64_t cols = min64(8, channels - c0);
        float* t = tensor + c0 * s.c + (row * width + w) * s.position;
        float* b = panel + (w * channels + c0) * np;
        for (int64_t n0 = 0; n0 < batch; n0 += 8) {
          const int64_t images = min64(8, batch - n0);
          if (to_panel) transpose_block(t + n0 * s.n, s.n, b + n0, np, images, cols);
          else transpose_block(b + n0, np, t + n0 * s.n, s.n, cols, images);
        }
        if (to_panel && np > batch)
          for (int64_t k = 0; k < cols; ++k) zero_floats(b + k * np + batch, np - batch);
      }
    }
  }
}

inline void row_to_batch_last(const BatchVectorGeometry& g, const float* src, Strides s, int64_t row, float* dst) {
  row_batch_last(true, g.batch, g.padded_batch, g.in_channels, g.width, const_cast<float*>(src), s, row, dst);
}

// The panels of the input rows output row `oh` reads (null for padding rows), from a ring of
// panel_ring_rows(g) panels: a row is laid out by `fill` only when its slot holds another row,
// so consecutive output rows reuse the rows they share. panel_rows: the row in each slot.
template <typename Fill>
inline void ring_panels(const BatchVectorGeometry& g, int64_t oh, float* panels, int64_t panel_size,
                        int64_t* panel_rows, const float** row_panel, Fill fill) {
  const int64_t slots = panel_ring_rows(g);
  for (int64_t i = 0; i < g.kernel_h; ++i) {
    const int64_t ih = oh * g.stride_h - g.pad_h + i * g.dilation_h;
    row_panel[i] = nullptr;
    if (ih < 0 || ih >= g.height) continue;
    float* panel = panels + (ih % slots) * panel_size;
    if (panel_rows[ih % slots] != ih) {
      fill(ih, panel);
      panel_rows[ih % slots] = ih;
    }
    row_panel[i] = panel;
  }
}

// Floats between images in the forward's staging row [n][c][ow]: Cout * Wout, padded off
// multiples of 1 KiB (the scratch holds N * (Cout * Wout + 16)). Each micro-tile stores its
// images' values at this stride; at 64 * 32 floats (8 KiB) they all fell into one L1 set.
inline int64_t staged_image_stride(const BatchVectorGeometry& g) {
  const int64_t floats = g.out_channels * g.out_width;
  return floats % 256 == 0 ? floats + 16 : floats;  // one cache line more than a multiple of 1 KiB
}

void forward_rows(const BatchVectorGeometry& g, const float* x, Strides x_strides, const float* w_f,
                  const float* bias, bool relu, const int64_t* position_offsets, const int64_t* position_channels,
                  int64_t row_begin, int64_t row_end, const float* residual, float* y, Strides y_strides,
                  int64_t* taps, float* panels, int64_t* panel_rows, float* staging, double* channel_sums) {
  // Input rows are laid out batch-last on demand into a small ring of cache-resident panels
  // (each used by kernel_h output rows), so the layout change never round-trips through
  // memory. Results land in a zeroed staging row [n][c][ow] that is then copied out whole
  // (kept and masked values), so y is written once, in long runs.
  const int64_t cout = g.out_channels, wo = g.out_width, panel_size = g.width * g.in_channels * g.padded_batch;
  for (int64_t k = 0; k < panel_ring_rows(g); ++k) panel_rows[k] = -1;
  const int64_t image_stride = staged_image_stride(g);  // see staged_image_stride
  const Strides staged{image_stride, wo, 1};
  const bool block_relu = relu && !residual;  // with a residual, the ReLU comes after adding it
  // The row's kept (c, ow) as bits, [c][ow / 64]: NCHW copy-outs load only the kept values
  // from the staging row and write zeros for the rest, so it needs no zeroing per row (a
  // memset of N * Cout * Wout floats a row, as many bytes as y). NHWC rows are transposed
  // out whole, so their staging row is zeroed.
  const bool nchw_out = y_strides.position == 1;
  const int64_t words = (wo + 63) / 64;
  std::vector<KeptWord> kept(cout * words);
  for (int64_t oh = row_begin; oh < row_end; ++oh) {
    const float* row_panel[64];  // per kernel row: its panel, or null for a padding row
    ring_panels(g, oh, panels, panel_size, panel_rows, row_panel,
                [&](int64_t ih, float* panel) { row_to_batch_last(g, x, x_strides, ih, panel); });
    for (KeptWord& word : kept) word.bits = 0;
    for (int64_t ow = 0; ow < wo; ++ow)
      for (int64_t e = position_offsets[oh * wo + ow]; e < position_offsets[oh * wo + ow + 1]; ++e)
        kept[position_channels[e] * words + ow / 64].bits |= uint64_t{1} << (ow % 64);
    if (!nchw_out) __builtin_memset(staging, 0, sizeof(float) * g.batch * image_stride);
    for (int64_t ow = 0; ow < wo; ++ow) {
      const int64_t p = oh * wo + ow;
      const int64_t e0 = position_offsets[p], e1 = position_offsets[p + 1];
      if (e0 == e1) continue;
      int64_t ntaps = 0;  // taps inside the image; padding taps contribute nothing
      for (int64_t i = 0; i < g.kernel_h; ++i) {
        if (!row_panel[i]) continue;
        for (int64_t j = 0; j < g.kernel_w; ++j) {
          const int64_t iw = ow * g.stride_w - g.pad_w + j * g.dilation_w;
          if (iw < 0 || iw >= g.width) continue;
          taps[2 * ntaps] = (i * g.kernel_w + j) * g.in_channels;
          taps[2 * ntaps + 1] = (row_panel[i] - panels) + iw * g.in_channels * g.padded_batch;
          ++ntaps;
        }
      }
      for (int64_t nb = 0; nb < g.batch; nb += kVectors * Simd::kLanes) {
        const int nv = tile_vectors(g, nb);
        for (int64_t e = e0; e < e1;) {
          const int tile = even_tile(e1 - e, kTile);
          with_count<kTile>(tile, [&](auto ch) {
            if (nv == kVectors)
              forward_block<decltype(ch)::value, kVectors>(g, panels, w_f, bias, block_relu, position_channels + e,
                                                           taps, ntaps, ow, nb, staging, staged);
            else
              forward_block<decltype(ch)::value, 1>(g, panels, w_f, bias, block_relu, position_channels + e, taps,
                                                    ntaps, ow, nb, staging, staged);
          });
          e += tile;
        }
      }
    }
    if (channel_sums) {  // over the kept outputs (masked ones are 0)
      for (int64_t n = 0; n < g.batch; ++n) {
        for (int64_t c = 0; c < cout; ++c) {
          const float* v = staging + n * image_stride + c * wo;
          const KeptWord* bits = kept.data() + c * words;
          float sum = 0.0f, squares = 0.0f;
          for (int64_t ow = 0; ow < wo; ++ow) {
            if (!(bits[ow / 64].bits >> (ow % 64) & 1)) continue;
            sum += v[ow];
            squares += v[ow] * v[ow];
          }
          channel_sums[c] += sum;
          channel_sums[cout + c] += squares;
        }
      }
    }
    // Out to y, plus the residual (laid out as y) and then the ReLU if there is one: NCHW rows
    // are short ([c][ow] runs of Wout floats, too short to pay for a memcpy call each), NHWC
    // needs [c][ow] -> [ow][c] transposes (and then one pass over its contiguous row).
    const Strides& s = y_strides;
    for (int64_t n = 0; n < g.batch; ++n) {
      const float* src = staging + n * image_stride;
      const int64_t offset = n * s.n + oh * wo * s.position;
      float* dst = y + offset;
      if (s.position == 1) {
        for (int64_t c = 0; c < cout; ++c)
          floats_out(dst + c * s.c, src + c * wo, kept.data() + c * words,
                     residual ? residual + offset + c * s.c : nullptr, wo, relu && residual, true);
      } else {
        for (int64_t c0 = 0; c0 < cout; c0 += 8)
          for (int64_t w0 = 0; w0 < wo; w0 += 8)
            transpose_block(src + c0 * wo + w0, wo, dst + w0 * s.position + c0 * s.c, s.position, min64(8, cout - c0),
                            min64(8, wo - w0));
        if (residual) floats_out(dst, dst, nullptr, residual + offset, wo * cout, relu, false);
      }
    }
  }
  _mm_sfence();  // the streaming stores are visible before the caller reads y
}

void grad_input_rows(const BatchVectorGeometry& g, const float* gy_pos, const float* w_b,
                     const int64_t* position_offsets, const int64_t* position_channels, int64_t row_begin,
                     int64_t row_end, float* grad_x, Strides x_strides, int64_t* contributions, float* panel) {
  // Each input row is computed batch-last into a cache-resident panel, then transposed out.
  for (int64_t ih = row_begin; ih < row_end; ++ih) {
    for (int64_t iw = 0; iw < g.width; ++iw) {
      int64_t ncontrib = 0;  // (tap, first, last) of the kept outputs this input position feeds
      for (int64_t i = 0; i < g.kernel_h; ++i) {
        const int64_t num_h = ih + g.pad_h - i * g.dilation_h;
        if (num_h < 0 || num_h % g.stride_h) continue;
        const int64_t oh = num_h / g.stride_h;
        if (oh >= g.out_height) continue;
        for (int64_t j = 0; j < g.kernel_w; ++j) {
          const int64_t num_w = iw + g.pad_w - j * g.dilation_w;
          if (num_w < 0 || num_w % g.stride_w) continue;
          const int64_t ow = num_w / g.stride_w;
          if (ow >= g.out_width) continue;
          const int64_t p = oh * g.out_width + ow;
          if (position_offsets[p] == position_offsets[p + 1]) continue;
          contributions[3 * ncontrib] = i * g.kernel_w + j;
          contributions[3 * ncontrib + 1] = position_offsets[p];
          contributions[3 * ncontrib + 2] = position_offsets[p + 1];
          ++ncontrib;
        }
      }
      for (int64_t nb = 0; nb < g.batch; nb += kVectors * Simd::kLanes) {
        const int nv = tile_vectors(g, nb);
        for (int64_t ci0 = 0, count = 0; ci0 < g.in_channels; ci0 += count) {
          count = even_tile(g.in_channels - ci0, kTile);
          with_count<kTile>(static_cast<int>(count), [&](auto ch) {
            if (nv == kVectors)
              grad_input_block<decltype(ch)::value, kVectors>(g, gy_pos, w_b, position_channels, contributions,
                                                              ncontrib, ci0, iw, nb, panel);
            else
              grad_input_block<decltype(ch)::value, 1>(g, gy_pos, w_b, position_channels, contributions, ncontrib,
                                                       ci0, iw, nb, panel);
          });
        }
      }
    }
    row_batch_last(false, g.batch, g.padded_batch, g.in_channels, g.width, grad_x, x_strides, ih, panel);
  }
}

void kept_gradient_rows(const BatchVectorGeometry& g, const float* gy, Strides s, const int64_t* position_offsets,
                        const int64_t* position_channels, int64_t row_begin, int64_t row_end, float* rows,
                        float* panel) {
  // Each output row of gy is laid out batch-last in a panel (runs of Wout floats read per
  // plane, as the forward reads its input), then its kept pairs are copied out whole.
  const int64_t np = g.padded_batch, cout = g.out_channels, wo = g.out_width;
  for (int64_t oh = row_begin; oh < row_end; ++oh) {
    if (position_offsets[oh * wo] == position_offsets[(oh + 1) * wo]) continue;  // nothing kept in this row
    row_batch_last(true, g.batch, np, cout, wo, const_cast<float*>(gy), s, oh, panel);
    for (int64_t ow = 0; ow < wo; ++ow) {
      const int64_t p = oh * wo + ow;
      for (int64_t e = position_offsets[p]; e < position_offsets[p + 1]; ++e)
        copy_floats(rows + e * np, panel + (ow * cout + position_channels[e]) * np, np);
    }
  }
}

int64_t padded_channels(int64_t channels) { return (channels + Simd::kLanes - 1) / Simd::kLanes * Simd::kLanes; }

// Input row `row` as an image-major panel [W][N][Cpad] (channels innermost, zero-padded).
inline void row_to_image_major(const BatchVectorGeometry& g, const float* src, Strides s, int64_t row, float* dst) {
  const int64_t cin = g.in_channels, cpad = padded_channels(cin), width = g.width, batch = g.batch;
  if (s.position == 1) {  // NCHW: tiles of 8 channels x 8 positions
    for (int64_t n = 0; n < batch; ++n)
      for (int64_t c0 = 0; c0 < cin; c0 += 8)
        for (int64_t w0 = 0; w0 < width; w0 += 8)
          transpose_block(src + n * s.n + c0 * s.c + (row * width + w0) * s.position, s.c,
                          dst + (w0 * batch + n) * cpad + c0, batch * cpad, min64(8, cin - c0), min64(8, width - w0));
  } else {  // NHWC: channels already innermost
    for (int64_t n = 0; n < batch; ++n)
      for (int64_t w = 0; w < width; ++w)
        __builtin_memcpy(dst + (w * batch + n) * cpad, src + n * s.n + (row * width + w) * s.position,
                         sizeof(float) * cin);
  }
  if (cpad > cin)
    for (int64_t r = 0; r < width * batch; ++r) zero_floats(dst + r * cpad + cin, cpad - cin);
}

void grad_weight_rows(const BatchVectorGeometry& g, const float* gy_pos, const float* x, Strides x_strides,
                      const int64_t* position_offsets, const int64_t* position_channels, int64_t row_begin,
                      int64_t row_end, float* grad_w_part, float* panels, int64_t* panel_rows) {
  // Position-major: each input panel is loaded once per output position and serves every
  // channel kept there; the images are the reduction, the input channels the SIMD lanes.
  const int64_t cpad = padded_channels(g.in_channels), kk = g.kernel_h * g.kernel_w;
  const int64_t panel_size = g.width * g.batch * cpad;
  for (int64_t k = 0; k < panel_ring_rows(g); ++k) panel_rows[k] = -1;
  for (int64_t oh = row_begin; oh < row_end; ++oh) {
    const float* row_panel[64];
    ring_panels(g, oh, panels, panel_size, panel_rows, row_panel,
                [&](int64_t ih, float* panel) { row_to_image_major(g, x, x_strides, ih, panel); });
    for (int64_t ow = 0; ow < g.out_width; ++ow) {
      const int64_t p = oh * g.out_width + ow;
      const int64_t e0 = position_offsets[p], e1 = position_offsets[p + 1];
      for (int64_t e = e0, count = 0; e < e1; e += count) {
        count = even_tile(e1 - e, kWeightTile);
        const float* gy_rows[kWeightTile];
        for (int k = 0; k < count; ++k) gy_rows[k] = gy_pos + (e + k) * g.padded_batch;
        for (int64_t i = 0; i < g.kernel_h; ++i) {
          if (!row_panel[i]) continue;
          for (int64_t j = 0; j < g.kernel_w; ++j) {
            const int64_t iw = ow * g.stride_w - g.pad_w + j * g.dilation_w;
            if (iw < 0 || iw >= g.width) continue;
            const float* x_nc = row_panel[i] + iw * g.batch * cpad;
            float* out[kWeightTile];
            for (int k = 0; k < count; ++k)
              out[k] = grad_w_part + (position_channels[e + k] * kk + i * g.kernel_w + j) * cpad;
            with_count<kWeightTile>(static_cast<int>(count), [&](auto ch) {
              grad_weight_channels_tile<decltype(ch)::value>(gy_rows, x_nc, g.batch, cpad, out);
            });
          }
        }
      }
    }
  }
}

// forward_positions' tile: R kept positions of one image x NV vectors of output channels
// from co0, reading the image channels-last: x_taps[r * ntaps + t] is where position r's tap t
// reads channel 0 (`zeros` for a padding tap). The sums, plus the bias and then the ReLU, are
// stored to (or with `accumulate`, added to) the channels-last rows out_rows[r] at co0.
// backward_positions runs grad-input through it too (one tap, output channels as the sum).
template <int R, int NV>
__attribute__((noinline)) void position_block(const float* const* x_taps, int64_t ntaps, int64_t cin,
                                              const float* w_p, int64_t cout_pad, int64_t co0, const float* bias,
                                              bool relu, bool accumulate, float* const* out_rows) {
  using V = typename Simd::V;
  V acc[R][NV];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[r][v] = Simd::zero();
  for (int64_t t = 0; t < ntaps; ++t) {
    const float* xp[R];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) xp[r] = x_taps[r * ntaps + t];
    const float* wp = w_p + t * cin * cout_pad + co0;
    for (int64_t ci = 0; ci < cin; ++ci) {
      V w[NV];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) w[v] = Simd::load(wp + ci * cout_pad + v * Simd::kLanes);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const V xb = Simd::broadcast(xp[r] + ci);
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) acc[r][v] = Simd::fma(xb, w[v], acc[r][v]);
      }
    }
  }
  const V zero = Simd::zero();
#pragma GCC unroll 4
  for (int v = 0; v < NV; ++v) {
    const V b = bias ? Simd::load(bias + co0 + v * Simd::kLanes) : zero;
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      float* out = out_rows[r] + co0 + v * Simd::kLanes;
      V value = Simd::add(acc[r][v], b);
      if (relu) value = Simd::max(zero, value);
      if (accumulate) value = Simd::add(Simd::load(out), value);
      Simd::store(out, value);
    }
  }
}

// position_block over every tile of R positions x NV vectors: rows of out_pad floats (padded
// output channels), reduction over `cin` per tap.
inline void position_tiles(const float* const* x_taps, int64_t ntaps, int64_t cin, const float* w_p, int64_t out_pad,
                           const float* bias, bool relu, bool accumulate, float* const* out_rows, int rows) {
  for (int64_t co0 = 0; co0 < out_pad; co0 += kPositionVectors * Simd::kLanes) {
    const int nv = static_cast<int>(min64(kPositionVectors, (out_pad - co0) / Simd::kLanes));
    with_count<kPositionRows>(rows, [&](auto r) {
      with_count<kPositionVectors>(nv, [&](auto v) {
        position_block<decltype(r)::value, decltype(v)::value>(x_taps, ntaps, cin, w_p, out_pad, co0, bias, relu,
                                                               accumulate, out_rows);
      });
    });
  }
}

// Whether a kept output position reads a block of Simd::kLanes input positions through some
// tap. A type of this file's own, as KeptBlock below: a std::vector<uint8_t> instantiated
// here would be shared with code compiled for another CPU.
struct InputBlock {
  bool read;
};

// One image of an NCHW or NHWC tensor as a channels-last image [H * W][stride] (channels
// [channels, stride) zero), into `image`. NCHW in blocks of kLanes channels x kLanes positions,
// a block of channels at a time over the whole plane: each block row is a whole cache line of
// its plane, and only kLanes planes stream at once (all of them at once, in blocks of 16
// positions: 12% slower on 64->64@32, 1024-position planes). `needed` (or null: all), per
// block of kLanes positions: whether any kept output reads it; the others are left as they
// were (a strided conv at keep 0.1 reads ~70% of them, see needed_blocks).
inline void image_channels_last(const float* src, Strides s, int64_t channels, int64_t hw, int64_t stride,
                                float* image, const InputBlock* needed = nullptr) {
  constexpr int64_t L = Simd::kLanes;
  if (s.c != 1) {
    for (int64_t c0 = 0; c0 < channels; c0 += L) {
      const int64_t nc = min64(L, channels - c0);
      int64_t q = 0;
      if (nc == L)
        for (; q + L <= hw; q += L)
          if (!needed || needed[q / L].read) Simd::transpose(src + c0 * s.c + q, s.c, image + q * stride + c0, stride);
      for (int64_t c = c0; c < c0 + nc; ++c)
        for (int64_t r = q; r < hw; ++r) image[r * stride + c] = src[c * s.c + r];
    }
  } else {
    for (int64_t q = 0; q < hw; ++q) copy_floats(image + q * stride, src + q * s.position, channels);
  }
  if (stride > channels)
    for (int64_t q = 0; q < hw; ++q) zero_floats(image + q * stride + channels, stride - channels);
}

// The inverse: a channels-last image [H * W][stride] out to one image of an NCHW or NHWC
// tensor, plus `residual` (laid out as dst) and then the ReLU if given. NCHW goes through
// [8 channels][16 positions] blocks, so that each plane gets whole cache lines, written with
// streaming stores (see floats_out); the caller fences.
inline void image_out(const float* image, int64_t stride, int64_t channels, int64_t hw, float* dst, Strides s,
                      const float* residual, bool relu) {
  if (s.c != 1) {
    alignas(64) float block[8 * 16];
    for (int64_t q0 = 0; q0 < hw; q0 += 16) {
      const int64_t here = min64(16, hw - q0);
      for (int64_t c0 = 0; c0 < channels; c0 += 8) {
        const int64_t count = min64(8, channels - c0);
        for (int64_t q = 0; q < here; q += 8)
          transpose_block(image + (q0 + q) * stride + c0, stride, block + q, 16, min64(8, here - q), count);
        for (int64_t k = 0; k < count; ++k) {
          float* out = dst + (c0 + k) * s.c + q0;
          floats_out(out, block + k * 16, nullptr, residual ? residual + (c0 + k) * s.c + q0 : nullptr, here,
                     relu && residual, true);
        }
      }
    }
  } else {
    for (int64_t q = 0; q < hw; ++q) {
      float* out = dst + q * s.position;
      floats_out(out, image + q * stride, nullptr, residual ? residual + q * s.position : nullptr, channels,
                 relu && residual, false);
    }
  }
}

// Where a plane's block of Simd::kLanes output positions (from b * kLanes) finds its kept
// outputs: `kept` has a bit per kept position, `first` is the compact index of the first one.
struct KeptBlock {
  uint32_t kept;
  int64_t first;
};

// The blocks of a plane of hw positions, from the ascending kept `positions`.
inline std::vector<KeptBlock> kept_blocks(const int64_t* positions, int64_t npositions, int64_t hw) {
  std::vector<KeptBlock> blocks((hw + Simd::kLanes - 1) / Simd::kLanes, KeptBlock{0, 0});
  for (int64_t k = npositions - 1; k >= 0; --k) {  // backwards: `first` ends at the lowest index
    KeptBlock& b = blocks[positions[k] / Simd::kLanes];
    b.kept |= 1u << (positions[k] % Simd::kLanes);
    b.first = k;
  }
  return blocks;
}

// The compact outputs of one image, rows [P][stride] for the ascending kept `positions`, out to
// that image of an NCHW or NHWC tensor with every masked element 0, plus `residual` (laid out as
// dst) and then the ReLU if given. NCHW: the rows are transposed to planes [channels][P] in
// `planes`, then each plane is written a vector at a time, each vector expanded from its kept
// values (Simd::expand), with streaming stores (see floats_out; the caller fences): the
// masked outputs cost only their share of the write.
inline void compact_out(const float* rows, int64_t stride, const int64_t* positions, int64_t npositions,
                        const KeptBlock* blocks, int64_t channels, int64_t hw, float* dst, Strides s,
                        const float* residual, bool relu, float* planes) {
  using V = typename Simd::V;
  const V zero = Simd::zero();
  if (s.c != 1) {
    for (int64_t p0 = 0; p0 < npositions; p0 += 8)
      for (int64_t c0 = 0; c0 < channels; c0 += 8)
        transpose_block(rows + p0 * stride + c0, stride, planes + c0 * npositions + p0, npositions,
                        min64(8, npositions - p0), min64(8, channels - c0));
    const int64_t whole = hw / Simd::kLanes * Simd::kLanes;
    for (int64_t c = 0; c < channels; ++c) {
      const float* plane = planes + c * npositions;
      float* out = dst + c * s.c;
      const float* res = residual ? residual + c * s.c : nullptr;
      for (int64_t q = 0; q < whole; q += Simd::kLanes) {
        const KeptBlock& b = blocks[q / Simd::kLanes];
        V v = b.kept ? Simd::expand(b.kept, plane + b.first) : zero;
        if (res) {
          v = Simd::add(v, Simd::load(res + q));
          if (relu) v = Simd::max(zero, v);
        }
        if (reinterpret_cast<uintptr_t>(out + q) % sizeof(V) == 0) Simd::stream(out + q, v);
        else Simd::store(out + q, v);
      }
      if (whole < hw) {
        const KeptBlock& b = blocks[whole / Simd::kLanes];
        for (int64_t q = whole, k = b.first; q < hw; ++q) {
          float v = (b.kept >> (q - whole) & 1) ? plane[k++] : 0.0f;
          if (res) v = v + res[q];
          out[q] = (res && relu && v < 0.0f) ? 0.0f : v;
        }
      }
    }
  } else {
    for (int64_t q = 0, k = 0; q < hw; ++q) {
      float* out = dst + q * s.position;
      const float* res = residual ? residual + q * s.position : nullptr;
      if (k < npositions && positions[k] == q) {
        const float* row = rows + (k++) * stride;
        floats_out(out, row, nullptr, res, channels, relu && res, false);
      } else if (res) {
        for (int64_t c = 0; c < channels; ++c) out[c] = (relu && res[c] < 0.0f) ? 0.0f : res[c];
      } else {
        __builtin_memset(out, 0, sizeof(float) * channels);
      }
    }
  }
}

// The input position (flat, h * W + w) that output position p reads through tap t
// (t = i * kw + j), or -1 for a padding tap.
inline int64_t tap_input(const BatchVectorGeometry& g, int64_t p, int64_t t) {
  const int64_t ih = (p / g.out_width) * g.stride_h - g.pad_h + (t / g.kernel_w) * g.dilation_h;
  const int64_t iw = (p % g.out_width) * g.stride_w - g.pad_w + (t % g.kernel_w) * g.dilation_w;
  return ih >= 0 && ih < g.height && iw >= 0 && iw < g.width ? ih * g.width + iw : -1;
}

// The blocks of a plane of H * W input positions, for the kept output `positions`.
inline std::vector<InputBlock> needed_blocks(const BatchVectorGeometry& g, const int64_t* positions,
                                             int64_t npositions) {
  std::vector<InputBlock> needed((g.height * g.width + Simd::kLanes - 1) / Simd::kLanes, InputBlock{false});
  for (int64_t k = 0; k < npositions; ++k)
    for (int64_t t = 0; t < g.kernel_h * g.kernel_w; ++t) {
      const int64_t q = tap_input(g, positions[k], t);
      if (q >= 0) needed[q / Simd::kLanes].read = true;
    }
  return needed;
}

// Points x_taps (R rows of kh * kw) at the channels-last input rows that the output positions
// positions[0 .. rows) read, `zeros` for padding taps.
inline void point_taps(const BatchVectorGeometry& g, const int64_t* positions, int rows, const float* image,
                       int64_t stride, const float* zeros, const float** x_taps) {
  const int64_t ntaps = g.kernel_h * g.kernel_w;
  for (int r = 0; r < rows; ++r)
    for (int64_t t = 0; t < ntaps; ++t) {
      const int64_t q = tap_input(g, positions[r], t);
      x_taps[r * ntaps + t] = q >= 0 ? image + q * stride : zeros;
    }
}

void forward_positions(const BatchVectorGeometry& g, const float* x, Strides xs, const float* w_p, int64_t cout_pad,
                       const float* bias_p, bool relu, const int64_t* positions, int64_t npositions,
                       int64_t image_begin, int64_t image_end, const float* residual, float* y, Strides ys,
                       const float** x_taps, const float* zeros, float* scratch, double* channel_sums) {
  // One image at a time, channels-last: an NCHW image is transposed into `scratch` first, so
  // that each tap's channels are contiguous (in NCHW they lie a plane apart, all in one L1
  // set); the kept positions are computed in tiles into compact rows, one per kept position,
  // which compact_out then writes to y in one pass (zeros, the residual and the ReLU). The
  // image's input, its kept outputs and the weights stay in L2.
  const int64_t cin = g.in_channels, cout = g.out_channels, ntaps = g.kernel_h * g.kernel_w;
  const int64_t hw = g.height * g.width, hw_out = g.out_height * g.out_width;
  const bool block_relu = relu && !residual;  // with a residual, the ReLU comes after adding it
  const bool x_nchw = xs.c != 1;
  float* x_image = scratch;                                     // [H * W][Cin], for NCHW x
  float* y_rows = scratch + (x_nchw ? hw * cin : 0);            // [P][cout_pad]
  float* y_planes = y_rows + npositions * cout_pad;             // [Cout][P], for NCHW y
  const auto blocks = kept_blocks(positions, npositions, hw_out);
  const auto needed = x_nchw ? needed_blocks(g, positions, npositions) : std::vector<InputBlock>();  // NCHW layout only
  float* out_rows[kPositionRows];
  for (int64_t n = image_begin; n < image_end; ++n) {
    const float* x_n = x + n * xs.n;
    int64_t row_stride = xs.position;
    if (x_nchw) {
      image_channels_last(x_n, xs, cin, hw, cin, x_image, needed.data());
      x_n = x_image, row_stride = cin;
    }
    for (int64_t k0 = 0; k0 < npositions; k0 += kPositionRows) {
      const int rows = static_cast<int>(min64(kPositionRows, npositions - k0));
      point_taps(g, positions + k0, rows, x_n, row_stride, zeros, x_taps);
      for (int r = 0; r < rows; ++r) out_rows[r] = y_rows + (k0 + r) * cout_pad;
      position_tiles(x_taps, ntaps, cin, w_p, cout_pad, bias_p, block_relu, false, out_rows, rows);
    }
    if (channel_sums) {  // over the kept outputs (the masked ones are 0 and add nothing)
      for (int64_t k = 0; k < npositions; ++k) {
        const float* v = y_rows + k * cout_pad;
        for (int64_t c = 0; c < cout; ++c) {
          channel_sums[c] += v[c];
          channel_sums[cout + c] += static_cast<double>(v[c]) * v[c];
        }
      }
    }
    compact_out(y_rows, cout_pad, positions, npositions, blocks.data(), cout, hw_out, y + n * ys.n, ys,
                residual ? residual + n * ys.n : nullptr, relu, y_planes);
  }
  _mm_sfence();  // the streaming stores are visible before the caller reads y
}

void backward_positions(const BatchVectorGeometry& g, const float* gy, Strides gys, const float* x, Strides xs,
                        const float* w_b, const int64_t* positions, int64_t npositions, int64_t image_begin,
                        int64_t image_end, float* grad_x, Strides gxs, float* grad_w_part, float* grad_b_part,
                        float* scratch) {
  // Per image, as forward_positions: the kept output gradients gathered twice (rows [P][Cout]
  // for grad-input, columns [Cout][P] for grad-weight and grad-bias); grad-input scattered
  // tap by tap into a channels-last image (distinct positions of one tap never share an input
  // position) and written out; grad-weight reduces over the kept positions, one tap's input
  // rows packed at a time. One thread per image and a fixed order: deterministic.
  const int64_t cin = g.in_channels, cout = g.out_channels, ntaps = g.kernel_h * g.kernel_w;
  const int64_t cin_pad = padded_channels(cin), cout_pad = padded_channels(cout), hw = g.height * g.width;
  const int64_t np = npositions;
  float* rows = scratch;                     // [P][cout_pad]
  float* columns = rows + np * cout_pad;     // [Cout][P]
  float* image = columns + cout * np;        // [H * W][cin_pad]: x for grad-weight, grad-x for grad-input
  float* panel = image + hw * cin_pad;       // [P][cin_pad]: one tap's input rows
  float* spare = panel + np * cin_pad;       // [cin_pad]: what padding taps add to
  float* out_rows[kPositionRows];
  const bool lay_out_x = grad_w_part && xs.c != 1;  // the NCHW layout for grad-weight uses `needed`
  const auto needed = lay_out_x ? needed_blocks(g, positions, npositions) : std::vector<InputBlock>();
  for (int64_t k = 0; k < np; ++k) zero_floats(rows + k * cout_pad + cout, cout_pad - cout);
  for (int64_t n = image_begin; n < image_end; ++n) {
    const float* gy_n = gy + n * gys.n;
    for (int64_t c = 0; c < cout; ++c)
      for (int64_t k = 0; k < np; ++k) columns[c * np + k] = gy_n[c * gys.c + positions[k] * gys.position];
    if (grad_x)
      for (int64_t c0 = 0; c0 < cout; c0 += 8)
        for (int64_t k0 = 0; k0 < np; k0 += 8)
          transpose_block(columns + c0 * np + k0, np, rows + k0 * cout_pad + c0, cout_pad, min64(8, cout - c0),
                          min64(8, np - k0));
    if (grad_b_part)
      for (int64_t c = 0; c < cout; ++c) {
        float sum = 0.0f;
        for (int64_t k = 0; k < np; ++k) sum += columns[c * np + k];
        grad_b_part[c] += sum;
      }
    if (grad_w_part) {
      image_channels_last(x + n * xs.n, xs, cin, hw, cin_pad, image, needed.data());
      const float* zeros = spare;
      zero_floats(spare, cin_pad);
      for (int64_t t = 0; t < ntaps; ++t) {
        for (int64_t k = 0; k < np; ++k) {
          const int64_t q = tap_input(g, positions[k], t);
          copy_floats(panel + k * cin_pad, q >= 0 ? image + q * cin_pad : zeros, cin_pad);
        }
        for (int64_t c0 = 0, count = 0; c0 < cout; c0 += count) {
          count = even_tile(cout - c0, kWeightTile);
          const float* gy_rows[kWeightTile];
          float* out[kWeightTile];
          for (int k = 0; k < count; ++k) {
            gy_rows[k] = columns + (c0 + k) * np;
            out[k] = grad_w_part + ((c0 + k) * ntaps + t) * cin_pad;
          }
          with_count<kWeightTile>(static_cast<int>(count), [&](auto ch) {
            grad_weight_channels_tile<decltype(ch)::value>(gy_rows, panel, np, cin_pad, out);
          });
        }
      }
    }
    if (grad_x) {
      __builtin_memset(image, 0, sizeof(float) * hw * cin_pad);
      const float* row_of[kPositionRows];
      for (int64_t k0 = 0; k0 < np; k0 += kPositionRows) {
        const int count = static_cast<int>(min64(kPositionRows, np - k0));
        for (int r = 0; r < count; ++r) row_of[r] = rows + (k0 + r) * cout_pad;
        for (int64_t t = 0; t < ntaps; ++t) {
          for (int r = 0; r < count; ++r) {
            const int64_t q = tap_input(g, positions[k0 + r], t);
            out_rows[r] = q >= 0 ? image + q * cin_pad : spare;
          }
          position_tiles(row_of, 1, cout, w_b + t * cout * cin_pad, cin_pad, nullptr, false, true, out_rows, count);
        }
      }
      image_out(image, cin_pad, cin, hw, grad_x + n * gxs.n, gxs, nullptr, false);
    }
  }
  _mm_sfence();  // the streaming stores are visible before the caller reads grad_x
}

// forward_positions' weights: dst[t][ci][co] (rows of cout_pad, zero past Cout) = w[co][ci][t],
// w contiguous, for k = ci * taps + t in [k_begin, k_end). As a [Cout][Cin * taps] matrix w is
// transposed a kLanes x kLanes block at a time, a block of k over every Cout before the next,
// so that each (tap, input channel) row is written whole: ATen's copy of the permuted weights
// took 40-90 us (PERF.md's shapes, 2 threads), a tenth of the fixed part.
void pack_position_weights(const float* w, int64_t cout, int64_t cin, int64_t taps, float* dst, int64_t cout_pad,
                           int64_t k_begin, int64_t k_end) {
  constexpr int64_t L = Simd::kLanes;
  const int64_t k_total = cin * taps;
  alignas(64) float block[L * L];
  for (int64_t k0 = k_begin; k0 < k_end; k0 += L) {
    const int64_t nk = min64(L, k_end - k0);
    float* rows[L];
    // (ci, t) of each k, stepped rather than divided: a division per row was most of the
    // packing's ~40 us (128x64x3x3)
    for (int64_t kk = 0, ci = k0 / taps, t = k0 % taps; kk < nk; ++kk) {
      rows[kk] = dst + (t * cin + ci) * cout_pad;
      if (++t == taps) t = 0, ++ci;
    }
    int64_t co0 = 0;
    if (nk == L)
      for (; co0 + L <= cout; co0 += L) {
        Simd::transpose(w + co0 * k_total + k0, k_total, block, L);
        for (int64_t kk = 0; kk < L; ++kk) Simd::store(rows[kk] + co0, Simd::load(block + kk * L));
      }
    for (int64_t kk = 0; kk < nk; ++kk)
      for (int64_t co = co0; co < cout_pad; ++co) rows[kk][co] = co < cout ? w[co * k_total + k0 + kk] : 0.0f;
  }
}

const BatchVectorKernels kernels = {kName,          padded_channels,  forward_rows,    forward_positions,
                                    backward_positions, kept_gradient_rows, grad_input_rows, grad_weight_rows,
                                    pack_position_weights};
