// The batch-vector kernels' data layouts and output writers (part of batch_vector_impl.h,
// included by it into each instruction set's translation unit):
//   transposes      8x8 and edge blocks (Simd::transpose does a whole vector's block)
//   floats_out      the one way a run of outputs is written: kept bits, residual, ReLU,
//                   streaming stores
//   batch-last      a tensor row as a panel [W][C][padded N] and back (row kernels)
//   channels-last   one image as [H * W][channels] and back; compact rows of kept positions
//                   out to an image (position kernels)

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

// The padding lanes of panel rows, a few floats each, once per row, in vector stores: GCC
// makes a memset call of the plain loop, a quarter of a batch-2 neuron forward's time.
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

// copy_floats where gate[i] > 0, 0 elsewhere (a fused ReLU's gradient gate).
inline void copy_floats_where_positive(float* dst, const float* src, const float* gate, int64_t count) {
  int64_t i = 0;
  for (; i + Simd::kLanes <= count; i += Simd::kLanes)
    Simd::store(dst + i, Simd::where_positive(Simd::load(gate + i), Simd::load(src + i)));
  for (; i < count; ++i) dst[i] = gate[i] > 0.0f ? src[i] : 0.0f;
}

// Part `part` of `parts` of the lines of one row of an [N][C][H * W] tensor (strides s,
// positions [first, first + count) of every image and channel) fetched toward L2. An NCHW row is
// N * C runs of `count` floats, too short for the hardware prefetcher: read when needed, each
// run waits on memory. Issued a part at a time while other work runs, it is there when needed.
inline void prefetch_row(const float* t, const Strides& s, int64_t images, int64_t channels, int64_t first,
                         int64_t count, int64_t part, int64_t parts) {
  const bool planar = s.position == 1;  // else channels last: an image's row is one run
  const int64_t inner = planar ? channels : 1, run = planar ? count : count * channels;
  const int64_t total = images * inner, begin = total * part / parts, end = total * (part + 1) / parts;
  for (int64_t r = begin; r < end; ++r) {
    const char* p = reinterpret_cast<const char*>(t + (r / inner) * s.n + (r % inner) * s.c + first * s.position);
    const char* last = p + run * sizeof(float) - 1;
    for (; p < last; p += 64) __builtin_prefetch(p, 0, 2);
    __builtin_prefetch(last, 0, 2);
  }
}

// dst = relu?(src + residual) element by element, the one way outputs are written out.
// residual may be null (then 0). The ReLU keeps NaN, as torch.relu does. With `stream`,
// streaming stores where dst is aligned: outputs come from the output cache (output_cache.h),
// blocks this code last wrote the same way, so no cached copy of them needs evicting, and the
// stores skip reading each line before overwriting it (at 64->64@32, keep 0.1, a spatial
// forward takes about half the time it takes with plain stores; docs/design.md). The caller
// fences (_mm_sfence) before anyone reads dst.
inline void floats_out(float* dst, const float* src, const float* residual, int64_t count, bool relu, bool stream) {
  using V = typename Simd::V;
  constexpr int64_t L = Simd::kLanes;
  const V zero = Simd::zero();
  stream = stream && reinterpret_cast<uintptr_t>(dst) % sizeof(V) == 0;
  int64_t i = 0;
  for (; i + L <= count; i += L) {
    V v = Simd::load(src + i);
    if (residual) v = Simd::add(v, Simd::load(residual + i));
    if (relu) v = Simd::max(zero, v);
    if (stream) Simd::stream(dst + i, v);
    else Simd::store(dst + i, v);
  }
  for (; i < count; ++i) {
    float v = src[i];
    if (residual) v += residual[i];
    dst[i] = (relu && v < 0.0f) ? 0.0f : v;
  }
}

// Row `row` of a tensor t (N, C, H, W), NCHW or NHWC, to (to_panel) or from a batch-last
// panel [W][C][padded N] (padding images zero-filled on the way in).
constexpr int64_t kPrefetchChannels = 2;

