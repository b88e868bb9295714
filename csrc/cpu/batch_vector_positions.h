// The position kernels for spatial masks (part of batch_vector_impl.h, included by it into
// each instruction set's translation unit): forward_positions, backward_positions and
// pack_position_weights. A spatial mask keeps every output channel at each of its kept
// positions, so one image at a time is laid out channels-last and each kept position is a dot
// product of its taps' channel rows with the packed weights, the output channels in the SIMD
// lanes. backward_positions' grad-weight uses the row kernels' grad-weight tile
// (grad_weight_channels_tile, batch_vector_rows.h).

// forward_positions' tile: R kept positions of one image x NV vectors of output channels
// from co0, reading the image channels-last: x_taps[r * ntaps + t] is where position r's tap t
// reads channel 0 (`zeros` for a padding tap). The sums, plus the bias and then the ReLU, are
// stored to (or with `accumulate`, added to) the channels-last rows out_rows[r] at co0.
// backward_positions runs grad-input through it too (one tap, output channels as the sum).
template <int R, int NV>
__attribute__((noinline)) void position_block(const float* const* x_taps, int64_t ntaps, int64_t cin,
                                              const float* packed_weight, int64_t cout_pad, int64_t co0,
                                              const float* bias,
                                              bool relu, bool accumulate, float* const* out_rows) {
  using V = typename Simd::V;
  V acc[R][NV];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[r][v] = Simd::zero();
  for (int64_t t = 0; t < ntaps; ++t) {
    const float* x_tap[R];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) x_tap[r] = x_taps[r * ntaps + t];
    const float* w_tap = packed_weight + t * cin * cout_pad + co0;
    for (int64_t ci = 0; ci < cin; ++ci) {
      V w[NV];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) w[v] = Simd::load(w_tap + ci * cout_pad + v * Simd::kLanes);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const V x = Simd::broadcast(x_tap[r] + ci);
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) acc[r][v] = Simd::fma(x, w[v], acc[r][v]);
      }
    }
  }
  const V zero = Simd::zero();
#pragma GCC unroll 4
  for (int v = 0; v < NV; ++v) {
    const V shift = bias ? Simd::load(bias + co0 + v * Simd::kLanes) : zero;
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      float* out = out_rows[r] + co0 + v * Simd::kLanes;
      V value = Simd::add(acc[r][v], shift);
      if (relu) value = Simd::max(zero, value);
      if (accumulate) value = Simd::add(Simd::load(out), value);
      Simd::store(out, value);
    }
  }
}

