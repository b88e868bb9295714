// C++ check of the rmask ops through the dispatcher, as a LibTorch user calls them:
// the masked conv equals conv2d * mask, masked outputs are exactly zero, and the backward
// op matches autograd through the reference. Built and run by `make cmake-check` (ctest).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cstdio>

namespace {

int failures = 0;

void expect(bool ok, const char* what) {
  if (!ok) {
    std::fprintf(stderr, "FAILED: %s\n", what);
    ++failures;
  }
}

}  // namespace

int main() {
  at::manual_seed(0);
  const auto opts = at::TensorOptions().dtype(at::kDouble);
  const auto input = at::randn({3, 4, 9, 7}, opts);
  const auto weight = at::randn({6, 4, 3, 3}, opts);
  const auto bias = at::randn({6}, opts);
  // A neuron mask: every channel its own pattern, about half kept.
  const auto mask = at::rand({6, 5, 4}, opts) > 0.5;
  const auto flat = mask.reshape({6, -1});
  const auto counts = flat.sum(1);
  auto offsets = at::zeros({7}, at::kLong);
  offsets.narrow(0, 1, 6).copy_(counts.cumsum(0));
  const auto positions = flat.nonzero().select(1, 1).contiguous();

  const std::vector<int64_t> stride{2, 2}, padding{1, 1}, dilation{1, 1};
  auto forward = c10::Dispatcher::singleton()
                     .findSchemaOrThrow("rmask::masked_conv2d", "")
                     .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                       const at::Tensor&, const at::Tensor&, const at::Tensor&, at::IntArrayRef,
                                       at::IntArrayRef, at::IntArrayRef, int64_t)>();
  const auto y = forward.call(input, weight, bias, mask, offsets, positions, stride, padding, dilation, 1);
  const auto expected = at::conv2d(input, weight, bias, stride, padding, dilation, 1) * mask;
  expect(at::allclose(y, expected, 1e-10, 1e-10), "forward equals conv2d * mask");
  expect(y.masked_select(mask.logical_not().expand_as(y)).eq(0).all().item<bool>(), "masked outputs are zero");

  auto backward = c10::Dispatcher::singleton()
                      .findSchemaOrThrow("rmask::masked_conv2d_backward", "")
                      .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                          const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                          const at::Tensor&, const at::Tensor&, at::IntArrayRef, at::IntArrayRef, at::IntArrayRef,
                          int64_t, std::array<bool, 3>)>();
  const auto grad_y = at::randn(y.sizes(), opts);
  const auto [grad_input, grad_weight, grad_bias] = backward.call(
      grad_y, input, weight, mask, offsets, positions, stride, padding, dilation, 1, {true, true, true});
  const auto masked_grad = grad_y * mask;
  const auto ref = at::convolution_backward(masked_grad, input, weight, at::IntArrayRef{6}, stride, padding, dilation,
                                            false, {0, 0}, 1, {true, true, true});
  expect(at::allclose(grad_input, std::get<0>(ref), 1e-10, 1e-10), "grad_input");
  expect(at::allclose(grad_weight, std::get<1>(ref), 1e-10, 1e-10), "grad_weight");
  expect(at::allclose(grad_bias, std::get<2>(ref), 1e-10, 1e-10), "grad_bias");

  std::printf("%d passed, %d failed\n", 5 - failures, failures);
  return failures == 0 ? 0 : 1;
}
