// The LoRA kernels' elementwise tile loops (declared in lora.h): the dropout mask applied to x
// rows, and the masked accumulation of the backward's (du A) o D.
#include "lora/lora.h"

namespace mmk {
namespace lora {
namespace {

template <typename T>
MMK_INLINE void dropout_rows_impl(const T* x, int64_t ldx, int64_t rows, int64_t cols,
                                  const int64_t* order, int64_t p0, TileDropout dr, T keep_scale,
                                  T* xd, T* factors) {
  const uint32_t* ch = dr.column_hash;
  const uint32_t seed_lo = dr.seed_lo, threshold = dr.threshold;
  for (int64_t i = 0; i < rows; ++i) {
    // The hash's row is the ORIGINAL flattened row index (mod 2^32, as in the reference).
    const uint32_t row = static_cast<uint32_t>(order != nullptr ? order[p0 + i] : p0 + i);
    const T* xr = x + i * ldx;
    T* o = xd + i * cols;
    if (factors != nullptr) {
      T* f = factors + i * cols;
#pragma omp simd
      for (int64_t j = 0; j < cols; ++j) {
        const T d = dropout_keep(ch[j], row, seed_lo, threshold) ? keep_scale : T(0);
        f[j] = d;
        o[j] = xr[j] * d;
      }
    } else {
#pragma omp simd
      for (int64_t j = 0; j < cols; ++j) {
        const T d = dropout_keep(ch[j], row, seed_lo, threshold) ? keep_scale : T(0);
        o[j] = xr[j] * d;
      }
    }
  }
}

template <typename T>
MMK_INLINE void add_product_impl(const T* src, const T* factors, int64_t rows, int64_t cols,
                                 T* dst, int64_t ld) {
  for (int64_t i = 0; i < rows; ++i) {
    const T* s = src + i * cols;
    const T* f = factors + i * cols;
    T* d = dst + i * ld;
#pragma omp simd
    for (int64_t j = 0; j < cols; ++j) d[j] += s[j] * f[j];
  }
}

}  // namespace

MMK_MULTIVERSION void dropout_rows(const float* x, int64_t ldx, int64_t rows, int64_t cols,
                                   const int64_t* order, int64_t p0, TileDropout dr,
                                   float keep_scale, float* xd, float* factors) {
  dropout_rows_impl<float>(x, ldx, rows, cols, order, p0, dr, keep_scale, xd, factors);
}

void dropout_rows(const double* x, int64_t ldx, int64_t rows, int64_t cols, const int64_t* order,
                  int64_t p0, TileDropout dr, double keep_scale, double* xd, double* factors) {
  dropout_rows_impl<double>(x, ldx, rows, cols, order, p0, dr, keep_scale, xd, factors);
}

MMK_MULTIVERSION void add_product(const float* src, const float* factors, int64_t rows,
                                  int64_t cols, float* dst, int64_t ld) {
  add_product_impl<float>(src, factors, rows, cols, dst, ld);
}

void add_product(const double* src, const double* factors, int64_t rows, int64_t cols,
                 double* dst, int64_t ld) {
  add_product_impl<double>(src, factors, rows, cols, dst, ld);
}

}  // namespace lora
}  // namespace mmk
