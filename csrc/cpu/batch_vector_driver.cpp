// The batch-vector kernels run on torch tensors (batch_vector_driver.h). Two pairs of kernels:
// the row kernels (forward_rows and its gradients), which serve any mask through the
// position-CSR lists, and the position kernels (forward_positions, backward_positions) for
// spatial masks, which keep every channel at each of their kept positions.

#include "batch_vector_driver.h"

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "kept_entries.h"
#include "output_cache.h"
#include "scratch.h"

namespace rmask {
namespace cpu {
namespace {

BatchVectorGeometry batch_vector_geometry(const ConvGeometry& g) {
  const int64_t padded = (g.batch + kBatchBlock - 1) / kBatchBlock * kBatchBlock;
  return {g.batch,      padded,     g.in_channels, g.height,     g.width,    g.out_channels,
          g.kernel_h,   g.kernel_w, g.out_height,  g.out_width,  g.stride_h, g.stride_w,
          g.pad_h,      g.pad_w,    g.dilation_h,  g.dilation_w};
}

// A 4-D tensor the kernels can address directly: NCHW- or NHWC-contiguous (else a copy).
Tensor addressable(const Tensor& t) {
  if (t.is_contiguous() || is_channels_last_contiguous(t)) return t;
  return rmask::contiguous(t, suggest_memory_format(t));
}

Strides strides_of(const Tensor& t) {
  // Both supported layouts keep (h, w) as one flat position axis; a size-1 dim's stride is arbitrary.
  const int64_t position = t.size(3) > 1 ? t.stride(3) : (t.size(2) > 1 ? t.stride(2) : 1);
  return {t.stride(0), t.stride(1), position};
}

// Output rows split into one chunk per thread (at most one per row): a fixed split, so partial
// results kept per chunk and summed in chunk order are deterministic for a thread count.
int64_t row_chunks(int64_t rows) { return std::max<int64_t>(1, std::min<int64_t>(torch::stable::get_num_threads(), rows)); }

// f(chunk, first_row, last_row) for every non-empty chunk of row_chunks(rows), in parallel.
template <typename F>
void parallel_row_chunks(int64_t rows, const F& f) {
  const int64_t chunks = row_chunks(rows), rows_per_chunk = (rows + chunks - 1) / chunks;
  torch::stable::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      const int64_t first = chunk * rows_per_chunk, last = std::min(rows, first + rows_per_chunk);
      if (first < last) f(chunk, first, last);
    }
  });
}

// Whether the per-image kernels for spatial masks serve this call: one mask pattern shared by
// every channel (the kept index's by-pattern form then lists the kept positions, ascending).
bool spatial_mask(const ConvGeometry& g, const Tensor& kept_positions) {
  return g.patterns == 1 && kept_positions.numel() > 0;
}

// Whether an input mask keeps all channels or none at each position (shape (1, H, W)): the
// position kernels serve it, dropping the taps that read a masked position.
bool spatial_input_mask(const InputMask& input_mask) { return input_mask.defined() && input_mask.mask.size(0) == 1; }

// The kernels' view of an input mask (InputIndex, batch_vector.h): its lists, as given with the
// mask (checked here, where they are read: offsets ascending from 0 to the channel count,
// channels in range and ascending at each position), and, with `positions` (the kept output
// positions of a spatial mask, for a spatial input mask), the position kernels' tap lists.
struct InputLists {
  Tensor offsets, channels;  // contiguous
  std::vector<int64_t> tap_offsets, tap_entries;
  bool partial = false;
  InputIndex index() const {
    return {data<int64_t>(offsets), data<int64_t>(channels), tap_offsets.empty() ? nullptr : tap_offsets.data(),
            tap_entries.data(), partial, nullptr};
  }
};

