// C++ check of the rmask ops through the dispatcher, as a LibTorch user calls them:
// the masked conv equals conv2d * mask (also with the fused ReLU and residual), masked
// outputs are exactly zero, and the backward op matches autograd through the reference;
// float32 (the batch-vector kernels on AVX2/AVX-512 CPUs) and float64 (the portable
// kernels). Built and run by `make cmake-check` (ctest).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cstdio>

namespace {

int checks = 0, failures = 0;

void expect(bool ok, const char* what, at::ScalarType dtype) {
  ++checks;
  if (!ok) {
    std::fprintf(stderr, "FAILED: %s (%s)\n", what, c10::toString(dtype));
    ++failures;
  }
}

// The kept (position, channel) index lists of a (C, H, W) neuron mask, as rmask_kernels.kept_index builds them.
std::vector<at::Tensor> kept_index(const at::Tensor& mask) {
  const int64_t channels = mask.size(0);
  const auto flat = mask.reshape({channels, -1});
  auto offsets = at::zeros({channels + 1}, at::kLong);
  offsets.narrow(0, 1, channels).copy_(flat.sum(1).cumsum(0));
  const auto positions = flat.nonzero().select(1, 1).contiguous();
  const auto by_position = flat.t();
  auto position_offsets = at::zeros({by_position.size(0) + 1}, at::kLong);
  position_offsets.narrow(0, 1, by_position.size(0)).copy_(by_position.sum(1).cumsum(0));
  const auto position_channels = by_position.nonzero().select(1, 1).contiguous();
  return {offsets, positions, position_offsets, position_channels};
}

void check(at::ScalarType dtype, double tolerance) {
  const auto opts = at::TensorOptions().dtype(dtype);
  const auto input = at::randn({3, 4, 9, 7}, opts);
  const auto weight = at::randn({6, 4, 3, 3}, opts);
  const auto bias = at::randn({6}, opts);
  const auto mask = at::rand({6, 5, 4}) > 0.5;  // a neuron mask, about half kept
  const auto index = kept_index(mask);
  const std::vector<int64_t> stride{2, 2}, padding{1, 1}, dilation{1, 1};

  auto forward = c10::Dispatcher::singleton()
                     .findSchemaOrThrow("rmask::masked_conv2d", "")
                     .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                       const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                       const at::Tensor&, at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, int64_t,
                                       const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                                       const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, bool)>();
  const auto y = forward.call(input, weight, bias, mask, index[0], index[1], index[2], index[3], stride, padding,
                              dilation, 1, std::nullopt, std::nullopt, std::nullopt, std::nullopt, /*relu=*/false);
  const auto expected = at::conv2d(input, weight, bias, stride, padding, dilation, 1) * mask;
  expect(at::allclose(y, expected, tolerance, tolerance), "forward equals conv2d * mask", dtype);
  expect(y.masked_select(mask.logical_not().expand_as(y)).eq(0).all().item<bool>(), "masked outputs are zero", dtype);
  const auto y_relu = forward.call(input, weight, bias, mask, index[0], index[1], index[2], index[3], stride, padding,
                                   dilation, 1, std::nullopt, std::nullopt, std::nullopt, std::nullopt, /*relu=*/true);
  expect(at::allclose(y_relu, at::relu(expected), tolerance, tolerance), "fused relu", dtype);
  const auto residual = at::randn(y.sizes(), opts);
  const auto y_residual = forward.call(input, weight, bias, mask, index[0], index[1], index[2], index[3], stride,
                                       padding, dilation, 1, residual, std::nullopt, std::nullopt, std::nullopt,
                                       /*relu=*/true);
  expect(at::allclose(y_residual, at::relu(expected + residual), tolerance, tolerance), "fused residual and relu",
         dtype);
  // An input mask: the op of input * input_mask (the kernels skip the masked inputs).
  // Its lists: the by-position part of its kept index.
  const auto input_mask = at::rand({4, 9, 7}) > 0.6;
  const auto input_index = kept_index(input_mask);
  const auto y_input_masked =
      forward.call(input, weight, bias, mask, index[0], index[1], index[2], index[3], stride, padding, dilation, 1,
                   std::nullopt, input_mask, input_index[2], input_index[3], /*relu=*/false);
  const auto expected_input_masked = at::conv2d(input * input_mask, weight, bias, stride, padding, dilation, 1) * mask;
  expect(at::allclose(y_input_masked, expected_input_masked, tolerance, tolerance), "input mask", dtype);

