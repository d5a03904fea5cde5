// The counter-based dropout hash of mmkernels/_rng.py (dropout_uniform), shared by every op
// family: element (row, column) is kept iff u = (h >> 8) 2^-24 >= p, with
//
//   h = fmix32(fmix32(fmix32(column ^ seed_hi) ^ row) + seed_lo)      (uint32 arithmetic)
//
// What a row and a column are is each op's business (attention: the query row's flat lse
// index and the key; LoRA: the flattened x row and the input feature). The innermost fmix32
// depends on the column only, so callers tabulate it once per call (column_hashes); an
// element then costs two fmix32. u >= p is compared exactly in integers: u is a multiple of
// 2^-24, so u >= p iff (h >> 8) >= ceil(p 2^24). Rows are taken mod 2^32 (the reference's
// uint32 arithmetic; any real row count is far below 2^32).
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <vector>

#include "common/math.h"

namespace mmk {

// MurmurHash3's 32-bit finalizer.
MMK_INLINE uint32_t fmix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x85EBCA6Bu;
  x ^= x >> 13;
  x *= 0xC2B2AE35u;
  x ^= x >> 16;
  return x;
}

// Whether element (row, column) is kept, given column_hash = fmix32(column ^ seed_hi).
MMK_INLINE bool dropout_keep(uint32_t column_hash, uint32_t row, uint32_t seed_lo,
                             uint32_t threshold) {
  return (fmix32(fmix32(column_hash ^ row) + seed_lo) >> 8) >= threshold;
}

// A call's dropout parameters, read from (dropout_p, seed) as every op takes them.
struct DropoutSeed {
  bool on = false;
  uint32_t seed_lo = 0, seed_hi = 0, threshold = 0;
  double keep_scale = 1.0;  // 1 / (1 - p)

  // fmix32(j ^ seed_hi) for j = 0..n-1.
  std::vector<uint32_t> column_hashes(int64_t n) const {
    std::vector<uint32_t> h(static_cast<size_t>(n));
    for (int64_t j = 0; j < n; ++j) h[j] = fmix32(static_cast<uint32_t>(j) ^ seed_hi);
    return h;
  }
};

// Checks dropout_p (in [0, 1)) and, when it is > 0, the seed (an int64 CPU tensor with one
// element, required then; ignored when dropout_p == 0).
inline DropoutSeed dropout_seed_arg(double dropout_p, const std::optional<at::Tensor>& seed,
                                    const char* fn) {
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, fn, ": dropout_p must be in [0, 1), got ",
              dropout_p);
  DropoutSeed d;
  if (dropout_p > 0.0) {
    TORCH_CHECK(seed.has_value() && seed->defined(), fn,
                ": seed (an int64 tensor with one element) is required when dropout_p > 0");
    const at::Tensor& sd = *seed;
    TORCH_CHECK(sd.device().is_cpu(), fn, ": seed must be a CPU tensor, got ", sd.device());
    TORCH_CHECK(sd.scalar_type() == at::kLong && sd.numel() == 1, fn,
                ": seed must be an int64 tensor with one element, got ", sd.scalar_type(),
                " of shape ", sd.sizes());
    const uint64_t s = static_cast<uint64_t>(sd.item<int64_t>());
    d.on = true;
    d.seed_lo = static_cast<uint32_t>(s & 0xFFFFFFFFu);
    d.seed_hi = static_cast<uint32_t>(s >> 32);
    d.threshold = static_cast<uint32_t>(std::ceil(dropout_p * 16777216.0));
    d.keep_scale = 1.0 / (1.0 - dropout_p);
  }
  return d;
}

}  // namespace mmk
