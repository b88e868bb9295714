// Everything the extension takes from torch, through LibTorch's stable ABI only: the stable C
// shim (torch/csrc/stable) and the header-only parts (torch/headeronly). The build sets
// TORCH_TARGET_VERSION (setup.py, CMakeLists.txt), which makes every other torch header an
// error, so one build loads in every torch from that release on (docs/design.md, section 8).
//
// The kernels see torch only through the names below: the tensor type, dtypes, memory formats,
// argument checks, and the few ATen ops they call, each through the stable dispatcher.
#pragma once

#include <torch/csrc/stable/device.h>
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/MemoryFormat.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/macros/Macros.h>
#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Half.h>
#include <torch/headeronly/util/HeaderOnlyArrayRef.h>

#include <array>
#include <cstdint>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace rmask {

using Tensor = torch::stable::Tensor;
using Device = torch::stable::Device;
using ScalarType = torch::headeronly::ScalarType;
using MemoryFormat = torch::headeronly::MemoryFormat;
using IntArrayRef = torch::headeronly::IntHeaderOnlyArrayRef;
using Half = torch::headeronly::Half;
using BFloat16 = torch::headeronly::BFloat16;

// ---- Errors --------------------------------------------------------------------------------

namespace detail {
template <typename... Args>
[[noreturn]] __attribute__((noinline, cold)) void fail(const Args&... args) {
  std::ostringstream message;
  (message << ... << args);
  throw std::runtime_error(message.str());
}
}  // namespace detail

// Throws std::runtime_error (RuntimeError in Python) with the arguments streamed into one
// message, as TORCH_CHECK does: the message only, no file or function name prepended.
#define RMASK_CHECK(cond, ...)                                  \
  do {                                                          \
    if (__builtin_expect(!static_cast<bool>(cond), 0)) {        \
      ::rmask::detail::fail(__VA_ARGS__);                       \
    }                                                           \
  } while (0)

// "[2, 3, 4]", as torch prints sizes.
inline std::string describe(IntArrayRef values) {
  std::ostringstream out;
  out << '[';
  for (size_t i = 0; i < values.size(); ++i) out << (i ? ", " : "") << values[i];
  out << ']';
  return out.str();
}

// "cpu", "cuda:0", as torch prints devices.
inline std::string describe(const Device& device) {
  std::string name = device.is_cpu() ? "cpu" : device.is_cuda() ? "cuda" : "device";
  if (!device.is_cpu() && device.has_index()) name += ":" + std::to_string(device.index());
  return name;
}

// ---- Dtypes --------------------------------------------------------------------------------

inline bool is_floating(ScalarType t) {
  return t == ScalarType::Float || t == ScalarType::Double || t == ScalarType::Half || t == ScalarType::BFloat16;
}

// The type arithmetic on scalar_t accumulates in: float for the 16-bit floats, else scalar_t
// (ATen's opmath_type).
template <typename T>
struct OpMath {
  using type = T;
};
template <>
struct OpMath<Half> {
  using type = float;
};
template <>
struct OpMath<BFloat16> {
  using type = float;
};
template <typename T>
using opmath_t = typename OpMath<T>::type;

template <typename T>
constexpr ScalarType scalar_type_of() {
  return torch::headeronly::CppTypeToScalarType<T>::value;
}

// Runs the lambda in __VA_ARGS__ with `scalar_t` set to the C++ type of TYPE (float, double,
// Half, BFloat16), as AT_DISPATCH_FLOATING_TYPES_AND2(kHalf, kBFloat16, ...) does.
#define RMASK_DISPATCH_FLOATING_TYPES(TYPE, NAME, ...)                                 \
  [&] {                                                                                \
    const ::rmask::ScalarType rmask_dispatch_type = (TYPE);                            \
    switch (rmask_dispatch_type) {                                                     \
      case ::rmask::ScalarType::Double: {                                              \
        using scalar_t = double;                                                       \
        return __VA_ARGS__();                                                          \
      }                                                                                \
      case ::rmask::ScalarType::Float: {                                               \
        using scalar_t = float;                                                        \
        return __VA_ARGS__();                                                          \
      }                                                                                \
      case ::rmask::ScalarType::Half: {                                                \
        using scalar_t = ::rmask::Half;                                                \
        return __VA_ARGS__();                                                          \
      }                                                                                \
      case ::rmask::ScalarType::BFloat16: {                                            \
        using scalar_t = ::rmask::BFloat16;                                            \
        return __VA_ARGS__();                                                          \
      }                                                                                \
      default:                                                                         \
        ::rmask::detail::fail(NAME, ": unsupported dtype ", rmask_dispatch_type);      \
    }                                                                                  \
  }()

// ---- Data and layout -----------------------------------------------------------------------

template <typename T>
inline T* data(const Tensor& t) {
  return static_cast<T*>(t.data_ptr());
}