  auto backward = c10::Dispatcher::singleton()
                      .findSchemaOrThrow("rmask::masked_conv2d_backward", "")
                      .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                          const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                          const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, at::IntArrayRef,
                          at::IntArrayRef, at::IntArrayRef, int64_t, std::array<bool, 3>,
                          const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                          const std::optional<at::Tensor>&, const std::optional<at::Tensor>&)>();
  const auto grad_y = at::randn(y.sizes(), opts);
  const auto [grad_input, grad_weight, grad_bias] =
      backward.call(grad_y, input, weight, mask, index[0], index[1], index[2], index[3], stride, padding, dilation, 1,
                    {true, true, true}, std::nullopt, std::nullopt, std::nullopt, std::nullopt);
  const auto ref = at::convolution_backward(grad_y * mask, input, weight, at::IntArrayRef{6}, stride, padding,
                                            dilation, false, {0, 0}, 1, {true, true, true});
  expect(at::allclose(grad_input, std::get<0>(ref), tolerance, tolerance), "grad_input", dtype);
  expect(at::allclose(grad_weight, std::get<1>(ref), tolerance, tolerance), "grad_weight", dtype);
  expect(at::allclose(grad_bias, std::get<2>(ref), tolerance, tolerance), "grad_bias", dtype);
  // A fused ReLU's backward: grad_output gated by the forward's output (> 0).
  const auto [gated_input, gated_weight, gated_bias] =
      backward.call(grad_y, input, weight, mask, index[0], index[1], index[2], index[3], stride, padding, dilation, 1,
                    {true, true, true}, y_relu, std::nullopt, std::nullopt, std::nullopt);
  const auto gated_ref = at::convolution_backward(grad_y * mask * y_relu.gt(0), input, weight, at::IntArrayRef{6},
                                                  stride, padding, dilation, false, {0, 0}, 1, {true, true, true});
  expect(at::allclose(gated_input, std::get<0>(gated_ref), tolerance, tolerance), "relu-gated grad_input", dtype);
  expect(at::allclose(gated_weight, std::get<1>(gated_ref), tolerance, tolerance), "relu-gated grad_weight", dtype);
  expect(at::allclose(gated_bias, std::get<2>(gated_ref), tolerance, tolerance), "relu-gated grad_bias", dtype);
  // The input mask's gradients: those of input * input_mask (0 at the masked inputs).
  const auto [masked_input_grad, masked_weight_grad, masked_bias_grad] =
      backward.call(grad_y, input, weight, mask, index[0], index[1], index[2], index[3], stride, padding, dilation, 1,
                    {true, true, true}, std::nullopt, input_mask, input_index[2], input_index[3]);
  const auto masked_ref = at::convolution_backward(grad_y * mask, input * input_mask, weight, at::IntArrayRef{6},
                                                   stride, padding, dilation, false, {0, 0}, 1, {true, true, true});
  expect(at::allclose(masked_input_grad, std::get<0>(masked_ref) * input_mask, tolerance, tolerance),
         "input-masked grad_input", dtype);
  expect(at::allclose(masked_weight_grad, std::get<1>(masked_ref), tolerance, tolerance), "input-masked grad_weight",
         dtype);
}

}  // namespace

int main() {
  at::manual_seed(0);
  check(at::kDouble, 1e-10);
  check(at::kFloat, 1e-4);
  std::printf("%d passed, %d failed\n", checks - failures, failures);
  return failures == 0 ? 0 : 1;
}