InputLists input_lists(const ConvGeometry& g, const InputMask& input_mask, const Tensor* positions) {
  InputLists lists;
  lists.offsets = rmask::contiguous(input_mask.offsets);
  lists.channels = rmask::contiguous(input_mask.channels);
  const int64_t hw = g.height * g.width, cin = g.in_channels, total = lists.channels.numel();
  const int64_t* offsets = data<int64_t>(lists.offsets);
  const int64_t* channels = data<int64_t>(lists.channels);
  RMASK_CHECK(offsets[0] == 0 && offsets[hw] == total, "masked_conv2d: input_offsets must run from 0 to the ",
              total, " entries of input_channels, got ", offsets[0], " to ", offsets[hw]);
  for (int64_t q = 0; q < hw; ++q) {
    const int64_t first = offsets[q], count = offsets[q + 1] - first;
    RMASK_CHECK(count >= 0 && count <= cin, "masked_conv2d: input_offsets must ascend by at most ", cin,
                " per position, got ", count, " at position ", q);
    for (int64_t e = first; e < offsets[q + 1]; ++e)
      RMASK_CHECK(channels[e] >= (e > first ? channels[e - 1] + 1 : 0) && channels[e] < cin,
                  "masked_conv2d: input_channels must list ascending channels in [0, ", cin, ") at each position, got ",
                  channels[e], " at position ", q);
    lists.partial = lists.partial || (count > 0 && count < cin);
  }
  if (positions) {
    const int64_t ntaps = g.kernel_h * g.kernel_w, npositions = positions->numel();
    const int64_t* kept_positions = data<int64_t>(*positions);
    lists.tap_offsets.resize(ntaps + 1);
    for (int64_t t = 0; t < ntaps; ++t) {
      lists.tap_offsets[t] = static_cast<int64_t>(lists.tap_entries.size() / 2);
      const int64_t i = t / g.kernel_w, j = t % g.kernel_w;
      for (int64_t k = 0; k < npositions; ++k) {
        const int64_t p = kept_positions[k];
        const int64_t ih = (p / g.out_width) * g.stride_h - g.pad_h + i * g.dilation_h;
        const int64_t iw = (p % g.out_width) * g.stride_w - g.pad_w + j * g.dilation_w;
        if (ih < 0 || ih >= g.height || iw < 0 || iw >= g.width) continue;
        const int64_t q = ih * g.width + iw;
        if (offsets[q + 1] == offsets[q]) continue;  // a masked position
        lists.tap_entries.push_back(k);
        lists.tap_entries.push_back(q);
      }
    }
    lists.tap_offsets[ntaps] = static_cast<int64_t>(lists.tap_entries.size() / 2);
  }
  return lists;
}

// Which kernels serve a call, and its input mask's lists: the position kernels for a spatial
// output mask unless the input mask keeps some channels of a position (then the row kernels).
// Built in place: its index points into its lists.
struct CallInputs {
  bool positions;
  bool masked;  // an input mask was given
  InputLists lists;
  InputIndex lists_index;

  CallInputs(const ConvGeometry& g, const Tensor& kept_positions, const InputMask& input_mask)
      : positions(spatial_mask(g, kept_positions) && (!input_mask.defined() || spatial_input_mask(input_mask))),
        masked(input_mask.defined()),
        lists(masked ? input_lists(g, input_mask, positions ? &kept_positions : nullptr) : InputLists()),
        lists_index(masked ? lists.index() : InputIndex{}) {}
  CallInputs(const CallInputs&) = delete;
  CallInputs& operator=(const CallInputs&) = delete;

  const InputIndex* index() const { return masked ? &lists_index : nullptr; }
};

// The int64 scratch of a row kernel's panel ring (panel_rows, batch_vector.h).
int64_t panel_index_scratch(const ConvGeometry& g) {
  return panel_ring_rows(batch_vector_geometry(g)) * (g.width + 1) + g.width;
}

