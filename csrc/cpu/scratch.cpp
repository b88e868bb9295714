#include "scratch.h"

#include <cstdint>
#include <vector>

namespace rmask {
namespace cpu {

float* thread_scratch(int slot, size_t floats) {
  constexpr size_t kLineFloats = 64 / sizeof(float);
  static thread_local std::vector<float> buffers[6];  // the slots of scratch.h
  auto& buffer = buffers[slot];
  if (buffer.size() < floats + kLineFloats) buffer.resize(floats + kLineFloats);
  const auto address = reinterpret_cast<uintptr_t>(buffer.data());
  return buffer.data() + (64 - address % 64) % 64 / sizeof(float);
}

}  // namespace cpu
}  // namespace rmask
