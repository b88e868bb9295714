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
// gather_kept and scatter_kept), 2 the position kernels' images, 5 a thread's own copy of
// packed weights (private_packed_weights); on the calling thread, 3 a call's kept input
// entries (kept_entries.h) and 4 the row forward's kept outputs.
float* thread_scratch(int slot, size_t floats);

// Whether each thread packs its own copy of `floats` packed weights into its scratch rather
// than all threads sharing one: where a copy fits well within a core's L2 (1 MiB), so that it
// stays there between calls. A shared copy's lines move between the cores' caches on every
// call (packed by one core, read by all), which on the AMD EPYC VM measured cost more than
// packing the whole copy again (docs/design.md, section 6); a larger copy would not stay in
// L2 and would cost every thread its memory.
inline bool private_packed_weights(size_t floats) { return floats * sizeof(float) <= (size_t(1) << 20); }

}  // namespace cpu
}  // namespace rmask