// The forward for spatial masks (see spatial_mask): BatchVectorKernels::forward_positions,
// an image (with tap lists, a block of images: position_images) per visit, so no layout step
// over the whole batch (the row forward lays out every input row of every image: at keep 0.1
// about half its time). Partial channel sums per chunk of images, added in chunk order.
Tensor full_positions_forward(const ConvGeometry& g, const Tensor& input, const Tensor& weight,
                              const std::optional<Tensor>& bias, const Tensor& positions, bool relu,
                              Tensor* channel_sums, const Tensor& residual, const InputIndex* inputs) {
  const auto vector_geometry = batch_vector_geometry(g);
  const auto* kernels = batch_vector_kernels();
  const auto x = addressable(input);
  const auto x_strides = strides_of(x);
  const int64_t cout_pad = kernels->padded_channels(g.out_channels);
  const int64_t taps = g.kernel_h * g.kernel_w, k_total = g.in_channels * taps;
  // The packed weights [kh][kw][Cin][Cout_pad]: each thread's own copy, packed by that thread
  // into its scratch, where it fits in L2 (every thread reads all of them, and lines another
  // core wrote cost more to read than packing them: docs/design.md, section 6); else one copy
  // packed by all threads.
  const bool own_copies = private_packed_weights(k_total * cout_pad);
  auto packed_weight = own_copies ? Tensor() : empty({g.kernel_h, g.kernel_w, g.in_channels, cout_pad},
                                                     ScalarType::Float, weight.device());
  const auto w = rmask::contiguous(weight);
  const float* w_data = data<float>(w);
  if (!own_copies) {
    const int64_t lanes = kernels->padded_channels(1);
    torch::stable::parallel_for(0, (k_total + lanes - 1) / lanes, 1, [&](int64_t begin, int64_t end) {
      kernels->pack_position_weights(w_data, g.out_channels, g.in_channels, taps, data<float>(packed_weight),
                                     cout_pad, begin * lanes, std::min(k_total, end * lanes));
    });
  }
  const bool has_bias = bias.has_value() && bias->defined();
  std::vector<float> padded_bias(has_bias ? cout_pad : 0, 0.0f);  // ATen's pad is a clone even with no padding: ~15 us
  if (has_bias) {
    const auto b = rmask::contiguous(*bias);
    std::copy_n(data<float>(b), g.out_channels, padded_bias.begin());
  }
  const auto format = suggest_memory_format(input);
  auto y = empty_output({g.batch, g.out_channels, g.out_height, g.out_width}, ScalarType::Float, format);
  const auto residual_as_y = residual.defined() ? rmask::contiguous(residual, format) : Tensor();
  auto partial = channel_sums ? zeros({row_chunks(g.batch), 2, g.out_channels}, ScalarType::Double, input.device())
                              : Tensor();
  const int64_t images = position_images(inputs && inputs->tap_offsets ? inputs->tap_offsets[taps] : -1, taps,
                                         positions.numel(), cout_pad);
  const int64_t scratch_size =
      images * ((x_strides.c == 1 ? 0 : g.height * g.width * g.in_channels) + positions.numel() * cout_pad) +
      positions.numel() * g.out_channels + kBatchBlock;
  // Pointers read before the threads start: no torch call inside the parallel region.
  const float* x_data = data<float>(x);
  const float* shared_weight = own_copies ? nullptr : data<float>(packed_weight);
  const int64_t* positions_data = data<int64_t>(positions);
  const int64_t npositions = positions.numel();
  const float* residual_data = residual_as_y.defined() ? data<float>(residual_as_y) : nullptr;
  float* y_data = data<float>(y);
  const Strides y_strides = strides_of(y);
  double* partial_data = channel_sums ? data<double>(partial) : nullptr;
  parallel_row_chunks(g.batch, [&](int64_t chunk, int64_t first, int64_t last) {
    std::vector<const float*> x_taps(8 * g.kernel_h * g.kernel_w);
    const std::vector<float> zero_channels(g.in_channels, 0.0f);
    const float* packed_weight_data = shared_weight;
    if (own_copies) {
      float* own = thread_scratch(5, k_total * cout_pad);
      kernels->pack_position_weights(w_data, g.out_channels, g.in_channels, taps, own, cout_pad, 0, k_total);
      packed_weight_data = own;
    }
    kernels->forward_positions(vector_geometry, x_data, x_strides, packed_weight_data, cout_pad,
                               has_bias ? padded_bias.data() : nullptr, relu, positions_data, npositions, first,
                               last, residual_data, y_data, y_strides, x_taps.data(), zero_channels.data(),
                               thread_scratch(2, scratch_size),
                               channel_sums ? partial_data + chunk * 2 * g.out_channels : nullptr, inputs);
  });
  if (channel_sums) *channel_sums = rmask::sum(partial, {0});
  return y;
}

