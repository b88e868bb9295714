// Per-thread scratch of the batch-vector kernels, kept between calls.
#pragma once

#include <cstddef>

namespace rmask {
namespace cpu {

// Per-thread scratch that outlives the call: the panels are hundreds of KiB, and a fresh
// allocation of that size is a fresh mmap whose pages fault in on every call. Aligned to a
// cache line: malloc's large blocks start 16 bytes into one, where every 64-byte vector load
// would straddle two lines.
// Slots: 0 and 1 the panels and staging of a row or position kernel (1 also the scratch of
// gather_kept and scatter_kept), 2 the position kernels' images; on the calling thread, 3 a
// call's kept input entries (kept_entries.h) and 4 the row forward's kept outputs.
float* thread_scratch(int slot, size_t floats);

}  // namespace cpu
}  // namespace rmask
