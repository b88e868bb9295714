// The row kernels (part of batch_vector_impl.h, included by it into each instruction set's
// translation unit): forward_rows, grad_input_rows, grad_weight_rows.
// They serve any mask through the position-CSR lists (which channels are kept at each output
// position): neuron and group masks. Forward and grad-input put the batch in the SIMD lanes,
// reading input rows laid out batch-last (batch_vector_layout.h) in a small ring of panels;
// grad-weight reduces over the images with the input channels in the lanes.

// Vectors of images in the tile starting at image nb: kVectors, or fewer at the end of a
// batch padded to a multiple of kBatchBlock but not of kVectors * kLanes.
inline int tile_vectors(const BatchVectorGeometry& g, int64_t nb) {
  return static_cast<int>(min64(kVectors, (g.padded_batch - nb) / Simd::kLanes));
}

// CH output channels at one output position, NV vectors of images from nb: the
// accumulators are locals of this one function so that they live in registers. Not inlined:
// inside the row loop the compiler runs out of general registers and spills accumulators.
// taps: 4 int64 per tap: weight offset, panel offset, and where the tap's input channels are
// listed in `in_channels` (first, count; first -1: every channel, laid out whole; else the
// listed channels, laid out compactly in list order). With Entries, channel k's values go to
// y + k * padded N + nb, image by image (y: the tile's first entry in rows [e][padded N]).
template <int CH, int NV, bool Entries = false>
__attribute__((noinline)) void forward_block(const BatchVectorGeometry& g, const float* panels,
                                             const float* forward_weight, const float* bias, bool relu,
                                             const int64_t* channels, const int64_t* taps, int64_t ntaps, int64_t p,
                                             int64_t nb, float* y, Strides s, const int64_t* in_channels) {
  using V = typename Simd::V;
  const int64_t cin = g.in_channels, padded_batch = g.padded_batch, per_channel = g.kernel_h * g.kernel_w * cin;
  V acc[CH][NV];
#pragma GCC unroll 16
  for (int k = 0; k < CH; ++k)
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) acc[k][v] = Simd::zero();
  for (int64_t t = 0; t < ntaps; ++t) {
    const float* x_tap = panels + taps[4 * t + 1] + nb;
    const float* w_tap[CH];
#pragma GCC unroll 16
    for (int k = 0; k < CH; ++k) w_tap[k] = forward_weight + channels[k] * per_channel + taps[4 * t];
    if (taps[4 * t + 2] < 0) {
      for (int64_t ci = 0; ci < cin; ++ci) {
        V x[NV];
#pragma GCC unroll 2
        for (int v = 0; v < NV; ++v) x[v] = Simd::load(x_tap + ci * padded_batch + v * Simd::kLanes);
#pragma GCC unroll 16
        for (int k = 0; k < CH; ++k) {
          const V w = Simd::broadcast(w_tap[k] + ci);
#pragma GCC unroll 2
          for (int v = 0; v < NV; ++v) acc[k][v] = Simd::fma(w, x[v], acc[k][v]);
        }
      }
    } else {  // the channels kept at the tap's input position, their entries (gather_kept)
      const int64_t* listed = in_channels + taps[4 * t + 2];
      for (int64_t j = 0, count = taps[4 * t + 3]; j < count; ++j) {
        const int64_t ci = listed[j];
        V x[NV];
#pragma GCC unroll 2
        for (int v = 0; v < NV; ++v) x[v] = Simd::load(x_tap + j * padded_batch + v * Simd::kLanes);
#pragma GCC unroll 16
        for (int k = 0; k < CH; ++k) {
          const V w = Simd::broadcast(w_tap[k] + ci);
#pragma GCC unroll 2
          for (int v = 0; v < NV; ++v) acc[k][v] = Simd::fma(w, x[v], acc[k][v]);
        }
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
    float* out = Entries ? y + k * padded_batch + nb : y + c * s.c + p * s.position + nb * s.n;
    const int64_t step = Entries ? 1 : s.n;
    for (int64_t n = 0; n < images; ++n) {
      const float v = lanes[n] + shift;
      out[n * step] = (relu && v < 0.0f) ? 0.0f : v;
    }
  }
}

// grad-input: CH input channels at one input position, NV vectors of images from nb: channels
// ci0 ... ci0 + CH - 1, or with Listed, listed[0 .. CH). Stored at panel's position q, channel
// by channel, or with Entries, the k-th at panel + k * padded N (its entry, see InputIndex).
template <int CH, int NV, bool Listed = false, bool Entries = false>
__attribute__((noinline)) void grad_input_block(const BatchVectorGeometry& g, const float* gy_pos,
                                                const float* backward_weight, const int64_t* position_channels,
                                                const int64_t* contributions, int64_t ncontrib, int64_t ci0, int64_t q,
                                                int64_t nb, float* panel, const int64_t* listed = nullptr) {
  using V = typename Simd::V;
  const int64_t padded_batch = g.padded_batch, cin = g.in_channels, cout = g.out_channels;
  V acc[CH][NV];
#pragma GCC unroll 16
  for (int k = 0; k < CH; ++k)
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) acc[k][v] = Simd::zero();
  for (int64_t t = 0; t < ncontrib; ++t) {
    const int64_t tap = contributions[3 * t], e0 = contributions[3 * t + 1], e1 = contributions[3 * t + 2];
    const float* w_tap = backward_weight + tap * cout * cin + ci0;
    for (int64_t e = e0; e < e1; ++e) {
      const float* gy_entry = gy_pos + e * padded_batch + nb;
      V gy[NV];
#pragma GCC unroll 2
      for (int v = 0; v < NV; ++v) gy[v] = Simd::load(gy_entry + v * Simd::kLanes);
      const float* w_channel = w_tap + position_channels[e] * cin;
#pragma GCC unroll 16
      for (int k = 0; k < CH; ++k) {
        const V w = Simd::broadcast(w_channel + (Listed ? listed[k] - ci0 : k));
#pragma GCC unroll 2
        for (int v = 0; v < NV; ++v) acc[k][v] = Simd::fma(w, gy[v], acc[k][v]);
      }
    }
  }
  float* out = (Entries ? panel : panel + (q * cin + ci0) * padded_batch) + nb;
#pragma GCC unroll 16
  for (int k = 0; k < CH; ++k)
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v)
      Simd::store(out + (Listed && !Entries ? listed[k] - ci0 : k) * padded_batch + v * Simd::kLanes, acc[k][v]);
}