// [chunks][Cout][kh * kw][Cpad] partial weight gradients -> [Cout][Cin][kh][kw], summed in
// chunk order (deterministic for a thread count), in one pass.
Tensor sum_weight_partials(const ConvGeometry& g, const Tensor& partial) {
  const int64_t chunks = partial.size(0), cin_pad = partial.size(3), taps = g.kernel_h * g.kernel_w;
  const int64_t cin = g.in_channels, cout = g.out_channels;
  auto grad_weight = empty({cout, cin, g.kernel_h, g.kernel_w}, ScalarType::Float, partial.device());
  const float* sums = data<float>(partial);
  float* out = data<float>(grad_weight);
  torch::stable::parallel_for(0, cout, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> total(taps * cin_pad);  // one output channel's [tap][channel] sums
    for (int64_t co = begin; co < end; ++co) {
      std::fill(total.begin(), total.end(), 0.0f);
      for (int64_t chunk = 0; chunk < chunks; ++chunk) {
        const float* part = sums + (chunk * cout + co) * taps * cin_pad;
        for (int64_t i = 0; i < taps * cin_pad; ++i) total[i] += part[i];
      }
      float* row = out + co * cin * taps;
      for (int64_t ci = 0; ci < cin; ++ci)
        for (int64_t t = 0; t < taps; ++t) row[ci * taps + t] = total[t * cin_pad + ci];
    }
  });
  return grad_weight;
}

// The weight [Cout][Cin][kh][kw] with its taps outside the input channels, zero in the padding
// channels: [kh][kw][Cout][cin_pad] (taps_first: the grad-input kernels') or
// [Cout][kh][kw][cin_pad] (the row forward's). One pass, an output channel's block at a time:
// ATen's copy of the permuted weight walks it element by element, for about a fifth of a
// masked 64->64@32x32 forward.
// pack_taps_outside: output channels [co_begin, co_end) of it, from w (contiguous) to dst;
// weight_taps_outside: all of it, on all threads.
void pack_taps_outside(const ConvGeometry& g, const float* w, bool taps_first, int64_t cin_pad, float* dst,
                       int64_t co_begin, int64_t co_end) {
  const int64_t taps = g.kernel_h * g.kernel_w, cin = g.in_channels, cout = g.out_channels;
  for (int64_t co = co_begin; co < co_end; ++co) {
    const float* block = w + co * cin * taps;
    for (int64_t t = 0; t < taps; ++t) {
      float* row = dst + (taps_first ? t * cout + co : co * taps + t) * cin_pad;
      for (int64_t ci = 0; ci < cin; ++ci) row[ci] = block[ci * taps + t];
      for (int64_t ci = cin; ci < cin_pad; ++ci) row[ci] = 0.0f;
    }
  }
}

Tensor weight_taps_outside(const ConvGeometry& g, const Tensor& weight, bool taps_first, int64_t cin_pad) {
  const auto w = rmask::contiguous(weight);
  auto packed = taps_first ? empty({g.kernel_h, g.kernel_w, g.out_channels, cin_pad}, ScalarType::Float, weight.device())
                           : empty({g.out_channels, g.kernel_h, g.kernel_w, cin_pad}, ScalarType::Float, weight.device());
  const float* src = data<float>(w);
  float* dst = data<float>(packed);
  torch::stable::parallel_for(0, g.out_channels, 1, [&](int64_t begin, int64_t end) {
    pack_taps_outside(g, src, taps_first, cin_pad, dst, begin, end);
  });
  return packed;
}

