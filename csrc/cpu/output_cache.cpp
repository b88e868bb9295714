#include "output_cache.h"

#include <algorithm>
#include <cstdlib>
#include <iterator>
#include <list>
#include <mutex>
#include <vector>

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
  RMASK_CHECK(end && *end == '\0' && megabytes >= 0, "RMASK_CPU_CACHE_MB must be a number of megabytes >= 0, got '",
              text, "'");
  return static_cast<size_t>(megabytes) << 20;
}

size_t element_size(ScalarType dtype) {
  switch (dtype) {
    case ScalarType::Double:
    case ScalarType::Long:
      return 8;
    case ScalarType::Float:
    case ScalarType::Int:
      return 4;
    case ScalarType::Half:
    case ScalarType::BFloat16:
      return 2;
    default:
      RMASK_CHECK(false, "rmask output cache: no element size for dtype ", dtype);
      return 0;
  }
}

// The strides of a dense tensor of `sizes` in `format` (c10's contiguous and channels_last
// strides; channels_last only for 4-D).
std::vector<int64_t> dense_strides(IntArrayRef sizes, MemoryFormat format) {
  std::vector<int64_t> strides(sizes.size());
  if (format == MemoryFormat::ChannelsLast && sizes.size() == 4) {
    strides[1] = 1;
    strides[3] = std::max<int64_t>(sizes[1], 1);
    strides[2] = strides[3] * std::max<int64_t>(sizes[3], 1);
    strides[0] = strides[2] * std::max<int64_t>(sizes[2], 1);
    return strides;
  }
  int64_t stride = 1;
  for (size_t d = sizes.size(); d-- > 0;) {
    strides[d] = stride;
    stride *= std::max<int64_t>(sizes[d], 1);
  }
  return strides;
}

class CachingAllocator {
 public:
  // A block of `bytes`: the most recently freed one of that size, else a fresh one.
  void* allocate(size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      for (auto it = free_.rbegin(); it != free_.rend(); ++it) {  // the most recently freed first
        if (it->bytes != bytes) continue;
        void* data = it->data;
        cached_ -= bytes;
        free_.erase(std::next(it).base());
        return data;
      }
    }
    void* data = nullptr;
    RMASK_CHECK(posix_memalign(&data, kAlignment, bytes) == 0, "rmask: out of memory allocating ", bytes, " bytes");
    return data;
  }

  // Takes a block back; over the limit, the blocks freed longest ago go (sizes the current
  // work no longer uses).
  void release(void* data, size_t bytes) {
    std::list<Block> evicted;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      free_.push_back({data, bytes});
      cached_ += bytes;
      while (cached_ > limit_) {
        cached_ -= free_.front().bytes;
        evicted.splice(evicted.end(), free_, free_.begin());
      }
    }
    for (const auto& old : evicted) std::free(old.data);
  }

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

}  // namespace

Tensor empty_output(IntArrayRef sizes, ScalarType dtype, MemoryFormat format) {
  const Device cpu(torch::headeronly::DeviceType::CPU);
  int64_t numel = 1;
  for (const int64_t size : sizes) numel *= size;
  const size_t bytes = static_cast<size_t>(numel) * element_size(dtype);
  auto& cache = allocator();
  if (bytes < kMinCachedBytes || cache.limit() == 0) return empty(sizes, dtype, cpu, format);
  void* data = cache.allocate(bytes);
  const auto strides = dense_strides(sizes, format);
  return torch::stable::from_blob(data, sizes, IntArrayRef(strides), cpu, dtype,
                                  [bytes](void* block) { allocator().release(block, bytes); });
}

int64_t output_cache_bytes() { return allocator().cached(); }
int64_t output_cache_limit() { return allocator().limit(); }

}  // namespace cpu
}  // namespace rmask