inline void row_batch_last(bool to_panel, int64_t batch, int64_t padded, int64_t channels, int64_t width,
                           float* tensor, Strides s, int64_t row, float* panel) {
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
          float* in_tensor = tensor + c * s.c + (row * width + w0) * s.position + n0 * s.n;
          float* in_panel = panel + (w0 * channels + c) * padded + n0;
          if (to_panel) {
            prefetch_ahead(in_tensor, c, L);
            Simd::transpose(in_tensor, s.n, in_panel, channels * padded);
          } else {
            Simd::transpose(in_panel, channels * padded, in_tensor, s.n);
          }
        }
      for (int64_t n0 = 0; n0 < batch; n0 += 8) {
        for (int64_t w0 = n0 < n_whole ? w_whole : 0; w0 < width; w0 += 8) {
          float* in_tensor = tensor + c * s.c + (row * width + w0) * s.position + n0 * s.n;
          float* in_panel = panel + (w0 * channels + c) * padded + n0;
          const int64_t images = min64(8, batch - n0), cols = min64(8, width - w0);
          if (to_panel) {
            if (w0 % 16 == 0) prefetch_ahead(in_tensor, c, images);  // a 64-byte line covers 16 columns
            transpose_block(in_tensor, s.n, in_panel, channels * padded, images, cols);
          } else {
            transpose_block(in_panel, channels * padded, in_tensor, s.n, cols, images);
          }
        }
      }
      if (to_panel && padded > batch)
        for (int64_t w = 0; w < width; ++w) zero_floats(panel + (w * channels + c) * padded + batch, padded - batch);
    }
  } else {  // NHWC: 8 consecutive channels of one position per tile row
    for (int64_t w = 0; w < width; ++w) {
      for (int64_t c0 = 0; c0 < channels; c0 += 8) {
        const int64_t cols = min64(8, channels - c0);
        float* in_tensor = tensor + c0 * s.c + (row * width + w) * s.position;
        float* in_panel = panel + (w * channels + c0) * padded;
        for (int64_t n0 = 0; n0 < batch; n0 += 8) {
          const int64_t images = min64(8, batch - n0);
          if (to_panel) transpose_block(in_tensor + n0 * s.n, s.n, in_panel + n0, padded, images, cols);
          else transpose_block(in_panel + n0, padded, in_tensor + n0 * s.n, s.n, cols, images);
        }
        if (to_panel && padded > batch)
          for (int64_t k = 0; k < cols; ++k) zero_floats(in_panel + k * padded + batch, padded - batch);
      }
    }
  }
}

inline void row_to_batch_last(const BatchVectorGeometry& g, const float* src, Strides s, int64_t row, float* dst) {
  row_batch_last(true, g.batch, g.padded_batch, g.in_channels, g.width, const_cast<float*>(src), s, row, dst);
}

// Input row ih's kept entries (InputIndex::values, [entry][padded N]) image-major for grad
// weight: position w's at panel[at[w] + n * lanes[w] + j] for its j-th kept channel; lanes[w]
// is its kept count padded to a vector, and the lanes past the count hold the next entries'
// values (lanes of the reduction whose sums are never added to a gradient), so values must
// hold a vector of entries past the last. Register transposes, images left over one by one.
inline void entries_image_major(const BatchVectorGeometry& g, const InputIndex& inputs, int64_t ih, const int64_t* at,
                                const int64_t* lanes, float* panel) {
  constexpr int64_t L = Simd::kLanes;
  const int64_t batch = g.batch, padded = g.padded_batch, whole = batch / L * L;
  for (int64_t w = 0; w < g.width; ++w) {
    const float* src = inputs.values + inputs.offsets[ih * g.width + w] * padded;
    float* dst = panel + at[w];
    const int64_t stride = lanes[w];
    for (int64_t k0 = 0; k0 < stride; k0 += L) {
      for (int64_t n0 = 0; n0 < whole; n0 += L)
        Simd::transpose(src + k0 * padded + n0, padded, dst + n0 * stride + k0, stride);
      for (int64_t n = whole; n < batch; ++n)
        for (int64_t k = k0; k < k0 + L; ++k) dst[n * stride + k] = src[k * padded + n];
    }
  }
}

// Whether a kept output position reads a block of Simd::kLanes input positions through some
// tap. A type of these headers' own (see batch_vector_impl.h): a std::vector<uint8_t>
// instantiated here would be shared with code compiled for another CPU.
struct InputBlock {
  bool read;
};

