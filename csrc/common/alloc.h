// Large scratch/result buffers on transparent huge pages.
//
// A fresh multi-MiB tensor from at::empty is mmap'ed by the allocator and page-faulted in
// 4 KiB pages on first touch; for the logits that InfoNCE keeps between its forward and
// backward (up to 256 MiB) this fault-in cost is a visible share of the whole loss (measured
// on 2 Zen 4 cores, fp32: a fresh 64 MiB buffer costs ~21 ms to fill instead of ~3 ms for a touched
// one, 256 MiB ~66 ms instead of ~10 ms; with 2 MiB pages ~6 ms and ~19 ms). Most Linux
// systems run transparent huge pages in "madvise" mode, so the buffer has to ask for them:
// it is allocated 2 MiB-aligned and marked MADV_HUGEPAGE. Elsewhere, or when that fails,
// this is plain at::empty.
#pragma once

#include <ATen/ATen.h>

#include <limits>
#include <mutex>

#include <cstdlib>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace mmk {

// In deterministic mode (the test suite's) fresh memory is filled with NaN, as at::empty does
// there: an element a kernel forgets to write reads NaN, not leftover memory.
inline void poison_if_deterministic(at::Tensor& t) {
  auto& ctx = at::globalContext();
  if (ctx.deterministicAlgorithms() && ctx.deterministicFillUninitializedMemory() &&
      at::isFloatingType(t.scalar_type())) {
    t.fill_(std::numeric_limits<double>::quiet_NaN());
  }
}

// A contiguous (rows x cols) tensor of `options` (CPU), uninitialised; on huge pages when it
// is large enough to matter (>= 4 MiB).
inline at::Tensor empty_huge_pages(int64_t rows, int64_t cols, const at::TensorOptions& options) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr size_t kHuge = size_t(2) << 20;
  const size_t bytes = static_cast<size_t>(rows) * static_cast<size_t>(cols) *
                       c10::elementSize(c10::typeMetaToScalarType(options.dtype()));
  if (rows > 0 && cols > 0 && bytes >= 2 * kHuge && options.device().is_cpu()) {
    const size_t size = (bytes + kHuge - 1) / kHuge * kHuge;
    void* p = nullptr;
    if (posix_memalign(&p, kHuge, size) == 0) {
      // Advice only: if the kernel refuses, the buffer still works with 4 KiB pages.
      (void)madvise(p, size, MADV_HUGEPAGE);
      at::Tensor t = at::from_blob(
          p, {rows, cols}, [](void* q) { std::free(q); }, options);
      poison_if_deterministic(t);
      return t;
    }
  }
#endif
  return at::empty({rows, cols}, options);
}

// Like empty_huge_pages, but a large buffer (>= 4 MiB) outlives its tensors: the process holds
// one, and hands it out again to the next call that asks for the same number of bytes once
// nothing else references it. A step of a training loop then reuses the previous step's
// memory instead of faulting in fresh pages: for InfoNCE's kept B x B logits (64 MiB at
// B = 4096, fp32) that was ~20 ms of a ~300 ms fwd+bwd on 2 Zen 4 cores, even on huge pages
// (the kernel zeroes every new page). While the held buffer is in use (a graph kept with
// retain_graph=True, two losses in one graph) the caller gets a fresh buffer that is not held.
// The held buffer stays allocated between calls until release_cached_buffer()
// (mmkernels.empty_cache()) or a call of another size replaces it. The loss's own peak is
// unchanged, but the idle buffer counts toward whatever runs between calls (optimizer step,
// evaluation).
at::Tensor cached_huge_pages(int64_t rows, int64_t cols, const at::TensorOptions& options);

// Frees the held buffer (its memory returns to the system once no tensor uses it).
void release_cached_buffer();

}  // namespace mmk
