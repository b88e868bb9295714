// The kept entries of a tensor (part of batch_vector_impl.h, included by it into each
// instruction set's translation unit): gather_kept and scatter_kept move the values of a
// KeptEntries list (batch_vector.h) between an [N][C][H * W] tensor, NCHW or NHWC, and rows
// [entry][padded N], one float per image, as the row kernels read and write them.

// values[e * padded + n] = x[n, c, q] (0 where `gate`, if given, is not > 0, and in the padding
// images) for the entries e = (q, c) of units [begin, end): channels of an NCHW x, positions of
// an NHWC one. NCHW: each image's plane gives the channel's kept values into a row [n][k] of
// scratch, register transposes turn the block to [k][n], and each row is copied to its entry:
// the scalar stores go to consecutive floats (stored straight to their entries they would land
// a line apart, and those stores, not the reads, bound the gather; docs/design.md, section 6).
inline void gather_kept(const KeptEntries& kept, const float* x, Strides s, const float* gate, Strides gate_strides,
                        int64_t begin, int64_t end, float* values, float* scratch) {
  constexpr int64_t L = Simd::kLanes;
  const int64_t batch = kept.batch, padded = kept.padded_batch;
  if (s.c == 1) {  // NHWC: each position's channels are together
    for (int64_t q = begin; q < end; ++q) {
      const int64_t first = kept.offsets[q], count = kept.offsets[q + 1] - first;
      float* dst = values + first * padded;
      zero_floats(dst, count * padded);
      for (int64_t n = 0; n < batch; ++n) {
        const float* src = x + n * s.n + q * s.position;
        const float* on = gate ? gate + n * gate_strides.n + q * gate_strides.position : nullptr;
        for (int64_t j = 0; j < count; ++j) {
          const int64_t c = kept.channels[first + j];
          dst[j * padded + n] = !on || on[c * gate_strides.c] > 0.0f ? src[c] : 0.0f;
        }
      }
    }
    return;
  }
  const int64_t stride = padded_channels(kept.most_of_a_channel);  // floats per image row of the scratch
  float* rows = scratch;                                             // [padded N][stride]
  float* columns = scratch + padded * stride;                        // [stride][padded N]
  for (int64_t n = batch; n < padded; ++n) zero_floats(rows + n * stride, stride);
  for (int64_t c = begin; c < end; ++c) {
    const int64_t* entries = kept.channel_entries + 2 * kept.channel_offsets[c];
    const int64_t count = kept.channel_offsets[c + 1] - kept.channel_offsets[c];
    if (count == 0) continue;
    for (int64_t n = 0; n < batch; ++n) {
      const float* plane = x + n * s.n + c * s.c;
      float* row = rows + n * stride;
      if (gate) {
        const float* on = gate + n * gate_strides.n + c * gate_strides.c;
        for (int64_t k = 0; k < count; ++k)
          row[k] = on[entries[2 * k] * gate_strides.position] > 0.0f ? plane[entries[2 * k] * s.position] : 0.0f;
      } else {
        for (int64_t k = 0; k < count; ++k) row[k] = plane[entries[2 * k] * s.position];
      }
    }
    for (int64_t k0 = 0; k0 < count; k0 += L)
      for (int64_t n0 = 0; n0 < padded; n0 += L)
        Simd::transpose(rows + n0 * stride + k0, stride, columns + k0 * padded + n0, padded);
    for (int64_t k = 0; k < count; ++k) copy_floats(values + entries[2 * k + 1] * padded, columns + k * padded, padded);
  }
}

// The inverse of gather_kept, ungated: every element of x for units [begin, end),
// values[e * padded + n] at the entries e = (q, c), 0 elsewhere; with `residual` (laid out as
// x), plus the residual and then the ReLU if `relu` (without one, the ReLU alone). NCHW: per
// channel, its entries' rows copied into [k][n] scratch and transposed to [n][k]; each image's
// plane is built in scratch (zeros, then the channel's kept values) and streamed out whole,
// the residual added on the way.
inline void scatter_kept(const KeptEntries& kept, float* x, Strides s, int64_t begin, int64_t end,
                         const float* values, const float* residual, bool relu, float* scratch) {
  constexpr int64_t L = Simd::kLanes;
  const int64_t batch = kept.batch, padded = kept.padded_batch;
  if (s.c == 1) {  // NHWC: each position's channels are together
    for (int64_t q = begin; q < end; ++q) {
      const int64_t first = kept.offsets[q], count = kept.offsets[q + 1] - first;
      for (int64_t n = 0; n < batch; ++n) {
        const int64_t at = n * s.n + q * s.position;
        float* dst = x + at;
        if (residual) copy_floats(dst, residual + at, kept.channel_count);
        else zero_floats(dst, kept.channel_count);
        for (int64_t j = 0; j < count; ++j) dst[kept.channels[first + j]] += values[(first + j) * padded + n];
        if (relu)
          for (int64_t c = 0; c < kept.channel_count; ++c) dst[c] = dst[c] < 0.0f ? 0.0f : dst[c];
      }
    }
    return;
  }
  const int64_t stride = padded_channels(kept.most_of_a_channel), hw = kept.positions;
  float* rows = scratch;                       // [padded N][stride]
  float* columns = scratch + padded * stride;  // [stride][padded N]
  float* plane = columns + stride * padded;    // [H * W]
  for (int64_t c = begin; c < end; ++c) {
    const int64_t* entries = kept.channel_entries + 2 * kept.channel_offsets[c];
    const int64_t count = kept.channel_offsets[c + 1] - kept.channel_offsets[c];
    for (int64_t k = 0; k < count; ++k) copy_floats(columns + k * padded, values + entries[2 * k + 1] * padded, padded);
    for (int64_t k0 = 0; k0 < count; k0 += L)
      for (int64_t n0 = 0; n0 < padded; n0 += L)
        Simd::transpose(columns + k0 * padded + n0, padded, rows + n0 * stride + k0, stride);
    for (int64_t n = 0; n < batch; ++n) {
      zero_floats(plane, hw);
      const float* row = rows + n * stride;
      for (int64_t k = 0; k < count; ++k) plane[entries[2 * k]] = row[k];
      const int64_t at = n * s.n + c * s.c;
      floats_out(x + at, plane, residual ? residual + at : nullptr, hw, relu, true);
    }
  }
  _mm_sfence();  // the streaming stores are visible before the caller reads x
}
