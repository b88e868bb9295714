#include "output_cache.h"

#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>

#include <cstdlib>
#include <cstring>
#include <list>
#include <mutex>

namespace rmask {
namespace cpu {
namespace {

constexpr size_t kMinCachedBytes = size_t(1) << 20;
constexpr size_t kAlignment = 64;  // as c10's CPU allocator

size_t limit_from_environment() {
  const char* text = std::getenv("RMASK_CPU_CACHE_MB");
  if (!text || !*text) return size_t(256) << 20;
  char* end = nullptr;
  const long long megabytes = std::strtoll(text, &end, 10);
  TORCH_CHECK(end && *end == '\0' && megabytes >= 0, "RMASK_CPU_CACHE_MB must be a number of megabytes >= 0, got '",
              text, "'");
  return static_cast<size_t>(megabytes) << 20;
}

class CachingAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t bytes) override {
    if (bytes < kMinCachedBytes || limit_ == 0) return c10::GetCPUAllocator()->allocate(bytes);
    void* data = nullptr;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      for (auto it = free_.rbegin(); it != free_.rend(); ++it) {  // the most recently freed first
        if (it->bytes != bytes) continue;
        data = it->data;
        cached_ -= bytes;
        free_.erase(std::next(it).base());
        break;
      }
    }
    if (!data) {
      TORCH_CHECK(posix_memalign(&data, kAlignment, bytes) == 0, "rmask: out of memory allocating ", bytes, " bytes");
    }
    return {data, new Block{data, bytes}, &release, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override { std::memcpy(dest, src, count); }

  int64_t cached() {
    std::lock_guard<std::mutex> lock(mutex_);
    return static_cast<int64_t>(cached_);
  }
  int64_t limit() const { return static_cast<int64_t>(limit_); }

 private:
  struct Block {
    void* data;
    size_t bytes;
  };

  static void release(void* context);

  std::mutex mutex_;
  std::list<Block> free_;  // in the order they were freed: the oldest go first when over the limit
  size_t cached_ = 0;
  const size_t limit_ = limit_from_environment();
};

// Never destroyed: tensors may outlive static destruction at exit.
CachingAllocator& allocator() {
  static auto* instance = new CachingAllocator();
  return *instance;
}

void CachingAllocator::release(void* context) {
  auto* block = static_cast<Block*>(context);
  auto& self = allocator();
  std::list<Block> evicted;
  {
    std::lock_guard<std::mutex> lock(self.mutex_);
    self.free_.push_back(*block);
    self.cached_ += block->bytes;
    // Over the limit, the blocks freed longest ago go (sizes the current work no longer uses).
    while (self.cached_ > self.limit_) {
      self.cached_ -= self.free_.front().bytes;
      evicted.splice(evicted.end(), self.free_, self.free_.begin());
    }
  }
  for (const auto& old : evicted) std::free(old.data);
  delete block;
}

}  // namespace

at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options, at::MemoryFormat memory_format) {
  if (options.device().type() != c10::DeviceType::CPU)
    return at::empty(sizes, options.memory_format(memory_format));
  return at::detail::empty_generic(sizes, &allocator(), c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   c10::typeMetaToScalarType(options.dtype()), memory_format);
}

int64_t output_cache_bytes() { return allocator().cached(); }
int64_t output_cache_limit() { return allocator().limit(); }

}  // namespace cpu
}  // namespace rmask