// grad-weight: CH output channels kept at one position, one tap, NV vectors of input
// channels: sum over the images of gy[channel, n] * x[n, ci], added into the partial gradient
// at out[k] + offset. x_nc: the tap's input, [image][cin_pad], from the block's first channel.
// Used by the position kernels' grad-weight too.
template <int CH, int NV>
__attribute__((noinline)) void grad_weight_block(const float* const* gy_rows, const float* x_nc, int64_t batch,
                                                 int64_t cin_pad, float* const* out, int64_t offset) {
  using V = typename Simd::V;
  V acc[CH][NV];
#pragma GCC unroll 8
  for (int k = 0; k < CH; ++k)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[k][v] = Simd::zero();
  for (int64_t n = 0; n < batch; ++n) {
    V x[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) x[v] = Simd::load(x_nc + n * cin_pad + v * Simd::kLanes);
#pragma GCC unroll 8
    for (int k = 0; k < CH; ++k) {
      const V gy = Simd::broadcast(gy_rows[k] + n);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[k][v] = Simd::fma(gy, x[v], acc[k][v]);
    }
  }
#pragma GCC unroll 8
  for (int k = 0; k < CH; ++k)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      float* sums = out[k] + offset + v * Simd::kLanes;
      Simd::store(sums, Simd::add(Simd::load(sums), acc[k][v]));
    }
}