// The backward for spatial masks (see spatial_mask): BatchVectorKernels::backward_positions,
// one image per visit; partial weight and bias gradients per chunk of images.
std::tuple<Tensor, Tensor, Tensor> full_positions_backward(const ConvGeometry& g, const Tensor& grad_output,
                                                           const Tensor& relu_gate, const Tensor& input,
                                                           const Tensor& weight, const Tensor& positions,
                                                           std::array<bool, 3> output_mask,
                                                           const InputIndex* inputs) {
  const auto [need_input, need_weight, need_bias] = output_mask;
  const auto vector_geometry = batch_vector_geometry(g);
  const auto* kernels = batch_vector_kernels();
  const auto device = input.device();
  const int64_t cin_pad = kernels->padded_channels(g.in_channels), cout_pad = kernels->padded_channels(g.out_channels);
  const int64_t taps = g.kernel_h * g.kernel_w, npositions = positions.numel(), chunks = row_chunks(g.batch);
  const auto gy = addressable(grad_output);
  const auto gate = relu_gate.defined() ? addressable(relu_gate) : Tensor();
  const auto x = need_weight ? addressable(input) : Tensor();
  const auto backward_weight = need_input ? weight_taps_outside(g, weight, true, cin_pad) : Tensor();
  auto grad_input = need_input ? empty_output(input.sizes(), ScalarType::Float, suggest_memory_format(input))
                               : empty({0}, ScalarType::Float, device);
  auto partial_w = need_weight ? zeros({chunks, g.out_channels, taps, cin_pad}, ScalarType::Float, device) : Tensor();
  auto partial_b = need_bias ? zeros({chunks, g.out_channels}, ScalarType::Float, device) : Tensor();
  const int64_t scratch_size = npositions * (cout_pad + g.out_channels + cin_pad) + g.height * g.width * cin_pad +
                               cin_pad + (gate.defined() ? npositions * g.out_channels : 0) +
                               (inputs && inputs->tap_offsets
                                    ? kImageBlock * inputs->tap_offsets[taps] * (cin_pad + g.out_channels)
                                    : 0);
  const auto grad_input_strides = need_input ? strides_of(grad_input) : Strides{0, 0, 0};
  // Pointers read before the threads start: no torch call inside the parallel region.
  const float* gy_data = data<float>(gy);
  const Strides gy_strides = strides_of(gy);
  const float* gate_data = gate.defined() ? data<float>(gate) : nullptr;
  const Strides gate_strides = gate.defined() ? strides_of(gate) : Strides{0, 0, 0};
  const float* x_data = need_weight ? data<float>(x) : nullptr;
  const Strides x_strides = need_weight ? strides_of(x) : Strides{0, 0, 0};
  const float* backward_weight_data = need_input ? data<float>(backward_weight) : nullptr;
  const int64_t* positions_data = data<int64_t>(positions);
  float* grad_input_data = need_input ? data<float>(grad_input) : nullptr;
  float* partial_w_data = need_weight ? data<float>(partial_w) : nullptr;
  float* partial_b_data = need_bias ? data<float>(partial_b) : nullptr;
  parallel_row_chunks(g.batch, [&](int64_t chunk, int64_t first, int64_t last) {
    kernels->backward_positions(vector_geometry, gy_data, gy_strides, gate_data, gate_strides, x_data, x_strides,
                                backward_weight_data, positions_data, npositions, first, last, grad_input_data,
                                grad_input_strides,
                                partial_w_data ? partial_w_data + chunk * g.out_channels * taps * cin_pad : nullptr,
                                partial_b_data ? partial_b_data + chunk * g.out_channels : nullptr,
                                thread_scratch(0, scratch_size), inputs);
  });
  return {grad_input, need_weight ? sum_weight_partials(g, partial_w) : empty({0}, ScalarType::Float, device),
          need_bias ? rmask::sum(partial_b, {0}) : empty({0}, ScalarType::Float, device)};
}