// One image of an NCHW or NHWC tensor as a channels-last image [H * W][stride] (channels
// [channels, stride) zero), into `image`. NCHW in blocks of kLanes channels x kLanes positions,
// a block of channels at a time over the whole plane: each block row is a whole cache line of
// its plane, and only kLanes planes stream at once (streaming all of them at once, in blocks
// of 16 positions, is 12% slower on 64->64@32, 1024-position planes). `needed` (or null: all), per
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

// A kept input position (flat, h * W + w). A type of these headers' own (see InputBlock).
struct KeptPosition {
  int64_t q;
};

// The rows of a channels-last image [H * W][stride] (channels [channels, stride) zero) at the
// `count` positions `kept` only, from one image of an NCHW tensor; the other rows are left as
// they were. Plane by plane, so that the reads run through each plane in order and the stores
// land in the same few rows (at keep 0.1, 81% of a plane's 16-position blocks hold a kept
// position: laying out whole blocks transposes nine positions for each kept one).
inline void gather_positions(const float* src, Strides s, int64_t channels, const KeptPosition* kept, int64_t count,
                             int64_t stride, float* image) {
  for (int64_t c = 0; c < channels; ++c) {
    const float* plane = src + c * s.c;
    for (int64_t j = 0; j < count; ++j) image[kept[j].q * stride + c] = plane[kept[j].q * s.position];
  }
  if (stride > channels)
    for (int64_t j = 0; j < count; ++j) zero_floats(image + kept[j].q * stride + channels, stride - channels);
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
          floats_out(out, block + k * 16, residual ? residual + (c0 + k) * s.c + q0 : nullptr, here,
                     relu && residual, true);
        }
      }
    }
  } else {
    for (int64_t q = 0; q < hw; ++q) {
      float* out = dst + q * s.position;
      floats_out(out, image + q * stride, residual ? residual + q * s.position : nullptr, channels,
                 relu && residual, false);
    }
  }
}

// Where a plane's block b of Simd::kLanes output positions (from b * kLanes) finds its kept
// outputs: `kept` has a bit per kept position, `first` is the compact index of the first one.
struct KeptBlock {
  uint32_t kept;
  int64_t first;
};

// The blocks of a plane of hw positions, from the ascending kept `positions`.
inline std::vector<KeptBlock> kept_blocks(const int64_t* positions, int64_t npositions, int64_t hw) {
  std::vector<KeptBlock> blocks((hw + Simd::kLanes - 1) / Simd::kLanes, KeptBlock{0, 0});
  for (int64_t k = npositions - 1; k >= 0; --k) {  // backwards: `first` ends at the lowest index
    KeptBlock& block = blocks[positions[k] / Simd::kLanes];
    block.kept |= 1u << (positions[k] % Simd::kLanes);
    block.first = k;
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
      const float* residual_here = residual ? residual + c * s.c : nullptr;
      for (int64_t q = 0; q < whole; q += Simd::kLanes) {
        const KeptBlock& block = blocks[q / Simd::kLanes];
        V v = block.kept ? Simd::expand(block.kept, plane + block.first) : zero;
        if (residual_here) {
          v = Simd::add(v, Simd::load(residual_here + q));
          if (relu) v = Simd::max(zero, v);
        }
        if (reinterpret_cast<uintptr_t>(out + q) % sizeof(V) == 0) Simd::stream(out + q, v);
        else Simd::store(out + q, v);
      }
      if (whole < hw) {
        const KeptBlock& block = blocks[whole / Simd::kLanes];
        for (int64_t q = whole, k = block.first; q < hw; ++q) {
          float v = (block.kept >> (q - whole) & 1) ? plane[k++] : 0.0f;
          if (residual_here) v = v + residual_here[q];
          out[q] = (residual_here && relu && v < 0.0f) ? 0.0f : v;
        }
      }
    }
  } else {
    for (int64_t q = 0, k = 0; q < hw; ++q) {
      float* out = dst + q * s.position;
      const float* residual_here = residual ? residual + q * s.position : nullptr;
      if (k < npositions && positions[k] == q) {
        const float* row = rows + (k++) * stride;
        floats_out(out, row, residual_here, channels, relu && residual_here, false);
      } else if (residual_here) {
        for (int64_t c = 0; c < channels; ++c) out[c] = (relu && residual_here[c] < 0.0f) ? 0.0f : residual_here[c];
      } else {
        __builtin_memset(out, 0, sizeof(float) * channels);
      }
    }
  }
}