// position_block over every tile of R positions x NV vectors: rows of out_pad floats (padded
// output channels), reduction over `cin` per tap.
inline void position_tiles(const float* const* x_taps, int64_t ntaps, int64_t cin, const float* packed_weight,
                           int64_t out_pad, const float* bias, bool relu, bool accumulate, float* const* out_rows,
                           int rows) {
  for (int64_t co0 = 0; co0 < out_pad; co0 += kPositionVectors * Simd::kLanes) {
    const int nv = static_cast<int>(min64(kPositionVectors, (out_pad - co0) / Simd::kLanes));
    with_count<kPositionRows>(rows, [&](auto r) {
      with_count<kPositionVectors>(nv, [&](auto v) {
        position_block<decltype(r)::value, decltype(v)::value>(x_taps, ntaps, cin, packed_weight, out_pad, co0, bias,
                                                               relu, accumulate, out_rows);
      });
    });
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

// The input positions that the tap lists of `inputs` read, ascending.
inline std::vector<KeptPosition> listed_positions(const BatchVectorGeometry& g, const InputIndex& inputs) {
  const int64_t hw = g.height * g.width, entries = inputs.tap_offsets[g.kernel_h * g.kernel_w];
  std::vector<InputBlock> read(hw, InputBlock{false});
  for (int64_t e = 0; e < entries; ++e) read[inputs.tap_entries[2 * e + 1]].read = true;
  std::vector<KeptPosition> positions;
  for (int64_t q = 0; q < hw; ++q)
    if (read[q].read) positions.push_back(KeptPosition{q});
  return positions;
}

// The kept rows [P][cout_pad] of `images` images (y_rows: [images][P][cout_pad]), tap by tap
// over the pairs the tap lists of `inputs` give (each tap's kept inputs only), a tap's pairs of
// every image in the same tiles, then the bias and the ReLU. x_images[b]: image b, channels-last
// rows `row_stride` apart.
inline void forward_listed_taps(const BatchVectorGeometry& g, const InputIndex& inputs, const float* const* x_images,
                                int64_t images, int64_t row_stride, const float* packed_weight, int64_t cout_pad,
                                const float* padded_bias, bool relu, int64_t npositions, float* y_rows,
                                const float** x_taps) {
  const int64_t cin = g.in_channels, ntaps = g.kernel_h * g.kernel_w;
  zero_floats(y_rows, images * npositions * cout_pad);
  float* out_rows[kPositionRows];
  for (int64_t t = 0; t < ntaps; ++t) {
    const int64_t first = inputs.tap_offsets[t], pairs = inputs.tap_offsets[t + 1] - first;
    // (image b, entry e) of row k = b * pairs + (e - first), stepped from k0
    for (int64_t k0 = 0, b = 0, e = first; k0 < images * pairs; k0 += kPositionRows) {
      const int rows = static_cast<int>(min64(kPositionRows, images * pairs - k0));
      for (int r = 0; r < rows; ++r) {
        x_taps[r] = x_images[b] + inputs.tap_entries[2 * e + 1] * row_stride;
        out_rows[r] = y_rows + (b * npositions + inputs.tap_entries[2 * e]) * cout_pad;
        if (++e == first + pairs) e = first, ++b;
      }
      position_tiles(x_taps, 1, cin, packed_weight + t * cin * cout_pad, cout_pad, nullptr, false, true, out_rows,
                     rows);
    }
  }
  if (!padded_bias && !relu) return;
  const typename Simd::V zero = Simd::zero();
  for (int64_t k = 0; k < images * npositions; ++k)
    for (int64_t c = 0; c < cout_pad; c += Simd::kLanes) {
      float* v = y_rows + k * cout_pad + c;
      typename Simd::V value = Simd::load(v);
      if (padded_bias) value = Simd::add(value, Simd::load(padded_bias + c));
      if (relu) value = Simd::max(zero, value);
      Simd::store(v, value);
    }
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

void forward_positions(const BatchVectorGeometry& g, const float* x, Strides x_strides, const float* packed_weight,
                       int64_t cout_pad, const float* padded_bias, bool relu, const int64_t* positions,
                       int64_t npositions, int64_t image_begin, int64_t image_end, const float* residual, float* y,
                       Strides y_strides, const float** x_taps, const float* zeros, float* scratch,
                       double* channel_sums, const InputIndex* inputs) {
  // A block of images at a time (one without tap lists), channels-last: an NCHW image is
  // transposed into `scratch` first, so that each tap's channels are contiguous (in NCHW they
  // lie a plane apart, all in one L1 set); the kept positions are computed in tiles into
  // compact rows, one per kept position, which compact_out then writes to y in one pass (zeros,
  // the residual and the ReLU). The block's input, its kept outputs and a tap's weights stay in
  // L2.
  const int64_t cin = g.in_channels, cout = g.out_channels, ntaps = g.kernel_h * g.kernel_w;
  const int64_t hw = g.height * g.width, hw_out = g.out_height * g.out_width;
  const bool block_relu = relu && !residual;  // with a residual, the ReLU comes after adding it
  const bool x_nchw = x_strides.c != 1;
  const bool listed = inputs && inputs->tap_offsets;  // tap by tap over the kept inputs
  const int64_t block = position_images(listed ? inputs->tap_offsets[ntaps] : -1, ntaps, npositions, cout_pad);
  float* x_block = scratch;                                    // [block][H * W][Cin], for NCHW x
  float* y_rows = scratch + (x_nchw ? block * hw * cin : 0);   // [block][P][cout_pad]
  float* y_planes = y_rows + block * npositions * cout_pad;    // [Cout][P], for NCHW y
  const auto blocks = kept_blocks(positions, npositions, hw_out);
  // For an NCHW x: with tap lists, the rows of the input positions they read; else the blocks
  // of positions some kept output reads.
  const auto read = x_nchw && listed ? listed_positions(g, *inputs) : std::vector<KeptPosition>();
  const auto needed = x_nchw && !listed ? needed_blocks(g, positions, npositions) : std::vector<InputBlock>();
  float* out_rows[kPositionRows];
  const float* x_images[kMaxPositionImages];
  const int64_t row_stride = x_nchw ? cin : x_strides.position;
  for (int64_t n0 = image_begin; n0 < image_end; n0 += block) {
    const int64_t images = min64(block, image_end - n0);
    for (int64_t b = 0; b < images; ++b) {
      const float* x_n = x + (n0 + b) * x_strides.n;
      x_images[b] = x_n;
      if (!x_nchw) continue;
      float* image = x_block + b * hw * cin;
      if (listed) gather_positions(x_n, x_strides, cin, read.data(), static_cast<int64_t>(read.size()), cin, image);
      else image_channels_last(x_n, x_strides, cin, hw, cin, image, needed.data());
      x_images[b] = image;
    }
    if (listed)
      forward_listed_taps(g, *inputs, x_images, images, row_stride, packed_weight, cout_pad, padded_bias, block_relu,
                          npositions, y_rows, x_taps);
    for (int64_t k0 = 0; k0 < (listed ? 0 : npositions); k0 += kPositionRows) {  // one image
      const int rows = static_cast<int>(min64(kPositionRows, npositions - k0));
      point_taps(g, positions + k0, rows, x_images[0], row_stride, zeros, x_taps);
      for (int r = 0; r < rows; ++r) out_rows[r] = y_rows + (k0 + r) * cout_pad;
      position_tiles(x_taps, ntaps, cin, packed_weight, cout_pad, padded_bias, block_relu, false, out_rows, rows);
    }
    for (int64_t b = 0; b < images; ++b) {
      const float* image_rows = y_rows + b * npositions * cout_pad;
      if (channel_sums) {  // over the kept outputs (the masked ones are 0 and add nothing)
        for (int64_t k = 0; k < npositions; ++k) {
          const float* v = image_rows + k * cout_pad;
          for (int64_t c = 0; c < cout; ++c) {
            channel_sums[c] += v[c];
            channel_sums[cout + c] += static_cast<double>(v[c]) * v[c];
          }
        }
      }
      const int64_t n = n0 + b;
      compact_out(image_rows, cout_pad, positions, npositions, blocks.data(), cout, hw_out, y + n * y_strides.n,
                  y_strides, residual ? residual + n * y_strides.n : nullptr, relu, y_planes);
    }
  }
  _mm_sfence();  // the streaming stores are visible before the caller reads y
}

void backward_positions(const BatchVectorGeometry& g, const float* gy, Strides gy_strides, const float* gate,
                        Strides gate_strides, const float* x, Strides x_strides, const float* backward_weight,
                        const int64_t* positions, int64_t npositions, int64_t image_begin, int64_t image_end,
                        float* grad_x, Strides grad_x_strides, float* grad_w_part, float* grad_b_part,
                        float* scratch, const InputIndex* inputs) {
  // Per image, as forward_positions: the kept output gradients gathered twice (rows [P][Cout]
  // for grad-input, columns [Cout][P] for grad-weight and grad-bias); grad-input scattered
  // tap by tap into a channels-last image (distinct positions of one tap never share an input
  // position) and written out; grad-weight reduces over the kept positions, one tap's input
  // rows packed at a time. One thread per image and a fixed order: deterministic.
  const int64_t cin = g.in_channels, cout = g.out_channels, ntaps = g.kernel_h * g.kernel_w;
  const int64_t cin_pad = padded_channels(cin), cout_pad = padded_channels(cout), hw = g.height * g.width;
  const int64_t kept_count = npositions;  // P: the kept positions
  float* rows = scratch;                          // [P][cout_pad]
  float* columns = rows + kept_count * cout_pad;  // [Cout][P]
  float* image = columns + cout * kept_count;     // [H * W][cin_pad]: x for grad-weight, grad-x for grad-input
  float* panel = image + hw * cin_pad;            // [P][cin_pad]: one tap's input rows
  float* spare = panel + kept_count * cin_pad;    // [cin_pad]: what padding taps add to
  float* gate_columns = spare + cin_pad;          // [Cout][P]: the gate, as columns (with a gate)
  const bool listed = inputs && inputs->tap_offsets;  // tap by tap over the kept inputs
  // With tap lists, grad-weight reduces each tap over the listed pairs of a block of
  // kImageBlock images at once (a tap lists a few pairs per image: one image's would not pay
  // for the read-modify-write of the tap's [Cout][Cin] sums). Per tap t, entries e0 = its
  // first pair, its pairs' input rows [kImageBlock * pairs][cin_pad] and gradient columns
  // [Cout][kImageBlock * pairs], image b of the block at b * pairs.
  const int64_t listed_pairs = listed ? inputs->tap_offsets[ntaps] : 0;
  float* block_panel = gate_columns + (gate ? cout * kept_count : 0);     // [kImageBlock * pairs][cin_pad]
  float* block_columns = block_panel + kImageBlock * listed_pairs * cin_pad;  // [Cout][kImageBlock * pairs]
  float* out_rows[kPositionRows];
  // Adds tap t's gradient, reduced over `count` rows (tap_gy: [Cout] rows of gy_stride; the
  // input rows: tap_panel, [count][cin_pad]), to the partial gradient.
  const auto reduce_tap = [&](int64_t t, const float* tap_gy, int64_t gy_stride, const float* tap_panel,
                              int64_t count) {
    for (int64_t c0 = 0, tile = 0; c0 < cout; c0 += tile) {
      tile = even_tile(cout - c0, kWeightTile);
      const float* gy_rows[kWeightTile];
      float* out[kWeightTile];
      for (int k = 0; k < tile; ++k) {
        gy_rows[k] = tap_gy + (c0 + k) * gy_stride;
        out[k] = grad_w_part + ((c0 + k) * ntaps + t) * cin_pad;
      }
      with_count<kWeightTile>(static_cast<int>(tile), [&](auto ch) {
        grad_weight_channels_tile<decltype(ch)::value>(gy_rows, tap_panel, count, cin_pad, out);
      });
    }
  };
  // Grad-weight lays out x channels-last: with tap lists the rows of the input positions they
  // read, else (and for an NHWC x, every row) the blocks some kept output reads.
  const bool nchw_x = grad_w_part && x_strides.c != 1;
  const auto read = nchw_x && listed ? listed_positions(g, *inputs) : std::vector<KeptPosition>();
  const auto needed = nchw_x && !listed ? needed_blocks(g, positions, kept_count) : std::vector<InputBlock>();
  for (int64_t k = 0; k < kept_count; ++k) zero_floats(rows + k * cout_pad + cout, cout_pad - cout);
  for (int64_t n = image_begin; n < image_end; ++n) {
    const float* gy_n = gy + n * gy_strides.n;
    for (int64_t c = 0; c < cout; ++c)
      for (int64_t k = 0; k < kept_count; ++k)
        columns[c * kept_count + k] = gy_n[c * gy_strides.c + positions[k] * gy_strides.position];
    if (gate) {  // a fused ReLU's gate, gathered at the kept positions as gy, then applied whole
      const float* gate_n = gate + n * gate_strides.n;
      for (int64_t c = 0; c < cout; ++c)
        for (int64_t k = 0; k < kept_count; ++k)
          gate_columns[c * kept_count + k] = gate_n[c * gate_strides.c + positions[k] * gate_strides.position];
      copy_floats_where_positive(columns, columns, gate_columns, cout * kept_count);
    }
    if (grad_x)
      for (int64_t c0 = 0; c0 < cout; c0 += 8)
        for (int64_t k0 = 0; k0 < kept_count; k0 += 8)
          transpose_block(columns + c0 * kept_count + k0, kept_count, rows + k0 * cout_pad + c0, cout_pad,
                          min64(8, cout - c0), min64(8, kept_count - k0));
    if (grad_b_part)
      for (int64_t c = 0; c < cout; ++c) {
        float sum = 0.0f;
        for (int64_t k = 0; k < kept_count; ++k) sum += columns[c * kept_count + k];
        grad_b_part[c] += sum;
      }
    if (grad_w_part) {
      if (nchw_x && listed)
        gather_positions(x + n * x_strides.n, x_strides, cin, read.data(), static_cast<int64_t>(read.size()), cin_pad,
                         image);
      else
        image_channels_last(x + n * x_strides.n, x_strides, cin, hw, cin_pad, image, needed.data());
      const float* zeros = spare;
      zero_floats(spare, cin_pad);
      if (listed) {
        const int64_t b = (n - image_begin) % kImageBlock;
        for (int64_t t = 0; t < ntaps; ++t) {
          const int64_t e0 = inputs->tap_offsets[t], pairs = inputs->tap_offsets[t + 1] - e0;
          const int64_t* entries = inputs->tap_entries + 2 * e0;
          float* tap_rows = block_panel + (kImageBlock * e0 + b * pairs) * cin_pad;
          for (int64_t j = 0; j < pairs; ++j)
            copy_floats(tap_rows + j * cin_pad, image + entries[2 * j + 1] * cin_pad, cin_pad);
          float* tap_columns = block_columns + cout * kImageBlock * e0 + b * pairs;
          for (int64_t c = 0; c < cout; ++c)
            for (int64_t j = 0; j < pairs; ++j)
              tap_columns[c * kImageBlock * pairs + j] = columns[c * kept_count + entries[2 * j]];
        }
        if (b == kImageBlock - 1 || n == image_end - 1)  // the block's last image: reduce each tap
          for (int64_t t = 0; t < ntaps; ++t) {
            const int64_t e0 = inputs->tap_offsets[t], pairs = inputs->tap_offsets[t + 1] - e0;
            if (pairs > 0)
              reduce_tap(t, block_columns + cout * kImageBlock * e0, kImageBlock * pairs,
                         block_panel + kImageBlock * e0 * cin_pad, (b + 1) * pairs);
          }
      } else {
        for (int64_t t = 0; t < ntaps; ++t) {  // every kept position (padding taps read zeros)
          for (int64_t k = 0; k < kept_count; ++k) {
            const int64_t q = tap_input(g, positions[k], t);
            copy_floats(panel + k * cin_pad, q >= 0 ? image + q * cin_pad : zeros, cin_pad);
          }
          reduce_tap(t, columns, kept_count, panel, kept_count);
        }
      }
    }
    if (grad_x) {
      __builtin_memset(image, 0, sizeof(float) * hw * cin_pad);
      const float* row_of[kPositionRows];
      for (int64_t t = 0; t < (listed ? ntaps : 0); ++t) {  // tap by tap: masked inputs stay 0
        const int64_t end = inputs->tap_offsets[t + 1];
        for (int64_t e = inputs->tap_offsets[t]; e < end; e += kPositionRows) {
          const int count = static_cast<int>(min64(kPositionRows, end - e));
          for (int r = 0; r < count; ++r) {
            row_of[r] = rows + inputs->tap_entries[2 * (e + r)] * cout_pad;
            out_rows[r] = image + inputs->tap_entries[2 * (e + r) + 1] * cin_pad;
          }
          position_tiles(row_of, 1, cout, backward_weight + t * cout * cin_pad, cin_pad, nullptr, false, true,
                         out_rows, count);
        }
      }
      for (int64_t k0 = 0; k0 < (listed ? 0 : kept_count); k0 += kPositionRows) {
        const int count = static_cast<int>(min64(kPositionRows, kept_count - k0));
        for (int r = 0; r < count; ++r) row_of[r] = rows + (k0 + r) * cout_pad;
        for (int64_t t = 0; t < ntaps; ++t) {
          for (int r = 0; r < count; ++r) {
            const int64_t q = tap_input(g, positions[k0 + r], t);
            out_rows[r] = q >= 0 ? image + q * cin_pad : spare;
          }
          position_tiles(row_of, 1, cout, backward_weight + t * cout * cin_pad, cin_pad, nullptr, false, true,
                         out_rows, count);
        }
      }
      image_out(image, cin_pad, cin, hw, grad_x + n * grad_x_strides.n, grad_x_strides, nullptr, false);
    }
  }
  _mm_sfence();  // the streaming stores are visible before the caller reads grad_x
}

// forward_positions' weights: dst[t][ci][co] (rows of cout_pad, zero past Cout) = w[co][ci][t],
// w contiguous, for k = ci * taps + t in [k_begin, k_end). As a [Cout][Cin * taps] matrix w is
// transposed a kLanes x kLanes block at a time, a block of k over every Cout before the next,
// so that each (tap, input channel) row is written whole: ATen's copy of the permuted weights
// takes 40-90 us (2 threads), a tenth of a spatial forward's fixed part.
void pack_position_weights(const float* w, int64_t cout, int64_t cin, int64_t taps, float* dst, int64_t cout_pad,
                           int64_t k_begin, int64_t k_end) {
  constexpr int64_t L = Simd::kLanes;
  const int64_t k_total = cin * taps;
  alignas(64) float block[L * L];
  for (int64_t k0 = k_begin; k0 < k_end; k0 += L) {
    const int64_t block_rows = min64(L, k_end - k0);
    float* rows[L];
    // (ci, t) of each k, stepped rather than divided: a division per row is most of the
    // packing's ~40 us (128x64x3x3)
    for (int64_t r = 0, ci = k0 / taps, t = k0 % taps; r < block_rows; ++r) {
      rows[r] = dst + (t * cin + ci) * cout_pad;
      if (++t == taps) t = 0, ++ci;
    }
    int64_t co0 = 0;
    if (block_rows == L)
      for (; co0 + L <= cout; co0 += L) {
        Simd::transpose(w + co0 * k_total + k0, k_total, block, L);
        for (int64_t r = 0; r < L; ++r) Simd::store(rows[r] + co0, Simd::load(block + r * L));
      }
    for (int64_t r = 0; r < block_rows; ++r)
      for (int64_t co = co0; co < cout_pad; ++co) rows[r][co] = co < cout ? w[co * k_total + k0 + r] : 0.0f;
  }
}
