// The one buffer held between calls (see cached_huge_pages in alloc.h), and the op that frees
// it: torch.ops.mmkernels.empty_cache, called by mmkernels.empty_cache().
#include "common/alloc.h"

#include <torch/library.h>

namespace mmk {
namespace {

struct Held {
  std::mutex mu;
  at::Tensor buffer;  // undefined when nothing is held
};

// Never destroyed: a tensor freed during static destruction at exit could outlive libtorch.
Held& held() {
  static Held* h = new Held();
  return *h;
}

constexpr size_t kHoldBytes = size_t(4) << 20;

}  // namespace

at::Tensor cached_huge_pages(int64_t rows, int64_t cols, const at::TensorOptions& options) {
  const size_t bytes = static_cast<size_t>(rows) * static_cast<size_t>(cols) *
                       c10::elementSize(c10::typeMetaToScalarType(options.dtype()));
  if (rows <= 0 || cols <= 0 || bytes < kHoldBytes || !options.device().is_cpu()) {
    return empty_huge_pages(rows, cols, options);
  }
  Held& h = held();
  std::lock_guard<std::mutex> lock(h.mu);
  if (h.buffer.defined() && h.buffer.storage().use_count() > 1) {
    // In use by an earlier call's outputs: this call gets its own memory.
    return empty_huge_pages(rows, cols, options);
  }
  if (!h.buffer.defined() || h.buffer.storage().nbytes() != bytes) {
    h.buffer = at::Tensor();  // free the old one first: never two held at once
    h.buffer = empty_huge_pages(1, static_cast<int64_t>(bytes), options.dtype(at::kByte));
  }
  // A new tensor on the held storage (its own TensorImpl: the caller cannot resize ours).
  at::Tensor t = at::empty({0}, options).set_(h.buffer.storage(), 0, {rows, cols}, {cols, 1});
  poison_if_deterministic(t);
  return t;
}

void release_cached_buffer() {
  Held& h = held();
  std::lock_guard<std::mutex> lock(h.mu);
  h.buffer = at::Tensor();
}

}  // namespace mmk

TORCH_LIBRARY_FRAGMENT(mmkernels, m) {
  // Frees the buffer the C++ kernels hold between calls (csrc/common/alloc.h).
  m.def("empty_cache() -> ()", [] { mmk::release_cached_buffer(); });
}