// grad_weight_block over all cin_pad input channels, kWeightVectors vectors at a time. The
// blocks take `out` as it is and an offset, not a shifted copy of the pointers: stored one by
// one and read back by vector loads, such a copy stalls store forwarding once per block.
template <int CH>
inline void grad_weight_channels_tile(const float* const* gy_rows, const float* x_nc, int64_t batch, int64_t cin_pad,
                                      float* const* out) {
  constexpr int64_t step = kWeightVectors * Simd::kLanes;
  int64_t ci = 0;
  for (; ci + step <= cin_pad; ci += step)
    grad_weight_block<CH, kWeightVectors>(gy_rows, x_nc + ci, batch, cin_pad, out, ci);
  const int rest = static_cast<int>((cin_pad - ci) / Simd::kLanes);
  if (rest == 0) return;
  with_count<kWeightVectors>(rest, [&](auto nv) {
    grad_weight_block<CH, decltype(nv)::value>(gy_rows, x_nc + ci, batch, cin_pad, out, ci);
  });
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
// images' values at this stride; at 64 * 32 floats (8 KiB) they would all fall into one L1 set.
inline int64_t staged_image_stride(const BatchVectorGeometry& g) {
  const int64_t floats = g.out_channels * g.out_width;
  return floats % 256 == 0 ? floats + 16 : floats;  // one cache line more than a multiple of 1 KiB
}

void forward_rows(const BatchVectorGeometry& g, const float* x, Strides x_strides, const float* forward_weight,
                  const float* bias, bool relu, const int64_t* position_offsets, const int64_t* position_channels,
                  int64_t row_begin, int64_t row_end, const float* residual, float* y, Strides y_strides,
                  int64_t* taps, float* panels, int64_t* panel_rows, float* staging, double* channel_sums,
                  const InputIndex* inputs, float* kept_out) {
  // Input rows are laid out batch-last on demand into a small ring of cache-resident panels
  // (each used by kernel_h output rows), so the layout change never round-trips through
  // memory. Results go to kept_out (NCHW y, written by the caller), or land in a zeroed
  // staging row [n][c][ow] that is then transposed out whole (NHWC y).
  const int64_t cout = g.out_channels, wo = g.out_width, panel_size = g.width * g.in_channels * g.padded_batch;
  const int64_t slots = panel_ring_rows(g);
  for (int64_t k = 0; k < slots; ++k) panel_rows[k] = -1;
  // With an input mask that keeps some channels of a position, its kept values come gathered
  // (gather_kept: position q's kept channels at entries offsets[q] ..., [entry][n]) and the
  // taps read them there; no input row is laid out.
  const float* gathered = inputs && inputs->partial ? inputs->values : nullptr;
  const int64_t image_stride = staged_image_stride(g);  // see staged_image_stride
  const Strides staged{image_stride, wo, 1};
  const bool block_relu = relu && !residual;  // with a residual, the ReLU comes after adding it
  for (int64_t oh = row_begin; oh < row_end; ++oh) {
    const float* row_panel[64];  // per kernel row: its panel, or null for a padding row
    if (gathered) {
      for (int64_t i = 0; i < g.kernel_h; ++i) {
        const int64_t ih = oh * g.stride_h - g.pad_h + i * g.dilation_h;
        row_panel[i] = ih >= 0 && ih < g.height ? gathered : nullptr;
      }
    } else {
      ring_panels(g, oh, panels, panel_size, panel_rows, row_panel,
                  [&](int64_t ih, float* panel) { row_to_batch_last(g, x, x_strides, ih, panel); });
    }
    if (!kept_out) __builtin_memset(staging, 0, sizeof(float) * g.batch * image_stride);
    // While the row computes, the input row the next output row lays out first, fetched a
    // part per output column.
    const int64_t next_ih = (oh + 1) * g.stride_h - g.pad_h + (g.kernel_h - 1) * g.dilation_h;
    const bool fetch_next = !gathered && oh + 1 < row_end && next_ih >= 0 && next_ih < g.height;
    for (int64_t ow = 0; ow < wo; ++ow) {
      if (fetch_next) prefetch_row(x, x_strides, g.batch, g.in_channels, next_ih * g.width, g.width, ow, wo);
      const int64_t p = oh * wo + ow;
      const int64_t e0 = position_offsets[p], e1 = position_offsets[p + 1];
      if (e0 == e1) continue;
      int64_t ntaps = 0;  // taps inside the image that read a kept input; the others contribute nothing
      for (int64_t i = 0; i < g.kernel_h; ++i) {
        if (!row_panel[i]) continue;
        const int64_t ih = oh * g.stride_h - g.pad_h + i * g.dilation_h;
        for (int64_t j = 0; j < g.kernel_w; ++j) {
          const int64_t iw = ow * g.stride_w - g.pad_w + j * g.dilation_w;
          if (iw < 0 || iw >= g.width) continue;
          int64_t first = -1, count = g.in_channels;  // every channel
          int64_t at = gathered ? 0 : (row_panel[i] - panels) + iw * g.in_channels * g.padded_batch;
          if (inputs) {
            const int64_t q = ih * g.width + iw;
            count = inputs->offsets[q + 1] - inputs->offsets[q];
            if (count == 0) continue;
            if (count < g.in_channels) first = inputs->offsets[q];
            if (gathered) at = inputs->offsets[q] * g.padded_batch;
          }
          taps[4 * ntaps] = (i * g.kernel_w + j) * g.in_channels;
          taps[4 * ntaps + 1] = at;
          taps[4 * ntaps + 2] = first;
          taps[4 * ntaps + 3] = count;
          ++ntaps;
        }
      }
      const int64_t* in_channels = inputs ? inputs->channels : nullptr;
      const float* base = gathered ? gathered : panels;  // what the taps' offsets are from
      for (int64_t nb = 0; nb < g.batch; nb += kVectors * Simd::kLanes) {
        const int nv = tile_vectors(g, nb);
        for (int64_t e = e0; e < e1;) {
          const int tile = even_tile(e1 - e, kTile);
          with_count<kTile>(tile, [&](auto ch) {
            constexpr int C = decltype(ch)::value;
            const int64_t* tile_channels = position_channels + e;
            if (kept_out) {
              float* to = kept_out + e * g.padded_batch;
              if (nv == kVectors)
                forward_block<C, kVectors, true>(g, base, forward_weight, bias, block_relu, tile_channels, taps,
                                                 ntaps, ow, nb, to, staged, in_channels);
              else
                forward_block<C, 1, true>(g, base, forward_weight, bias, block_relu, tile_channels, taps, ntaps, ow,
                                          nb, to, staged, in_channels);
            } else if (nv == kVectors) {
              forward_block<C, kVectors>(g, base, forward_weight, bias, block_relu, tile_channels, taps, ntaps, ow,
                                         nb, staging, staged, in_channels);
            } else {
              forward_block<C, 1>(g, base, forward_weight, bias, block_relu, tile_channels, taps, ntaps, ow, nb,
                                  staging, staged, in_channels);
            }
          });
          e += tile;
        }
      }
    }
    if (kept_out) {  // the row's kept outputs stay in kept_out; their sums from there
      if (channel_sums)
        for (int64_t e = position_offsets[oh * wo]; e < position_offsets[(oh + 1) * wo]; ++e) {
          const float* v = kept_out + e * g.padded_batch;
          float sum = 0.0f, squares = 0.0f;
          for (int64_t n = 0; n < g.batch; ++n) {
            sum += v[n];
            squares += v[n] * v[n];
          }
          channel_sums[position_channels[e]] += sum;
          channel_sums[cout + position_channels[e]] += squares;
        }
      continue;
    }
    if (channel_sums) {  // over the kept outputs (the masked ones are the staging row's zeros)
      for (int64_t n = 0; n < g.batch; ++n) {
        for (int64_t c = 0; c < cout; ++c) {
          const float* v = staging + n * image_stride + c * wo;
          float sum = 0.0f, squares = 0.0f;
          for (int64_t ow = 0; ow < wo; ++ow) {
            sum += v[ow];
            squares += v[ow] * v[ow];
          }
          channel_sums[c] += sum;
          channel_sums[cout + c] += squares;
        }
      }
    }
    // Out to NHWC y by [c][ow] -> [ow][c] transposes, then the residual (laid out as y) and the
    // ReLU in one pass over the contiguous row.
    const Strides& s = y_strides;
    for (int64_t n = 0; n < g.batch; ++n) {
      const float* src = staging + n * image_stride;
      const int64_t offset = n * s.n + oh * wo * s.position;
      float* dst = y + offset;
      for (int64_t c0 = 0; c0 < cout; c0 += 8)
        for (int64_t w0 = 0; w0 < wo; w0 += 8)
          transpose_block(src + c0 * wo + w0, wo, dst + w0 * s.position + c0 * s.c, s.position, min64(8, cout - c0),
                          min64(8, wo - w0));
      if (residual) floats_out(dst, dst, residual + offset, wo * cout, relu, false);
    }
  }
}

void grad_input_rows(const BatchVectorGeometry& g, const float* gy_pos, const float* backward_weight,
                     const int64_t* position_offsets, const int64_t* position_channels, int64_t row_begin,
                     int64_t row_end, float* grad_x, Strides x_strides, int64_t* contributions, float* panel,
                     const InputIndex* inputs) {
  // Each input row is computed batch-last into a cache-resident panel, then transposed out;
  // with an input mask that keeps some channels of a position, each kept entry's gradient goes
  // to inputs->values instead (its position's entries together, [entry][n]).
  float* entries = inputs && inputs->partial ? inputs->values : nullptr;
  const int64_t position_floats = g.in_channels * g.padded_batch;
  for (int64_t ih = row_begin; ih < row_end; ++ih) {
    for (int64_t iw = 0; iw < g.width; ++iw) {
      // With an input mask: 0 at the masked channels; only the kept ones are computed.
      int64_t first = 0, kept = g.in_channels;
      if (inputs) {
        const int64_t q = ih * g.width + iw;
        first = inputs->offsets[q], kept = inputs->offsets[q + 1] - first;
        if (kept < g.in_channels && !entries) zero_floats(panel + iw * position_floats, position_floats);
        if (kept == 0) continue;
      }
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
      // Where the position's gradient goes: its entries, or its place in the panel.
      float* out = entries ? entries + first * g.padded_batch : panel;
      const int64_t at = entries ? 0 : iw;
      if (kept < g.in_channels) {
        const int64_t* listed = inputs->channels + first;
        for (int64_t nb = 0; nb < g.batch; nb += kVectors * Simd::kLanes) {
          const int nv = tile_vectors(g, nb);
          for (int64_t j = 0, count = 0; j < kept; j += count) {
            count = even_tile(kept - j, kTile);
            with_count<kTile>(static_cast<int>(count), [&](auto ch) {
              constexpr int C = decltype(ch)::value;
              if (entries) {
                float* to = out + j * g.padded_batch;
                if (nv == kVectors)
                  grad_input_block<C, kVectors, true, true>(g, gy_pos, backward_weight, position_channels,
                                                            contributions, ncontrib, 0, 0, nb, to, listed + j);
                else
                  grad_input_block<C, 1, true, true>(g, gy_pos, backward_weight, position_channels, contributions,
                                                     ncontrib, 0, 0, nb, to, listed + j);
              } else if (nv == kVectors) {
                grad_input_block<C, kVectors, true>(g, gy_pos, backward_weight, position_channels, contributions,
                                                    ncontrib, 0, iw, nb, panel, listed + j);
              } else {
                grad_input_block<C, 1, true>(g, gy_pos, backward_weight, position_channels, contributions,
                                             ncontrib, 0, iw, nb, panel, listed + j);
              }
            });
          }
        }
        continue;
      }
      for (int64_t nb = 0; nb < g.batch; nb += kVectors * Simd::kLanes) {
        const int nv = tile_vectors(g, nb);
        for (int64_t ci0 = 0, count = 0; ci0 < g.in_channels; ci0 += count) {
          count = even_tile(g.in_channels - ci0, kTile);
          with_count<kTile>(static_cast<int>(count), [&](auto ch) {
            if (nv == kVectors)
              grad_input_block<decltype(ch)::value, kVectors>(g, gy_pos, backward_weight, position_channels,
                                                              contributions, ncontrib, ci0, at, nb, out);
            else
              grad_input_block<decltype(ch)::value, 1>(g, gy_pos, backward_weight, position_channels,
                                                       contributions, ncontrib, ci0, at, nb, out);
          });
        }
      }
    }
    if (!entries) row_batch_last(false, g.batch, g.padded_batch, g.in_channels, g.width, grad_x, x_strides, ih, panel);
  }
}

// Input row `row` as an image-major panel [W][N][cin_pad] (channels innermost, zero-padded).
inline void row_to_image_major(const BatchVectorGeometry& g, const float* src, Strides s, int64_t row, float* dst) {
  const int64_t cin = g.in_channels, cin_pad = padded_channels(cin), width = g.width, batch = g.batch;
  if (s.position == 1) {  // NCHW: tiles of 8 channels x 8 positions
    for (int64_t n = 0; n < batch; ++n)
      for (int64_t c0 = 0; c0 < cin; c0 += 8)
        for (int64_t w0 = 0; w0 < width; w0 += 8)
          transpose_block(src + n * s.n + c0 * s.c + (row * width + w0) * s.position, s.c,
                          dst + (w0 * batch + n) * cin_pad + c0, batch * cin_pad, min64(8, cin - c0),
                          min64(8, width - w0));
  } else {  // NHWC: channels already innermost
    for (int64_t n = 0; n < batch; ++n)
      for (int64_t w = 0; w < width; ++w)
        __builtin_memcpy(dst + (w * batch + n) * cin_pad, src + n * s.n + (row * width + w) * s.position,
                         sizeof(float) * cin);
  }
  if (cin_pad > cin)
    for (int64_t r = 0; r < width * batch; ++r) zero_floats(dst + r * cin_pad + cin, cin_pad - cin);
}

void grad_weight_rows(const BatchVectorGeometry& g, const float* gy_pos, const float* x, Strides x_strides,
                      const int64_t* position_offsets, const int64_t* position_channels, int64_t row_begin,
                      int64_t row_end, float* grad_w_part, float* panels, int64_t* panel_rows,
                      const InputIndex* inputs) {
  // Position-major: each input panel is loaded once per output position and serves every
  // channel kept there; the images are the reduction, the input channels the SIMD lanes. With
  // an input mask that keeps some but not all channels of some positions, each input row is
  // laid out from the gathered entries (inputs->values), per position its kept channels only
  // (position w: [N][padded kept], at starts[slot][w]), each reduction runs over its tap's kept
  // channels, and its sums are added to those channels' gradients.
  const int64_t cin_pad = padded_channels(g.in_channels), ntaps = g.kernel_h * g.kernel_w, batch = g.batch;
  const int64_t panel_size = g.width * batch * cin_pad, slots = panel_ring_rows(g);
  const bool compact = inputs && inputs->partial;
  for (int64_t k = 0; k < slots; ++k) panel_rows[k] = -1;
  int64_t* starts = panel_rows + slots;                       // [slot][w]
  int64_t* padded = starts + slots * g.width;                 // [w]: padded kept channels, the row being laid out
  float* sums = panels + slots * panel_size;                  // [kWeightTile][kept_pad]: one tap's sums
  for (int64_t oh = row_begin; oh < row_end; ++oh) {
    const float* row_panel[64];
    ring_panels(g, oh, panels, panel_size, panel_rows, row_panel, [&](int64_t ih, float* panel) {
      if (!compact) return row_to_image_major(g, x, x_strides, ih, panel);
      int64_t* start = starts + (panel - panels) / panel_size * g.width;
      int64_t size = 0;
      for (int64_t w = 0; w < g.width; ++w) {
        const int64_t q = ih * g.width + w;
        padded[w] = padded_channels(inputs->offsets[q + 1] - inputs->offsets[q]);
        start[w] = size;
        size += batch * padded[w];
      }
      entries_image_major(g, *inputs, ih, start, padded, panel);
    });
    for (int64_t ow = 0; ow < g.out_width; ++ow) {
      const int64_t p = oh * g.out_width + ow;
      const int64_t e0 = position_offsets[p], e1 = position_offsets[p + 1];
      for (int64_t e = e0, count = 0; e < e1; e += count) {
        count = even_tile(e1 - e, kWeightTile);
        const float* gy_rows[kWeightTile];
        for (int k = 0; k < count; ++k) gy_rows[k] = gy_pos + (e + k) * g.padded_batch;
        for (int64_t i = 0; i < g.kernel_h; ++i) {
          if (!row_panel[i]) continue;
          const int64_t ih = oh * g.stride_h - g.pad_h + i * g.dilation_h;
          const int64_t slot = (row_panel[i] - panels) / panel_size;
          for (int64_t j = 0; j < g.kernel_w; ++j) {
            const int64_t iw = ow * g.stride_w - g.pad_w + j * g.dilation_w;
            if (iw < 0 || iw >= g.width) continue;
            const int64_t q = ih * g.width + iw;
            const int64_t first = inputs ? inputs->offsets[q] : 0;
            const int64_t kept = inputs ? inputs->offsets[q + 1] - first : g.in_channels;
            if (kept == 0) continue;
            // The reduction's input rows, lanes and sums: the whole channel vector, added in
            // place; or (compact) the kept channels, summed apart and then added to theirs.
            const float* x_nc = row_panel[i] + (compact ? starts[slot * g.width + iw] : iw * batch * cin_pad);
            const int64_t lanes = compact ? padded_channels(kept) : cin_pad;
            float* gradient[kWeightTile];
            float* out[kWeightTile];
            for (int k = 0; k < count; ++k) {
              gradient[k] = grad_w_part + (position_channels[e + k] * ntaps + i * g.kernel_w + j) * cin_pad;
              out[k] = compact ? sums + k * lanes : gradient[k];
              if (compact) zero_floats(out[k], lanes);
            }
            with_count<kWeightTile>(static_cast<int>(count), [&](auto ch) {
              grad_weight_channels_tile<decltype(ch)::value>(gy_rows, x_nc, batch, lanes, out);
            });
            if (!compact) continue;
            const int64_t* listed = inputs->channels + first;
            for (int k = 0; k < count; ++k)
              for (int64_t c = 0; c < kept; ++c) gradient[k][listed[c]] += out[k][c];
          }
        }
      }
    }
  }
}