// Whether the 4-D `t` is laid out NHWC-contiguous (c10's compute_channels_last_contiguous_2d).
inline bool is_channels_last_contiguous(const Tensor& t) {
  if (t.dim() != 4) return false;
  const auto sizes = t.sizes();
  const auto strides = t.strides();
  int64_t expected = 1;
  for (const int d : {1, 3, 2, 0}) {
    if (sizes[d] != 1) {
      if (strides[d] != expected) return false;
      expected *= sizes[d];
    }
  }
  return true;
}

inline bool is_contiguous(const Tensor& t, MemoryFormat format) {
  return format == MemoryFormat::ChannelsLast ? is_channels_last_contiguous(t) : t.is_contiguous();
}

// The memory format torch's Tensor::suggest_memory_format() returns for a strided tensor:
// ChannelsLast where the 4-D strides order like NHWC (c10's is_channels_last_strides_2d_s4,
// with its tie-breaks towards NCHW), else Contiguous.
inline MemoryFormat suggest_memory_format(const Tensor& t) {
  if (t.dim() != 4) return MemoryFormat::Contiguous;
  const auto sizes = t.sizes();
  const auto strides = t.strides();
  if (strides[1] == 0) return MemoryFormat::Contiguous;
  int64_t min = 0;
  for (const int d : {1, 3, 2, 0}) {
    if (sizes[d] == 0 || strides[d] < min) return MemoryFormat::Contiguous;
    if (d == 0 && min == strides[1]) return MemoryFormat::Contiguous;
    min = strides[d];
    if (sizes[d] > 1) min *= sizes[d];
  }
  return MemoryFormat::ChannelsLast;
}

// ---- ATen ops, through the stable ABI ----------------------------------------------------------
// Call these qualified, `rmask::view(...)`: argument-dependent lookup on a torch::stable::Tensor
// also finds torch::stable's functions of the same names, and an unqualified call is ambiguous.

namespace detail {
// Calls the ATen op name.overload with `args` (every argument of its schema, defaults
// included) and returns its first output.
template <typename... Args>
Tensor call_op(const char* name, const char* overload, const Args&... args) {
  std::array<StableIValue, sizeof...(Args)> stack{torch::stable::detail::from(args)...};
  STABLE_TORCH_ERROR_CODE_CHECK(torch_call_dispatcher(name, overload, stack.data(), TORCH_ABI_VERSION));
  return torch::stable::detail::to<Tensor>(stack[0]);
}
}  // namespace detail

// torch.empty(sizes, dtype=, device=, memory_format=).
inline Tensor empty(IntArrayRef sizes, ScalarType dtype, const Device& device,
                    MemoryFormat format = MemoryFormat::Contiguous) {
  return torch::stable::empty(sizes, dtype, std::nullopt, device, std::nullopt, format);
}

inline Tensor zeros(IntArrayRef sizes, ScalarType dtype, const Device& device) {
  Tensor t = empty(sizes, dtype, device);
  torch::stable::zero_(t);
  return t;
}

// t.to(dtype, memory_format=format): `t` itself when nothing changes.
inline Tensor to(const Tensor& t, ScalarType dtype, std::optional<MemoryFormat> format = std::nullopt) {
  return torch::stable::to(t, dtype, std::nullopt, std::nullopt, std::nullopt, false, false, format);
}

// `t` itself when it already is contiguous in `format` (as ATen's contiguous), without the
// round trip through the dispatcher.
inline Tensor contiguous(const Tensor& t, MemoryFormat format = MemoryFormat::Contiguous) {
  return is_contiguous(t, format) ? t : torch::stable::contiguous(t, format);
}

inline Tensor permute(const Tensor& t, std::vector<int64_t> dims) {
  return detail::call_op("aten::permute", "", t, dims);
}

inline Tensor view(const Tensor& t, std::vector<int64_t> sizes) { return torch::stable::view(t, sizes); }
inline Tensor reshape(const Tensor& t, std::vector<int64_t> sizes) { return torch::stable::reshape(t, sizes); }

inline Tensor narrow(const Tensor& t, int64_t dim, int64_t start, int64_t length) {
  Tensor self = t;
  return torch::stable::narrow(self, dim, start, length);
}

// t.sum(dims) in dtype (default: t's).
inline Tensor sum(const Tensor& t, std::vector<int64_t> dims, std::optional<ScalarType> dtype = std::nullopt) {
  return torch::stable::sum(t, IntArrayRef(dims), /*keepdim=*/false, dtype);
}

inline Tensor mul(const Tensor& a, const Tensor& b) { return detail::call_op("aten::mul", "Tensor", a, b); }
// a *= b, in place (a keeps its memory format).
inline Tensor mul_(const Tensor& a, const Tensor& b) { return detail::call_op("aten::mul_", "Tensor", a, b); }

inline Tensor mm(const Tensor& a, const Tensor& b) { return detail::call_op("aten::mm", "", a, b); }

// out = a @ b, into `out` (its size already right).
inline void mm_out(const Tensor& out, const Tensor& a, const Tensor& b) {
  detail::call_op("aten::mm", "out", a, b, out);
}

}  // namespace rmask
