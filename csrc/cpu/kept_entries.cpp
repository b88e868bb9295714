#include "kept_entries.h"

#include <algorithm>
#include <cstdint>
#include <vector>

#include "batch_vector_driver.h"
#include "output_cache.h"
#include "scratch.h"

namespace rmask {
namespace cpu {
namespace {

// A tensor's kept entries by position and, for NCHW, by channel (KeptEntries, batch_vector.h),
// and what gather_kept and scatter_kept split among threads: channels (NCHW) or positions.
struct EntryLists {
  std::vector<int64_t> channel_offsets, channel_entries;
  KeptEntries kept;
  int64_t units;
  bool nchw;
  int64_t scratch_floats;  // per thread, for gather_kept (scatter_kept adds H * W)

  EntryLists(const BatchVectorGeometry& g, int64_t channels, int64_t positions, const int64_t* offsets,
             const int64_t* listed, bool nchw) {
    int64_t most = 0;
    if (nchw) {
      const int64_t total = offsets[positions];
      channel_offsets.assign(channels + 1, 0);
      for (int64_t e = 0; e < total; ++e) ++channel_offsets[listed[e] + 1];
      for (int64_t c = 0; c < channels; ++c) {
        most = std::max(most, channel_offsets[c + 1]);
        channel_offsets[c + 1] += channel_offsets[c];
      }
      channel_entries.resize(2 * total);
      std::vector<int64_t> cursor(channel_offsets.begin(), channel_offsets.end() - 1);
      for (int64_t q = 0; q < positions; ++q)
        for (int64_t e = offsets[q]; e < offsets[q + 1]; ++e) {
          const int64_t k = cursor[listed[e]]++;
          channel_entries[2 * k] = q;
          channel_entries[2 * k + 1] = e;
        }
    }
    kept = {g.batch,         g.padded_batch,          channels, positions, offsets, listed,
            channel_offsets.data(), channel_entries.data(), most};
    units = nchw ? channels : positions;
    this->nchw = nchw;
    scratch_floats = nchw ? 2 * g.padded_batch * batch_vector_kernels()->padded_channels(most) : 0;
  }
  EntryLists(const EntryLists&) = delete;
  EntryLists& operator=(const EntryLists&) = delete;
};

// values (padded N floats per entry) from x, gated where `gate` is not null, on all threads.
void gather_entries(const EntryLists& lists, const float* x, Strides s, const float* gate, Strides gate_strides,
                    float* values) {
  torch::stable::parallel_for(0, lists.units, 1, [&](int64_t begin, int64_t end) {
    batch_vector_kernels()->gather_kept(lists.kept, x, s, gate, gate_strides, begin, end, values,
                                        lists.scratch_floats ? thread_scratch(1, lists.scratch_floats) : nullptr);
  });
}

// Every element of x from the entries' values (0 elsewhere), on all threads.
void scatter_entries(const EntryLists& lists, const float* values, float* x, Strides s, const float* residual,
                     bool relu) {
  // NCHW: the plane every channel is built in, also where the channels keep nothing.
  const int64_t scratch = lists.nchw ? lists.scratch_floats + lists.kept.positions : 0;
  torch::stable::parallel_for(0, lists.units, 1, [&](int64_t begin, int64_t end) {
    batch_vector_kernels()->scatter_kept(lists.kept, x, s, begin, end, values, residual, relu,
                                         lists.nchw ? thread_scratch(1, scratch) : nullptr);
  });
}

}  // namespace

float* entry_values(const BatchVectorGeometry& g, const InputIndex& inputs) {
  constexpr int64_t kTail = 16;
  const int64_t entries = inputs.offsets[g.height * g.width];
  float* values = thread_scratch(3, (entries + kTail) * g.padded_batch);
  std::fill(values + entries * g.padded_batch, values + (entries + kTail) * g.padded_batch, 0.0f);
  return values;
}

float* gather_kept_values(const BatchVectorGeometry& g, const InputIndex& inputs, const float* x, Strides s) {
  float* values = entry_values(g, inputs);
  const EntryLists lists(g, g.in_channels, g.height * g.width, inputs.offsets, inputs.channels, s.c != 1);
  gather_entries(lists, x, s, nullptr, Strides{0, 0, 0}, values);
  return values;
}

void scatter_kept_values(const BatchVectorGeometry& g, const InputIndex& inputs, float* x, Strides s) {
  const EntryLists lists(g, g.in_channels, g.height * g.width, inputs.offsets, inputs.channels, s.c != 1);
  scatter_entries(lists, inputs.values, x, s, nullptr, false);
}

void scatter_kept_outputs(const BatchVectorGeometry& g, const Tensor& position_offsets,
                          const Tensor& position_channels, const float* values, float* y, Strides s,
                          const float* residual, bool relu) {
  const EntryLists lists(g, g.out_channels, g.out_height * g.out_width, data<int64_t>(position_offsets),
                         data<int64_t>(position_channels), s.c != 1);
  scatter_entries(lists, values, y, s, residual, relu);
}

Tensor kept_gradient_rows(const BatchVectorGeometry& g, const float* gy, Strides gy_strides, const float* gate,
                          Strides gate_strides, const Tensor& position_offsets, const Tensor& position_channels) {
  auto rows = empty_output({position_channels.numel(), g.padded_batch}, ScalarType::Float, MemoryFormat::Contiguous);
  const EntryLists lists(g, g.out_channels, g.out_height * g.out_width, data<int64_t>(position_offsets),
                         data<int64_t>(position_channels), gy_strides.c != 1);
  gather_entries(lists, gy, gy_strides, gate, gate_strides, data<float>(rows));
  return rows;
}

}  // namespace cpu
}  // namespace rmask