// The vector instruction sets ATen's own CPU kernels use in this process, as
// at::get_cpu_capability() (which the stable ABI does not offer) decides them in ATen's
// compute_cpu_capability: ATEN_CPU_CAPABILITY names the level when set to one of "avx512",
// "avx2", "default" (any other value is ignored), else the CPU decides: AVX-512 with avx512f,
// bw, dq and vl and FMA, else AVX2 with FMA, else none.
enum class CpuCapability { kDefault, kAvx2, kAvx512 };

CpuCapability aten_cpu_capability() {
  if (const char* requested = std::getenv("ATEN_CPU_CAPABILITY")) {
    if (std::strcmp(requested, "avx512") == 0) return CpuCapability::kAvx512;
    if (std::strcmp(requested, "avx2") == 0) return CpuCapability::kAvx2;
    if (std::strcmp(requested, "default") == 0) return CpuCapability::kDefault;
  }
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("fma")) {
    return CpuCapability::kAvx512;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return CpuCapability::kAvx2;
#endif
  return CpuCapability::kDefault;
}

}  // namespace

const BatchVectorKernels* batch_vector_kernels() {
  // Where ATen itself runs no vector kernels (ATEN_CPU_CAPABILITY=default), neither do these.
  static const BatchVectorKernels* kernels = [] {
    const CpuCapability capability = aten_cpu_capability();
    return capability == CpuCapability::kDefault ? nullptr
                                                 : best_batch_vector_kernels(capability == CpuCapability::kAvx512);
  }();
  return kernels;
}

bool use_batch_vector(ScalarType dtype, int64_t groups, int64_t batch, int64_t kernel_h) {
  // Kernel heights above 64 (the kernels' fixed per-row tables) take the portable path.
  return batch_vector_kernels() && dtype == ScalarType::Float && groups == 1 && batch > 0 && kernel_h <= 64;
}

