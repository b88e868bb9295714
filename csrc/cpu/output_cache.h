// Memory for the CPU kernels' large outputs, kept mapped between calls.
//
// A fresh multi-MB tensor from glibc malloc is a fresh mmap (or a heap top that malloc
// trimmed back to the system on the last free), so each of its pages faults in on first
// write: 1-4 ms per 8 MB output on a VM (docs/design.md), as long as the kernel itself.
// Layers call the op on the same shapes step after step, so outputs freed by one step are
// handed to the next, already mapped, as the CUDA caching allocator does on GPUs.
#pragma once

#include "../torch_stable.h"

namespace rmask {
namespace cpu {

// empty(sizes, dtype, cpu, format) from a cache of blocks: blocks of at least 1 MiB are kept
// when their tensor is freed, up to RMASK_CPU_CACHE_MB megabytes in all (default 256; 0 turns
// caching off; over it, the blocks freed longest ago are released), and reused for a request
// of exactly their size. Smaller tensors come from torch's allocator. A cached block reaches
// torch as the storage of a from_blob tensor whose deleter hands it back: such a storage
// cannot grow (resize_ past its size fails), as torch's own from_blob tensors cannot.
Tensor empty_output(IntArrayRef sizes, ScalarType dtype, MemoryFormat format);

// Bytes the cache holds now (free blocks only) and its limit.
int64_t output_cache_bytes();
int64_t output_cache_limit();

}  // namespace cpu
}  // namespace rmask