// The row forward's per-channel sums are accumulated per chunk of rows and added up in chunk
// order (deterministic for a given thread count).
Tensor batch_vector_forward(const ConvGeometry& g, const Tensor& input, const Tensor& weight,
                            const std::optional<Tensor>& bias, const Tensor& kept_positions,
                            const Tensor& position_offsets, const Tensor& position_channels, bool relu,
                            Tensor* channel_sums, const Tensor& residual, const InputMask& input_mask) {
  const CallInputs call(g, kept_positions, input_mask);
  const InputIndex* inputs = call.index();
  if (call.positions)
    return full_positions_forward(g, input, weight, bias, kept_positions, relu, channel_sums, residual, inputs);
  const auto vector_geometry = batch_vector_geometry(g);
  const auto x = addressable(input);
  InputIndex gathered;
  if (inputs && inputs->partial) {
    gathered = *inputs;
    gathered.values = gather_kept_values(vector_geometry, *inputs, data<float>(x), strides_of(x));
    inputs = &gathered;
  }
  // The weight [Cout][kh][kw][Cin]: each thread's own copy where it fits in L2, as the position
  // forward's (private_packed_weights).
  const int64_t weight_floats = g.out_channels * g.kernel_h * g.kernel_w * g.in_channels;
  const bool own_copies = private_packed_weights(weight_floats);
  const auto forward_weight = own_copies ? Tensor() : weight_taps_outside(g, weight, false, g.in_channels);
  const auto contiguous_weight = own_copies ? rmask::contiguous(weight) : Tensor();
  const auto b = (bias.has_value() && bias->defined()) ? rmask::contiguous(*bias) : Tensor();
  // Every element is written by the kernel (masked ones as zeros).
  const auto format = suggest_memory_format(input);
  auto y = empty_output({g.batch, g.out_channels, g.out_height, g.out_width}, ScalarType::Float, format);
  const auto residual_as_y = residual.defined() ? rmask::contiguous(residual, format) : Tensor();
  const int64_t slots = panel_ring_rows(vector_geometry);
  auto partial = channel_sums ? zeros({row_chunks(g.out_height), 2, g.out_channels}, ScalarType::Double, input.device())
                              : Tensor();
  // Pointers read before the threads start: no torch call inside the parallel region.
  const float* x_data = data<float>(x);
  const Strides x_strides = strides_of(x);
  const float* shared_weight = own_copies ? nullptr : data<float>(forward_weight);
  const float* w_data = own_copies ? data<float>(contiguous_weight) : nullptr;
  const float* bias_data = b.defined() ? data<float>(b) : nullptr;
  const int64_t* offsets = data<int64_t>(position_offsets);
  const int64_t* channels = data<int64_t>(position_channels);
  const float* residual_data = residual_as_y.defined() ? data<float>(residual_as_y) : nullptr;
  float* y_data = data<float>(y);
  const Strides y_strides = strides_of(y);
  double* partial_data = channel_sums ? data<double>(partial) : nullptr;
  // NCHW: the kept outputs go to rows [e][padded N], and y is written from them plane by plane
  // with the residual and the ReLU (scatter_kept: whole planes, streamed), not row by row (a
  // run of Wout floats per image and channel, each on a page of its own: a TLB miss per run,
  // which at 64->64@32x32 cost more than the convolution).
  const bool nchw_out = y_strides.position == 1;
  const bool residual_after = residual_data && nchw_out;
  float* kept_out_data = nchw_out ? thread_scratch(4, position_channels.numel() * vector_geometry.padded_batch) : nullptr;
  parallel_row_chunks(g.out_height, [&](int64_t chunk, int64_t first, int64_t last) {
    std::vector<int64_t> taps(4 * g.kernel_h * g.kernel_w), panel_rows(panel_index_scratch(g));
    float* panels = thread_scratch(0, slots * g.width * g.in_channels * vector_geometry.padded_batch);
    float* staging = nchw_out ? nullptr : thread_scratch(1, g.batch * (g.out_channels * g.out_width + 16));
    const float* forward_weight_data = shared_weight;
    if (own_copies) {
      float* own = thread_scratch(5, weight_floats);
      pack_taps_outside(g, w_data, false, g.in_channels, own, 0, g.out_channels);
      forward_weight_data = own;
    }
    batch_vector_kernels()->forward_rows(vector_geometry, x_data, x_strides, forward_weight_data, bias_data,
                                         relu && !residual_after, offsets, channels, first, last,
                                         residual_after ? nullptr : residual_data, y_data, y_strides,
                                         taps.data(), panels, panel_rows.data(), staging,
                                         partial_data ? partial_data + chunk * 2 * g.out_channels : nullptr, inputs,
                                         kept_out_data);
  });
  if (nchw_out)
    scatter_kept_outputs(vector_geometry, position_offsets, position_channels, kept_out_data, y_data, y_strides,
                         residual_after ? residual_data : nullptr, relu && residual_after);
  if (channel_sums) *channel_sums = rmask::sum(partial, {0});
  return y;
}

std::tuple<Tensor, Tensor, Tensor> batch_vector_backward(const ConvGeometry& g, const Tensor& grad_output,
                                                         const Tensor& relu_gate, const Tensor& input,
                                                         const Tensor& weight, const Tensor& kept_positions,
                                                         const Tensor& position_offsets,
                                                         const Tensor& position_channels,
                                                         std::array<bool, 3> output_mask, const InputMask& input_mask) {
  const CallInputs call(g, kept_positions, input_mask);
  const InputIndex* inputs = call.index();
  if (call.positions)
    return full_positions_backward(g, grad_output, relu_gate, input, weight, kept_positions, output_mask, inputs);
  const auto [need_input, need_weight, need_bias] = output_mask;
  const auto vector_geometry = batch_vector_geometry(g);
  const auto device = input.device();
  Tensor grad_input = empty({0}, ScalarType::Float, device), grad_weight = empty({0}, ScalarType::Float, device),
         grad_bias = empty({0}, ScalarType::Float, device);
  const auto gy = addressable(grad_output);
  const auto gate = relu_gate.defined() ? addressable(relu_gate) : Tensor();
  const auto rows = kept_gradient_rows(vector_geometry, data<float>(gy), strides_of(gy),
                                       gate.defined() ? data<float>(gate) : nullptr,
                                       gate.defined() ? strides_of(gate) : Strides{0, 0, 0}, position_offsets,
                                       position_channels);
  const float* row_values = data<float>(rows);
  const int64_t* offsets = data<int64_t>(position_offsets);
  const int64_t* channels = data<int64_t>(position_channels);
  if (need_bias) {  // summed in a fixed order: deterministic
    grad_bias = zeros({g.out_channels}, ScalarType::Float, device);
    float* grad_bias_values = data<float>(grad_bias);
    const int64_t padded_batch = vector_geometry.padded_batch;
    for (int64_t e = 0; e < position_channels.numel(); ++e) {
      float total = 0.0f;  // the padding images hold zeros
      for (int64_t n = 0; n < padded_batch; ++n) total += row_values[e * padded_batch + n];
      grad_bias_values[channels[e]] += total;
    }
  }
  if (need_input) {
    const auto backward_weight = weight_taps_outside(g, weight, true, g.in_channels);  // [kh][kw][Cout][Cin]
    const float* backward_weight_data = data<float>(backward_weight);
    grad_input = empty_output(input.sizes(), ScalarType::Float, suggest_memory_format(input));
    const Strides grad_input_strides = strides_of(grad_input);
    float* grad_input_data = data<float>(grad_input);
    // A partial input mask: the kept entries' gradients first, then grad_input from them.
    InputIndex kept_entries;
    const InputIndex* grad_inputs = inputs;
    if (inputs && inputs->partial) {
      kept_entries = *inputs;
      kept_entries.values = entry_values(vector_geometry, *inputs);
      grad_inputs = &kept_entries;
    }
    torch::stable::parallel_for(0, g.height, 1, [&](int64_t begin, int64_t end) {
      std::vector<int64_t> contributions(3 * g.kernel_h * g.kernel_w);
      float* panel = thread_scratch(0, g.width * g.in_channels * vector_geometry.padded_batch);
      batch_vector_kernels()->grad_input_rows(vector_geometry, row_values, backward_weight_data, offsets, channels,
                                              begin, end, grad_input_data, grad_input_strides, contributions.data(),
                                              panel, grad_inputs);
    });
    if (grad_inputs != inputs)
      scatter_kept_values(vector_geometry, kept_entries, grad_input_data, grad_input_strides);
  }
  if (need_weight) {
    // One partial gradient per chunk of output rows, summed in chunk order afterwards, so
    // the result is bit-identical run to run for a given thread count.
    const auto x = addressable(input);
    const float* x_data = data<float>(x);
    const Strides x_strides = strides_of(x);
    const int64_t cin_pad = batch_vector_kernels()->padded_channels(g.in_channels), taps = g.kernel_h * g.kernel_w;
    auto partial = zeros({row_chunks(g.out_height), g.out_channels, taps, cin_pad}, ScalarType::Float, device);
    float* partial_data = data<float>(partial);
    const int64_t slots = panel_ring_rows(vector_geometry);
    InputIndex gathered;  // a partial input mask: its kept values gathered once
    const InputIndex* weight_inputs = inputs;
    if (inputs && inputs->partial) {
      gathered = *inputs;
      gathered.values = gather_kept_values(vector_geometry, *inputs, x_data, x_strides);
      weight_inputs = &gathered;
    }
    parallel_row_chunks(g.out_height, [&](int64_t chunk, int64_t first, int64_t last) {
      float* panels = thread_scratch(0, slots * g.width * g.batch * cin_pad + 16 * cin_pad);
      std::vector<int64_t> panel_rows(panel_index_scratch(g));
      batch_vector_kernels()->grad_weight_rows(vector_geometry, row_values, x_data, x_strides, offsets, channels,
                                               first, last, partial_data + chunk * g.out_channels * taps * cin_pad,
                                               panels, panel_rows.data(), weight_inputs);
    });
    grad_weight = sum_weight_partials(g, partial);
  }
  return {grad_input, grad_weight, grad_bias};
}

}  // namespace cpu
}  // namespace rmask
